"""eval.image_reliance: the own-image vs other-image answer loss and its sign test."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eval import image_reliance
from eval.run import format_prompt, load_model
from eval.tasks import load_task


def test_answer_loss_is_the_mean_loss_of_the_answer_tokens(model_dir: Path, testbed: Path) -> None:
    model, processor = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    item = load_task("testbed", testbed, "test")[0]
    image = item.load_image().convert("RGB")
    prompt = format_prompt(processor, item.question, None)
    ids = processor(images=image, text=prompt + item.truth["answer"], return_tensors="pt")
    start = processor(images=image, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**ids).logits[0].double()
    targets = ids["input_ids"][0, start:]
    assert len(targets) >= 1  # the answer adds tokens
    expected = torch.nn.functional.cross_entropy(logits[start - 1 : -1], targets)
    got = image_reliance.answer_loss(model, processor, item, image)
    assert abs(got - float(expected)) < 1e-5


def test_cli_reports_every_family_and_refuses_a_shift_onto_itself(
    model_dir: Path, testbed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "reliance.json"
    argv = ["--model", str(model_dir), "--data", str(testbed), "--split", "test"]
    assert (
        image_reliance.main(
            [*argv, "--per-family", "1", "--shift", "3", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    result = json.loads(out.read_text())
    families = list(dict.fromkeys(i.group for i in load_task("testbed", testbed, "test")))
    assert list(result["families"]) == families and result["overall"]["n"] == len(families)
    overall = result["overall"]
    assert overall["own_lower"] + overall["other_lower"] <= overall["n"]
    rows = result["rows"]
    assert overall["own_loss"] == sum(r["own"] for r in rows) / len(rows)
    shift_to_self = ["--per-family", "1", "--shift", str(len(families)), "--no-progress"]
    assert image_reliance.main([*argv, *shift_to_self]) == 2


def test_sign_test_of_the_paired_counts() -> None:
    rows = [{"family": "a", "own": 0.1, "other": 0.9}] * 6
    rows += [{"family": "b", "own": 0.5, "other": 0.5}] * 3  # ties say nothing
    result = image_reliance.summarise(rows)
    assert result["overall"]["own_lower"] == 6 and result["overall"]["other_lower"] == 0
    assert result["overall"]["p_value"] == 2 / 2**6
    assert result["families"]["b"]["p_value"] == 1.0


def test_captions_score_each_images_scene_caption(model_dir: Path, testbed: Path) -> None:
    from eval.testbed.data import CAPTION_PROMPTS, scene_caption

    items = load_task("testbed", testbed, "test", per_group=1)
    captioned = image_reliance.caption_items(items)
    assert [c.item_id for c in captioned] == [i.item_id for i in items]
    for item, caption in zip(items, captioned, strict=True):
        assert caption.question in CAPTION_PROMPTS
        meta = json.loads(item.extra["meta"])
        assert caption.truth["answer"] == scene_caption(meta, item.load_image().size[0])
    argv = ["--model", str(model_dir), "--data", str(testbed), "--split", "test"]
    assert (
        image_reliance.main(
            [*argv, "--per-family", "1", "--shift", "3", "--captions", "--no-progress"]
        )
        == 0
    )
    weights = ["--weights", str(model_dir)]
    assert image_reliance.main([*argv, *weights, "--no-progress"]) == 2  # not pretrained-mini
