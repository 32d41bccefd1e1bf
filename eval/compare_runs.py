"""Compare finished `crossget eval` runs question by question: per-family accuracy and McNemar.

    python -m eval.compare_runs --data data/testbed --split test \\
        --run new=runs/test_new/answers/testbed-crossget-64 \\
        --run tome=runs/test_peers/answers/testbed-tome-64 --baseline new

Each ``--run NAME=STEM`` names the answers of one (method, budget) of an earlier
`crossget eval --out OUT` run (``OUT/answers/<task>-<method>-<budget>``, without the
``.rankN.jsonl`` suffix; every rank's file is read).  The table gives overall and per-family
accuracy; then every run is compared with ``--baseline`` on the same questions (exact
McNemar test: right only with the run / right only with the baseline, p-value), overall and
within each family.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from eval import metrics
from eval.run import read_run_answers
from eval.tasks import first_per_group

__all__ = ["compare", "main"]


def _questions(
    data: Path, split: str, limit: int | None, per_family: int | None = None
) -> list[tuple[str, str, str]]:
    """(id, answer, family) of a testbed split, from ``DATA/llava/SPLIT.json`` (in the order
    `crossget eval` reads the split, so ``limit`` takes the same questions)."""
    path = data / "llava" / f"{split}.json"
    if not path.is_file():
        raise SystemExit(f"error: no {path}; make the data with `crossget data make --out {data}`")
    rows = json.loads(path.read_text(encoding="utf-8"))
    if per_family:
        rows = first_per_group(rows, per_family, lambda row: row["family"])
    rows = rows if limit is None else rows[:limit]
    return [(row["id"], row["conversations"][1]["value"], row["family"]) for row in rows]


def _answers(stem: Path) -> dict[str, str]:
    if not any(stem.parent.glob(f"{stem.name}.rank*.jsonl")):
        raise SystemExit(f"error: no answers {stem}.rank*.jsonl; run `crossget eval` first")
    return read_run_answers(stem.parent, stem.name)


def compare(
    data: Path,
    split: str,
    runs: Sequence[tuple[str, Path]],
    baseline: str,
    limit: int | None = None,
    per_family: int | None = None,
) -> str:
    """The markdown report: accuracy per family, then McNemar of each run against baseline."""
    items = _questions(data, split, limit, per_family)
    truth = [answer for _, answer, _ in items]
    families = sorted({family for _, _, family in items})
    family_rows = {f: [i for i, item in enumerate(items) if item[2] == f] for f in families}
    correct: dict[str, list[bool]] = {}
    for name, stem in runs:
        answers = _answers(stem)
        missing = [qid for qid, _, _ in items if qid not in answers]
        if missing:
            raise SystemExit(f"error: {name}: {len(missing)} answers missing (e.g. {missing[:3]})")
        predictions = [answers[qid] for qid, _, _ in items]
        correct[name] = metrics.exact_match_per_item(predictions, truth)
    if baseline not in correct:
        raise SystemExit(f"error: --baseline {baseline!r} is none of the runs {list(correct)}")
    lines = [
        "| run | all | " + " | ".join(families) + " |",
        "|---|---|" + "---|" * len(families),
    ]
    for name, values in correct.items():
        cells = [f"{100.0 * sum(values) / len(values):.1f}"]
        for family in families:
            picked = [values[i] for i in family_rows[family]]
            cells.append(f"{100.0 * sum(picked) / len(picked):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Against {baseline} (right only with the run / only with {baseline}, exact McNemar):",
        "",
        "| run | difference (points) | only run | only baseline | p |",
        "|---|---|---|---|---|",
    ]
    for name, values in correct.items():
        if name == baseline:
            continue
        pair = metrics.paired_comparison(values, correct[baseline])
        lines.append(
            f"| {name} | {pair.delta_points:+.1f} | {pair.only_first} | {pair.only_second} | "
            f"{pair.p_value:.3g} |"
        )
    lines += [
        "",
        f"Per family against {baseline} (only run / only {baseline}, exact McNemar p):",
        "",
        "| run | " + " | ".join(families) + " |",
        "|---|" + "---|" * len(families),
    ]
    for name, values in correct.items():
        if name == baseline:
            continue
        cells = []
        for family in families:
            rows = family_rows[family]
            pair = metrics.paired_comparison(
                [values[i] for i in rows], [correct[baseline][i] for i in rows]
            )
            cells.append(f"{pair.only_first} / {pair.only_second}, {pair.p_value:.2g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.compare_runs",
        description="Per-family accuracy and exact McNemar tests (overall and per family) of "
        "finished eval runs.",
    )
    parser.add_argument("--data", type=Path, required=True, help="testbed data folder")
    parser.add_argument("--split", default="test", help="split the runs answered")
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=STEM",
        help="a run's answers: OUT/answers/<task>-<method>-<budget> (repeatable)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="the first N questions (as eval --limit)"
    )
    parser.add_argument(
        "--per-family",
        type=int,
        default=None,
        help="the first N questions of each family (as eval --per-family)",
    )
    parser.add_argument("--baseline", required=True, help="NAME of the run to compare against")
    args = parser.parse_args(argv)
    runs = []
    for pair in args.run:
        name, sep, stem = pair.rpartition("=")
        if not sep or not name or not stem:
            raise SystemExit(f"error: --run wants NAME=STEM, got {pair!r}")
        runs.append((name, Path(stem)))
    print(compare(args.data, args.split, runs, args.baseline, args.limit, args.per_family), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
