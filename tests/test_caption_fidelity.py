"""eval.caption_fidelity: caption loss per setting, the kept share and the sign tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mllm_crossget as crossget
from eval import caption_fidelity as fidelity
from eval.image_reliance import answer_loss, caption_items
from eval.run import load_model, method_config
from eval.tasks import Item, load_task


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test split with several images in every family."""
    from eval.testbed.data import export, make_dataset_dict

    root = tmp_path_factory.mktemp("captioned")
    export(make_dataset_dict(train=0, validation=0, test=24, seed=5), root)
    return root


def _item(family: str, index: int) -> Item:
    return Item(
        item_id=f"{family}{index}", question="q", truth={"answer": "a"}, image=None,
        image_path=f"{family}{index}.png", group=family,
    )  # fmt: skip


def test_other_image_comes_from_the_same_family_and_never_is_the_own() -> None:
    items = [_item("a", 0), _item("b", 0), _item("a", 1), _item("a", 2), _item("b", 1)]
    assert fidelity.other_image_of(items, 1) == [2, 4, 3, 0, 1]
    with pytest.raises(ValueError, match="family 'b' has 2 image"):
        fidelity.other_image_of(items, 2)  # b's two images: a shift of 2 lands on itself
    with pytest.raises(ValueError, match="family 'c' has 1 image"):
        fidelity.other_image_of([*items, _item("c", 0)], 1)
    assert fidelity.one_item_per_image([_item("a", 0), _item("a", 0), _item("a", 1)]) == [
        _item("a", 0),
        _item("a", 1),
    ]


def test_kept_share_and_sign_tests_on_known_losses() -> None:
    rows = [
        {"family": "a", "loss": {"full": 1.0, "other": 2.0, "x/8": 1.5, "y/8": 1.8}},
        {"family": "a", "loss": {"full": 1.0, "other": 3.0, "x/8": 1.5, "y/8": 1.2}},
        {"family": "b", "loss": {"full": 2.0, "other": 2.0, "x/8": 2.0, "y/8": 2.5}},
    ]
    # means: full 4/3, other 7/3, x 5/3: kept (7/3 - 5/3) / (7/3 - 4/3) = 2/3
    assert fidelity.kept_share(rows, "x/8") == pytest.approx(2 / 3)
    assert fidelity.kept_share(rows[:2], "y/8") == pytest.approx((2.5 - 1.5) / 1.5)
    test = fidelity.sign_test(rows, "x/8", "y/8")
    assert (test["first_lower"], test["second_lower"]) == (2, 1) and test["p"] == 1.0
    assert fidelity.sign_test(rows, "x/8", "full")["second_lower"] == 2  # one tie


def test_cli_scores_every_setting_against_full_and_other(
    model_dir: Path, captioned: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fidelity.json"
    argv = ["--model", str(model_dir), "--data", str(captioned), "--split", "test"]
    argv += ["--per-family", "3", "--budgets", "48,32", "--methods", "crossget,tome"]
    argv += ["--shift", "1", "--out", str(out), "--no-progress"]
    assert fidelity.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    names = ["full", "other", "crossget/48", "tome/48", "crossget/32", "tome/32"]
    assert list(result["settings"]) == names
    assert all(list(r["loss"]) == names for r in rows)
    assert set(result["crossget_vs_peers"]) == {"crossget vs tome at 48", "crossget vs tome at 32"}

    # the losses are image_reliance's caption losses: own image, a same-family image, reduced
    items = load_task("testbed", captioned, "test", per_group=3)
    items = caption_items(fidelity.one_item_per_image(items))
    assert [r["id"] for r in rows] == [i.item_id for i in items]
    model, processor = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    partner = fidelity.other_image_of(items, 1)
    first, other = items[0], items[partner[0]]
    assert other.group == first.group and other.item_id != first.item_id
    image = first.load_image().convert("RGB")
    assert rows[0]["loss"]["full"] == pytest.approx(answer_loss(model, processor, first, image))
    other_image = other.load_image().convert("RGB")
    assert rows[0]["loss"]["other"] == pytest.approx(
        answer_loss(model, processor, first, other_image)
    )
    config = method_config("crossget", 32, "cross", model.config.text_config.num_hidden_layers)
    _, reduced = crossget.apply(model, config, processor)
    assert rows[0]["loss"]["crossget/32"] == pytest.approx(
        answer_loss(model, reduced, first, image)
    )
    crossget.remove(model, processor)
    full = result["settings"]["full"]
    assert full["kept"] == pytest.approx(1.0) and full["against_full"] is None
    assert result["settings"]["other"]["kept"] == pytest.approx(0.0)
    effect = sum(r["loss"]["other"] - r["loss"]["full"] for r in rows) / len(rows)
    assert result["image_effect"]["overall"] == pytest.approx(effect)
    assert set(result["image_effect"]["by_family"]) == set(result["families"])
    with pytest.raises(SystemExit):
        fidelity.main([*argv[:-1], "--budgets", "a,b"])
    assert fidelity.main([*argv, "--per-family", "1"]) == 2  # one image a family: no partner
    with pytest.raises(SystemExit, match="not a CrossGETConfig field"):
        fidelity.main([*argv, "--crossget-option", "hubs=1"])

    # a CrossGET option reaches CrossGET only: the same full, other and ToMe losses
    capped = tmp_path / "capped.json"
    option = ["--crossget-option", "max_sources_per_destination=1"]
    assert fidelity.main([*argv[:-3], "--out", str(capped), "--no-progress", *option]) == 0
    capped_rows = json.loads(capped.read_text())["rows"]
    for row, other_row in zip(rows, capped_rows, strict=True):
        for name in ("full", "other", "tome/48", "tome/32"):
            assert other_row["loss"][name] == row["loss"][name]
    config = method_config(
        "crossget", 32, "cross", model.config.text_config.num_hidden_layers,
        options={"max_sources_per_destination": 1},
    )  # fmt: skip
    _, reduced = crossget.apply(model, config, processor)
    assert capped_rows[0]["loss"]["crossget/32"] == pytest.approx(
        answer_loss(model, reduced, first, image)
    )
    crossget.remove(model, processor)
