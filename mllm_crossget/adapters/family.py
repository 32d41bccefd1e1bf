"""What :mod:`mllm_crossget.api` needs from one model family, as one small record.

The LLaVA and bare-CLIP towers predate this record and are dispatched inline in ``api.py``;
families added since (BLIP-2 / InstructBLIP, CLIP two-tower models) describe themselves with
a :class:`Family`, so the public functions stay one line per family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..config import CrossGETConfig
from ..cross_tokens import CrossTokens

__all__ = ["Family"]


@dataclass(frozen=True)
class Family:
    """Callbacks for one family of models (each takes the top-level model first).

    ``planner`` returns the image tower's :class:`~mllm_crossget.planner.TowerPlanner`;
    ``check`` raises a clear error for an unsupported setup before anything is patched;
    ``holder`` is the submodule that owns ``crossget_tokens`` (it reads them in its own
    forward, so a deep copy uses its own copy); ``patch``/``unpatch`` swap instance classes
    and hooks; ``image_size`` is the default ``(height, width)``; ``alignment_loss`` pairs
    cross tokens of the last forward (or raises when the family has no second side).
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
