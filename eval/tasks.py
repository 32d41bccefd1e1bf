"""Evaluation tasks read from local files, each scored with the metric of its benchmark.

Every task turns its files into :class:`Item` rows (image, question, what scoring needs) and
scores a list of predictions with :mod:`eval.metrics`.  Nothing is downloaded: when files are
missing the error says exactly which files to put where.

Layouts (``--data DIR``):

* ``testbed``: a folder written by ``crossget data make --out DIR`` (``hf/`` or ``parquet/``).
* ``vqav2``, ``textvqa``, ``gqa``, ``pope``, ``mme``, ``scienceqa``: LLaVA's evaluation layout —
  ``DIR/questions.jsonl`` (one ``{"question_id", "image", "text"}`` per line, as in LLaVA's
  ``llava_*.jsonl`` question files), ``DIR/images/`` (the files ``image`` names) and
  ``DIR/annotations.jsonl`` keyed by ``question_id`` with the task's ground truth:
  ``answers`` (list of 10) and ``answer_type`` for vqav2; ``answers`` for textvqa; ``answer``
  for gqa; ``label`` (yes/no) for pope; ``answer`` (yes/no) and ``category`` for mme;
  ``answer`` (index of the right choice) and ``choices`` for scienceqa.
* ``mmbench``: ``DIR/*.tsv`` as released (``index, question, hint, A..D, answer, category,
  image`` with base64 images); every question is asked once per circular shift of its options
  and scored with CircularEval.  A local ``datasets`` copy
  (``save_to_disk`` folder with the same columns plus an ``image`` column) works too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from eval import metrics

__all__ = ["TASKS", "Item", "load_task", "score_task"]

LLAVA_TASKS = ("vqav2", "textvqa", "gqa", "pope", "mme", "scienceqa")
T = TypeVar("T")

TASKS: tuple[str, ...] = ("testbed", *LLAVA_TASKS, "mmbench")
MMBENCH_PROMPT = "Answer with the option's letter from the given choices directly."
GROUND_TRUTH_FIELDS: dict[str, tuple[str, ...]] = {
    "vqav2": ("answers",),
    "textvqa": ("answers",),
    "gqa": ("answer",),
    "pope": ("label",),
    "mme": ("answer", "category"),
    "scienceqa": ("answer", "choices"),
}


@dataclass
class Item:
    """One question: its id, image (loaded lazily), prompt text and ground truth."""

    item_id: str
    question: str
    truth: dict[str, Any]
    image: Image.Image | None = None
    image_path: Path | None = None
    group: str = "all"
    extra: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        if self.image is not None:
            return self.image.convert("RGB")
        if self.image_path is None:
            raise ValueError(f"item {self.item_id} has no image")
        try:
            with Image.open(self.image_path) as handle:
                return handle.convert("RGB")
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"image {self.image_path} for question {self.item_id} is missing"
            ) from error
        except OSError as error:
            raise ValueError(
                f"image {self.image_path} for question {self.item_id} cannot be decoded "
                f"({error}); replace the file"
            ) from error


def _missing_files_error(task: str, data: Path, missing: Sequence[str]) -> FileNotFoundError:
    fields = ", ".join(GROUND_TRUTH_FIELDS[task])
    return FileNotFoundError(
        f"task {task!r} needs these files under {data}: {', '.join(missing)} are missing.\n"
        f"  {data}/questions.jsonl   one JSON object per line: question_id, image, text\n"
        f"  {data}/images/           the image files named by `image`\n"
        f"  {data}/annotations.jsonl one JSON object per line: question_id, {fields}\n"
        "(or a `datasets.save_to_disk` folder with those columns and an image column)"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error.msg})") from error
    return rows


def _load_llava_layout(task: str, data: Path) -> list[Item]:
    if (data / "dataset_info.json").is_file() or (data / "state.json").is_file():
        return _load_saved_dataset(task, data)
    needed = ["questions.jsonl", "images", "annotations.jsonl"]
    missing = [name for name in needed if not (data / name).exists()]
    if missing:
        raise _missing_files_error(task, data, missing)
    truth = {str(row["question_id"]): row for row in _read_jsonl(data / "annotations.jsonl")}
    items = []
    for row in _read_jsonl(data / "questions.jsonl"):
        question_id = str(row["question_id"])
        if question_id not in truth:
            raise ValueError(f"question {question_id} has no row in {data}/annotations.jsonl")
        gt = truth[question_id]
        absent = [name for name in GROUND_TRUTH_FIELDS[task] if name not in gt]
        if absent:
            raise ValueError(f"annotation of question {question_id} lacks {absent}")
        items.append(
            Item(
                item_id=question_id,
                question=row["text"],
                truth=gt,
                image_path=data / "images" / row["image"],
                group=str(gt.get("category") or gt.get("answer_type") or "all"),
            )
        )
    return items


def _load_saved_dataset(task: str, data: Path) -> list[Item]:
    import datasets

    loaded = datasets.load_from_disk(str(data))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["test"] if "test" in loaded else next(iter(loaded.values()))
    items = []
    for row in loaded:
        gt = {name: row[name] for name in GROUND_TRUTH_FIELDS[task]}
        items.append(
            Item(
                item_id=str(row["question_id"]),
                question=row.get("text") or row["question"],
                truth=gt | {"answer_type": row.get("answer_type")},
                image=row["image"],
                group=str(row.get("category") or row.get("answer_type") or "all"),
            )
        )
    return items


def _load_testbed(data: Path, split: str) -> list[Item]:
    from eval.testbed.data import load_split

    return [
        Item(
            item_id=str(row["id"]),
            question=row["question"],
            truth={"answer": row["answer"]},
            image=row["image"],
            group=row["family"],
            extra={"meta": row["meta"]},
        )
        for row in load_split(data, split)
    ]


def _load_mmbench(data: Path) -> list[Item]:
    import base64
    import csv
    import io
    import sys

    tables = sorted(data.glob("*.tsv"))
    if not tables:
        raise FileNotFoundError(
            f"task 'mmbench' needs the released TSV (e.g. mmbench_dev_20230712.tsv) in {data}"
        )
    csv.field_size_limit(sys.maxsize)
    items = []
    with tables[0].open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            letters = [k for k in "ABCD" if row.get(k) not in (None, "", "nan")]
            image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
            hint = row.get("hint") if row.get("hint") not in (None, "", "nan") else ""
            for shift in range(len(letters)):
                texts = [row[letters[(i + shift) % len(letters)]] for i in range(len(letters))]
                options = dict(zip(letters, texts, strict=True))
                gold = letters[(letters.index(row["answer"]) - shift) % len(letters)]
                lines = [hint, row["question"], *(f"{k}. {v}" for k, v in options.items())]
                question = "\n".join(line for line in lines if line) + "\n" + MMBENCH_PROMPT
                index = int(row["index"]) + shift * 1_000_000
                items.append(
                    Item(
                        item_id=str(index),
                        question=question,
                        truth={"index": index, "answer": gold, "category": row["category"]}
                        | options,
                        image=image,
                        group=row["category"],
                    )
                )
    return items


def load_task(
    task: str,
    data: str | Path,
    split: str = "test",
    limit: int | None = None,
    per_group: int | None = None,
) -> list[Item]:
    """The task's items in a stable order (so shards and reruns line up).

    ``per_group`` keeps the first N items of each group (testbed: family) in that order: a
    smaller run that still covers every family, where ``limit`` (the first N items) would
    leave out a family written last, such as the testbed's fashion photos."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    root = Path(data)
    if not root.exists():
        hint = ""
        if task == "testbed":
            hint = (
                f"; create it with `crossget data make --out {root}` (`make demo` writes its "
                "own copy to data/testbed-demo/seed0-224px, which --data also takes)"
            )
        raise FileNotFoundError(f"data folder {root} does not exist{hint}")
    if task == "testbed":
        items = _load_testbed(root, split)
    elif task == "mmbench":
        items = _load_mmbench(root)
    else:
        items = _load_llava_layout(task, root)
    if per_group:
        items = first_per_group(items, per_group, lambda item: item.group)
    return items[:limit] if limit else items


