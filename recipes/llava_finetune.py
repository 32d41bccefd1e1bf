"""Recovery fine-tuning of a CrossGET LLaVA: LoRA on the language model plus the cross tokens.

Merging visual tokens changes what the LLM reads, so a short fine-tune at the target budget
recovers accuracy (the authors fine-tune LLaVA-1.5 with merging switched on). Here the vision
tower and the base LLM stay frozen; LoRA adapters on the LLM's attention/MLP projections, the
CrossGET cross tokens (``model.model.crossget_tokens``, a peft ``modules_to_save`` module) and
optionally the projector train. The loss is the LM loss on answer tokens only plus
``alignment_weight x crossget.alignment_loss(model)`` (symmetric JS between the vision and the
text cross tokens). Data, collator and Trainer come from :mod:`eval.testbed.training.train`.

Outputs in ``--output-dir``: ``adapter/`` (peft: LoRA + cross tokens), ``crossget/``
(``crossget.save_pretrained``: config + cross tokens), ``loss.json``, ``loss.png``,
``train_summary.json``, ``run_config.json`` and the Trainer's ``checkpoint-*`` folders (for
``--resume``). A folder that already holds a run is refused unless ``--resume`` continues it or
``--overwrite`` deletes it first. Each run gets an id (``run_config.json``), written into each
of its checkpoints, and ``--resume`` takes only checkpoints with the folder's run id.
``adapter/`` and ``crossget/`` are written to a temporary folder and renamed into place, the
JSON files through ``os.replace``, so a crash never leaves half an output.

    python -m recipes.llava_finetune --model llava-hf/llava-1.5-7b-hf \\
        --data llava_v1_5_mix665k.json --image-folder data/images \\
        --visual-tokens 144 --bf16 --gradient-checkpointing --output-dir runs/ft-144
    crossget eval --model llava-hf/llava-1.5-7b-hf --adapter runs/ft-144/adapter \\
        --crossget-state runs/ft-144/crossget --task testbed --data data/testbed --budgets 144
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mllm_crossget as crossget
from eval.testbed.training.train import (
    BAD_ROW_POLICIES,
    IGNORE_INDEX,
    PackedVQADataset,
    PixelNormalizingCollator,
    _loss_logger,
    _save_final,
    _trainer_class,
    cache_pixels,
    collator_for,
    load_examples,
    trainer_arguments,
)
from mllm_crossget import named_models
from mllm_crossget.config import GUIDANCE_MODES, replace_folder, write_json_atomic
from mllm_crossget.schedule import SCHEDULE_MODES

ADAPTER_DIR = "adapter"
CROSSGET_DIR = "crossget"
RUN_CONFIG = "run_config.json"
RUN_MARKER = "crossget_run.json"  # in each checkpoint: its run id and loss sum so far
# What a run writes into --output-dir: a folder holding any of them is in use.
RUN_FILES = ("loss.json", "loss.png", "train_summary.json", RUN_CONFIG)
# LoRA on the language model's decoder layers only: the vision tower stays frozen, and a
# full-path regex cannot match `vision_tower...q_proj` by accident.
DEFAULT_LORA_TARGETS = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)
TOKENS_MODULE = "crossget_tokens"
PROJECTOR_MODULE = "multi_modal_projector"
# QLoRA quantizes the LLM only; bitsandbytes needs the skipped modules' full prefixes.
QLORA_SKIP_MODULES: tuple[str, ...] = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "lm_head",
)


class FinetuneError(Exception):
    """A problem with the command line, the data or the machine, worded for the user."""


class _NoKernelsHubNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community"
    warning, logged on import on AVX512-BF16 CPUs when the optional ``kernels`` package is
    missing. peft imports bitsandbytes whether or not the run quantises, and this recipe's
    QLoRA runs on CUDA only, so the notice is noise here; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# Installed before peft (and with it bitsandbytes) is imported: the logger is the module's own.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubNotice())


class _DefaultsOnceFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already names its default or
    there is none to name (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or action.option_strings == []
        ):
            return text
        return text + " (default: %(default)s)"


# ----------------------------------------------------------------------------- command line


def _schedule_r(text: str) -> int | list[int]:
    """``--r 13`` (constant) or ``--r 8,6,4`` (one value per merging layer)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int or a comma list of ints: {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.llava_finetune",
        description="Recovery fine-tuning of a LLaVA model with CrossGET merging: LoRA on the "
        "LLM + the cross tokens (vision tower frozen); loss = answer-token LM loss + "
        "alignment_weight x cross-token JS alignment.",
        formatter_class=_DefaultsOnceFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        help="base LLaVA: a named model (reference), a local folder or a hub id "
        "(LlavaForConditionalGeneration + AutoProcessor)",
    )
    model.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=("sdpa", "eager"),
        help="attention kernel of the model (guidance 'attention' forces eager)",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        type=Path,
        default=None,
        help="LLaVA-format JSON/JSONL file (with --image-folder), a `datasets` save_to_disk "
        "folder, or a testbed export root (required unless --merge-only)",
    )
    data.add_argument("--split", default="train", help="split of a folder --data")
    data.add_argument(
        "--image-folder",
        type=Path,
        default=None,
        help="folder the JSON's image names are relative to (default: the JSON's sibling images/)",
    )
    data.add_argument(
        "--on-bad-row",
        choices=BAD_ROW_POLICIES,
        default="fail",
        help="a malformed JSON row or a missing image file: stop with its row number (fail) "
        "or skip it with a warning (skip)",
    )
    data.add_argument(
        "--no-pack",
        action="store_true",
        help="one sequence per question instead of all questions of an image in one sequence "
        "(always on for --guidance query: each question must steer its own merge)",
    )
    data.add_argument(
        "--max-turns", type=int, default=0, help="questions per packed sequence (0 = all)"
    )
    budget = parser.add_argument_group("CrossGET (one budget; flags override --crossget-config)")
    budget.add_argument("--visual-tokens", type=int, default=None, help="visual tokens per image")
    budget.add_argument("--keep-ratio", type=float, default=None, help="fraction of patches kept")
    budget.add_argument(
        "--r",
        type=_schedule_r,
        default=None,
        help="tokens merged per layer: an int, or a comma list with one value per merging layer",
    )
    budget.add_argument(
        "--guidance",
        choices=GUIDANCE_MODES,
        default=None,
        help="importance source (default from the config: cross); query trains the query map "
        "with the answer masked out of the pooled prompt",
    )
    budget.add_argument(
        "--schedule",
        choices=SCHEDULE_MODES,
        default=None,
        help="how a visual-tokens/keep-ratio budget is spread over layers (default: even)",
    )
    budget.add_argument(
        "--crossget-config",
        default=None,
        help="a CrossGETConfig as a JSON file, a folder with crossget_config.json, or inline JSON",
    )
    budget.add_argument(
        "--alignment-weight",
        type=float,
        default=None,
        help="lambda of the cross-token alignment loss (default: the config's, 0.001)",
    )
    lora = parser.add_argument_group("LoRA / QLoRA")
    lora.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    lora.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (scale alpha/r)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    lora.add_argument(
        "--lora-targets",
        default=DEFAULT_LORA_TARGETS,
        help="regex (peft full match on module paths) of the Linear layers that get LoRA; "
        "must not reach the vision tower",
    )
    lora.add_argument(
        "--train-projector",
        action="store_true",
        help="also train the multimodal projector (a full trainable copy, saved in the adapter)",
    )
    lora.add_argument(
        "--qlora",
        action="store_true",
        help="load the LLM in 4-bit NF4 (bitsandbytes, CUDA only); vision tower, projector and "
        "lm_head stay unquantized",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    optim.add_argument(
        "--lr-scheduler",
        default="cosine",
        choices=("cosine", "linear", "constant"),
        help="decay after warmup",
    )
    optim.add_argument(
        "--warmup", type=float, default=0.03, help="warmup: ratio of total steps if < 1, else steps"
    )
    optim.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    optim.add_argument(
        "--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0"
    )
    optim.add_argument("--batch-size", type=int, default=4, help="sequences per device per step")
    optim.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    optim.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward (non-reentrant) to save memory",
    )
    precision = optim.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16", action="store_true", help="bf16 weights + autocast (trainable params stay fp32)"
    )
    precision.add_argument(
        "--fp16", action="store_true", help="fp16 weights + autocast with loss scaling (GPU)"
    )
    optim.add_argument("--seed", type=int, default=0, help="seed for LoRA init, order, dropout")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        help="adapter/, crossget/, loss.json, loss.png, train_summary.json, checkpoints",
    )
    reuse = run.add_mutually_exclusive_group()
    reuse.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its last checkpoint-* (LoRA, cross tokens, "
        "optimizer, scheduler and RNG states restored); only checkpoints with the run id of "
        "the folder's run_config.json are taken",
    )
    reuse.add_argument(
        "--overwrite",
        action="store_true",
        help="--output-dir already holds a run: delete its outputs and checkpoints first "
        "(without --resume or --overwrite such a folder is refused)",
    )
    run.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    run.add_argument("--save-total-limit", type=int, default=2, help="checkpoints to keep")
    run.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps")
    run.add_argument(
        "--stop-after-steps",
        type=int,
        default=0,
        help="end this run after N optimizer steps in total, writing a checkpoint there, with "
        "the schedule of the full run (for time-limited job slots; continue with --resume)",
    )
    run.add_argument(
        "--merge-and-unload",
        type=Path,
        default=None,
        metavar="DIR",
        help="after training, write a merged full model (LoRA folded into a fresh base) + "
        "processor to DIR and the CrossGET state to DIR/crossget, for serving",
    )
    run.add_argument(
        "--merge-only",
        action="store_true",
        help="do not train: merge the finished run in --output-dir into --merge-and-unload DIR",
    )
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


