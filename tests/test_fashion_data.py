"""The fashion family: grids of real product photos (here a synthetic IDX stand-in)."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from eval.testbed import data

N_TRAIN, N_TEST = 120, 60


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST's four files, tiny: every photo is a flat grey level unique to its index
    within its file, so a rendered cell tells which photo it came from."""
    folder = tmp_path_factory.mktemp("fashion")
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = (np.arange(n) // 2) % 10  # both halves of t10k hold every class
        images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None] * 2 + 1, 28, 1)
        images = np.repeat(images, 28, 2)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return folder


def test_idx_reader_checks_the_magic(fashion_dir: Path) -> None:
    images = data.read_idx(fashion_dir / "train-images-idx3-ubyte.gz", 2051)
    assert images.shape == (N_TRAIN, 28, 28)
    assert int(images[7, 3, 3]) == 15
    with pytest.raises(ValueError, match="magic 2049, expected 2051"):
        data.read_idx(fashion_dir / "train-labels-idx1-ubyte.gz", 2051)


def test_first_answers_are_balanced_and_correct(fashion_dir: Path) -> None:
    answers = data.FAMILY_ANSWERS[data.FASHION]
    assert len(answers) == 17
    records = data.generate_fashion_examples(
        2 * len(answers), 3, "validation", image_size=112, folder=fashion_dir
    )
    assert Counter(r["answer"] for r in records) == dict.fromkeys(answers, 2)
    assert data.CHANCE[data.FASHION] == pytest.approx(3 / 17)
    for record in data.generate_fashion_examples(
        40, 3, "train", image_size=112, questions_per_image=16, folder=fashion_dir
    ):
        cells = json.loads(record["meta"])["cells"]
        labels = [c["label"] for c in cells]
        question, answer = record["question"], record["answer"]
        assert answer in data.KIND_ANSWERS[(data.FASHION, record["kind"])]
        if record["kind"] == "cell":
            row, column = int(question.split()[4]), int(question.split()[6].rstrip("?"))
            assert labels[(row - 1) * 3 + column - 1] == answer
        elif record["kind"] == "count":
            plural = question.split()[2]
            name = next(n for n, p in data.FASHION_PLURALS.items() if p == plural)
            assert labels.count(name) == int(answer)
        else:
            name = question.removeprefix("is there a ").rstrip("?")
            assert (name in labels) == (answer == "yes")


def test_deterministic_by_seed(fashion_dir: Path) -> None:
    def render(seed: int) -> list[tuple[str, str, bytes]]:
        records = data.generate_fashion_examples(
            12, seed, "train", image_size=112, questions_per_image=3, folder=fashion_dir
        )
        out = []
        for r in records:
            buffer = io.BytesIO()
            r["image"].save(buffer, format="PNG")
            out.append((r["question"], r["answer"], buffer.getvalue()))
        return out

    assert render(5) == render(5)
    assert render(5) != render(6)


def test_no_photo_shared_between_splits(fashion_dir: Path) -> None:
    drawn = {}
    for pool in ("train", "validation", "test"):
        records = data.generate_fashion_examples(60, 0, pool, image_size=112, folder=fashion_dir)
        drawn[pool] = data.fashion_photo_ids(records)
        # the cell shows the photo the metadata names (grey level 2 * index + 1)
        image = np.asarray(records[0]["image"].convert("L"))
        for cell in json.loads(records[0]["meta"])["cells"]:
            x0, y0, x1, y1 = cell["box"]
            assert int(np.median(image[y0:y1, x0:x1])) == 2 * cell["photo"] + 1
    assert {f for f, _ in drawn["train"]} == {"train"}
    validation = {i for _, i in drawn["validation"]}
    test = {i for _, i in drawn["test"]}
    assert validation and test and not validation & test
    assert all(i % 2 == 0 for i in validation) and all(i % 2 == 1 for i in test)


def test_reference_vocabulary_and_rotation_unchanged() -> None:
    assert data.FASHION not in data.FAMILIES
    assert "t-shirt" not in data.vocabulary_words()
    records = data.generate_examples(7, 0, image_size=112)
    assert [r["family"] for r in records] == list(data.FAMILIES)


def test_make_appends_the_family_and_skips_it_when_missing(
    fashion_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["make", "--train", "7", "--validation", "0", "--test", "0", "--image-size", "112"]
    out = tmp_path / "with"
    flags = ["--fashion-train", "4", "--fashion-dir", str(fashion_dir), "--no-progress"]
    assert data.main([*common, "--out", str(out), *flags]) == 0
    train = data.load_split(out, "train")
    assert Counter(train["family"]) == {**dict.fromkeys(data.FAMILIES, 1), data.FASHION: 4}
    missing = ["--fashion-train", "4", "--fashion-dir", str(tmp_path / "nope"), "--no-progress"]
    assert data.main([*common, "--out", str(tmp_path / "without"), *missing]) == 0
    assert "skipping the fashion family" in capsys.readouterr().err
    assert data.FASHION not in data.load_split(tmp_path / "without", "train")["family"]
    with pytest.raises(data.FashionDataMissing, match="apt-get install -y dataset-fashion-mnist"):
        data.generate_fashion_examples(1, 0, "train", folder=tmp_path / "nope")


def test_fashion_captions_name_every_cell(fashion_dir: Path) -> None:
    for record in data.generate_fashion_examples(
        12, 3, "train", image_size=112, questions_per_image=16, folder=fashion_dir
    ):
        cells = json.loads(record["meta"])["cells"]
        caption = data.scene_caption(json.loads(record["meta"]), 112)
        assert caption.startswith("a grid of product photos. row 1: ")
        for cell in cells:
            row = caption.split(f"row {cell['row']}: ")[1].split(".")[0].split(", ")
            assert row[cell["column"] - 1] == cell["label"]
