"""Feature-stage peers inside a ViT tower (CLIP, SigLIP, DINOv2): run it unmerged, then
reduce to exactly K tokens.

The tower runs the adapter's plan with zero merges (the original layers, bit for bit) up to
the feature layer.  Methods that read attention get the feature layer's CLS attention row
and head-averaged keys from forward hooks on that layer's ``q_proj``/``k_proj`` (the
projections the layer computes anyway; the hooks live only for this call); towers without
CLS refuse them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..merge import exact_dtypes
from . import get_method
from .reduction import FeatureInputs, check_reduction

__all__ = ["reduce_after_encoder"]


def reduce_after_encoder(
    encode: Callable[[Tensor, Any], Tensor],
    attention: nn.Module,
    hidden: Tensor,
    plan: Any,
    grid: tuple[int, int],
    has_cls: bool,
    keep_cls: bool,
    k: int,
    method: str,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``(features [I, K, C], assignment [I, N])`` for embedded images ``hidden`` [I, T, C].

    ``encode(hidden, plan)`` runs the tower's layers unmerged; ``attention`` is the feature
    layer's self-attention module (hooked for the methods that read attention).  ``has_cls``:
    index 0 is a class token (the features are the tokens after it); ``keep_cls``: the select
    strategy keeps it (``"full"``), it then stays first and counts as one of the K tokens.
    ``assignment`` maps each patch to its output token (-1 dropped), counted among the patch
    tokens.
    """
    spec = get_method(method)
    if spec.reduce is None:
        raise ValueError(f"method {method!r} does not reduce features after the encoder")
    if spec.needs_attention and not has_cls:
        raise ValueError(
            f"method {method!r} ranks patches by the CLS token's attention; this tower has no "
            "CLS token"
        )
    captured: dict[str, Tensor] = {}
    handles = []
    if spec.needs_attention:
        for name in ("q_proj", "k_proj"):
            projection = getattr(attention, name, None)
            if projection is None:
                raise TypeError(f"{method} needs separate q/k projections, got {type(attention)}")
            handles.append(projection.register_forward_hook(_store(captured, name)))
    try:
        states = encode(hidden, plan)
    finally:
        for handle in handles:
            handle.remove()
    cls_attention = keys = None
    if spec.needs_attention:
        cls_attention, keys = _cls_row_and_keys(attention, captured["q_proj"], captured["k_proj"])
    start = 1 if has_cls else 0
    prefix = states[:, :1] if keep_cls else states[:, :0]
    inputs = FeatureInputs(
        features=states[:, start:],
        grid=grid,
        cls_attention=cls_attention,
        keys=keys,
        seed=seed,
    )
    budget = k - prefix.shape[1]
    reduction = check_reduction(spec.reduce(inputs, budget), inputs, budget, method)
    return torch.cat([prefix, reduction.tokens], dim=1), reduction.assignment


def _store(captured: dict[str, Tensor], name: str) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        captured[name] = output

    return hook


@exact_dtypes
def _cls_row_and_keys(attn: nn.Module, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """CLS attention over the patches summed over heads [I, N], head-averaged keys [I, N, D]."""
    batch, tokens, _ = key.shape
    head_dim = attn.head_dim
    q = query[:, 0].view(batch, -1, head_dim).float()  # [I, H, D]
    k = key.view(batch, tokens, -1, head_dim).float()  # [I, T, H, D]
    scale = attn.scale if hasattr(attn, "scale") else attn.scaling  # CLIP/SigLIP, DINOv2
    logits = torch.einsum("bhd,bthd->bht", q, k) * scale
    row = logits.softmax(dim=-1).sum(dim=1)  # softmax over CLS + patches, as the layer does
    return row[:, 1:], k.mean(dim=2)[:, 1:]
