"""Average pooling of the 2-D patch grid to K tokens (the plain spatial baseline).

Cited as the "pooling" baseline of the token-reduction literature (e.g. LLaVA-NeXT/Video's
2-D pooling of visual features).  The grid is pooled with ``adaptive_avg_pool2d``:

* if ``K = a * b`` with ``a <= b <= 2a`` and the cells fit the grid, the grid is pooled to
  ``a x b`` and nothing is lost (64 -> 8 x 8, 144 -> 12 x 12, 32 -> 4 x 8);
* otherwise (a prime K, or a very elongated factorisation) it is pooled to the smallest
  ``rows x cols`` grid with ``cols = ceil(sqrt(K))`` and ``rows = ceil(K / cols)``, and the
  last ``rows * cols - K`` cells of the raster order are dropped, so exactly K tokens reach
  the LLM; the patches of those bottom-right cells are then not represented.

Where pooling windows overlap (grid size not divisible by the pooled size), the assignment
names the cell that contains the patch's centre.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from .reduction import FeatureInputs, Reduction

__all__ = ["pool_grid_shape", "pool_tokens"]


def pool_grid_shape(k: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The pooled ``(rows, cols)`` grid for a budget of K tokens (``rows * cols >= K``)."""
    height, width = grid
    if not 1 <= k <= height * width:
        raise ValueError(f"pooling needs 1 <= K <= {height * width} patches, got K={k}")
    # Exact factorisations K = a * b that fit the grid with cells at most 2:1, squarest first.
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0]
    fitting = [
        (a, b) for a, b in pairs if a <= height and b <= width and max(a, b) <= 2 * min(a, b)
    ]
    if fitting:
        return min(fitting, key=lambda pair: (abs(pair[0] - pair[1]), pair[0]))
    cols = min(width, math.ceil(math.sqrt(k)))
    return math.ceil(k / cols), cols


def pool_tokens(inputs: FeatureInputs, k: int) -> Reduction:
    features = inputs.features
    batch, n, width = features.shape
    height, grid_width = inputs.grid
    if height * grid_width != n:
        raise ValueError(f"grid {inputs.grid} does not hold {n} patches")
    rows, cols = pool_grid_shape(k, inputs.grid)
    image = features.transpose(1, 2).reshape(batch, width, height, grid_width)
    # Pool in float32 (at least): half-precision sums of many patches lose digits.
    work = image.float() if image.dtype in (torch.float16, torch.bfloat16) else image
    pooled = functional.adaptive_avg_pool2d(work, (rows, cols)).to(features.dtype)
    tokens = pooled.flatten(2).transpose(1, 2)[:, :k]
    # The cell holding each patch's centre: floor((i + 0.5) * cells / patches).
    cell_row = (2 * torch.arange(height, device=features.device) + 1) * rows // (2 * height)
    cell_col = (2 * torch.arange(grid_width, device=features.device) + 1) * cols // (2 * grid_width)
    cell = (cell_row[:, None] * cols + cell_col[None, :]).flatten()
    cell = torch.where(cell < k, cell, torch.full_like(cell, -1))
    return Reduction(tokens.contiguous(), cell.expand(batch, n).clone())
