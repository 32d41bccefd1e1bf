"""What every post-encoder peer receives and returns, so that one LLaVA branch serves them all.

A post-encoder peer sees the patch tokens of the feature layer (CLS already separated), the
patch grid, and — when it asks for them — the feature layer's CLS attention row and
head-averaged keys.  It returns exactly ``K`` tokens plus an *assignment*: for every input
patch, the output token it ended up in (``-1`` = dropped).  The assignment is what
``crossget visualize`` draws and what the tests compare against naive references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FeatureInputs",
    "Reduction",
    "Reducer",
    "check_reduction",
    "first_patch_of_tokens",
    "patches_per_token",
    "keep_indices",
]


@dataclass(frozen=True)
class FeatureInputs:
    """Patch features of a batch of images at the LLaVA feature layer.

    ``features`` [I, N, C] are the patch tokens in raster order (``grid`` = (rows, cols),
    ``rows * cols == N``).  ``cls_attention`` [I, N] is the CLS query's attention over the
    patches in the feature layer, summed over heads (softmax taken over CLS + patches);
    ``keys`` [I, N, D] that layer's keys averaged over heads.  Both are ``None`` unless the
    method declared ``needs_attention``.
    """

    features: Tensor
    grid: tuple[int, int]
    cls_attention: Tensor | None = None
    keys: Tensor | None = None
    seed: int = 0


@dataclass(frozen=True)
class Reduction:
    """``tokens`` [I, K, C]; ``assignment`` [I, N] long: output token of each patch or -1."""

    tokens: Tensor
    assignment: Tensor


Reducer = Callable[[FeatureInputs, int], Reduction]


def keep_indices(features: Tensor, index: Tensor) -> Reduction:
    """Selection methods: keep the rows ``index`` [I, K] (ascending), drop the rest."""
    batch, n, width = features.shape
    tokens = features.gather(1, index[..., None].expand(-1, -1, width))
    assignment = torch.full((batch, n), -1, dtype=torch.long, device=features.device)
    order = torch.arange(index.shape[1], device=features.device).expand_as(index)
    assignment.scatter_(1, index, order)
    return Reduction(tokens, assignment)


def check_reduction(reduction: Reduction, inputs: FeatureInputs, k: int, method: str) -> Reduction:
    """Every method must hand the LLM exactly K tokens: a wrong count is a bug, said loudly."""
    batch, n, width = inputs.features.shape
    if tuple(reduction.tokens.shape) != (batch, k, width):
        raise RuntimeError(
            f"peer {method!r} returned {tuple(reduction.tokens.shape)} tokens for a budget of "
            f"K={k} (expected {(batch, k, width)}): this is a bug in the peer"
        )
    if tuple(reduction.assignment.shape) != (batch, n):
        raise RuntimeError(f"peer {method!r} returned a malformed assignment (a bug)")
    return reduction


def first_patch_of_tokens(assignment: Tensor, k: int) -> Tensor:
    """[I, K] long: the lowest patch index assigned to each output token.

    That index is where the LLaVA adapter places the token in the LLM (``llm_positions=
    "original"``); a kept patch keeps its own place, a pooled or merged token takes its first
    patch's.  A token with no patch at all would have no place: that is a bug in the peer.
    """
    batch, n = assignment.shape
    patch = torch.arange(n, device=assignment.device).expand(batch, n)
    assigned = assignment >= 0
    first = torch.full((batch, k + 1), n, dtype=torch.long, device=assignment.device)
    slot = torch.where(assigned, assignment, torch.full_like(assignment, k))
    first.scatter_reduce_(1, slot, patch, reduce="amin")
    first = first[:, :k]
    if bool((first == n).any()):
        raise RuntimeError("a reduced token holds no patch in its assignment (a bug in the peer)")
    return first


def patches_per_token(assignment: Tensor, k: int) -> Tensor:
    """[I, K] float32: how many patches each output token stands for (its size).

    A kept patch holds itself (1), a pooled or merged token its members; dropped patches
    (``-1``) count for no token.  ``llm_proportional_attention`` gives each token's key
    ``log(size)`` in the LLM.
    """
    batch = assignment.shape[0]
    slot = torch.where(assignment >= 0, assignment, torch.full_like(assignment, k))
    counts = torch.zeros(batch, k + 1, dtype=torch.float32, device=assignment.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.float32))
    return counts[:, :k]
