"""torch.compile on a CrossGET LLaVA: the merging layers add no graph break (eval.compile_check)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import single_thread

from eval.compile_check import build, build_parser, graph_breaks


@pytest.mark.parametrize(
    ("method", "dtype", "autocast"),
    [("crossget", "fp32", False), ("tome", "fp32", False), ("crossget", "bf16", False)]
    + [("crossget", "fp32", True)],
)
def test_merging_layers_add_no_graph_break(method: str, dtype: str, autocast: bool) -> None:
    """Before: one .item() (r's clamp) and one data-dependent branch (the finite check) per
    merging layer, plus the LLM-side checks; now only the text cross token's context variable
    (set and reset around the LLM) and transformers' own placeholder check break the graph.
    bf16 weights, and a bf16 autocast region (token choosing turns it off inside), add none."""
    args = build_parser().parse_args(
        ["--method", method, "--budget", "16", "--llm-layers", "1", "--llm-width", "128"]
        + ["--vision-width", "64", "--vision-layers", "4", "--image-size", "112"]
        + ["--prompt-tokens", "12", "--dtype", dtype]
    )
    model, request = build(args)
    inputs = request()
    assert inputs["pixel_values"].dtype == next(model.parameters()).dtype
    region = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with single_thread(), torch.inference_mode(), region:
        breaks = graph_breaks(model, inputs)
    ours = {
        where: count
        for where, count in breaks["locations"].items()
        if where.startswith("mllm_crossget/")
    }
    assert all(where.startswith("mllm_crossget/adapters/llava.py") for where in ours), ours
    assert sum(ours.values()) == 2, breaks  # _TEXT_CONTEXT.set, once per explained frame
    assert breaks["graph_breaks"] <= 5, breaks
