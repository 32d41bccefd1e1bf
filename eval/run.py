"""`crossget eval`: score token-reduction methods at equal budgets on one task, one harness.

Answers are appended to JSONL files as they are generated, so a rerun skips what is done.
Under ``accelerate launch`` (GPUs) or ``torchrun --nproc_per_node N -m eval.run`` (CPU
processes, gloo) every process answers its own shard (items ``rank::world``) and the main
process scores the gathered answers once: the same command scales from this CPU to a
multi-GPU node.

    crossget eval --model reference --task testbed --data data/testbed --budgets full,128,64
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import mllm_crossget as crossget
from eval.bench import (
    LLM_PROPORTIONAL_CHOICES,
    add_llm_positions_argument,
    add_llm_proportional_argument,
    split_two_stage,
)
from eval.tasks import TASKS, Item, load_task, score_task
from eval.timing import DTYPES
from mllm_crossget import named_models
from mllm_crossget.config import atomic_write_text
from mllm_crossget.processing import processor_image_size

DEFAULT_TEMPLATE = "<image>\nUSER: {question} ASSISTANT:"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget eval",
        description="Score methods x budgets on a task with the benchmark's own metric.",
    )
    parser.add_argument(
        "--model",
        default="reference",
        help="a named model (reference: the testbed model shipped in "
        "eval/testbed/reference_model; default), a local LLaVA folder, or a hub id",
    )
    parser.add_argument("--task", choices=TASKS, default="testbed", help="what to evaluate")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the task's local data folder (layouts: see eval/tasks.py)",
    )
    parser.add_argument("--split", default="test", help="testbed split to evaluate")
    parser.add_argument(
        "--budgets",
        default="full,192,128,64",
        help="comma list of visual-token budgets; 'full' = unmodified model; K@R = K tokens "
        "from the encoder, then the LLM keeps R of them from layer 2 on, chosen by the "
        "question's attention (llm_keep_ratio; any method but fastv, e.g. 128@0.5)",
    )
    parser.add_argument(
        "--methods",
        default="crossget",
        help="comma list: crossget, tome, or a peer registered in "
        "mllm_crossget.peers (visionzip, divprune, pool, random, fastv)",
    )
    parser.add_argument(
        "--guidance",
        default="cross",
        help="CrossGET guidance: cross, attention (eager only), query, none",
    )
    add_llm_positions_argument(parser)
    add_llm_proportional_argument(parser)
    add_crossget_option_argument(parser)
    parser.add_argument(
        "--crossget-state",
        type=Path,
        default=None,
        help="folder saved by crossget.save_pretrained (learned cross tokens); "
        "its config's method/guidance are kept, the budget is replaced",
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="peft LoRA adapter of a recovery fine-tuning run (recipes.llava_finetune: "
        "OUT/adapter), merged into --model before evaluating; needs --crossget-state OUT/crossget",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items")
    parser.add_argument(
        "--per-family",
        type=int,
        default=None,
        help="evaluate the first N items of each family (testbed) or group, every family "
        "covered; applied before --limit",
    )
    parser.add_argument(
        "--prompt-template",
        default=None,
        help="prompt with {question} and <image>; default: the processor's "
        f"chat template if it has one, else {DEFAULT_TEMPLATE!r}",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model dtype")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/eval"),
        help="folder for answers/*.jsonl, results.json and results.md",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the per-setting progress bars (for logs: a bar redraws itself many times)",
    )
    return parser


def load_model(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """`--model` through the library's named-model registry (a name, a folder or a hub id)."""
    return named_models.load_llava(name, dtype=dtype, device=device)


def merge_adapter(model: Any, adapter: Path, state: Path | None) -> Any:
    """Fold a fine-tuned run's LoRA into ``model``; ``configure`` then re-applies CrossGET per
    budget from ``state`` (the run's trained cross tokens). The adapter also holds the cross
    tokens (peft ``modules_to_save``), so CrossGET must be applied before it loads."""
    if state is None:
        raise SystemExit(
            "crossget eval: --adapter needs --crossget-state (the run's crossget/ folder, saved "
            "next to adapter/ by recipes.llava_finetune)"
        )
    from recipes.llava_finetune import attach_finetuned

    merged, _ = attach_finetuned(model, adapter, state, merge=True)
    crossget.remove(merged)
    return merged


