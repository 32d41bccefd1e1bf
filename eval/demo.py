"""`make demo`: what CrossGET and its peers cost in accuracy, and buy in speed, on the testbed.

One run on the trained reference LLaVA (eval/testbed/reference_model): every method at every
visual-token budget answers the same held-out testbed questions, and one table shows exact-match
accuracy per question family beside the visual tokens the LLM keeps, analytic FLOPs and the
measured speed-up of time to first token over the unmodified model.  Each family isolates an
ability that merging can hurt differently (small objects and text suffer first), so the overall
number alone would hide where a method fails; the chance row says what guessing scores.

The pieces are the project's own harnesses, not a new evaluation loop: `eval.run` answers and
`eval.tasks` scores (exactly as `crossget eval --task testbed`), `eval.bench` builds the
settings, counts FLOPs and times them round-robin (exactly as `crossget bench`), and
`eval.testbed.data` renders the questions.  Everything must fit in 5 minutes on two CPU cores,
so the default number of questions was measured for that (see `DEFAULT_QUESTIONS`).

    python -m eval.demo                       # what `make demo` runs
    python -m eval.demo --questions 700 --out outputs/demo-700
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import mllm_crossget as crossget
from eval import bench, run, tasks
from eval.testbed.data import (
    FAMILIES,
    chance_by_family,
    export,
    load_split,
    make_dataset_dict,
)
from eval.testbed.model import (
    DEFAULT_PATH,
    load_reference,
    visual_tokens_per_image,
)
from mllm_crossget import named_models
from mllm_crossget.config import atomic_write_text, write_json_atomic
from mllm_crossget.peers import METHOD_NAMES, get_method

# Measured (untrained cpu-small model, 1 thread, batch 32, 2 new tokens, another training job on
# the same two cores): 29 questions/s at the full 256 tokens, 22-60/s at 192-64 tokens, so the
# 22 settings cost ~0.56 s per question. 350 questions (50 per family) took 235 s in all
# (rendering, answering, timing, plots): under five minutes with room for a busy machine.
DEFAULT_QUESTIONS = 350
DEFAULT_SEED = 0
DEFAULT_CACHE = Path("data/testbed-demo")
DEFAULT_OUT = Path("outputs/demo")
# One answer word is one token of the word-level tokenizer, so a second token (</s> or an extra
# word) decides exact match: longer generations cannot turn a wrong answer right or vice versa.
DEFAULT_MAX_NEW_TOKENS = 2
# The exact recipe that produced the shipped model (see docs/reference-model.md).
TRAIN_COMMAND = (
    "make reference-model   # testbed data, then crossget testbed-train --init-reference "
    "... (the full recipe is in the Makefile)"
)
UNTRAINED_NOTE = (
    "MODEL NOT TRAINED: eval/testbed/reference_model is not shipped yet, so this run uses an "
    "untrained model of its exact shape. Its accuracy columns mean nothing; visual tokens, FLOPs "
    "and speed are real."
)
FAMILY_LABELS: dict[str, str] = {"multiple_choice": "mc"}


class DemoError(RuntimeError):
    """A problem the user can fix (missing model, bad flag); printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.demo",
        description="The `make demo` job: accuracy per testbed family, visual tokens, FLOPs and "
        "measured speed-up of CrossGET and its peers at equal visual-token budgets, on the "
        "reference LLaVA. Prints one table; writes demo.json, demo.md and "
        "accuracy_vs_tokens.png into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="reference",
        help="a named model (reference: the shipped testbed model; pretrained-mini: the LLaVA "
        "from real pretrained parts, loaded with its trained weights and asked in its chat "
        "template) or the folder of a LLaVA saved with save_pretrained (model + processor)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="an existing testbed export (`crossget data make --out DIR`) to read the test "
        "split from; default: render the test split into --data-cache when it is missing",
    )
    parser.add_argument(
        "--data-cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the rendered test split is kept between runs (one folder per seed and "
        "image size)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="testbed seed of the rendered questions"
    )
    parser.add_argument(
        "--questions",
        type=int,
        default=DEFAULT_QUESTIONS,
        help="test questions every setting answers (the first N of the split; a multiple of "
        "7 keeps the families balanced). The default fits 25 settings in 5 min on 2 CPU cores",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHOD_NAMES),
        help="comma list of methods (mllm_crossget.peers)",
    )
    parser.add_argument(
        "--budgets",
        default="full,192,128,64",
        help="comma list of visual-token budgets; 'full' = the unmodified model",
    )
    parser.add_argument(
        "--fastv-layer",
        type=int,
        default=2,
        help="FastV's K (lowered to the LLM's last layer - 1 for shallow models, noted)",
    )
    bench.add_llm_positions_argument(parser)
    bench.add_llm_proportional_argument(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generate call")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="answer length limit (answers are one token; the second only has to be </s>)",
    )
    parser.add_argument(
        "--timing-batch", type=int, default=8, help="images per timed generate call"
    )
    parser.add_argument(
        "--timing-repeats", type=int, default=5, help="timed round-robin rounds (medians)"
    )
    parser.add_argument(
        "--timing-warmup", type=int, default=1, help="untimed round-robin rounds first"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads; 0 = torch's default (all cores). 1 by default: with another "
        "job on the same two cores, 2 threads made this demo ~4x slower (15 min instead of 4)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for demo.json/md/png and answers/"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def load_model(folder: Path, device: str, untrained_fallback: bool = False) -> tuple[Any, Any]:
    """The reference model; when the shipped one is missing (and `untrained_fallback`), an
    untrained stand-in of its shape, so `make demo` still shows the speed side; otherwise an
    error that says how to get one."""
    if not (folder / "config.json").is_file():
        if untrained_fallback:
            from eval.testbed.model import build_reference

            print(f"\n*** {UNTRAINED_NOTE}\n*** Train it with: {TRAIN_COMMAND}\n", file=sys.stderr)
            model, processor = build_reference(size="cpu-small", seed=0)
            return model.to(device).eval(), processor
        raise DemoError(
            f"no reference model in {folder} (config.json missing).\n"
            f"Train it first:\n  {TRAIN_COMMAND}\n"
            "or point --model at a folder saved with save_pretrained, or at a named model "
            f"({', '.join(named_models.known_names())})."
        )
    return load_reference(folder, device)


def load_named_or_folder(args: argparse.Namespace) -> tuple[Any, Any, bool]:
    """``--model``: a named model with its own loader (pretrained-mini: converted parts plus
    the shipped trained weights) goes through the registry; ``reference`` and folders load
    as saved (the shipped reference may fall back to an untrained stand-in, said by the
    third value)."""
    entry = named_models.get(args.model)
    if entry is not None and entry.loader is not named_models.load_llava_folder:
        try:
            return (*named_models.load_llava(args.model, device=args.device), False)
        except named_models.UnknownModelError as error:
            raise DemoError(str(error)) from error
    folder = named_models.folder_argument(args.model)
    untrained = not (folder / "config.json").is_file() and folder == DEFAULT_PATH
    return (*load_model(folder, args.device, untrained_fallback=untrained), untrained)


def ensure_test_split(
    cache: Path, questions: int, seed: int, image_size: int, progress: bool
) -> Path:
    """An export holding at least `questions` test questions, rendered only when missing.

    Rendering is prefix-stable (question i depends on (seed, i) only), so a larger cached
    split serves a smaller request with exactly the same questions.
    """
    folder = cache / f"seed{seed}-{image_size}px"
    try:
        if len(load_split(folder, "test")) >= questions:
            return folder
    except (FileNotFoundError, ValueError):
        pass
    print(f"rendering {questions} test questions into {folder}")
    splits = make_dataset_dict(0, 0, questions, seed, image_size=image_size, progress=progress)
    return export(splits, folder, progress=progress)


def _prompt(processor: Any, question: str) -> str:
    """The prompt the answers are generated with (eval.run's: chat template, else LLaVA's)."""
    return run.format_prompt(processor, question, None)


def _timing_inputs(
    processor: Any, items: Sequence[tasks.Item], batch: int, image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Text ids without the image token, pixels and the prompt length, for `bench.prepare`.

    The prompt nearest to the mean length is used for every row, so FLOPs and timing share
    one realistic length.
    """
    tokenizer = processor.tokenizer
    lengths = [len(tokenizer(_prompt(processor, item.question)).input_ids) - 1 for item in items]
    mean = statistics.fmean(lengths)
    chosen = min(range(len(items)), key=lambda i: abs(lengths[i] - mean))
    ids = tokenizer(_prompt(processor, items[chosen].question), return_tensors="pt").input_ids
    text = ids[:, ids[0] != image_token_id].repeat(batch, 1)
    images = [items[i % len(items)].load_image() for i in range(batch)]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return text, pixels, lengths[chosen]


def evaluate_settings(
    model: Any,
    processor: Any,
    settings: Sequence[bench.Setting],
    items: Sequence[tasks.Item],
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """Answers and scores of every setting through `eval.run` / `eval.tasks`, by label."""
    answers_dir = args.out / "answers"
    shutil.rmtree(answers_dir, ignore_errors=True)  # eval.run resumes; a demo starts afresh
    results: dict[str, dict[str, Any]] = {}
    for setting in tqdm(settings, desc="accuracy", unit="setting", disable=args.no_progress):
        crossget.remove(model, processor)
        if setting.config is not None:
            crossget.apply(model, setting.config, processor)  # the processor changes in place
        answers_file = answers_dir / f"{setting.label.replace('/', '-')}.jsonl"
        start = time.perf_counter()
        try:
            run.generate_answers(
                model,
                processor,
                items,
                answers_file,
                args.batch_size,
                args.max_new_tokens,
                None,
                setting.label,
                leave=False,
                progress=not args.no_progress,
            )
            seconds = time.perf_counter() - start
            llm_input = visual_tokens_per_image(model, processor, items[0].load_image())
        finally:
            crossget.remove(model, processor)
        answers = run.read_answers(answers_file)
        predictions = [answers[item.item_id] for item in items]
        results[setting.label] = {
            "metrics": tasks.score_task("testbed", items, predictions),
            "eval_seconds": seconds,
            "questions_per_s": len(items) / seconds,
            "llm_input_tokens": llm_input,
        }
    return results


def build_rows(
    settings: Sequence[bench.Setting], scores: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per setting: bench's timing/FLOPs row plus the accuracies and eval speed."""
    rows = []
    for setting, timing in zip(settings, bench.result_rows(settings), strict=True):
        timing.pop("samples")
        rows.append(timing | scores[setting.label])
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]], chance: dict[str, float]) -> str:
    """Rows = method x budget (+ chance); accuracy in % per family and overall."""
    families = [FAMILY_LABELS.get(f, f) for f in FAMILIES]
    header = [
        "method",
        "budget",
        *families,
        "overall",
        "visual tokens",
        "GFLOPs",
        "TTFT ms",
        "speed-up",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for row in rows:
        metrics = row["metrics"]
        ttft = row.get("ttft_s")
        speedup = row.get("speedup")
        cells = [
            row["method"] + (" *" if row["kept_tokens"] != row["visual_tokens"] else ""),
            row["budget"],
            *(_percent(metrics.get(f"accuracy/{f}")) for f in FAMILIES),
            _percent(metrics["accuracy"]),
            str(row["kept_tokens"]),
            f"{row['flops']['total'] / 1e9:.2f}",
            "-" if ttft is None else f"{1e3 * ttft:.0f}",
            "-" if speedup is None else f"{speedup:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    chance_cells = [_percent(100 * chance[f]) if f in chance else "-" for f in FAMILIES]
    lines.append(
        f"| chance | - | {' | '.join(chance_cells)} | {_percent(100 * chance['overall'])} "
        "| - | - | - | - |"
    )
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: Sequence[dict[str, Any]], chance: float, path: Path, title: str) -> None:
    """Overall accuracy vs visual tokens, one line per method; full and chance as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    full = next((r for r in rows if r["method"] == "full"), None)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        points = sorted(
            (r["kept_tokens"], r["metrics"]["accuracy"]) for r in rows if r["method"] == method
        )
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method)
    if full is not None:
        accuracy = full["metrics"]["accuracy"]
        axis.axhline(accuracy, color="black", lw=1, ls="--", label="full model")
        axis.plot([full["kept_tokens"]], [accuracy], "k*", ms=10)
    axis.axhline(100 * chance, color="grey", lw=1, ls=":", label="chance")
    axis.set_xlabel("visual tokens the LLM keeps per image")
    axis.set_ylabel("testbed accuracy (%)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    bench.save_figure(figure, path)
    plt.close(figure)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job; returns what demo.json holds."""
    started = time.perf_counter()
    if args.questions < 1:
        raise DemoError(f"--questions must be >= 1, got {args.questions}")
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    methods = _comma_list(args.methods)
    budgets = _comma_list(args.budgets)
    try:
        for method in methods:
            get_method(method)  # a typo fails before any work
    except ValueError as error:
        raise DemoError(str(error)) from error
    model, processor, untrained = load_named_or_folder(args)
    try:  # questions are rendered at the size the tower is fed
        image_size = bench.input_image_size(model, processor)
    except ValueError as error:
        raise DemoError(str(error)) from error
    data = args.data or ensure_test_split(
        args.data_cache, args.questions, args.seed, image_size, not args.no_progress
    )
    items = tasks.load_task("testbed", data, "test", args.questions)
    records = load_split(data, "test").select_columns(["family", "kind"]).select(range(len(items)))
    chance = chance_by_family(list(records))
    chance["overall"] = sum(chance[r["family"]] for r in records) / len(items)
    if len(items) < args.questions:
        print(f"note: {data} holds only {len(items)} test questions", file=sys.stderr)

    settings, skipped = bench.build_settings(
        model,
        methods,
        budgets,
        args.fastv_layer,
        args.llm_positions,
        processor,
        args.llm_proportional_attention,
    )
    threads = torch.get_num_threads() if args.device == "cpu" else None
    print(
        f"{len(items)} questions ({len(items) // len(FAMILIES)} per family) x {len(settings)} "
        f"settings on {args.device}" + (f", {threads} CPU thread(s)" if threads else "")
    )
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    text, pixels, prompt_tokens = _timing_inputs(
        processor, items, args.timing_batch, model.config.image_token_id
    )
    text, pixels = text.to(args.device), pixels.to(args.device)
    for setting in settings:
        bench.prepare(model, setting, text, model.config.image_token_id, prompt_tokens, processor)
    scores = evaluate_settings(model, processor, settings, items, args)
    bench.time_round_robin(
        model,
        settings,
        pixels,
        args.device,
        1,  # one new token: time to first token is what fewer visual tokens speed up most
        args.timing_warmup,
        args.timing_repeats,
        progress=not args.no_progress,
        processor=processor,
    )
    rows = build_rows(settings, scores)
    for row in rows:  # what the processor really emitted must match the plan and the FLOPs
        if row["llm_input_tokens"] != row["visual_tokens"]:
            raise RuntimeError(
                f"{row['method']}/{row['budget']}: the processor emitted "
                f"{row['llm_input_tokens']} image tokens, the plan says {row['visual_tokens']}"
            )
    notes = [UNTRAINED_NOTE] if untrained else []
    notes += [
        f"{len(items)} test questions of {data} (seed {args.seed}), exact match in %, "
        f"greedy, batch {args.batch_size}; chance = kind-aware guessing.",
        f"visual tokens = what the LLM keeps per image; GFLOPs per image with a "
        f"{prompt_tokens}-token prompt (analytic, mllm_crossget.flops); TTFT = time to first "
        f"token of a batch of {args.timing_batch}, median of {args.timing_repeats} "
        "round-robin rounds; speed-up = TTFT of full / TTFT.",
    ]
    if any(r["kept_tokens"] != r["visual_tokens"] for r in rows):
        notes.append(
            "* FastV: the LLM receives every visual token and keeps the budget from layer K on."
        )
    notes += [f"skipped {note}" for note in skipped]
    notes.append(f"wall time {time.perf_counter() - started:.0f} s")
    table = markdown_table(rows, chance)
    report = {
        "model": str(args.model),
        "trained_model": not untrained,
        "data": str(data),
        "questions": len(items),
        "device": args.device,
        "threads": threads,
        "chance": chance,
        "rows": rows,
        "skipped": skipped,
        "notes": notes,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "demo.json", report)
    atomic_write_text(
        args.out / "demo.md", table + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    )
    plot_accuracy(
        rows,
        chance["overall"],
        args.out / "accuracy_vs_tokens.png",
        f"{Path(args.model).name}: {len(items)} testbed questions",
    )
    print(table)
    print("\n".join(notes))
    print(f"wrote {args.out / 'demo.json'}, demo.md and accuracy_vs_tokens.png")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
