"""Token choosing computes in the dtypes it asks for, whatever autocast the caller runs under.

Under ``torch.autocast`` every matrix product runs in bf16/fp16; a cosine similarity near 1
then collapses into ties, and before ``merge.exact_dtypes`` the matching of a bf16-autocast
run differed from the float32 one on the same keys (the benchmark and the pretrained-mini
recipe run under autocast).  Each function must give bit-identical results inside and outside
a CPU bf16 autocast region.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_models import tiny_llava

from mllm_crossget.guidance import cross_row_importance, text_relevance
from mllm_crossget.merge import bipartite_matching, complete_graph_matching
from mllm_crossget.peers import FeatureInputs
from mllm_crossget.peers.divprune import divprune_indices
from mllm_crossget.peers.fastv import attention_scores
from mllm_crossget.peers.visionzip import visionzip_tokens


def _matching(matching: Any) -> tuple[torch.Tensor, ...]:
    return matching.src_idx, matching.dst_idx, matching.kept_idx


def _cases() -> dict[str, Callable[[torch.Generator], Any]]:
    def metric(g: torch.Generator) -> torch.Tensor:
        # Near-duplicate keys: float32 similarities separate them, bf16 ones tie.
        return torch.randn(2, 1, 32, generator=g) + 0.05 * torch.randn(2, 96, 32, generator=g)

    def protected() -> torch.Tensor:
        mask = torch.zeros(2, 96, dtype=torch.bool)
        mask[:, 0] = True
        return mask

    def fastv(g: torch.Generator) -> Any:
        torch.manual_seed(0)
        lm = tiny_llava().model.language_model
        attn = lm.layers[0].self_attn
        hidden = torch.randn(2, 40, lm.config.hidden_size, generator=g)
        with torch.autocast("cpu", enabled=False):  # the model's projections, fixed here
            query, key = attn.q_proj(hidden).detach(), attn.k_proj(hidden).detach()
            rotary = lm.rotary_emb(hidden, position_ids=torch.arange(40)[None].expand(2, -1))
        valid = torch.ones(2, 40, dtype=torch.bool)
        return attention_scores(attn, query, key, rotary, torch.tensor([39, 37]), valid)

    def visionzip(g: torch.Generator) -> Any:
        features = torch.randn(2, 64, 16, generator=g)
        attention = torch.rand(2, 64, generator=g)
        keys = torch.randn(2, 1, 8, generator=g) + 0.05 * torch.randn(2, 64, 8, generator=g)
        out = visionzip_tokens(FeatureInputs(features, (8, 8), attention, keys), 20)
        return out.tokens, out.assignment

    return {
        "complete_graph_matching": lambda g: _matching(
            complete_graph_matching(metric(g), 30, torch.rand(2, 96, generator=g) / 96, protected())
        ),
        "bipartite_matching": lambda g: _matching(bipartite_matching(metric(g), 30, protected())),
        "cross_row_importance": lambda g: cross_row_importance(
            torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 4, 96, 16, generator=g), 0.25
        ),
        "text_relevance": lambda g: text_relevance(
            metric(g), torch.randn(2, 7, 32, generator=g), torch.ones(2, 7, dtype=torch.bool)
        ),
        "divprune_indices": lambda g: divprune_indices(metric(g), 24),
        "visionzip_tokens": visionzip,
        "fastv_attention_scores": fastv,
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_token_choosing_is_the_same_under_bf16_autocast(name: str) -> None:
    plain = CASES[name](torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = CASES[name](torch.Generator().manual_seed(0))
    plain_parts = plain if isinstance(plain, tuple) else (plain,)
    autocast_parts = autocast if isinstance(autocast, tuple) else (autocast,)
    for expected, got in zip(plain_parts, autocast_parts, strict=True):
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected), name