# ----------------------------------------------------------------------------- configuration


def _read_config_json(source: str) -> dict[str, Any]:
    if source.lstrip().startswith("{"):
        text, origin = source, "--crossget-config"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "crossget_config.json"
        if not path.is_file():
            raise FinetuneError(f"--crossget-config: no such file {path}")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise FinetuneError(f"{origin} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise FinetuneError(f"{origin}: expected a JSON object of CrossGETConfig fields")
    return data


def build_crossget_config(args: argparse.Namespace) -> crossget.CrossGETConfig:
    """``--crossget-config`` (if any), then the budget/guidance/schedule/weight flags on top."""
    data = _read_config_json(args.crossget_config) if args.crossget_config else {}
    budgets = {
        name: value
        for name, value in (
            ("visual_tokens", args.visual_tokens),
            ("keep_ratio", args.keep_ratio),
            ("r", args.r),
        )
        if value is not None
    }
    if len(budgets) > 1:
        flags = ", ".join("--" + name.replace("_", "-") for name in budgets)
        raise FinetuneError(f"give one budget, got {flags}")
    if budgets:
        data.update({"visual_tokens": None, "keep_ratio": None, "r": None, **budgets})
    for name in ("guidance", "schedule", "alignment_weight"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    try:
        config = crossget.CrossGETConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise FinetuneError(f"CrossGET config: {error}") from None
    if not config.merges_in_encoder:
        raise FinetuneError(
            f"method={config.method!r} has no cross tokens to train; recovery fine-tuning is "
            "for the merging methods (crossget, tome)"
        )
    return config


def _attention_for(config: crossget.CrossGETConfig, requested: str = "sdpa") -> str:
    return "eager" if config.guidance == "attention" else requested


def _dtype(args: argparse.Namespace) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


def check_qlora_support() -> None:
    """QLoRA trains through bitsandbytes' CUDA 4-bit kernels; refuse early and say why."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FinetuneError(
            "--qlora needs bitsandbytes (pip install 'bitsandbytes>=0.45'); or drop --qlora to "
            "train LoRA on unquantized weights"
        ) from None
    if not torch.cuda.is_available():
        raise FinetuneError(
            "--qlora needs a CUDA GPU: 4-bit NF4 training runs on bitsandbytes' CUDA kernels and "
            "torch sees no GPU here. Run on a GPU machine, or drop --qlora to train LoRA on "
            "unquantized weights (with --bf16 on a GPU to halve the memory)"
        )


def check_distributed_setup() -> None:
    """Refuse DeepSpeed ZeRO-3 before loading anything (see recipes/accelerate/deepspeed_zero3.yaml)."""
    if (
        os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    ):
        raise FinetuneError(
            "DeepSpeed ZeRO-3 is not supported by this recipe yet: ZeRO-3 gathers a parameter "
            "only while its own module runs forward, but CrossGET reads the cross tokens from "
            "LLM-layer hooks and the vision encoder, and the alignment loss runs the projector "
            "after the forward. Use recipes/accelerate/multi_gpu_ddp.yaml (with --bf16 or "
            "--qlora) or recipes/accelerate/fsdp.yaml"
        )


def qlora_quantization(compute_dtype: torch.dtype) -> Any:
    """NF4 with double quantization for the LLM; tower, projector and lm_head unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )


def load_base(
    name: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    quantization: Any = None,
) -> tuple[nn.Module, Any]:
    """``LlavaForConditionalGeneration`` + ``AutoProcessor`` (4-bit on this rank's GPU)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    extra: dict[str, Any] = {}
    if quantization is not None:
        extra = {"quantization_config": quantization, "device_map": {"": _local_rank()}}
    try:
        name = named_models.resolve(name)  # `reference` and other named models, offline-safe
    except named_models.UnknownModelError as error:
        raise FinetuneError(str(error)) from None
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            name, dtype=dtype, attn_implementation=attn_implementation, **extra
        )
        processor = AutoProcessor.from_pretrained(name)
    except OSError as error:
        raise FinetuneError(f"cannot load --model {name}: {error}") from None
    return model, processor


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wrap_with_lora(
    model: nn.Module,
    config: crossget.CrossGETConfig,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.05,
    targets: str = DEFAULT_LORA_TARGETS,
    train_projector: bool = False,
) -> Any:
    """peft model whose trainable parameters are LoRA, the cross tokens, maybe the projector.

    Cross-token tensors that the configuration never reads (vision prompts without a cross
    token, empty text prompts) are frozen, so DDP sees no parameter without a gradient.
    Trainable tensors are kept in fp32 (fp16 gradients cannot be unscaled).
    """
    from peft import LoraConfig, get_peft_model

    to_save = [TOKENS_MODULE] + ([PROJECTOR_MODULE] if train_projector else [])
    lora_config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        modules_to_save=to_save,
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as error:
        raise FinetuneError(f"--lora-targets {targets!r}: {error}") from None
    in_tower = [n for n, _ in peft_model.named_parameters() if "lora_" in n and "vision_tower" in n]
    if in_tower:
        raise FinetuneError(
            f"--lora-targets {targets!r} puts LoRA into the vision tower ({in_tower[0]}, ...); "
            "the tower stays frozen in recovery fine-tuning: restrict the regex to "
            r"language_model\.layers"
        )
    tokens = crossget.cross_tokens(model)
    if not config.uses_cross_token:
        tokens.vision_prompts.requires_grad_(False)
    for parameter in tokens.parameters():
        if parameter.numel() == 0:
            parameter.requires_grad_(False)
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


def trainable_summary(peft_model: nn.Module) -> dict[str, int]:
    """Trainable element counts by kind; anything else trainable is a bug and shows up here."""
    counts = {"lora": 0, "cross_tokens": 0, "projector": 0, "other": 0}
    for name, parameter in peft_model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "lora_" in name:
            kind = "lora"
        elif TOKENS_MODULE in name:
            kind = "cross_tokens"
        elif PROJECTOR_MODULE in name:
            kind = "projector"
        else:
            kind = "other"
        counts[kind] += parameter.numel()
    return counts


# ----------------------------------------------------------------------------- loss and logging


class AlignmentTerm:
    """``weight x crossget.alignment_loss`` of the forward that just ran (a Trainer extra loss).

    Holds the unwrapped LLaVA model: under DDP/peft the Trainer passes wrappers, but the
    cross-token states of the last forward live on the LLaVA model itself.
    """

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.model = model
        self.weight = weight
        # The Trainer's mixed precision autocasts the model's forward only; this term runs the
        # projector outside it, so it takes the same context (set once the Trainer exists).
        self.autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
        self._sum = 0.0
        self._count = 0

    def __call__(self, wrapped: Any, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        with self.autocast():
            value = crossget.alignment_loss(self.model)
        self._sum += float(value.detach())
        self._count += 1
        return self.weight * value

    def pop_mean(self) -> float | None:
        """Mean unweighted JS since the last call (for the loss log)."""
        if not self._count:
            return None
        mean, self._sum, self._count = self._sum / self._count, 0.0, 0
        return mean


@dataclass
class QueryMaskCollator:
    """Adds ``crossget_query_mask``: real tokens that are not answer tokens. With query
    guidance the prompt steers the merge; the teacher-forced answer must not."""

    inner: PixelNormalizingCollator

    def __call__(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = self.inner(batch)
        out["crossget_query_mask"] = (out["labels"] == IGNORE_INDEX) & out["attention_mask"].bool()
        return out


def _run_marker(run_id: str, base_loss_sum: float | None) -> Any:
    """Writes ``crossget_run.json`` (run id, loss sum so far) into each checkpoint it saves."""
    from transformers import TrainerCallback

    class RunMarker(TrainerCallback):
        trainer: Any = None  # set once the Trainer exists

        def loss_sum(self) -> float | None:
            """Summed per-step loss of the run so far (earlier sessions included)."""
            total = getattr(self.trainer, "_total_loss_scalar", None)
            pending = getattr(self.trainer, "_tr_loss", None)
            if base_loss_sum is None or total is None or pending is None:
                return None
            return base_loss_sum + float(total) + float(pending)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                marker = {"run_id": run_id, "step": state.global_step, "loss_sum": self.loss_sum()}
                write_json_atomic(folder / RUN_MARKER, marker, indent=1)

    return RunMarker()


def _callbacks(term: AlignmentTerm | None, stop_after: int) -> list[Any]:
    from transformers import TrainerCallback

    class RunControl(TrainerCallback):
        """Adds the alignment term to each log entry; ends the run at --stop-after-steps."""

        stopped_early = False

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
            mean = term.pop_mean() if term is not None else None
            if logs is not None and mean is not None and "loss" in logs:
                logs["alignment_js"] = mean

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
            if (
                stop_after
                and state.global_step >= stop_after
                and state.global_step < state.max_steps
            ):
                control.should_save = True
                control.should_training_stop = True
                self.stopped_early = True

    return [RunControl()]


# ----------------------------------------------------------------------------- loading a run


def attach_finetuned(
    model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    crossget_dir: str | os.PathLike[str],
    processor: Any = None,
    merge: bool = False,
) -> tuple[nn.Module, Any]:
    """CrossGET state, then the LoRA adapter, on a base LLaVA model (order matters: the
    adapter's ``modules_to_save`` wraps the cross tokens that the CrossGET state creates).

    ``merge=True`` folds LoRA into the weights and returns the plain LLaVA model (CrossGET
    still applied, trained cross tokens in place); otherwise a peft model in eval mode.
    """
    from peft import PeftModel

    adapter_dir, crossget_dir = Path(adapter_dir), Path(crossget_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no peft adapter in {adapter_dir} (adapter_config.json missing)")
    if not crossget_dir.is_dir():
        raise FileNotFoundError(f"no CrossGET state folder {crossget_dir}")
    if processor is not None:
        model, processor = crossget.from_pretrained(model, crossget_dir, processor)
    else:
        crossget.from_pretrained(model, crossget_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    if merge:
        return peft_model.merge_and_unload(), processor
    return peft_model, processor


def load_finetuned(
    base_model: nn.Module | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    processor: Any = None,
    merge: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """A fine-tuned run ready for inference: ``base_model`` (a fresh model, or a name/folder
    to load) + ``output_dir/crossget`` + ``output_dir/adapter``. Returns (model, processor);
    the processor is adjusted to the budget (None when a model object and no processor are
    given)."""
    run = Path(output_dir)
    if not isinstance(base_model, nn.Module):
        config = crossget.CrossGETConfig.from_pretrained(run / CROSSGET_DIR)
        base_model, loaded = load_base(base_model, dtype, _attention_for(config))
        processor = processor if processor is not None else loaded
    return attach_finetuned(base_model, run / ADAPTER_DIR, run / CROSSGET_DIR, processor, merge)


def merge_and_save(
    base_model: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    merged_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A servable full model: LoRA folded into a fresh *unquantized* base (also after QLoRA),
    saved as a stock LLaVA + processor in ``merged_dir``, CrossGET state in
    ``merged_dir/crossget``. Load it back with ``LlavaForConditionalGeneration.from_pretrained``
    and ``crossget.from_pretrained(model, merged_dir / "crossget", processor)``."""
    merged = Path(merged_dir)
    model, processor = load_finetuned(base_model, output_dir, merge=True, dtype=dtype)
    merged.mkdir(parents=True, exist_ok=True)
    crossget.save_pretrained(model, merged / CROSSGET_DIR)
    crossget.remove(model, processor)
    _save_final(model, processor, merged)
    return merged


# ----------------------------------------------------------------------------- training


@dataclass
class FinetuneRun:
    """What :func:`train` leaves behind in memory (tests and notebooks read it)."""

    model: Any  # the peft model (CrossGET applied underneath)
    processor: Any
    trainer: Any
    summary: dict[str, Any] = field(default_factory=dict)


def _check_run_config(output_dir: Path, record: dict[str, Any], resuming: bool) -> None:
    """A resumed run must train the same thing: same CrossGET config and LoRA shape."""
    path = output_dir / RUN_CONFIG
    if resuming and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in record if saved.get(k) != record[k])
        if changed:
            raise FinetuneError(
                f"--resume with different settings than the run in {output_dir}: {changed} "
                f"changed (see {path}); use the original flags or a new --output-dir"
            )


def _checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, newest (largest N) first."""
    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True)


def run_artefacts(output_dir: Path) -> list[Path]:
    """What an earlier run left in ``output_dir`` (outputs, checkpoints, partial writes)."""
    if not output_dir.is_dir():
        return []
    named = [output_dir / n for n in (ADAPTER_DIR, CROSSGET_DIR, *RUN_FILES)]
    partial = sorted(output_dir.glob(".adapter.*")) + sorted(output_dir.glob(".crossget.*"))
    return _checkpoints(output_dir) + [p for p in named if p.exists()] + partial


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """A folder that holds a run is refused unless the run is continued or deleted on purpose."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FinetuneError(f"--output-dir {output_dir} is a file, not a folder")
    found = run_artefacts(output_dir)
    if found and not (resume or overwrite):
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:8])
        raise FinetuneError(
            f"--output-dir {output_dir} already holds a run ({names}{', ...' if len(found) > 8 else ''}); "
            "continue it with --resume, delete it and start over with --overwrite, or choose "
            "a new --output-dir"
        )


