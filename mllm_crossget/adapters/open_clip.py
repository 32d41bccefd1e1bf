"""CrossGET in open_clip ``CLIP`` models (ViT image tower + the built-in text transformer).

open_clip's ``ResidualAttentionBlock`` runs ``nn.MultiheadAttention``, which hides the keys
CrossGET matches on and takes no per-key bias beyond a mask.  Each block is therefore run by
:func:`.vit_layer.merging_block` from its own parameters: q/k/v from
``attn.in_proj_weight``/``in_proj_bias`` (``[q; k; v]`` stacked, as MHA stores them), SDPA
with the ``log(size)`` bias, ``attn.out_proj`` and the layer scales, then the MLP branch.  Block
classes and weights are untouched (open_clip 3.3 blocks are batch-first; the adapter works on
``[B, N, C]`` either way because it never calls the MHA module).

The ``CLIP`` instance gets a subclass whose ``encode_image`` / ``encode_text`` (which
``forward`` and ``get_logits`` call) run the towers this way when they merge, and the original
methods otherwise (bit-exact).  ``crossget_tokens`` lives on the model.  Text merging
(``config.text_r > 0``) protects the EOT token (found by the model's ``text_pool_type``:
``argmax`` or ``eos``) and the padding after it; see :mod:`.clip_pair`.  Calling
``model.visual(...)`` directly bypasses CrossGET.

Supported: ``open_clip.model.CLIP`` with a ``VisionTransformer`` image tower (``tok``
pooling, no attentional pooler) and default (non-custom) blocks in both towers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import CrossGETConfig
from ..cross_tokens import CrossTokens, unwrap_cross_tokens
from ..planner import TowerPlanner
from . import clip_pair
from .family import Family
from .vit_layer import open_clip_ops

__all__ = ["OPEN_CLIP", "block_ops"]

RUNTIME_ATTR = "_crossget_clip"


block_ops = open_clip_ops  # a ResidualAttentionBlock as BlockOps (kept name)


def _project(x: Tensor, projection: nn.Module | Tensor | None) -> Tensor:
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Module) else x @ projection


def _encode_image(self: nn.Module, image: Tensor, normalize: bool = False) -> Tensor:
    runtime: clip_pair.PairRuntime = getattr(self, RUNTIME_ATTR)
    if not runtime.planner.plan(image.shape[-2], image.shape[-1]).merges:
        runtime.last.vision_cross = ()
        return super(type(self), self).encode_image(image, normalize=normalize)
    visual = self.visual
    x = visual._embeds(image)  # patches + CLS, positions, patch dropout, ln_pre
    plan = runtime.planner.plan_for_length(x.shape[1])
    state = clip_pair.vision_state(x, plan.uses_cross_token)
    blocks = [block_ops(block) for block in visual.transformer.resblocks]
    prompts = unwrap_cross_tokens(self.crossget_tokens).vision_prompts
    state, cross = clip_pair.run_tower(blocks, state, plan, prompts, training=self.training)
    runtime.last.vision_cross = cross
    pooled, _ = visual._pool(state.hidden)
    features = _project(pooled, visual.proj)
    return F.normalize(features, dim=-1) if normalize else features


def _eot_index(model: nn.Module, text: Tensor) -> Tensor:
    if model.text_pool_type == "argmax":
        return text.argmax(dim=-1)
    return (text == model.text_eos_id).int().argmax(dim=-1)  # "eos"


def _encode_text(self: nn.Module, text: Tensor, normalize: bool = False) -> Tensor:
    runtime: clip_pair.PairRuntime = getattr(self, RUNTIME_ATTR)
    plan = runtime.text_plan
    if plan is None:
        runtime.last.text_cross = ()
        return super(type(self), self).encode_text(text, normalize=normalize)
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[: x.shape[1]].to(cast_dtype)
    state = clip_pair.text_state(
        x,
        _eot_index(self, text),
        None,
        causal=self.attn_mask is not None,
        with_cross=plan.uses_cross_token,
    )
    blocks = [block_ops(block) for block in self.transformer.resblocks]
    prompts = unwrap_cross_tokens(self.crossget_tokens).text_prompts
    state, cross = clip_pair.run_tower(blocks, state, plan, prompts, training=self.training)
    runtime.last.text_cross = cross
    x = self.ln_final(state.hidden)
    rows = torch.arange(x.shape[0], device=x.device)
    features = _project(x[rows, state.pooled_index()], self.text_projection)
    return F.normalize(features, dim=-1) if normalize else features


_SUBCLASSES: dict[type, type] = {}


def _subclass(original: type) -> type:
    if original not in _SUBCLASSES:
        _SUBCLASSES[original] = type(
            f"CrossGET{original.__name__}",
            (original,),
            {"encode_image": _encode_image, "encode_text": _encode_text},
        )
    return _SUBCLASSES[original]


# ------------------------------------------------------------------ family callbacks


def _square_patch(visual: nn.Module) -> int:
    height, width = visual.patch_size
    if height != width:
        raise ValueError(f"CrossGET plans for square patches, this tower uses {height}x{width}")
    return int(height)


def _planner(model: nn.Module, config: CrossGETConfig) -> TowerPlanner:
    layers = len(model.visual.transformer.resblocks)
    if config.first_merge_layer >= layers:
        raise ValueError(
            f"first_merge_layer={config.first_merge_layer} leaves no merging layer: the image "
            f"tower has {layers} layers"
        )
    return TowerPlanner(
        config=config,
        patch_size=_square_patch(model.visual),
        layers_run=layers,
        dropped_tokens=0,
    )


def _check(model: nn.Module, config: CrossGETConfig) -> None:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not getattr(config, "merges_in_encoder", True):
        raise ValueError("CLIP models support the merging methods (crossget, tome) only")
    if config.guidance == "query":
        raise ValueError(
            "guidance='query' needs a prompt that conditions the image; a CLIP model encodes "
            "images and texts independently: use guidance='cross'"
        )
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"CrossGET needs a ViT image tower, got {type(visual).__name__}")
    if not (hasattr(visual, "_embeds") and hasattr(visual, "_pool")):
        raise TypeError(
            "this open_clip version's VisionTransformer has no _embeds/_pool steps, which the "
            "adapter calls around its own block loop (written against open_clip 3.3)"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ValueError(
            "CrossGET supports open_clip image towers that pool the class token "
            f"(pool_type='tok', no attentional pooler); got pool_type={visual.pool_type!r}"
        )
    blocks = [*visual.transformer.resblocks]
    if config.text_r:
        if model.text_pool_type not in ("argmax", "eos"):
            raise ValueError(
                "text merging pools at the end-of-text token; this model pools with "
                f"text_pool_type={model.text_pool_type!r}"
            )
        blocks += [*model.transformer.resblocks]
    if any(type(block) is not ResidualAttentionBlock for block in blocks):
        raise TypeError(
            "CrossGET runs open_clip's default ResidualAttentionBlock; this model uses custom "
            "blocks (qk-norm / scaled attention), which are not supported"
        )


def _build_tokens(model: nn.Module, planner: TowerPlanner, config: CrossGETConfig) -> CrossTokens:
    return CrossTokens(
        vision_layers=planner.layers_run,
        vision_width=model.visual.transformer.width,
        text_layers=len(model.transformer.resblocks) if config.text_r else 0,
        text_width=model.transformer.width,
    )


def _patch(model: nn.Module, config: CrossGETConfig, planner: TowerPlanner) -> None:
    runtime = clip_pair.PairRuntime(
        config=config,
        planner=planner,
        text_plan=clip_pair.text_plan(config, len(model.transformer.resblocks)),
        original_class=type(model),
    )
    model.__class__ = _subclass(type(model))
    setattr(model, RUNTIME_ATTR, runtime)


def _unpatch(model: nn.Module) -> None:
    runtime: clip_pair.PairRuntime | None = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        return
    model.__class__ = runtime.original_class
    delattr(model, RUNTIME_ATTR)


def _image_size(model: nn.Module) -> tuple[int, int]:
    return tuple(model.visual.image_size)  # type: ignore[return-value]


def _alignment_loss(model: nn.Module) -> Tensor:
    runtime: clip_pair.PairRuntime = getattr(model, RUNTIME_ATTR)
    image_norm = clip_pair.frozen(model.visual.ln_post)
    text_norm = clip_pair.frozen(model.ln_final)

    def frozen_projection(projection: Any) -> Any:
        if isinstance(projection, nn.Module):
            return clip_pair.frozen(projection)
        return lambda x: _project(x, None if projection is None else projection.detach())

    image_proj = frozen_projection(model.visual.proj)
    text_proj = frozen_projection(model.text_projection)
    return clip_pair.alignment_loss(
        runtime.last,
        lambda x: image_proj(image_norm(x)),
        lambda x: text_proj(text_norm(x)),
    )


OPEN_CLIP = Family(
    name="open_clip.CLIP",
    planner=_planner,
    check=_check,
    holder=lambda model: model,
    build_tokens=_build_tokens,
    patch=_patch,
    unpatch=_unpatch,
    image_size=_image_size,
    alignment_loss=_alignment_loss,
)
