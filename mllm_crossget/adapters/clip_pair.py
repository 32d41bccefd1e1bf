"""What the two CLIP two-tower adapters (HF ``CLIPModel``, open_clip ``CLIP``) share.

Both merge in the image tower (budget from the config, CLS protected) and, when
``config.text_r > 0``, in the text tower: ``text_r`` tokens per text layer, the end-of-text
(EOT) token and padding protected.  Each layer merges at most half of the mergeable tokens of
the *shortest* caption in the batch (rows stay the same length), so short captions merge less.
The EOT token is where CLIP pools; it is never merged, a marker follows it through the merges
and the pooled feature is read there.  Padding is never merged and never attended.

Cross tokens: the image cross token starts as CLS, the text one as the EOT token; before layer
``l`` each becomes ``stopgrad(previous) + P_l`` (image) or ``+ T_l`` (text).  Their states of
the last forward are kept (``runtime.last``) for :func:`alignment_loss`: each side goes
through its tower's own (frozen) final norm and projection into the joint embedding space,
and the symmetric Jensen-Shannon divergence of the softmaxes is averaged over layer pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..config import CrossGETConfig
from ..loss import symmetric_js_divergence
from .vit_layer import BlockOps, EncoderPlan, TokenState, merging_block

__all__ = [
    "LastPair",
    "PairRuntime",
    "alignment_loss",
    "frozen",
    "run_tower",
    "text_plan",
    "text_state",
    "vision_state",
]


@dataclass
class LastPair:
    """Cross-token states of the last image and text forward (overwritten by each call)."""

    vision_cross: tuple[Tensor, ...] = ()  # per image layer [B, C_img]
    text_cross: tuple[Tensor, ...] = ()  # per text layer [B, C_txt]


@dataclass
class PairRuntime:
    """What the patched model reads (configuration) plus what ``remove`` restores."""

    config: CrossGETConfig
    planner: object  # mllm_crossget.planner.TowerPlanner for the image tower
    text_plan: EncoderPlan | None  # None: the text tower is left as it is
    original_class: type
    text_original_class: type | None = None
    last: LastPair = field(default_factory=LastPair)


def text_plan(config: CrossGETConfig, num_layers: int) -> EncoderPlan | None:
    """Constant ``config.text_r`` per text layer, or None when the text tower does not merge."""
    if not config.text_r:
        return None
    return EncoderPlan.from_config(config, (config.text_r,) * num_layers)


def vision_state(hidden: Tensor, with_cross: bool) -> TokenState:
    """Image tokens after the embeddings: CLS (index 0) protected, cross token = CLS."""
    batch, n, _ = hidden.shape
    protected = torch.zeros(batch, n, dtype=torch.bool, device=hidden.device)
    protected[:, 0] = True
    size = torch.ones(batch, n, dtype=torch.float32, device=hidden.device)
    cross = hidden[:, :1] if with_cross else None
    return TokenState(hidden, size, protected, cross=cross, protected_prefix=1)


def text_state(
    hidden: Tensor,
    eot_index: Tensor,
    attention_mask: Tensor | None,
    *,
    causal: bool,
    with_cross: bool,
) -> TokenState:
    """Text tokens after the embeddings.

    Real tokens are those up to and including the EOT token (and not masked out); the EOT
    token and everything else (padding) are protected; only real tokens may be attended.
    """
    batch, n, _ = hidden.shape
    device = hidden.device
    arange = torch.arange(n, device=device)
    eot_index = eot_index.to(device)
    real = arange[None, :] <= eot_index[:, None]
    if attention_mask is not None:
        real = real & attention_mask.to(device).bool()
    marker = arange[None, :] == eot_index[:, None]
    rows = torch.arange(batch, device=device)
    return TokenState(
        hidden=hidden,
        size=torch.ones(batch, n, dtype=torch.float32, device=device),
        protected=~real | marker,
        key_valid=None if bool(real.all()) else real,
        position=arange.expand(batch, n) if causal else None,
        marker=marker,
        cross=hidden[rows, eot_index][:, None] if with_cross else None,
    )


def run_tower(
    blocks: Sequence[BlockOps],
    state: TokenState,
    plan: EncoderPlan,
    prompts: Tensor | None,
    *,
    training: bool,
) -> tuple[TokenState, tuple[Tensor, ...]]:
    """Run ``plan.num_layers`` blocks; returns the final state and the cross state per layer."""
    if plan.num_layers > len(blocks):
        raise ValueError(f"plan runs {plan.num_layers} layers, the tower has {len(blocks)}")
    if not plan.uses_cross_token:
        state = replace(state, cross=None)
    cross_states: list[Tensor] = []
    for index, ops in enumerate(blocks[: plan.num_layers]):
        offset = None
        if state.cross is not None and prompts is not None and prompts.shape[0] > index:
            offset = prompts[index]
            if not torch.is_grad_enabled():
                offset = offset.detach()
        state, _ = merging_block(
            ops, state, r=plan.layer_r[index], plan=plan, cross_offset=offset, training=training
        )
        if state.cross is not None:
            cross_states.append(state.cross[:, 0])
    return state, tuple(cross_states)


def frozen(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``module`` as a function of its input only: its parameters are detached, so a loss
    through it trains nothing of the module (the alignment maps are frozen)."""

    def call(x: Tensor) -> Tensor:
        params = {name: p.detach() for name, p in module.named_parameters()}
        return torch.func.functional_call(module, params, (x,))

    return call


def alignment_loss(
    last: LastPair,
    image_map: Callable[[Tensor], Tensor],
    text_map: Callable[[Tensor], Tensor],
) -> Tensor:
    """Symmetric JS between image and text cross tokens in the joint embedding space.

    With ``L_img`` and ``L_txt`` layers, ``max(L_img, L_txt)`` pairs are formed by spreading
    the shorter side over the longer one; image ``b`` pairs with caption ``b``.
    """
    if not last.vision_cross or not last.text_cross:
        raise RuntimeError(
            "no cross-token states from the last forward: run the image and the text tower "
            "(e.g. model(pixel_values=..., input_ids=...) / get_logits) with a guidance that "
            "uses a cross token and text_r > 0 first"
        )
    vision, text = last.vision_cross, last.text_cross
    if vision[0].shape[0] != text[0].shape[0]:
        raise ValueError(
            f"alignment pairs image b with caption b: got {vision[0].shape[0]} images and "
            f"{text[0].shape[0]} captions in the last forward"
        )
    pairs = max(len(vision), len(text))
    total = vision[0].new_zeros((), dtype=torch.float32)
    for index in range(pairs):
        image_state = vision[index * len(vision) // pairs]
        text_state_ = text[index * len(text) // pairs]
        total = total + symmetric_js_divergence(
            image_map(image_state).float(), text_map(text_state_).float()
        )
    return total / pairs