def method_config(
    method: str,
    budget: int,
    guidance: str,
    llm_layers: int | None = None,
    llm_positions: str = "original",
    options: dict[str, Any] | None = None,
    llm_proportional: str = "auto",
    llm_keep_ratio: float | None = None,
) -> crossget.CrossGETConfig:
    """CrossGET takes the chosen guidance; peers (ToMe, VisionZip, ...) take their defaults,
    except that FastV's pruning layer is lowered to the LLM's last layer for shallow models
    (the testbed model has 2), as `crossget bench` does; so is the layer a ``K@R`` budget's
    second stage (``llm_keep_ratio``, any method but FastV) prunes from."""
    common: dict[str, Any] = {"visual_tokens": budget, "llm_positions": llm_positions}
    if method != "fastv":  # FastV reduces inside the LLM: no sizes to weigh
        common["llm_proportional_attention"] = LLM_PROPORTIONAL_CHOICES[llm_proportional]
    if llm_keep_ratio is not None:
        if method == "fastv":
            raise ValueError("a K@R budget follows an encoder-side method, not fastv")
        if "llm_keep_ratio" in (options or {}):
            raise ValueError("llm_keep_ratio is set twice: by a K@R budget and --crossget-option")
        common["llm_keep_ratio"] = llm_keep_ratio
    if method == "crossget":
        config = crossget.CrossGETConfig(guidance=guidance, **common, **(options or {}))
    else:
        config = crossget.CrossGETConfig(method=method, **common)
    if config.prunes_in_llm and llm_layers is not None and config.fastv_layer >= llm_layers:
        config = dataclasses.replace(config, fastv_layer=max(1, llm_layers - 1))
    return config


def configure(
    model: Any,
    processor: Any,
    method: str,
    budget: str,
    guidance: str,
    state: Path | None,
    llm_positions: str = "original",
    options: dict[str, Any] | None = None,
    llm_proportional: str = "auto",
) -> Any:
    """Put ``model``/``processor`` into the (method, budget) setting; 'full' = unmodified."""
    crossget.remove(model, processor)
    if budget == "full":
        return processor
    tokens, ratio = split_two_stage(budget)
    if state is not None:
        saved = crossget.CrossGETConfig.from_pretrained(state).to_dict()
        if ratio is not None:
            saved["llm_keep_ratio"] = ratio
        saved.update(
            visual_tokens=int(tokens),
            keep_ratio=None,
            r=None,
            llm_positions=llm_positions,
            llm_proportional_attention=LLM_PROPORTIONAL_CHOICES[llm_proportional],
        )
        model, processor = crossget.from_pretrained(model, state, processor)
        _, processor = crossget.apply(model, crossget.CrossGETConfig(**saved), processor)
        return processor
    llm_layers = model.config.get_text_config().num_hidden_layers
    config = method_config(
        method, int(tokens), guidance, llm_layers, llm_positions, options, llm_proportional, ratio
    )
    _, processor = crossget.apply(model, config, processor)
    return processor


def add_crossget_option_argument(parser: argparse.ArgumentParser) -> None:
    """``--crossget-option KEY=VALUE`` (read by :func:`parse_crossget_options`) for every
    harness that applies CrossGET with extra config fields."""
    parser.add_argument(
        "--crossget-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a CrossGETConfig field for method crossget, repeatable, VALUE as JSON (a bare "
        "word is a string): e.g. --crossget-option max_sources_per_destination=1 "
        "--crossget-option importance_norm=standard",
    )


def parse_crossget_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> CrossGETConfig fields (VALUE parsed as JSON, else a string);
    unknown keys and the fields other flags own are refused with the fix."""
    from dataclasses import fields

    known = {f.name for f in fields(crossget.CrossGETConfig)}
    owned = {"visual_tokens", "keep_ratio", "r", "method", "guidance", "llm_positions"}
    owned.add("llm_proportional_attention")  # --llm-proportional-attention
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"error: --crossget-option wants KEY=VALUE, got {pair!r}")
        if key not in known:
            raise SystemExit(
                f"error: --crossget-option {key!r} is not a CrossGETConfig field; known: "
                f"{', '.join(sorted(known - owned))}"
            )
        if key in owned:
            raise SystemExit(
                f"error: --crossget-option {key} is set by its own flag (--budgets, --methods, "
                "--guidance, --llm-positions)"
            )
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def format_prompt(processor: Any, question: str, template: str | None) -> str:
    if template is not None:
        return template.format(question=question)
    if getattr(processor, "chat_template", None):
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return DEFAULT_TEMPLATE.format(question=question)


def _batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def generate_answers(
    model: Any,
    processor: Any,
    items: Sequence[Item],
    answers_file: Path,
    batch_size: int,
    max_new_tokens: int,
    template: str | None,
    description: str,
    leave: bool = True,
    progress: bool = True,
) -> None:
    """Answer every item not yet in ``answers_file``, appending as batches finish.

    ``leave=False`` clears the progress bar when done (for callers that show an outer bar);
    ``progress=False`` hides it.
    """
    _drop_partial_line(answers_file)
    done = set(read_answers(answers_file))
    pending = [item for item in items if item.item_id not in done]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    with (
        answers_file.open("a") as sink,
        tqdm(
            total=len(items),
            initial=len(items) - len(pending),
            desc=description,
            leave=leave,
            disable=not progress,
        ) as bar,
    ):
        for batch in _batches(pending, batch_size):
            inputs = processor(
                images=[item.load_image() for item in batch],
                text=[format_prompt(processor, item.question, template) for item in batch],
                return_tensors="pt",
                padding=True,
            ).to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(
                generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for item, text in zip(batch, texts, strict=True):
                answer = text.strip().split("\n", 1)[0].strip()
                sink.write(json.dumps({"id": item.item_id, "prediction": answer}) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(batch))


def _drop_partial_line(path: Path) -> None:
    """A crash mid-write leaves a line without its newline; cut it so appends stay valid."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def read_answers(path: Path) -> dict[str, str]:
    """Answers written so far; a line cut by a crash mid-write is ignored (it is redone)."""
    answers: dict[str, str] = {}
    if not path.is_file():
        return answers
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        answers[str(row["id"])] = row["prediction"]
    return answers


