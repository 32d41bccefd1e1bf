"""eval.probe_features: the patch under each object, the probe's fit, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval.probe_features import centre_patch, fit_probe, image_key, main
from eval.tasks import Item

pytestmark = pytest.mark.usefixtures("one_thread")


def test_centre_patch_is_the_patch_under_the_box_centre() -> None:
    # 224 px, 16 x 16 patches of 14 px: centre (50, 50) is column 3, row 3.
    assert centre_patch([40, 40, 60, 60], 224, 16) == 3 * 16 + 3
    # centre (220, 10): last column, first row; a box past the edge stays on the grid.
    assert centre_patch([216, 0, 224, 20], 224, 16) == 15
    assert centre_patch([230, 230, 240, 240], 224, 16) == 16 * 16 - 1
    assert centre_patch([0, 0, 1, 1], 112, 8) == 0


def test_image_key_drops_the_question_number() -> None:
    def item(item_id: str, path: str | None = None) -> Item:
        return Item(item_id=item_id, question="", truth={}, image_path=path)

    assert image_key(item("s2000029-0000000-q3")) == "s2000029-0000000"
    assert image_key(item("s2000029-0000000-q12")) == "s2000029-0000000"
    assert image_key(item("plain-id")) == "plain-id"
    assert image_key(item("s1-q3", "images/a.png")) == "images/a.png"


def test_fit_probe_reads_a_linear_code_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    classes = ["red", "green", "blue"]
    labels = [classes[i] for i in rng.integers(0, 3, 300)]
    codes = np.eye(3)[[classes.index(c) for c in labels]]
    features = np.concatenate([codes * 3, rng.normal(size=(300, 5))], axis=1)
    readable = fit_probe(features[:200], labels[:200], features[200:], labels[200:])
    assert readable["accuracy"] == 1.0
    assert readable["n"] == 100
    truth = np.asarray(labels[200:])
    counts = {c: labels[:200].count(c) for c in classes}
    assert readable["majority"] == pytest.approx(
        float((truth == max(counts, key=counts.get)).mean())
    )
    noise = rng.normal(size=(300, 8))
    unreadable = fit_probe(noise[:200], labels[:200], noise[200:], labels[200:])
    assert unreadable["accuracy"] < 0.6


def test_cli_probes_a_tiny_model_on_a_tiny_testbed(
    model_dir: Path, testbed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "probe.json"
    argv = ["--model", str(model_dir), "--data", str(testbed), "--train-split", "test"]
    argv += ["--eval-split", "test", "--train-images", "6", "--eval-images", "2"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # one split for both: each side still takes its own number of images
    assert result["train"]["images"] > result["eval"]["images"] == 2
    assert result["train"]["objects"] >= result["train"]["images"]
    for where in ("feature layer", "after projector"):
        for label in ("colour", "shape"):
            row = result["probes"][where][label]
            assert row["n"] == result["eval"]["objects"]
            assert 0.0 <= row["accuracy"] <= 1.0
    assert "| after projector | shape |" in capsys.readouterr().out