def first_per_group(items: Sequence[T], n: int, group_of: Callable[[T], str]) -> list[T]:
    """The first ``n`` items of every group, in their original order."""
    if n < 1:
        raise ValueError(f"per-family count must be at least 1, got {n}")
    seen: Counter[str] = Counter()
    kept = []
    for item in items:
        group = group_of(item)
        if seen[group] < n:
            seen[group] += 1
            kept.append(item)
    return kept


def _group_means(values: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    return {k: 100.0 * v for k, v in metrics.per_group_accuracy(values, groups).items()}


def _score_testbed(items: Sequence[Item], predictions: Sequence[str]) -> dict[str, Any]:
    correct = metrics.exact_match_per_item(predictions, [i.truth["answer"] for i in items])
    values = [float(c) for c in correct]
    return {"accuracy": 100.0 * sum(values) / len(values)} | {
        f"accuracy/{k}": v for k, v in _group_means(values, [i.group for i in items]).items()
    }


def _score_soft(
    items: Sequence[Item], predictions: Sequence[str], scorer: Callable[[str, Any], float]
) -> dict[str, Any]:
    values = [scorer(p, i.truth["answers"]) for p, i in zip(predictions, items, strict=True)]
    return {"accuracy": 100.0 * sum(values) / len(values)} | {
        f"accuracy/{k}": v for k, v in _group_means(values, [i.group for i in items]).items()
    }


def score_task(task: str, items: Sequence[Item], predictions: Sequence[str]) -> dict[str, Any]:
    """The benchmark's own numbers for these predictions (percentages, MME in points)."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    if not items:
        raise ValueError("nothing to score")
    if task == "testbed":
        return _score_testbed(items, predictions)
    if task == "vqav2":
        return _score_soft(items, predictions, metrics.vqa_accuracy)
    if task == "textvqa":
        return _score_soft(items, predictions, metrics.textvqa_accuracy)
    if task == "gqa":
        return {"accuracy": metrics.gqa_accuracy(predictions, [i.truth["answer"] for i in items])}
    if task == "pope":
        scores = metrics.pope_metrics(predictions, [i.truth["label"] for i in items])
        return {k: 100.0 * v for k, v in scores.items()}
    if task == "mme":
        records = [
            {
                "question_id": str(i.truth.get("image_id", i.item_id)),
                "category": i.truth["category"],
                "prediction": p,
                "answer": i.truth["answer"],
            }
            for p, i in zip(predictions, items, strict=True)
        ]
        return metrics.mme_scores(records)
    if task == "scienceqa":
        answers = [int(i.truth["answer"]) for i in items]
        choices = [i.truth["choices"] for i in items]
        return {"accuracy": metrics.scienceqa_accuracy(predictions, answers, choices)}
    if task == "mmbench":
        records = [i.truth | {"prediction": p} for p, i in zip(predictions, items, strict=True)]
        return metrics.mmbench_circular_accuracy(records)
    raise ValueError(f"unknown task {task!r}")
