"""What :mod:`mllm_crossget.api` needs from one model family, as one small record.

Every family (LLaVA, bare CLIP towers, BLIP-2 / InstructBLIP, CLIP two-tower models)
describes itself with a :class:`Family`, so the public functions in ``api.py`` stay one line
per family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..config import CrossGETConfig
from ..cross_tokens import CrossTokens

__all__ = ["Family", "check_attention"]


@dataclass(frozen=True)
class Family:
    """Callbacks for one family of models (each takes the top-level model first).

    ``planner`` returns the image tower's :class:`~mllm_crossget.planner.TowerPlanner`;
    ``check`` raises a clear error for an unsupported setup before anything is patched;
    ``holder`` is the submodule that owns ``crossget_tokens`` (it reads them in its own
    forward, so a deep copy uses its own copy); ``patch``/``unpatch`` swap instance classes
    and hooks; ``image_size`` is the default ``(height, width)``; ``alignment_loss`` pairs
    cross tokens of the last forward (or raises when the family has no second side);
    ``adjust_processor(processor, planner)`` makes a processor emit the merged placeholder
    count (``None``: the processor needs no change; ``remove`` restores any adjusted one);
    ``supports_peers``: the feature- and LLM-stage peers (``mllm_crossget.peers``) apply.
    """

    name: str
    planner: Callable[[nn.Module, CrossGETConfig], Any]
    check: Callable[[nn.Module, CrossGETConfig], None]
    holder: Callable[[nn.Module], nn.Module]
    build_tokens: Callable[[nn.Module, Any, CrossGETConfig], CrossTokens]
    patch: Callable[[nn.Module, CrossGETConfig, Any], None]
    unpatch: Callable[[nn.Module], None]
    image_size: Callable[[nn.Module], tuple[int, int]]
    alignment_loss: Callable[[nn.Module], Tensor]
    adjust_processor: Callable[[Any, Any], Any] | None = None
    supports_peers: bool = False


def check_attention(vision_config: Any, config: CrossGETConfig) -> None:
    """A vision tower's attention implementation must take what the config needs."""
    implementation = getattr(vision_config, "_attn_implementation", None) or "eager"
    if implementation.startswith("flash") and (
        (config.merges_in_encoder and config.proportional_attention) or config.uses_cross_token
    ):
        raise ValueError(
            f"the vision tower uses attn_implementation={implementation!r}, which cannot take "
            "the proportional-attention bias or the cross-token mask; load it with "
            "attn_implementation='sdpa' (or 'eager'), or use proportional_attention=False and "
            "guidance='none'"
        )
    if config.uses_cross_token and config.guidance == "attention" and implementation != "eager":
        raise ValueError(
            "guidance='attention' needs full attention probabilities: load the model with "
            "attn_implementation='eager', or use guidance='cross' (works with SDPA)"
        )
