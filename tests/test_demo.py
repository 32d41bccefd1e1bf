"""`make demo`'s job end to end on the tiny testbed: every row, exact token counts, files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from eval import demo
from mllm_crossget.peers import METHOD_NAMES

BUDGETS = ("48", "32")  # the tiny model has 64 patch tokens


@pytest.fixture(scope="module")
def two_layer_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny model with a second LLM layer, so that FastV (K=1) has a row too."""
    from eval.testbed import model as testbed_model

    size = dataclasses.replace(testbed_model.MODEL_SIZES["cpu-tiny"], text_layers=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(testbed_model.MODEL_SIZES, "test-two-layers", size)
        model, processor = testbed_model.build_reference(
            size="test-two-layers", image_size=112, seed=0
        )
    folder = tmp_path_factory.mktemp("two-layer-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _table(markdown: str) -> list[list[str]]:
    """Header and rows of the markdown table in `markdown` (the `|---|` line dropped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_demo_reports_every_method_and_budget(
    two_layer_model_dir: Path, testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    argv = ["--model", str(two_layer_model_dir), "--data", str(testbed), "--out", str(out)]
    argv += ["--questions", "7", "--budgets", "full," + ",".join(BUDGETS), "--batch-size", "4"]
    argv += ["--timing-batch", "2", "--timing-repeats", "1", "--timing-warmup", "0"]
    assert demo.main([*argv, "--threads", "1", "--no-progress"]) == 0

    printed = capsys.readouterr().out
    assert "7 questions (1 per family)" in printed
    header, *rows = _table((out / "demo.md").read_text())
    assert [header, *rows] == _table(printed)
    assert header == [
        "method",
        "budget",
        *("attribute", "counting", "spatial", "small", "text", "existence", "mc"),
        *("overall", "visual tokens", "GFLOPs", "TTFT ms", "speed-up"),
    ]
    column = header.index("visual tokens")
    by_setting = {(row[0].rstrip(" *"), row[1]): row for row in rows}
    expected = [("full", "full")] + [(m, b) for m in METHOD_NAMES for b in BUDGETS]
    assert list(by_setting) == [*expected, ("chance", "-")]
    assert by_setting[("full", "full")][column] == "64"
    for method, budget in expected[1:]:
        assert by_setting[(method, budget)][column] == budget, (method, budget)
        assert by_setting[(method, budget)][-1].endswith("x")
    assert by_setting[("fastv", "32")][0] == "fastv *"  # receives all 64, keeps 32 after K

    report = json.loads((out / "demo.json").read_text())
    assert report["questions"] == 7
    assert [(r["method"], r["budget"]) for r in report["rows"]] == expected
    for row in report["rows"]:
        assert 0.0 <= row["metrics"]["accuracy"] <= 100.0
        assert row["ttft_s"] > 0
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 0
    assert len((out / "answers" / "crossget-32.jsonl").read_text().splitlines()) == 7


def test_missing_model_says_how_to_train_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "no reference model" in error and "crossget testbed-train --init-reference" in error


def test_missing_shipped_model_falls_back_to_an_untrained_stand_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make demo` keeps working before the reference model ships, and says so loudly."""
    model, processor = demo.load_model(tmp_path / "nothing", "cpu", untrained_fallback=True)
    assert "NOT TRAINED" in capsys.readouterr().err
    assert model.config.image_seq_length == 256
    assert model.config.vision_config.hidden_size == 128  # the cpu-small shape the recipe trains
    assert processor.tokenizer.padding_side == "left"


def test_a_named_model_with_its_own_loader_runs_in_its_own_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m eval.demo --model pretrained-mini`: the entry's loader is used (not a plain
    from_pretrained of its folder), questions are rendered at the processor's size (not the
    tower config's, which is 518 for pretrained-mini) and asked in the chat template."""
    import torch

    from eval import run
    from mllm_crossget import named_models
    from mllm_crossget import pretrained_mini as pm
    from mllm_crossget.named_models import NamedModel

    folder = tmp_path / "mini"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    calls: list[Path] = []

    def loader(path: Path, dtype: torch.dtype) -> tuple[object, object]:
        calls.append(path)
        return pm.tiny_stand_in(112)

    monkeypatch.setattr(named_models, "_REGISTRY", dict(named_models._REGISTRY))
    named_models.register(
        NamedModel(
            name="mini-demo",
            summary="a test entry",
            prompt="chat template",
            folder=lambda: folder,
            missing="build it",
            loader=loader,
        )
    )
    prompts: list[str] = []
    format_prompt = run.format_prompt
    monkeypatch.setattr(
        run, "format_prompt", lambda *a: prompts.append(format_prompt(*a)) or prompts[-1]
    )
    out = tmp_path / "demo"
    argv = ["--model", "mini-demo", "--data-cache", str(tmp_path / "data"), "--out", str(out)]
    argv += ["--questions", "7", "--budgets", "full,32", "--methods", "crossget,tome"]
    argv += ["--batch-size", "4", "--timing-batch", "2", "--timing-repeats", "1"]
    assert demo.main([*argv, "--timing-warmup", "0", "--threads", "1", "--no-progress"]) == 0
    assert calls == [folder]
    assert (tmp_path / "data" / "seed0-112px").is_dir()  # the stand-in's processor size
    assert prompts and all(p.startswith("<|im_start|>system") for p in prompts)
    report = json.loads((out / "demo.json").read_text())
    tokens = {(r["method"], r["budget"]): r["visual_tokens"] for r in report["rows"]}
    assert tokens == {("full", "full"): 64, ("crossget", "32"): 32, ("tome", "32"): 32}
