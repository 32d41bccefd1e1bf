"""`crossget visualize` draws a PNG for every method; `crossget bench` reports and plots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import random_images, single_thread, tiny_llava, tiny_processor

from eval import bench
from eval.visualize import assignment_for, render
from mllm_crossget.peers import METHOD_NAMES


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def test_visualize_writes_a_png_with_k_tokens_per_method(tmp_path: Path) -> None:
    model, processor = tiny_llava(), tiny_processor()
    image = random_images(1)[0]
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    for method in METHOD_NAMES:
        assignment = assignment_for(model, processor, method, 16, pixels, "w1 w2")
        assert assignment.shape == (8, 8)
        assert len(np.unique(assignment[assignment >= 0])) == 16, method
    out = render(model, processor, image, METHOD_NAMES, 16, tmp_path / "grid.png", "w1 w2")
    assert out.stat().st_size > 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 100
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def _row(method: str, budget: str, tokens: int, speedup: float) -> dict:
    return {
        "method": method,
        "budget": budget,
        "visual_tokens": tokens,
        "kept_tokens": tokens,
        "ttft_s": 1 / speedup,
        "speedup": speedup,
        "flops_speedup": speedup * 1.2,
        "flops": {"total": int(1e9 / speedup)},
        "overhead_ms": 0.1,
        "memory": {"peak_mb": 900.0, "working_mb": 12.0, "kv_mb": 1.5, "kv_analytic_mb": 1.5},
        "note": "",
    }


def test_bench_report_table_and_plots(tmp_path: Path) -> None:
    rows = [_row("full", "full", 576, 1.0), _row("crossget", "64", 64, 3.0)]
    rows += [_row("pool", "64", 64, 3.5), _row("pool", "144", 144, 2.0)]
    results = [
        {"method": "full", "budget": "full", "visual_tokens": 576, "metrics": {"acc": 80.0}},
        {"method": "crossget", "budget": "64", "visual_tokens": 64, "metrics": {"acc": 77.0}},
        {"method": "pool", "budget": "64", "visual_tokens": 64, "metrics": {"acc": 70.0}},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    accuracy, metric = bench.load_accuracy(path, None)
    assert metric == "acc" and accuracy[("crossget", "64")] == 77.0
    table = bench.markdown(rows, "header", ["x/r13: no"], accuracy, metric)
    assert "| crossget | 64 | 64 | 64 |" in table and "| 77.0 |" in table and "x/r13" in table
    assert "| 900 | 12 | 1.50 | 1.50 |" in table  # peak, working, KV measured, KV analytic
    bench.plot_speedup(rows, tmp_path / "speedup.png", "title")
    bench.plot_pareto(rows, accuracy, metric, tmp_path / "pareto.png")
    for name in ("speedup.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_budget_parsing() -> None:
    assert bench.parse_budget("tome", "r13", 2).r == 13
    assert bench.parse_budget("fastv", "64", 1).fastv_layer == 1
    assert bench.parse_budget("pool", "0.25", 2).keep_ratio == 0.25
    with pytest.raises(ValueError, match="merging methods"):
        bench.parse_budget("pool", "r13", 2)
    two_stage = bench.parse_budget("crossget", "128@0.5", 3)
    assert (two_stage.visual_tokens, two_stage.llm_keep_ratio) == (128, 0.5)
    assert two_stage.fastv_layer == 3 and two_stage.method == "crossget"
    assert bench.parse_budget("divprune", "96@0.25", 2).llm_keep_ratio == 0.25
    with pytest.raises(ValueError, match="not fastv"):
        bench.parse_budget("fastv", "128@0.5", 2)
    with pytest.raises(ValueError, match="keep ratio after '@'"):
        bench.parse_budget("crossget", "128@half", 2)


def test_bench_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--llm-layers", "--methods", "--budgets", "--accuracy", "--out"):
        assert flag in text


def test_bench_runs_end_to_end_on_the_reference_architecture(tmp_path: Path) -> None:
    argv = ["--model", "reference", "--methods", "pool,fastv", "--budgets", "full,r13,64"]
    argv += ["--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--out", str(tmp_path)]
    assert bench.main([*argv, "--memory", "none"]) == 0  # tests/test_bench_speed.py: memory
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {("full", "full"), ("pool", "64"), ("fastv", "64")}
    assert rows[("pool", "64")]["visual_tokens"] == rows[("pool", "64")]["kept_tokens"] == 64
    assert rows[("fastv", "64")]["visual_tokens"] == 256  # the LLM receives all, keeps 64
    assert rows[("fastv", "64")]["kept_tokens"] == 64
    assert rows[("pool", "64")]["flops_speedup"] > 1
    assert any("pool/r13" in note for note in report["skipped"])
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert "| pool | 64 | 64 | 64 |" in (tmp_path / "bench.md").read_text()
    machine = report["environment"]
    assert machine["device"] == "cpu" and machine["threads"] == torch.get_num_threads()
    assert f"Machine: {machine['cpu']} (" in (tmp_path / "bench.md").read_text()
