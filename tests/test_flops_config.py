"""Analytic FLOPs against torch's own counter, and the config's validation and JSON round trip."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llava
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

import mllm_crossget as crossget
from mllm_crossget.config import CONFIG_NAME


def _eager_tiny_llava() -> LlavaForConditionalGeneration:
    # Eager attention: torch's counter does not count the CPU SDPA kernel.
    return tiny_llava(attn="eager")


@pytest.mark.parametrize(
    "budget",
    [None, {"visual_tokens": 20}, {"visual_tokens": 8, "guidance": "none"}, {"r": 9}],
)
def test_flops_report_matches_flop_counter(budget: dict | None) -> None:
    model = _eager_tiny_llava()
    if budget is not None:
        crossget.apply(model, crossget.CrossGETConfig(**budget))
    report = crossget.flops_report(model, prompt_length=10)
    visual = report.visual_tokens
    input_ids = torch.cat(
        [
            torch.ones(1, 1, dtype=torch.long),
            torch.full((1, visual), 99),
            torch.randint(2, 90, (1, 9)),
        ],
        dim=1,
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 56, 56), logits_to_keep=1)
    assert counter.get_total_flops() == report.total
    if budget is not None:
        assert visual == crossget.num_visual_tokens(model)


def test_merging_cuts_vision_and_llm_flops() -> None:
    model = _eager_tiny_llava()
    full = crossget.flops_report(model, prompt_length=10)
    crossget.apply(model, crossget.CrossGETConfig(visual_tokens=16))
    merged = crossget.flops_report(model, prompt_length=10)
    assert merged.visual_tokens == 16 and full.visual_tokens == 64
    assert merged.vision < full.vision and merged.llm_prefill < full.llm_prefill


def test_config_json_round_trip(tmp_path) -> None:
    config = crossget.CrossGETConfig(r=[1, 2, 3], guidance="query", schedule="front")
    path = config.save_pretrained(tmp_path)
    assert path.name == CONFIG_NAME
    assert crossget.CrossGETConfig.from_pretrained(tmp_path) == config
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({}, "no budget"),
        ({"visual_tokens": 64, "r": 2}, "exactly one budget"),
        ({"visual_tokens": 0}, "visual_tokens"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"r": -1}, "non-negative"),
        ({"r": 2, "guidance": "magic"}, "guidance must be one of"),
        ({"r": 2, "schedule": "late"}, "schedule must be one of"),
        ({"r": 2, "matching": "bipartite", "guidance": "query"}, "bipartite"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        crossget.CrossGETConfig(**kwargs)


def test_config_unknown_key_and_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown CrossGET config keys"):
        crossget.CrossGETConfig.from_dict({"r": 1, "ratio": 0.5})
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        crossget.CrossGETConfig.from_pretrained(tmp_path)


def test_atomic_writers_replace_whole_files_with_usual_permissions(tmp_path, monkeypatch) -> None:
    """The one atomic writer: UTF-8 text, umask-respecting permissions (not mkstemp's 0600), no
    temporary file left behind, and a failed write leaves the old file as it was."""
    import json
    import os
    import stat

    from mllm_crossget import config as config_module
    from mllm_crossget.config import atomic_output, atomic_write_text, write_json_atomic

    target = tmp_path / "out.md"
    target.write_text("old\n")
    old_umask = os.umask(0o022)
    try:
        atomic_write_text(target, "naïve – ünïcode\n")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == "naïve – ünïcode\n".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.md"]

    def broken_replace(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(config_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_bytes() == "naïve – ünïcode\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.md"]

    picture = tmp_path / "plot.png"
    with atomic_output(picture, suffix=".png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"  # savefig reads the extension
        tmp.write_bytes(b"png")
    assert picture.read_bytes() == b"png"
    with (
        pytest.raises(RuntimeError, match="savefig failed"),
        atomic_output(picture, suffix=".png") as tmp,
    ):
        tmp.write_bytes(b"half")
        raise RuntimeError("savefig failed")
    assert picture.read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.md", "plot.png"]

    nested = tmp_path / "a" / "b" / "r.json"
    write_json_atomic(nested, {"x": [1, 2]}, indent=1)
    assert nested.read_text() == json.dumps({"x": [1, 2]}, indent=1) + "\n"
