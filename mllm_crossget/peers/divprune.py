"""DivPrune: keep the K most diverse visual tokens (max-min diversity, greedy farthest point).

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025 (code: vbdi/divprune).  Distance is ``1 - cosine similarity``.  The first token is
the one whose nearest neighbour is farthest away; every next token is the one farthest from
the already selected set (largest minimum distance).  The kept tokens stay in their
original order.

Difference from the authors' LLaVA code: they compute distances on the projected tokens
(the LLM's input space); here selection runs on the feature-layer outputs before the
projector, like every post-encoder peer in this package, so the projector only sees K
tokens.  Ties go to the lowest index (``argmax`` returns the first maximum).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..merge import exact_dtypes
from .reduction import FeatureInputs, Reduction, keep_indices

__all__ = ["divprune_indices", "divprune_tokens"]


@exact_dtypes
def divprune_indices(features: Tensor, k: int) -> Tensor:
    """[I, K] ascending indices of a greedy max-min diverse subset of each row of [I, N, C]."""
    batch, n, _ = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"DivPrune needs 1 <= K <= N={n}, got K={k}")
    work = features.double() if features.dtype == torch.float64 else features.float()
    unit = work / work.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [I, N, N]
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    # First pick: the token whose nearest other token is farthest away.
    nearest = distance.masked_fill(eye, torch.inf).amin(dim=-1)
    chosen = torch.empty(batch, k, dtype=torch.long, device=features.device)
    chosen[:, 0] = nearest.argmax(dim=-1)
    rows = torch.arange(batch, device=features.device)
    selected = torch.zeros(batch, n, dtype=torch.bool, device=features.device)
    selected[rows, chosen[:, 0]] = True
    to_set = distance[rows, chosen[:, 0]]  # [I, N] distance to the selected set
    for step in range(1, k):
        pick = to_set.masked_fill(selected, -torch.inf).argmax(dim=-1)
        chosen[:, step] = pick
        selected[rows, pick] = True
        to_set = torch.minimum(to_set, distance[rows, pick])
    return chosen.sort(dim=1).values


def divprune_tokens(inputs: FeatureInputs, k: int) -> Reduction:
    return keep_indices(inputs.features, divprune_indices(inputs.features, k))
