"""The lm-eval model `crossget-llava` applies CrossGET and runs the testbed task offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mllm_crossget as crossget
from eval import lmeval_plugin


def test_model_args_become_a_crossget_config(model_dir: Path) -> None:
    lm = lmeval_plugin.CrossGETLlavaLM(
        pretrained=str(model_dir), visual_tokens=32, batch_size=2, device="cpu"
    )
    assert lm.crossget_config == crossget.CrossGETConfig(visual_tokens=32)
    assert crossget.num_visual_tokens(lm._model) == 32
    from PIL import Image

    inputs = lm.processor(images=[Image.new("RGB", (112, 112))], text=["<image> what"])
    assert inputs["input_ids"][0].count(lm._model.config.image_token_id) == 32
    baseline = lmeval_plugin.CrossGETLlavaLM(pretrained=str(model_dir), batch_size=2, device="cpu")
    assert baseline.crossget_config is None and not crossget.is_applied(baseline._model)


def test_lm_eval_cli_runs_the_testbed_offline(
    model_dir: Path, testbed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lmeval_plugin.main(
        [
            "--model",
            "crossget-llava",
            "--model_args",
            f"pretrained={model_dir},visual_tokens=32",
            "--include_path",
            str(testbed / "lmeval"),
            "--tasks",
            "crossget_testbed",
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path),
        ]
    )
    results = [json.loads(p.read_text()) for p in tmp_path.rglob("results_*.json")]
    assert results, "lm-eval wrote no results file"
    scores = results[0]["results"]["crossget_testbed"]
    assert 0.0 <= scores["exact_match,none"] <= 1.0
    assert results[0]["n-samples"]["crossget_testbed"]["effective"] == 10
