"""Peer token-reduction methods behind CrossGET's budget API, registered by name.

``CrossGETConfig(visual_tokens=64, method="visionzip")`` selects one; every method reaches
the LLM with exactly the budget (FastV: from its pruning layer on).  Each method lives in its
own small module that cites its paper and code and says where it departs from them.

=========  ========  ==========================================================================
method     stage     what it does
=========  ========  ==========================================================================
crossget   encoder   complete-graph soft matching + cross-token guidance, inside the ViT
tome       encoder   ToMe bipartite matching, size-weighted average, inside the ViT
visionzip  features  top CLS-attention tokens + contextual tokens merged by key similarity
divprune   features  greedy max-min diversity (farthest point) selection
pool       features  average pooling of the 2-D patch grid
random     features  random subset of patches (seeded, same positions for every image)
fastv      llm       drop visual tokens after LLM layer K by last-token attention
=========  ========  ==========================================================================

*features* methods run the unmerged tower up to the feature layer and reduce its patch
tokens before the projector; *llm* methods give the LLM every visual token and reduce inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .divprune import divprune_tokens
from .pool import pool_tokens
from .random_drop import random_tokens
from .reduction import FeatureInputs, Reducer, Reduction
from .visionzip import contextual_count, visionzip_tokens

__all__ = [
    "FEATURE_METHODS",
    "MERGING_METHODS",
    "METHODS",
    "METHOD_NAMES",
    "FeatureInputs",
    "Method",
    "Reduction",
    "get_method",
]

Stage = Literal["encoder", "features", "llm"]


@dataclass(frozen=True)
class Method:
    """One registered method.

    ``overhead(n, k, width, heads)`` is the analytic FLOPs of the selection itself for one
    image (n patches, budget k, vision width and heads), counted like
    ``torch.utils.flop_counter`` (2 per multiply-add of matmuls; element-wise work is free).
    """

    name: str
    stage: Stage
    summary: str
    citation: str
    reduce: Reducer | None = None
    needs_attention: bool = False
    overhead: Callable[[int, int, int, int], int] | None = None


def _visionzip_flops(n: int, k: int, width: int, heads: int) -> int:
    contextual = contextual_count(k)
    members = n - k
    # CLS query row over CLS + patches, then members against contextual targets (mean keys).
    return 2 * (n + 1) * width + 2 * members * contextual * (width // heads)


def _divprune_flops(n: int, k: int, width: int, heads: int) -> int:
    return 2 * n * n * width  # the cosine-similarity matrix; the greedy loop is element-wise


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "crossget",
            "encoder",
            "CrossGET: complete-graph soft matching with cross-token guidance",
            "Shi et al., ICML 2024 (arXiv 2305.17455); sdc17/CrossGET",
        ),
        Method(
            "tome",
            "encoder",
            "ToMe: bipartite soft matching, size-weighted average (matching='bipartite', "
            "guidance='none')",
            "Bolya et al., ICLR 2023 (arXiv 2210.09461); facebookresearch/ToMe",
        ),
        Method(
            "visionzip",
            "features",
            "VisionZip: dominant tokens by CLS attention + contextual tokens by key similarity",
            "Yang et al., CVPR 2025 (arXiv 2412.04467); dvlab-research/VisionZip",
            reduce=visionzip_tokens,
            needs_attention=True,
            overhead=_visionzip_flops,
        ),
        Method(
            "divprune",
            "features",
            "DivPrune: greedy max-min diversity selection",
            "Alvar et al., CVPR 2025 (arXiv 2503.02175); vbdi/divprune",
            reduce=divprune_tokens,
            overhead=_divprune_flops,
        ),
        Method(
            "pool",
            "features",
            "average pooling of the 2-D patch grid (adaptive_avg_pool2d)",
            "the spatial-pooling baseline (e.g. LLaVA-NeXT/Video 2-D pooling)",
            reduce=pool_tokens,
        ),
        Method(
            "random",
            "features",
            "random dropping (seeded; the same positions for every image)",
            "the random baseline of FastV / DivPrune / VisionZip",
            reduce=random_tokens,
        ),
        Method(
            "fastv",
            "llm",
            "FastV: drop visual tokens after LLM layer K by the last token's attention",
            "Chen et al., ECCV 2024 (arXiv 2403.06764); pkunlp-icler/FastV",
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
MERGING_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.stage == "encoder")
FEATURE_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.stage == "features")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]
