"""torch.compile on a CrossGET LLaVA: the merging layers add no graph break (eval.compile_check)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import single_thread
from transformers import LlavaForConditionalGeneration

import mllm_crossget as crossget
from eval.bench_llava import llava_7b_config
from eval.compile_check import graph_breaks


@pytest.mark.parametrize("method", ["crossget", "tome"])
def test_merging_layers_add_no_graph_break(method: str) -> None:
    """Before: one .item() (r's clamp) and one data-dependent branch (the finite check) per
    merging layer, plus the LLM-side checks; now only the text cross token's context variable
    (set and reset around the LLM) and transformers' own placeholder check break the graph."""
    config = llava_7b_config(
        1, "sdpa", llm_width=128, vision_width=64, vision_layers=4, image_size=112
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config).eval()
    crossget.apply(model, crossget.CrossGETConfig(visual_tokens=16, method=method))
    visual = crossget.num_visual_tokens(model)
    text = torch.randint(5, 32000, (1, 12), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([text[:, :1], torch.full((1, visual), config.image_token_id), text[:, 1:]], 1)
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 112, 112), "logits_to_keep": 1}
    with single_thread(), torch.inference_mode():
        breaks = graph_breaks(model, inputs)
    ours = {
        where: count
        for where, count in breaks["locations"].items()
        if where.startswith("mllm_crossget/")
    }
    assert all(where.startswith("mllm_crossget/adapters/llava.py") for where in ours), ours
    assert sum(ours.values()) == 2, breaks  # _TEXT_CONTEXT.set, once per explained frame
    assert breaks["graph_breaks"] <= 5, breaks