def clear_run(output_dir: Path) -> list[Path]:
    """``--overwrite``: delete what a run wrote (other files in the folder stay)."""
    removed = run_artefacts(output_dir)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: str
    run_id: str
    step: int
    loss_sum: float | None  # the run's summed per-step loss up to ``step`` (None: unknown)


def resume_point(output_dir: Path) -> ResumePoint:
    """The newest checkpoint of the folder's own run (its id in run_config.json)."""
    checkpoints = _checkpoints(output_dir)
    if not checkpoints:
        raise FinetuneError(
            f"--resume but no checkpoint-* folder in {output_dir}; start it over with --overwrite"
        )
    config_path = output_dir / RUN_CONFIG
    saved = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    run_id = saved.get("run_id")
    if run_id is None:
        raise FinetuneError(
            f"--resume: {output_dir} has checkpoints ({checkpoints[0].name}, ...) but no run id "
            f"({config_path} is missing or predates run ids), so they cannot be told apart from "
            "another run's; start over with --overwrite or choose a new --output-dir"
        )
    others = []
    for checkpoint in checkpoints:
        marker = checkpoint / RUN_MARKER
        info = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
        if info.get("run_id") == run_id:
            if others:
                print(f"--resume: skipping {', '.join(others)}: not checkpoints of run {run_id}")
            step = int(checkpoint.name.removeprefix("checkpoint-"))
            return ResumePoint(str(checkpoint), run_id, step, info.get("loss_sum"))
        others.append(checkpoint.name)
    raise FinetuneError(
        f"--resume: none of the checkpoints in {output_dir} ({', '.join(others)}) belongs to "
        f"its run {run_id} (run_config.json); start over with --overwrite or choose a new "
        "--output-dir"
    )


