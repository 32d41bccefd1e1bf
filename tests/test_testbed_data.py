"""The procedural VQA testbed: determinism, balance, honest geometry, export round trip, CLI."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest

from eval.testbed import data

BALANCE_N = 7 * 60  # 60 single-question images per family


@pytest.fixture(scope="module")
def balanced_records() -> list[dict]:
    return data.generate_examples(BALANCE_N, seed=123)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_images_and_questions() -> None:
    first = data.generate_examples(21, seed=7)
    second = data.generate_examples(21, seed=7)
    assert [r["question"] for r in first] == [r["question"] for r in second]
    assert [r["answer"] for r in first] == [r["answer"] for r in second]
    assert [r["image"].tobytes() for r in first] == [r["image"].tobytes() for r in second]


def test_different_seed_differs() -> None:
    first = data.generate_examples(14, seed=7)
    other = data.generate_examples(14, seed=8)
    assert [r["image"].tobytes() for r in first] != [r["image"].tobytes() for r in other]
    assert [r["question"] for r in first] != [r["question"] for r in other]


def test_prefix_stable_when_generating_more() -> None:
    short = data.generate_examples(10, seed=3)
    long = data.generate_examples(20, seed=3)
    assert [r["id"] for r in short] == [r["id"] for r in long[:10]]
    assert [r["image"].tobytes() for r in short] == [r["image"].tobytes() for r in long[:10]]


def test_every_family_present_and_schema(balanced_records: list[dict]) -> None:
    assert Counter(r["family"] for r in balanced_records) == dict.fromkeys(data.FAMILIES, 60)
    for record in balanced_records:
        assert record["image"].mode == "RGB" and record["image"].size == (224, 224)
        answer = record["answer"]
        assert answer == answer.lower() and " " not in answer and answer
        assert answer in data.FAMILY_ANSWERS[record["family"]]
        assert answer in data.KIND_ANSWERS[(record["family"], record["kind"])]
        if record["family"] == "multiple_choice":
            assert len(record["choices"]) == 4
            assert record["choices"][data.LETTERS.index(answer)] in record["question"]
        else:
            assert record["choices"] == []


def test_answers_balanced_within_family(balanced_records: list[dict]) -> None:
    for family in data.FAMILIES:
        counts = Counter(r["answer"] for r in balanced_records if r["family"] == family)
        assert set(counts) == set(data.FAMILY_ANSWERS[family]), family
        assert max(counts.values()) / min(counts.values()) <= 1.5, (family, counts)


def test_chance_table_matches_balanced_data(balanced_records: list[dict]) -> None:
    measured = data.chance_by_family(balanced_records)
    for family in data.FAMILIES:
        assert 0.0 < data.CHANCE[family] < 1.0
        assert measured[family] == pytest.approx(data.CHANCE[family], abs=0.03), family
    assert data.CHANCE["existence"] == pytest.approx(0.5)
    assert data.CHANCE["multiple_choice"] == pytest.approx(0.25)


def test_small_objects_are_smaller_than_a_patch(balanced_records: list[dict]) -> None:
    seen = 0
    for record in balanced_records:
        if record["family"] != "small":
            continue
        for obj in json.loads(record["meta"])["small_objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 < x1 - x0 < data.PATCH_SIZE and 0 < y1 - y0 < data.PATCH_SIZE
            # The drawn pixels of that colour really fit in the box.
            crop = record["image"].crop((x0, y0, x1, y1))
            assert data.COLOUR_RGB[obj["colour"]] in {c for _, c in crop.getcolors(4096)}
            seen += 1
    assert seen > 20


def test_small_objects_stay_sub_patch_at_336() -> None:
    records = data.generate_examples(28, seed=5, image_size=336)
    assert records[0]["image"].size == (336, 336)
    for record in records:
        for obj in json.loads(record["meta"]).get("small_objects", []):
            x0, y0, x1, y1 = obj["box"]
            assert x1 - x0 < data.PATCH_SIZE and y1 - y0 < data.PATCH_SIZE


def test_questions_use_only_vocabulary_words(balanced_records: list[dict]) -> None:
    vocabulary = set(data.vocabulary_words())
    for record in balanced_records:
        assert set(data._split_words(record["question"])) <= vocabulary, record["question"]


def test_several_questions_per_image_share_it() -> None:
    records = data.generate_examples(40, seed=11, questions_per_image=3)
    assert len(records) == 40
    by_image: dict[str, list[dict]] = {}
    for record in records:
        by_image.setdefault(record["image_id"], []).append(record)
    assert max(len(group) for group in by_image.values()) == 3
    for group in by_image.values():
        assert len({r["question"] for r in group}) == len(group)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="image_size"):
        data.generate_examples(1, seed=0, image_size=225)
    with pytest.raises(ValueError, match="digit_pool"):
        data.generate_examples(1, seed=0, digit_pool="nope")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    dataset_dict = data.make_dataset_dict(
        train=21, validation=7, test=14, seed=0, train_questions_per_image=2
    )
    out = data.export(dataset_dict, tmp_path_factory.mktemp("testbed"))
    return out, dataset_dict


def test_export_round_trip(exported: tuple[Path, object]) -> None:
    import datasets
    import pyarrow.parquet as pq

    out, dataset_dict = exported
    loaded = datasets.load_from_disk(str(out / "hf"))
    assert {s: len(d) for s, d in loaded.items()} == {"train": 21, "validation": 7, "test": 14}
    assert loaded["test"][0]["question"] == dataset_dict["test"][0]["question"]
    assert loaded["test"][0]["image"].tobytes() == dataset_dict["test"][0]["image"].tobytes()

    for split in ("train", "validation", "test"):
        table = pq.read_table(out / "parquet" / f"{split}.parquet")
        images = table.column("image").combine_chunks()
        assert images.null_count == 0 and images.field("bytes").null_count == 0
        assert images.field("bytes")[0].as_py()[:4] == b"\x89PNG"

    for split in ("train", "validation", "test"):
        rows = json.loads((out / "llava" / f"{split}.json").read_text())
        assert len(rows) == len(loaded[split])
        for row in rows:
            assert (out / "llava" / "images" / row["image"]).is_file()
            human, gpt = row["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"]

    yaml_text = (out / "lmeval" / "crossget_testbed.yaml").read_text()
    assert "dataset_path: parquet" in yaml_text
    assert str((out / "parquet" / "test.parquet").resolve()) in yaml_text
    for key in ("output_type: generate_until", "doc_to_target: answer", "exact_match"):
        assert key in yaml_text
    assert not list(out.glob(".*tmp*")), "temporary export folders left behind"


def test_load_split_errors(exported: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = exported
    assert len(data.load_split(out, "validation")) == 7
    with pytest.raises(ValueError, match="split 'dev' not found"):
        data.load_split(out, "dev")
    with pytest.raises(FileNotFoundError):
        data.load_split(tmp_path / "missing", "test")


def test_cli_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = data.main(
        ["make", "--out", str(tmp_path), "--train", "7", "--validation", "7", "--test", "7"]
        + ["--seed", "1", "--no-progress"]
    )
    assert code == 0
    assert "train=7" in capsys.readouterr().out
    assert (tmp_path / "parquet" / "test.parquet").is_file()
    assert data.main(["make", "--out", str(tmp_path), "--image-size", "100"]) == 2


def test_empty_splits_are_left_out() -> None:
    dataset_dict = data.make_dataset_dict(train=0, validation=0, test=7, seed=0)
    assert list(dataset_dict) == ["test"]
    assert len(dataset_dict["test"]) == 7


@pytest.mark.parametrize("size", [224, 336])
def test_counting_objects_centre_inside_one_patch(size: int) -> None:
    """A counting object's centre is inside one patch (not on a corner of four), objects stay
    apart and inside the image, so one patch per object is a well-posed thing to count."""
    records = data.generate_examples(7 * 12, seed=11, image_size=size)
    seen = 0
    for record in records:
        if record["family"] != "counting":
            continue
        boxes = [obj["box"] for obj in json.loads(record["meta"])["objects"]]
        assert len(boxes) >= int(record["answer"])
        for box in boxes:
            assert min(box[:2]) >= 0 and max(box[2:]) <= size
            for centre in data._centre(box):
                assert 4.5 <= centre % data.PATCH_SIZE <= data.PATCH_SIZE - 4.5
            seen += 1
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not data._boxes_overlap(a, b, margin=2)
    assert seen > 30


def _caption_rows(caption: str) -> dict[int, list[str]]:
    """'row 1: a b c. row 2: ...' -> {1: [a, b, c], ...} (words split on spaces or commas)."""
    rows = {}
    for part in caption.split("row ")[1:]:
        number, _, cells = part.partition(":")
        rows[int(number)] = cells.strip().rstrip(".").replace(",", " ").split()
    return rows


def test_captions_state_what_each_question_asks(balanced_records: list[dict]) -> None:
    """Stage 1's captions (LLaVA's image-caption alignment) hold each question's answer:
    a cell's digit, the code, a named shape's colour, whether a shape is there, how many."""
    checked = Counter()
    for record in balanced_records:
        meta = json.loads(record["meta"])
        caption = data.scene_caption(meta, record["image"].size[0])
        assert caption == data.scene_caption(meta, record["image"].size[0])  # deterministic
        question, answer, kind = record["question"], record["answer"], record["kind"]
        if record["family"] == "multiple_choice":
            continue
        if kind == "cell":  # "what digit is in row R column C?"
            words = question.rstrip("?").split()
            row, column = int(words[5]), int(words[7])
            assert _caption_rows(caption)[row][column - 1] == answer, caption
        elif kind == "code":
            assert f"the code {answer} " in caption
        elif record["family"] == "attribute" and kind == "colour":
            shape = question.removeprefix("what color is the ").rstrip("?")
            assert f"{answer} {shape}" in caption, (question, caption)
        elif record["family"] == "existence":
            colour, shape = question.removeprefix("is there a ").rstrip("?").split()
            named = f"a {colour} {shape} " in caption or f" {colour} {shape}" in caption
            assert named == (answer == "yes"), (question, answer, caption)
        elif record["family"] == "counting":
            colour, plural = question.split()[2:4]
            shape = next(s for s, p in data.SHAPE_PLURALS.items() if p == plural)
            listed = caption.count(f"a {colour} {shape} at")
            counted = [
                int(part.split()[0])
                for part in caption.rstrip(".").replace(" and ", ", ").split(", ")
                if part.split()[1:] in ([colour, shape], [colour, plural])
            ]
            assert listed + sum(counted) == int(answer), (question, answer, caption)
        elif record["family"] == "small" and kind == "colour":
            assert f"a small {answer} dot at" in caption
        else:
            continue
        checked[record["family"]] += 1
    assert set(checked) == {"text", "attribute", "existence", "counting", "small"}


def test_caption_places_and_prompts() -> None:
    meta = {
        "objects": [
            {"colour": "red", "shape": "circle", "box": [150, 150, 200, 200]},
            {"colour": "blue", "shape": "square", "box": [0, 0, 30, 30]},
            {"colour": "green", "shape": "cross", "box": [90, 90, 130, 130]},
        ],
        "small_objects": [{"colour": "yellow", "shape": "square", "box": [200, 5, 207, 12]}],
    }
    assert data.scene_caption(meta, 224) == (
        "a blue square at the top left, a green cross at the center, a red circle at the "
        "bottom right and a small yellow dot at the top right."
    )
    many = {"objects": [{"colour": "red", "shape": "cross", "box": [i, i, i + 5, i + 5]}
                        for i in range(0, 70, 10)]}  # fmt: skip
    assert data.scene_caption(many, 224) == "7 red crosses."
    assert data.scene_caption({"objects": []}, 224) == "an empty picture."
    assert data.caption_prompt("s0-0000001") in data.CAPTION_PROMPTS
    assert len({data.caption_prompt(f"s0-{i:07d}") for i in range(8)}) > 1
