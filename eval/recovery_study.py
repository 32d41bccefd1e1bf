"""What a short LoRA recovery fine-tune buys back, measured on the testbed reference model.

One run, one question set, one table: the full model, CrossGET training-free at each budget,
and CrossGET after `recipes.llava_finetune` at the same budgets; then two ablations at the
most aggressive budget with the same number of steps: LoRA without the cross-token alignment
loss, and `query` instead of `cross` guidance; last, a control that fine-tunes the same steps
with nothing merged. Every fine-tune sees one question per sequence (as evaluation does, and
as `query` guidance requires), so the settings differ in nothing else. Every number comes
from the project's own entry points (`recipes.llava_finetune.main`, `eval.run.main`), exactly
as a user would run them.

    python -m eval.recovery_study --limit 1400 --steps 600   # 29 min on 2 CPU cores
    python -m eval.recovery_study --budgets 64 --steps 50 --limit 140 --no-control --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.testbed.data import FAMILIES
from mllm_crossget import named_models
from mllm_crossget.config import atomic_write_text, write_json_atomic


@dataclass(frozen=True)
class Setting:
    name: str
    budget: str  # "full" or a number of visual tokens
    train: bool
    guidance: str = "cross"
    alignment_weight: float | None = None  # None: the recipe's default (the design doc's)


CONTROL = "LoRA, all tokens (control)"


def settings_for(
    budgets: Sequence[int], ablation_budget: int, unreduced: int | None = None
) -> list[Setting]:
    """Every row of the study; ``unreduced`` (the model's visual tokens) adds the control.

    The control fine-tunes the same steps with nothing merged. The base model is trained
    for under an hour, so extra steps on the train split may raise accuracy by themselves,
    and "recovery" must be read against that (no alignment: without merging there is no
    cross token to align).
    """
    rows = [Setting("full model", "full", train=False)]
    for budget in budgets:
        rows.append(Setting("training-free", str(budget), train=False))
        rows.append(Setting("LoRA + alignment", str(budget), train=True))
    rows.append(Setting("LoRA, no alignment", str(ablation_budget), True, alignment_weight=0.0))
    rows.append(Setting("LoRA + alignment, query", str(ablation_budget), True, guidance="query"))
    if unreduced is not None:
        rows.append(Setting(CONTROL, str(unreduced), True, alignment_weight=0.0))
    return rows


def unreduced_visual_tokens(model: Path) -> int:
    """Visual tokens per image of a LLaVA folder without any reduction (from its config)."""
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    vision = config["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return patches + int(config.get("vision_feature_select_strategy", "default") == "full")


def _slug(setting: Setting) -> str:
    weight = "default" if setting.alignment_weight is None else f"{setting.alignment_weight:g}"
    return f"{setting.budget}-{setting.guidance}-align{weight}-{'ft' if setting.train else 'free'}"


def _finetune(setting: Setting, args: argparse.Namespace, run_dir: Path) -> float:
    from recipes.llava_finetune import main as finetune_main

    argv = [
        "--model", str(args.model), "--data", str(args.data), "--split", "train",
        "--visual-tokens", setting.budget, "--guidance", setting.guidance,
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--lora-r", str(args.lora_r), "--seed", str(args.seed),
        "--output-dir", str(run_dir), "--save-steps", str(args.steps), "--logging-steps", "10",
        "--threads", str(args.threads),
        # One question per sequence for every setting: what evaluation asks, and what `query`
        # guidance needs anyway. Packed turns for `cross` only would confound the ablation.
        "--no-pack",
        # A study rerun into the same --out trains each setting afresh, as it always did
        # (the fine-tune refuses a used folder unless told).
        "--overwrite",
    ]  # fmt: skip
    if setting.alignment_weight is not None:
        argv += ["--alignment-weight", str(setting.alignment_weight)]
    if args.no_progress:
        argv.append("--no-progress")
    started = time.perf_counter()
    if finetune_main(argv) != 0:
        raise RuntimeError(f"fine-tuning failed for {setting}")
    return time.perf_counter() - started


def _evaluate(setting: Setting, args: argparse.Namespace, run_dir: Path | None, out: Path) -> dict:
    from eval.run import main as eval_main

    argv = [
        "--model", str(args.model), "--task", "testbed", "--data", str(args.data),
        "--split", args.split, "--budgets", setting.budget, "--methods", "crossget",
        "--guidance", setting.guidance, "--limit", str(args.limit), "--out", str(out),
        "--max-new-tokens", "2",
    ]  # fmt: skip
    if run_dir is not None:
        argv += [
            "--adapter",
            str(run_dir / "adapter"),
            "--crossget-state",
            str(run_dir / "crossget"),
        ]
    if args.no_progress:
        argv.append("--no-progress")
    if eval_main(argv) != 0:
        raise RuntimeError(f"evaluation failed for {setting}")
    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return rows[0]


def format_table(results: Sequence[dict[str, Any]]) -> str:
    full = next(r for r in results if r["budget"] == "full")["metrics"]["accuracy"]
    families = [f for f in FAMILIES if f"accuracy/{f}" in results[0]["metrics"]]
    header = ["setting", "visual tokens", *families, "overall", "% of full", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        metrics = row["metrics"]
        cells = [row["setting"], str(row["visual_tokens"])]
        cells += [f"{metrics[f'accuracy/{f}']:.1f}" for f in families]
        cells += [
            f"{metrics['accuracy']:.1f}",
            f"{100 * metrics['accuracy'] / full:.1f}%" if full else "-",
            "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# (first, second) setting names compared question by question at the same budget; the
# references in ANY_BUDGET (one row each) are compared with the first at every budget.
PAIRS: tuple[tuple[str, str], ...] = (
    ("training-free", "full model"),
    ("LoRA + alignment", "training-free"),
    ("LoRA + alignment", "full model"),
    ("LoRA + alignment", CONTROL),
    ("LoRA + alignment", "LoRA, no alignment"),
    ("LoRA + alignment", "LoRA + alignment, query"),
)
ANY_BUDGET = ("full model", CONTROL)


def _per_question_correct(answers_dir: Path, gold: dict[str, str]) -> dict[str, bool]:
    from eval.metrics import exact_match_per_item

    records = []
    for path in sorted(answers_dir.glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [r["id"] for r in records]
    correct = exact_match_per_item([r["prediction"] for r in records], [gold[i] for i in ids])
    return dict(zip(ids, correct, strict=True))


def paired_table(results: Sequence[dict[str, Any]], eval_root: Path, gold: dict[str, str]) -> str:
    """McNemar comparisons of the settings in `PAIRS` at every budget where both ran."""
    from eval.metrics import paired_comparison

    lines = [
        "| comparison | budget | right only in first | right only in second | "
        "difference (points) | McNemar p |",
        "|---|---|---|---|---|---|",
    ]
    by_key = {(r["setting"], str(r["budget"])): r for r in results}
    reference = {name: row for (name, _), row in by_key.items() if name in ANY_BUDGET}
    correct: dict[str, dict[str, bool]] = {}  # per slug, each answers file read once

    def correct_of(row: dict[str, Any]) -> dict[str, bool]:
        if row["slug"] not in correct:
            answers = eval_root / row["slug"] / "answers"
            correct[row["slug"]] = _per_question_correct(answers, gold)
        return correct[row["slug"]]

    for first, second in PAIRS:
        for (name, budget), row in by_key.items():
            if name != first:
                continue
            other = by_key.get((second, budget)) or reference.get(second)
            if other is None:
                continue
            a, b = correct_of(row), correct_of(other)
            shared = sorted(a.keys() & b.keys())
            result = paired_comparison([a[i] for i in shared], [b[i] for i in shared])
            lines.append(
                f"| {first} vs {second} | {budget} | {result.only_first} | "
                f"{result.only_second} | {result.delta_points:+.1f} | {result.p_value:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _gold_answers(data: Path, split: str) -> dict[str, str]:
    from eval.testbed.data import load_split

    dataset = load_split(data, split).remove_columns(["image"])
    return dict(zip(dataset["id"], dataset["answer"], strict=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.recovery_study",
        description="Training-free vs LoRA-recovered CrossGET accuracy on the testbed, plus the "
        "no-alignment and query-guidance ablations and a no-merging LoRA control, in one table.",
    )
    parser.add_argument(
        "--model",
        type=named_models.existing_folder_argument,
        default="reference",
        help="base model: a named model (reference) or a LLaVA folder",
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/testbed"), help="testbed export (make one with "
        "`crossget data make`); fine-tuning uses its train split only",
    )  # fmt: skip
    parser.add_argument("--split", default="test", help="split to evaluate on")
    parser.add_argument("--limit", type=int, default=700, help="evaluate the first N questions")
    parser.add_argument(
        "--budgets", default="128,64", help="comma list of visual-token budgets to recover"
    )
    parser.add_argument(
        "--ablation-budget", type=int, default=64, help="budget of the two ablation runs"
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per fine-tune")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="LoRA/cross-token learning rate")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0, help="seed of every fine-tune")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/recovery"), help="runs, results.json/.md"
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control row (the same LoRA steps with all visual tokens, no merging)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild results.md (table + paired McNemar comparisons) from an earlier run in "
        "--out without training or evaluating anything",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: no model at {args.model}; train it with `make reference-model`")
    if not (args.data / "hf").is_dir():
        raise SystemExit(
            f"error: no testbed export at {args.data}; make one with "
            "`crossget data make --out data/testbed` (see Makefile reference-model)"
        )
    if args.report_only:
        saved = args.out / "results.json"
        if not saved.is_file():
            raise SystemExit(f"error: --report-only but no {saved}; run the study first")
        results = json.loads(saved.read_text(encoding="utf-8"))["rows"]
        return _report(results, args)
    budgets = [int(b) for b in args.budgets.split(",") if b]
    results: list[dict[str, Any]] = []
    unreduced = None if args.no_control else unreduced_visual_tokens(args.model)
    for setting in settings_for(budgets, args.ablation_budget, unreduced):
        slug = _slug(setting)
        run_dir = args.out / "runs" / slug if setting.train else None
        train_seconds = _finetune(setting, args, run_dir) if run_dir is not None else None
        row = _evaluate(setting, args, run_dir, args.out / "eval" / slug)
        row |= {"setting": setting.name, "guidance": setting.guidance, "slug": slug,
                "train_seconds": train_seconds, "steps": args.steps if setting.train else 0}  # fmt: skip
        results.append(row)
        settings = {k: str(v) for k, v in vars(args).items()}
        write_json_atomic(args.out / "results.json", {"args": settings, "rows": results})
    return _report(results, args)


def _report(results: list[dict[str, Any]], args: argparse.Namespace) -> int:
    table = format_table(results)
    pairs = paired_table(results, args.out / "eval", _gold_answers(args.data, args.split))
    text = f"{table}\nSame questions, compared one by one (exact McNemar test):\n\n{pairs}"
    atomic_write_text(args.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