def _prepare_data(
    args: argparse.Namespace, processor: Any, visual_tokens: int, pack: bool
) -> tuple[PackedVQADataset, int, int]:
    try:
        examples = load_examples(args.data, args.split, args.image_folder, args.on_bad_row)
    except (OSError, ValueError) as error:
        raise FinetuneError(str(error)) from None
    try:
        pixels = cache_pixels(
            examples,
            processor.image_processor,
            progress=_is_rank_zero() and not args.no_progress,
        )
    except OSError as error:
        raise FinetuneError(f"cannot read a training image: {error}") from None
    try:
        dataset = PackedVQADataset(
            examples,
            pixels,
            processor.tokenizer,
            image_seq_length=visual_tokens,
            pack_per_image=pack,
            max_turns=args.max_turns,
        )
    except ValueError as error:
        raise FinetuneError(f"cannot tokenize the data: {error}") from None
    return dataset, len(examples), sum(len(e.turns) for e in examples)


def train(args: argparse.Namespace) -> FinetuneRun:
    """Load, apply CrossGET, wrap with LoRA, train, write the run folder (see module doc)."""
    from transformers import set_seed

    if args.data is None:
        raise FinetuneError("--data is required to train (only --merge-only works without it)")
    config = build_crossget_config(args)
    check_distributed_setup()
    if args.qlora:
        check_qlora_support()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    output_dir: Path = args.output_dir
    resume = bool(args.resume)
    overwrite = bool(getattr(args, "overwrite", False))
    check_output_dir(output_dir, resume, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    point = resume_point(output_dir) if resume else None
    resume_from = point.checkpoint if point is not None else None
    record = {
        "model": str(args.model),
        "crossget": config.to_dict(),
        "lora": [args.lora_r, args.lora_alpha, args.lora_targets, args.train_projector],
        "qlora": args.qlora,
    }
    _check_run_config(output_dir, record, resuming=resume_from is not None)

    dtype = _dtype(args)
    quantization = None
    if args.qlora:
        dtype = torch.float16 if args.fp16 else torch.bfloat16
        quantization = qlora_quantization(dtype)
    model, processor = load_base(
        args.model, dtype, _attention_for(config, args.attn_implementation), quantization
    )
    if args.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    try:
        model, processor = crossget.apply(model, config, processor)
    except ValueError as error:
        raise FinetuneError(f"the CrossGET budget does not fit {args.model}: {error}") from None
    visual_tokens = crossget.num_visual_tokens(model)
    peft_model = wrap_with_lora(
        model,
        config,
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        args.lora_targets,
        args.train_projector,
    )
    pack = not (args.no_pack or config.guidance == "query")
    dataset, n_images, n_questions = _prepare_data(args, processor, visual_tokens, pack)
    collator: Any = collator_for(processor)
    if config.guidance == "query":
        collator = QueryMaskCollator(collator)
    term = None
    if config.uses_cross_token and config.text_cross_tokens and config.alignment_weight > 0:
        term = AlignmentTerm(model, config.alignment_weight)

    training_args = trainer_arguments(
        args,
        output_dir,
        bf16=args.bf16 or (args.qlora and not args.fp16),
        fp16=args.fp16,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        # Without CUDA, only use_cpu makes the Trainer form a gloo group under torchrun.
        use_cpu=not torch.cuda.is_available(),
    )
    rank, world = training_args.process_index, training_args.world_size
    # Every rank checked the folder above; only now (all ranks past it) does rank 0 change it.
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    if point is not None:
        run_id = point.run_id
        if training_args.process_index == 0:
            print(f"resuming from {Path(point.checkpoint).name} of run {run_id}")
    else:
        # Fresh run: rank 0 picks the id; the other ranks never need it (marker on rank 0).
        run_id = uuid.uuid4().hex[:12]
    if training_args.process_index == 0:
        if overwrite and point is None:
            cleared = clear_run(output_dir)
            if cleared:
                print(f"--overwrite: deleted {len(cleared)} outputs of the earlier run")
        for stale in (ADAPTER_DIR, CROSSGET_DIR):  # left by a run killed while saving
            for suffix in ("partial", "old"):
                if (output_dir / f".{stale}.{suffix}").is_dir():
                    shutil.rmtree(output_dir / f".{stale}.{suffix}")
        write_json_atomic(output_dir / RUN_CONFIG, {**record, "run_id": run_id}, indent=1)
    PartialState().wait_for_everyone()
    counts = trainable_summary(peft_model)
    print(
        f"[rank {rank}/{world}] {n_images} images, {n_questions} questions, {len(dataset)} "
        f"sequences, {visual_tokens} visual tokens/image; trainable: {counts}"
    )
    resume_step = point.step if point is not None else 0
    control = _callbacks(term, args.stop_after_steps)
    marker = _run_marker(run_id, point.loss_sum if point is not None else 0.0)
    trainer = _trainer_class()(
        model=peft_model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[
            *control,
            marker,
            _loss_logger(output_dir / "loss.json", output_dir / "loss.png", resume_step),
        ],
        extra_losses=[term] if term is not None else [],
    )
    marker.trainer = trainer
    if term is not None:
        term.autocast = trainer.accelerator.autocast
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.time() - started
    # Written aside, then renamed into place (on rank 0, after every rank's FSDP/ZeRO gather).
    partial_adapter = output_dir / f".{ADAPTER_DIR}.partial"
    trainer.save_model(str(partial_adapter))
    stopped = control[0].stopped_early
    # The whole run's mean step loss: HF's training_loss covers this session's steps only.
    steps_now = trainer.state.global_step - resume_step
    train_loss = result.training_loss
    if point is not None:
        earlier = point.loss_sum
        train_loss = (
            None
            if earlier is None
            else (earlier + result.training_loss * steps_now) / max(trainer.state.global_step, 1)
        )
    summary = {
        "world_size": world,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "stopped_early": stopped,
        "resumed_from": resume_from,
        "wall_time_s": wall,
        "train_loss": train_loss,
        "train_loss_this_session": result.training_loss,
        "images": n_images,
        "questions": n_questions,
        "sequences": len(dataset),
        "visual_tokens": visual_tokens,
        "crossget_config": config.to_dict(),
        "alignment_loss": term is not None,
        "trainable_parameters": counts,
        "adapter_dir": str(output_dir / ADAPTER_DIR),
        "crossget_dir": str(output_dir / CROSSGET_DIR),
        "argv": list(getattr(args, "argv", [])),
    }
    if trainer.is_world_process_zero():
        replace_folder(partial_adapter, output_dir / ADAPTER_DIR)
        partial_state = output_dir / f".{CROSSGET_DIR}.partial"
        if partial_state.exists():
            shutil.rmtree(partial_state)
        crossget.save_pretrained(model, partial_state)
        replace_folder(partial_state, output_dir / CROSSGET_DIR)
        write_json_atomic(output_dir / "train_summary.json", summary, indent=1)
        print(
            f"trained {trainer.state.global_step} steps in {wall / 60:.1f} min -> {output_dir}"
            + (" (stopped early: continue with --resume)" if stopped else "")
        )
    trainer.accelerator.wait_for_everyone()
    return FinetuneRun(peft_model, processor, trainer, summary)


def _merge_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 or (args.qlora and not args.fp16) else _dtype(args)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``python -m recipes.llava_finetune --help``."""
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if args.merge_only:
            if args.merge_and_unload is None:
                raise FinetuneError("--merge-only needs --merge-and-unload DIR")
            merged = merge_and_save(
                args.model, args.output_dir, args.merge_and_unload, _merge_dtype(args)
            )
            print(f"merged model -> {merged}")
            return 0
        run = train(args)
        if args.merge_and_unload is not None and run.trainer.is_world_process_zero():
            if run.summary["stopped_early"]:
                print("not merging: the run stopped early (--stop-after-steps)")
            else:
                merged = merge_and_save(
                    args.model, args.output_dir, args.merge_and_unload, _merge_dtype(args)
                )
                print(f"merged model -> {merged}")
    except (FinetuneError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "AlignmentTerm",
    "FinetuneError",
    "FinetuneRun",
    "QueryMaskCollator",
    "attach_finetuned",
    "build_crossget_config",
    "build_parser",
    "load_finetuned",
    "main",
    "merge_and_save",
    "train",
    "wrap_with_lora",
]
