"""Random dropping: keep K patch tokens chosen uniformly at random (the floor every method
must beat; used as a baseline in FastV, DivPrune and VisionZip's papers).

The choice is drawn from a CPU generator seeded with ``CrossGETConfig.seed`` and depends only
on ``(seed, N, K)``: every image of every batch keeps the same patch positions, so results
do not depend on batch composition, beams see the same image, and reruns agree bit for bit.
Over a data set this is as random as a fresh draw per image; change ``seed`` to resample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reduction import FeatureInputs, Reduction, keep_indices

__all__ = ["random_indices", "random_tokens"]


def random_indices(n: int, k: int, seed: int) -> Tensor:
    """K distinct positions out of N, ascending, reproducible for ``seed``."""
    if not 1 <= k <= n:
        raise ValueError(f"random dropping needs 1 <= K <= N={n}, got K={k}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].sort().values


def random_tokens(inputs: FeatureInputs, k: int) -> Reduction:
    features = inputs.features
    batch, n, _ = features.shape
    index = random_indices(n, k, inputs.seed).to(features.device)
    return keep_indices(features, index.expand(batch, k))
