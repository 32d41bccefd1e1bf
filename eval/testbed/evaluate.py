"""Per-family exact-match accuracy of a testbed model, printed beside chance.

Accuracy alone hides whether a family is learned at all (yes/no starts at 50%, counting at
10%), so every row carries the kind-aware chance level of exactly the questions evaluated.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.testbed.data import FAMILIES, KIND_ANSWERS, SPLITS, load_split
from eval.testbed.model import answer, load_reference, normalize_answer
from mllm_crossget import named_models
from mllm_crossget.config import write_json_atomic


def evaluate_dataset(
    model: Any,
    processor: Any,
    dataset: Any,
    batch_size: int = 32,
    limit: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Answers every question (batched greedy decoding) and scores exact match per family."""
    from tqdm.auto import tqdm

    total = len(dataset) if limit <= 0 else min(limit, len(dataset))
    correct: dict[str, int] = {}
    count: dict[str, int] = {}
    chance: dict[str, float] = {}
    kinds: dict[str, list[int]] = {}  # "family:kind" -> [correct, asked]
    predictions = []
    for start in tqdm(range(0, total, batch_size), desc="evaluating", disable=not progress):
        batch = dataset[start : min(start + batch_size, total)]
        answers = answer(model, processor, batch["image"], batch["question"])
        for i, predicted in enumerate(answers):
            family, kind = batch["family"][i], batch["kind"][i]
            hit = predicted == normalize_answer(batch["answer"][i])
            count[family] = count.get(family, 0) + 1
            correct[family] = correct.get(family, 0) + int(hit)
            chance[family] = chance.get(family, 0.0) + 1.0 / len(KIND_ANSWERS[(family, kind)])
            tally = kinds.setdefault(f"{family}:{kind}", [0, 0])
            tally[0] += int(hit)
            tally[1] += 1
            predictions.append(
                {
                    "id": batch["id"][i],
                    "family": family,
                    "kind": kind,
                    "answer": batch["answer"][i],
                    "prediction": predicted,
                    "correct": hit,
                }
            )
    families = [f for f in FAMILIES if f in count] + sorted(set(count) - set(FAMILIES))
    per_family = {
        f: {
            "n": count[f],
            "accuracy": correct[f] / count[f],
            "chance": chance[f] / count[f],
        }
        for f in families
    }
    n_total = sum(count.values())
    overall = {
        "n": n_total,
        "accuracy": sum(correct.values()) / n_total if n_total else 0.0,
        "chance": sum(chance.values()) / n_total if n_total else 0.0,
        "macro_accuracy": sum(r["accuracy"] for r in per_family.values()) / max(1, len(per_family)),
    }
    per_kind = {
        name: {"n": asked, "accuracy": right / asked}
        for name, (right, asked) in sorted(kinds.items())
    }
    return {
        "overall": overall,
        "families": per_family,
        "kinds": per_kind,
        "predictions": predictions,
    }


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: family | n | accuracy | chance | halfway-to-100% target."""
    lines = [
        "| family | n | accuracy | chance | halfway target |",
        "|---|---:|---:|---:|---:|",
    ]
    for family, row in results["families"].items():
        target = (row["chance"] + 1.0) / 2
        lines.append(
            f"| {family} | {row['n']} | {100 * row['accuracy']:.1f}% | "
            f"{100 * row['chance']:.1f}% | {100 * target:.1f}% |"
        )
    overall = results["overall"]
    lines.append(
        f"| **overall** | {overall['n']} | {100 * overall['accuracy']:.1f}% | "
        f"{100 * overall['chance']:.1f}% | |"
    )
    return "\n".join(lines)


def format_kind_table(results: dict[str, Any]) -> str:
    """Markdown table of accuracy per question kind, the level a family's average hides
    (multiple-choice counting is one kind of six in its family)."""
    lines = ["| family:kind | n | accuracy |", "|---|---:|---:|"]
    for name, row in results["kinds"].items():
        lines.append(f"| {name} | {row['n']} | {100 * row['accuracy']:.1f}% |")
    return "\n".join(lines)


def evaluate_folder(
    model_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    split: str,
    limit: int = 0,
    batch_size: int = 32,
    output: str | os.PathLike[str] | None = None,
    progress: bool = True,
    by_kind: bool = False,
) -> dict[str, Any]:
    """Loads a saved model and a data split, prints the table (and with `by_kind` the
    per-kind one) and optionally writes JSON."""
    model, processor = load_reference(model_dir)
    dataset = load_split(data_dir, split)
    results = evaluate_dataset(
        model, processor, dataset, batch_size=batch_size, limit=limit, progress=progress
    )
    print(f"model {model_dir} on {split} of {data_dir}")
    print(format_table(results))
    if by_kind:
        print(format_kind_table(results))
    if output is not None:
        write_json_atomic(Path(output), results, indent=1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.testbed.evaluate",
        description="Exact-match accuracy per question family, beside chance.",
    )
    parser.add_argument(
        "--model",
        type=named_models.existing_folder_argument,
        default="reference",
        help="a named model (reference: the shipped model; default) or a model folder",
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="export root or save_to_disk folder"
    )
    parser.add_argument("--split", default="test", help=f"split to score, one of {SPLITS}")
    parser.add_argument("--limit", type=int, default=0, help="score the first N questions only")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generate call")
    parser.add_argument(
        "--by-kind", action="store_true", help="also print accuracy per question kind"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="also write results as JSON (with every question's answer and prediction)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        evaluate_folder(
            args.model,
            args.data,
            args.split,
            limit=args.limit,
            batch_size=args.batch_size,
            output=args.output,
            progress=not args.no_progress,
            by_kind=args.by_kind,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