def read_run_answers(answers_dir: Path, stem: str) -> dict[str, str]:
    """Every rank's answers of one (task, method, budget): ``answers_dir/STEM.rank*.jsonl``."""
    answers: dict[str, str] = {}
    for path in sorted(answers_dir.glob(f"{stem}.rank*.jsonl")):
        answers |= read_answers(path)
    return answers


def results_markdown(rows: Sequence[dict[str, Any]]) -> str:
    metric_names: list[str] = []
    for row in rows:
        metric_names += [k for k in row["metrics"] if k not in metric_names]
    header = ["method", "budget", "visual tokens", *metric_names, "GFLOPs/sample", "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [
            f"{row['metrics'][m]:.1f}" if isinstance(row["metrics"].get(m), float) else "-"
            for m in metric_names
        ]
        lines.append(
            f"| {row['method']} | {row['budget']} | {row['visual_tokens']} | "
            + " | ".join(values)
            + f" | {row['flops'] / 1e9:.3f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# What an answers file depends on besides its task, method and budget (the file's name).
ANSWER_SETTINGS: tuple[str, ...] = (
    "model",
    "data",
    "split",
    "guidance",
    "llm_positions",
    "llm_proportional_attention",
    "crossget_option",
    "crossget_state",
    "adapter",
    "max_new_tokens",
    "prompt_template",
    "dtype",
    "model_files",
    "data_files",
    "adapter_files",
    "crossget_state_files",
)
# Bytes read from each end of a file for its fingerprint: enough to tell retrained or
# regenerated files apart, little enough for a 7B checkpoint to cost milliseconds.
FINGERPRINT_EDGE_BYTES = 1 << 20


def files_fingerprint(files: Sequence[Path], root: Path) -> str:
    """Answers are resumed by the model's and data's *names*; weights retrained or data
    regenerated under the same name must not resume the old answers. Hashing every byte of a
    large checkpoint would take minutes, so each file adds its path, size and both ends."""
    digest = hashlib.sha256()
    for file in sorted(files):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}:{size}:".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(FINGERPRINT_EDGE_BYTES))
            if size > FINGERPRINT_EDGE_BYTES:
                handle.seek(max(FINGERPRINT_EDGE_BYTES, size - FINGERPRINT_EDGE_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()[:16] if files else "none"


def folder_fingerprint(path: Path | None) -> str:
    """A file, or the files directly in a folder: a model, a LoRA adapter, a CrossGET state.
    'none' where there is nothing local to read (unset, or a hub name)."""
    if path is None or not path.exists():
        return "none"
    if path.is_file():
        return files_fingerprint([path], path.parent)
    return files_fingerprint([f for f in path.iterdir() if f.is_file()], path)


def model_folder(name: str) -> Path:
    """`--model` as a path: a named model's folder (see mllm_crossget.named_models), else the
    name itself (a hub id has no local folder; its fingerprint is 'none')."""
    entry = named_models.get(name)
    return entry.folder() if entry is not None else Path(name)


def data_files_fingerprint(data: Path, split: str) -> str:
    """Every file under the data folder whose path names the split (`hf/test/...`,
    `parquet/test.parquet`), or the data file itself."""
    if not data.is_dir():
        return folder_fingerprint(data)
    files = [
        f
        for f in data.rglob("*")
        if f.is_file()
        and any(part == split or part.split(".")[0] == split for part in f.relative_to(data).parts)
    ]
    return files_fingerprint(files, data)


def check_answer_settings(answers_dir: Path, stem: str, args: argparse.Namespace) -> None:
    """Answers are resumed by name, so a rerun with other settings would silently score the
    old answers: each file's settings are recorded beside it and a mismatch is refused."""
    settings = {name: str(getattr(args, name)) for name in ANSWER_SETTINGS}
    record = answers_dir / f"{stem}.settings.json"
    if record.exists():
        recorded = json.loads(record.read_text(encoding="utf-8"))
        changed = {
            name: (recorded.get(name), value)
            for name, value in settings.items()
            if recorded.get(name) != value
        }
        if changed:
            described = ", ".join(f"{n}: {old} -> {new}" for n, (old, new) in changed.items())
            raise SystemExit(
                f"error: {answers_dir} holds {stem} answers made with other settings "
                f"({described}); pass another --out, or delete {answers_dir} to redo them"
            )
        return
    answers_dir.mkdir(parents=True, exist_ok=True)
    if any(answers_dir.glob(f"{stem}.rank*.jsonl")):
        raise SystemExit(
            f"error: {answers_dir} holds {stem} answers with no record of their settings; "
            "pass another --out, or delete them to redo them"
        )
    atomic_write_text(record, json.dumps(settings, indent=1))


def main(argv: list[str] | None = None) -> int:
    from accelerate import PartialState

    args = build_parser().parse_args(argv)
    try:  # a --model typo stops here, before any data is read or the hub is tried
        named_models.resolve(args.model)
    except named_models.UnknownModelError as error:
        raise SystemExit(f"crossget eval: {error}") from None
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    for budget in budgets:  # a malformed budget stops here, before any model work
        try:
            if budget != "full":
                int(split_two_stage(budget)[0])
        except ValueError as error:
            raise SystemExit(
                f"error: --budgets {budget!r}: want full, K (tokens) or K@R (e.g. 128@0.5) "
                f"({error})"
            ) from None
    options = parse_crossget_options(args.crossget_option)
    try:  # a bad option value fails now, with the config's own message
        crossget.CrossGETConfig(visual_tokens=1, guidance=args.guidance, **options)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: --crossget-option: {error}") from error
    # On CPU, accelerate only forms a process group when asked for one (gloo).
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        items = load_task(args.task, args.data, args.split, args.limit, args.per_family)
    except (FileNotFoundError, ValueError) as error:
        print(f"crossget eval: {error}", file=sys.stderr)
        return 2
    shard = items[state.process_index :: state.num_processes]
    model, processor = load_model(args.model, state.device, DTYPES[args.dtype])
    if args.adapter is not None:
        model = merge_adapter(model, args.adapter, args.crossget_state)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = [("full", "full")] if "full" in budgets else []
    runs += [(m, b) for m in methods for b in budgets if b != "full"]
    rows = []
    # Once per run, before any answer is resumed: read in `check_answer_settings`.
    args.model_files = folder_fingerprint(model_folder(args.model))
    args.data_files = data_files_fingerprint(args.data, args.split)
    args.adapter_files = folder_fingerprint(args.adapter)
    args.crossget_state_files = folder_fingerprint(args.crossget_state)
    for method, budget in runs:
        processor = configure(
            model,
            processor,
            method,
            budget,
            args.guidance,
            args.crossget_state,
            args.llm_positions,
            options,
            args.llm_proportional_attention,
        )
        stem = f"{args.task}-{method}-{budget}"
        if state.is_main_process:
            check_answer_settings(args.out / "answers", stem, args)
        state.wait_for_everyone()
        answers_file = args.out / "answers" / f"{stem}.rank{state.process_index}.jsonl"
        start = time.perf_counter()
        generate_answers(
            model,
            processor,
            shard,
            answers_file,
            args.batch_size,
            args.max_new_tokens,
            args.prompt_template,
            f"{stem} [{state.process_index}]",
            progress=not args.no_progress,
        )
        seconds = time.perf_counter() - start
        state.wait_for_everyone()
        if not state.is_main_process:
            continue
        answers = read_run_answers(args.out / "answers", stem)
        missing = [item.item_id for item in items if item.item_id not in answers]
        if missing:
            raise RuntimeError(f"{len(missing)} answers missing for {stem} (e.g. {missing[:3]})")
        predictions = [answers[item.item_id] for item in items]
        size = processor_image_size(processor)  # what the tower is fed (not its config's)
        visual = crossget.num_visual_tokens(model, size) if crossget.is_applied(model) else None
        report = crossget.flops_report(
            model, image_size=size[0] if size else None, prompt_length=32
        )
        rows.append(
            {
                "task": args.task,
                "method": method,
                "budget": budget,
                "visual_tokens": visual if visual is not None else report.visual_tokens,
                "metrics": score_task(args.task, items, predictions),
                "flops": report.total,
                "seconds": seconds,
                "items": len(items),
            }
        )
    crossget.remove(model, processor)
    if state.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.json", json.dumps(rows, indent=2))
        table = results_markdown(rows)
        atomic_write_text(args.out / "results.md", table)
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
