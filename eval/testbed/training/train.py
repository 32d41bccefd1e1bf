"""Supervised fine-tuning of LLaVA-style models on the testbed (or any LLaVA-format data).

Built on the transformers `Trainer`, so it runs on CPU, on one GPU, or under
`accelerate launch` without changes. The loss covers answer tokens only: the image
placeholders and the prompt are masked with -100 so the model is never trained to predict
its own input. Questions about the same image are packed into one multi-turn sequence by
default, which reuses a single vision-tower pass for several answers.

Extension points for later recipes (LoRA, an extra loss term): `build_model_and_processor`
returns the model to train (wrap it with peft there), and `TestbedTrainer.extra_losses`
holds callables whose values are added to the language-model loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from eval.testbed.model import (
    BOS,
    EOS,
    IMAGE,
    MODEL_SIZES,
    TURN_TEMPLATE,
    build_reference,
    load_reference,
)
from eval.testbed.patch_labels import NEIGHBOUR_QUERIES
from eval.testbed.training.grounding import (
    IGNORE_INDEX,
    SIDE_KEYS,
    SUPERVISIONS,
    TALLY_KEY,
    TURN_IDS_KEY,
)
from eval.testbed.training.pixels import normalize_pixels
from eval.testbed.training.resume import finished_checkpoint_output
from mllm_crossget import named_models
from mllm_crossget.config import atomic_output, write_json_atomic

# ----------------------------------------------------------------------------- data


@dataclass
class Turn:
    question: str
    answer: str
    family: str = ""  # the testbed's question family, when the data has one


@dataclass
class ImageExample:
    """One image and every question asked about it."""

    key: str
    load_image: Callable[[], Image.Image]
    turns: list[Turn]
    meta: str | None = None  # the testbed's scene metadata, for vision pretraining


# (prompt token ids, answer token ids + </s>, [(prompt token index, patch mask)], the patches
# the answer rests on or None, prompt indices of the question's grounded words)
EncodedTurn = tuple[
    list[int], list[int], list[tuple[int, np.ndarray]], np.ndarray | None, list[int]
]


def _strip_image_tag(text: str) -> str:
    return text.replace(IMAGE, "").strip()


BAD_ROW_POLICIES: tuple[str, ...] = ("fail", "skip")


class BadRowError(ValueError):
    """One LLaVA data row that cannot be trained on; the message names the row."""


def _read_llava_rows(json_path: Path) -> list[tuple[str, Any]]:
    """(label, parsed row) pairs: ``row i`` of a JSON list (from 0), or ``line n`` of JSON
    Lines (``.jsonl``, from 1), where a line that does not parse becomes a
    :class:`BadRowError` in place of its row."""
    text = json_path.read_text(encoding="utf-8")
    if json_path.suffix == ".jsonl":
        rows: list[tuple[str, Any]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                rows.append((f"line {number}", BadRowError(f"not valid JSON ({error.msg})")))
        return rows
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{json_path} is not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg}); a file with one row per line must be named *.jsonl"
        ) from None
    if not isinstance(parsed, list):
        raise ValueError(f"{json_path}: expected a JSON list of rows, got {type(parsed).__name__}")
    return [(f"row {index}", row) for index, row in enumerate(parsed)]


def _parse_llava_row(row: Any, label: str, folder: Path) -> tuple[str, Path, list[Turn]]:
    """Validates one row (image present on disk, alternating human/gpt turns)."""
    if isinstance(row, BadRowError):
        raise BadRowError(f"{label}: {row}")
    if not isinstance(row, dict):
        raise BadRowError(f"{label}: expected an object, got {type(row).__name__}")
    label = f"{label} (id={row['id']})" if "id" in row else label
    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise BadRowError(f"{label}: no 'image' file name (text-only rows cannot be trained here)")
    conversation = row.get("conversations")
    if (
        not isinstance(conversation, list)
        or not conversation
        or len(conversation) % 2
        or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversation)
    ):
        raise BadRowError(
            f"{label}: 'conversations' must be a non-empty list of alternating human/gpt "
            "turns, each with a string 'value'"
        )
    image_path = folder / image
    if not image_path.is_file():
        raise BadRowError(f"{label}: image file not found: {image_path}")
    turns = [
        Turn(_strip_image_tag(human["value"]), gpt["value"].strip())
        for human, gpt in zip(conversation[::2], conversation[1::2], strict=True)
    ]
    return image, image_path, turns


def load_llava_json(
    json_path: Path, image_folder: Path | None = None, on_bad_row: str = "fail"
) -> list[ImageExample]:
    """Reads LLaVA conversation JSON (or JSON Lines); rows that share an image file are merged.

    A row that cannot be used (malformed, missing image file) stops loading with its row
    number (``on_bad_row="fail"``) or is skipped with a warning (``"skip"``).
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    if not json_path.is_file():
        raise FileNotFoundError(f"LLaVA JSON not found: {json_path}")
    folder = image_folder if image_folder is not None else json_path.parent / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (pass --image-folder)")
    by_image: dict[str, ImageExample] = {}
    for label, row in _read_llava_rows(json_path):
        try:
            image, image_path, turns = _parse_llava_row(row, label, folder)
        except BadRowError as error:
            if on_bad_row == "fail":
                raise BadRowError(
                    f"{json_path}: {error} (pass --on-bad-row skip to skip such rows)"
                ) from None
            warnings.warn(f"{json_path}: skipping {error}", stacklevel=2)
            continue
        if image not in by_image:
            by_image[image] = ImageExample(image, _file_loader(image_path), [])
        by_image[image].turns.extend(turns)
    if not by_image:
        raise ValueError(f"{json_path}: no usable rows")
    return list(by_image.values())


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        with Image.open(path) as image:
            return image.convert("RGB")

    return load


def _bytes_loader(data: bytes) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import io

        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")

    return load


def load_hf_split(dataset: Any) -> list[ImageExample]:
    """Groups a testbed `datasets.Dataset` by `image_id` without decoding images yet."""
    import datasets

    plain = dataset.cast_column("image", datasets.Image(decode=False))
    by_image: dict[str, ImageExample] = {}
    for record in plain:
        key = record.get("image_id") or record["id"]
        if key not in by_image:
            image = record["image"]
            loader = (
                _bytes_loader(image["bytes"])
                if image["bytes"]
                else _file_loader(Path(image["path"]))
            )
            by_image[key] = ImageExample(key, loader, [], record.get("meta"))
        family = record.get("family") or ""
        by_image[key].turns.append(Turn(record["question"], record["answer"], family))
    return list(by_image.values())


def load_examples(
    data: Path, split: str, image_folder: Path | None = None, on_bad_row: str = "fail"
) -> list[ImageExample]:
    """Accepts an export root (with hf/ or llava/), a `save_to_disk` folder, or a LLaVA JSON
    (or .jsonl) file; `on_bad_row` applies to LLaVA JSON (see `load_llava_json`)."""
    if data.is_file():
        return load_llava_json(data, image_folder, on_bad_row)
    from eval.testbed.data import load_split

    if (
        data.is_dir()
        and not (data / "hf").is_dir()
        and (data / "llava" / f"{split}.json").is_file()
    ):
        return load_llava_json(data / "llava" / f"{split}.json", image_folder, on_bad_row)
    return load_hf_split(load_split(data, split))


def parse_family_weights(spec: str) -> dict[str, float]:
    """`"counting=3,attribute=0.5"` -> {"counting": 3.0, "attribute": 0.5}; errors say what is
    wrong."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        family, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not family.strip() or not weight > 0 or weight == float("inf"):
            raise ValueError(
                f"--family-weights entry {part!r} must be FAMILY=W with W a number > 0, "
                "e.g. counting=3 or attribute=0.5"
            )
        weights[family.strip()] = weight
    return weights


def select_families(
    examples: Sequence[ImageExample], families: Sequence[str]
) -> list[ImageExample]:
    """Keeps only the questions of `families` (and the images that still have one)."""
    wanted = {f.strip() for f in families if f.strip()}
    kept = []
    for example in examples:
        turns = [t for t in example.turns if t.family in wanted]
        if turns:
            kept.append(ImageExample(example.key, example.load_image, turns, example.meta))
    if not kept:
        raise ValueError(f"no questions of families {sorted(wanted)} in the data")
    return kept


def cache_pixels(
    examples: Sequence[ImageExample], image_processor: Any, chunk: int = 64, progress: bool = True
) -> torch.Tensor:
    """Decodes and resizes every image once and keeps it as uint8 (4x smaller than float);
    normalisation happens per batch in the collator, exactly as the processor would do it."""
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no training examples")
    parts = []
    for start in tqdm(range(0, len(examples), chunk), desc="caching pixels", disable=not progress):
        images = [example.load_image() for example in examples[start : start + chunk]]
        resized = image_processor(
            images=images, do_rescale=False, do_normalize=False, return_tensors="pt"
        )["pixel_values"]
        parts.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(parts)


# Batch key of a frozen vision tower's cached output (see cache_vision_features).
VISION_FEATURES_KEY = "vision_features"


@torch.no_grad()
def cache_vision_features(
    model: Any,
    pixels: torch.Tensor,
    image_processor: Any,
    batch_size: int = 64,
    bf16: bool = False,
    progress: bool = True,
) -> torch.Tensor:
    """What a frozen vision tower hands the projector for each cached image, (N, P, C).

    With the tower frozen, every epoch recomputes the same features (a tenth of a language
    step of the reference model); computing them once leaves the projector and the LLM, which
    still train, as they were. The features are those of the tower in eval mode, so a tower
    that uses dropout is refused: in training mode its output would differ each time."""
    from tqdm.auto import tqdm

    config = model.config
    vision_config = config.vision_config
    dropouts = {
        name: float(getattr(vision_config, name, 0.0) or 0.0)
        for name in ("attention_dropout", "dropout", "hidden_dropout_prob")
    }
    if any(dropouts.values()):
        raise ValueError(
            f"cannot cache the vision features of a tower with dropout ({dropouts}): its "
            "training-mode output changes every step; drop --cache-vision-features"
        )
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    crop_cls = config.vision_feature_select_strategy == "default"
    tower = model.model.vision_tower
    was_training = tower.training
    tower.eval()
    mean, std = list(image_processor.image_mean), list(image_processor.image_std)
    rescale = float(image_processor.rescale_factor)
    parts = []
    try:
        starts = range(0, len(pixels), batch_size)
        for start in tqdm(starts, desc="caching vision features", disable=not progress):
            pixel_values = normalize_pixels(pixels[start : start + batch_size], mean, std, rescale)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hidden = tower(pixel_values, output_hidden_states=True).hidden_states
            selected = [hidden[layer][:, 1:] if crop_cls else hidden[layer] for layer in layers]
            parts.append(torch.cat(selected, dim=-1))
    finally:
        tower.train(was_training)
    return torch.cat(parts)


def image_encoder_outputs(model: Any, features: torch.Tensor) -> dict[str, Any]:
    """`mm_encoder_outputs` for a LLaVA forward from cached tower features: the projector
    (which trains) runs here, the tower does not run at all."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    projector = projector_of(model)
    projected = projector(features.to(next(projector.parameters()).dtype))
    return {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}


def use_cached_features(model: Any, inputs: dict[str, Any]) -> None:
    """A batch with cached tower features: replace them (in place) by the projected
    `mm_encoder_outputs` the LLaVA forward takes instead of pixels."""
    if VISION_FEATURES_KEY in inputs:
        features = inputs.pop(VISION_FEATURES_KEY)
        inputs["mm_encoder_outputs"] = image_encoder_outputs(model, features)


def projector_of(model: Any) -> torch.nn.Module:
    """The LLaVA projector under any wrapper: plain, or peft's (whose ``modules_to_save``
    wrapper forwards to the copy being trained)."""
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            return module
    raise ValueError("no multi_modal_projector in the model")


class PackedVQADataset(torch.utils.data.Dataset):
    """Token ids, answer-only labels and cached pixels; one item per image (packed turns) or
    per question. With `patch_label_sets` (one per image, from the scene metadata) every item
    also carries the grounding targets of its question words (see training/grounding.py).

    With `isolate_turns`, every packed turn sees the image and itself only, at the positions
    it would have alone (`turn_ids`, `position_ids`; the trainer turns them into a 4-D mask):
    a turn then trains exactly what a single-question prompt is asked at evaluation, and
    cannot lean on the answers of the image's other questions."""

    def __init__(
        self,
        examples: Sequence[ImageExample],
        pixels: torch.Tensor,
        tokenizer: Any,
        image_seq_length: int,
        pack_per_image: bool = True,
        max_turns: int = 0,
        patch_label_sets: Sequence[dict[str, np.ndarray]] | None = None,
        isolate_turns: bool = False,
        family_weights: Mapping[str, float] | None = None,
        neighbour_query: str = "last",
    ) -> None:
        from eval.testbed.patch_labels import attention_targets, tally_classes

        if patch_label_sets is not None and len(patch_label_sets) != len(examples):
            raise ValueError("patch_label_sets needs one entry per image")
        self.pixels = pixels
        self.vision_features: torch.Tensor | None = None
        self.image_seq_length = image_seq_length
        self.grounded = patch_label_sets is not None
        self.tallies = (
            None
            if patch_label_sets is None
            else [torch.from_numpy(tally_classes(labels)) for labels in patch_label_sets]
        )
        self.isolate_turns = isolate_turns
        self.prefix = [tokenizer.convert_tokens_to_ids(BOS)] + [
            tokenizer.convert_tokens_to_ids(IMAGE)
        ] * image_seq_length
        eos = tokenizer.convert_tokens_to_ids(EOS)
        unk = tokenizer.unk_token_id
        self.items: list[tuple[int, list[EncodedTurn]]] = []
        shown: dict[str, int] = {}  # images of each family so far
        for image_index, example in enumerate(examples):
            encoded = []
            for turn in example.turns:
                prompt = tokenizer.encode(
                    TURN_TEMPLATE.format(question=turn.question), add_special_tokens=False
                )
                target = tokenizer.encode(turn.answer, add_special_tokens=False) + [eos]
                if unk in prompt or unk in target:
                    raise ValueError(
                        f"out-of-vocabulary word in {turn.question!r} -> {turn.answer!r}"
                    )
                supervision = {}
                if patch_label_sets is not None:
                    words = tokenizer.convert_ids_to_tokens(prompt)
                    supervision = attention_targets(
                        words, patch_label_sets[image_index], turn.answer, neighbour_query
                    )
                encoded.append((prompt, target, supervision))
            if pack_per_image:
                groups = [encoded]
                if max_turns > 0:
                    groups = [encoded[i : i + max_turns] for i in range(0, len(encoded), max_turns)]
            else:
                groups = [[turn] for turn in encoded]
            family = example.turns[0].family if example.turns else ""
            weight = (family_weights or {}).get(family, 1.0)
            seen = shown.get(family, 0)
            shown[family] = seen + 1
            # The i-th image of a family appears floor((i+1) w) - floor(i w) times: exactly
            # floor(n w) in all, spread evenly over the family's images.
            repeats = math.floor((seen + 1) * weight) - math.floor(seen * weight)
            self.items.extend((image_index, group) for group in groups for _ in range(repeats))

    def use_vision_features(self, features: torch.Tensor) -> None:
        """Items carry these (one entry per image, from `cache_vision_features`) instead of
        pixels from now on."""
        if len(features) != len(self.pixels):
            raise ValueError(
                f"{len(features)} cached vision features for {len(self.pixels)} images"
            )
        self.vision_features = features

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Every item's token count, without building the items (which would shuffle turns
        and draw from the seeded RNG): what `--group-by-length` sorts batches by."""
        return [
            len(self.prefix) + sum(len(prompt) + len(target) for prompt, target, _ in turns)
            for _, turns in self.items
        ]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_index, turns = self.items[index]
        turns = list(turns)
        random.shuffle(turns)  # seeded by Trainer; no fixed order for the model to exploit
        input_ids = list(self.prefix)
        labels = [IGNORE_INDEX] * len(self.prefix)
        rows: dict[str, list[tuple[int, Any]]] = {name: [] for name in SUPERVISIONS}
        turn_ids = [0] * len(self.prefix)  # 0: BOS and the image, seen by every turn
        # each turn continues from the image as if it were the only one
        position_ids = list(range(len(self.prefix)))
        for number, (prompt, target, supervision) in enumerate(turns, start=1):
            start = len(input_ids)
            turn_ids += [number] * (len(prompt) + len(target))
            position_ids += range(len(self.prefix), len(self.prefix) + len(prompt) + len(target))
            for name, targets in supervision.items():
                for query, on in targets:
                    # word indices are relative to the prompt; patch masks stay as they are
                    on = on if isinstance(on, np.ndarray) else [start + i for i in on]
                    rows[name].append((start + query, on))
            input_ids += prompt + target
            labels += [IGNORE_INDEX] * len(prompt) + target
        item = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        if self.vision_features is not None:
            item[VISION_FEATURES_KEY] = self.vision_features[image_index]
        else:
            item["pixels"] = self.pixels[image_index]
        if self.isolate_turns:
            item[TURN_IDS_KEY] = torch.tensor(turn_ids)
            item["position_ids"] = torch.tensor(position_ids)
        if self.tallies is not None:
            item[TALLY_KEY] = self.tallies[image_index]
        if self.grounded:
            for name, supervision in SUPERVISIONS.items():
                width = self.image_seq_length if supervision.over_patches else len(input_ids)
                masks = torch.zeros((len(rows[name]), width), dtype=torch.bool)
                for row, (_, on) in enumerate(rows[name]):
                    masks[row, torch.as_tensor(on)] = True
                item[supervision.positions_key] = torch.tensor(
                    [query for query, _ in rows[name]], dtype=torch.long
                )
                item[supervision.masks_key] = masks
        return item


# Which --*-weight / --*-layer flags set each supervision of grounding.SUPERVISIONS.
SUPERVISION_FLAGS: dict[str, tuple[str, str | None]] = {
    "grounding": ("grounding_weight", "grounding_layer"),
    "question": ("question_weight", None),
    "question2": ("question_weight", None),
    "letter": ("letter_weight", None),
    "readout": ("readout_weight", "readout_layer"),
    "evidence": ("evidence_weight", "evidence_layer"),
    "count": ("count_weight", "evidence_layer"),
    "second": ("evidence_weight", "evidence_layer"),
    "option": ("option_weight", "readout_layer"),
    "neighbour": ("neighbour_weight", None),
    "tally": ("tally_weight", "evidence_layer"),
}


def grounding_losses(model: Any, args: argparse.Namespace) -> list[Callable]:
    """The attention losses switched on by their --*-weight flags (see training/grounding.py)."""
    from eval.testbed.training.grounding import GroundingLoss

    if args.coordinate_weight > 0 and args.evidence_weight <= 0:
        raise ValueError(
            "--coordinate-weight asks the evidence heads for positions, but --evidence-weight "
            "is 0, so there are no evidence heads; pass --evidence-weight > 0 as well"
        )
    losses = []
    for name, supervision in SUPERVISIONS.items():
        weight_flag, layer_flag = SUPERVISION_FLAGS[name]
        weight = getattr(args, weight_flag)
        if weight <= 0:
            continue
        heads = args.grounding_heads if name == "grounding" else 1
        if name == "count":
            supervision = replace(
                supervision, head=args.count_head, sink_weight=args.count_sink_weight
            )
        if name == "grounding" and args.grounding_coordinates:
            supervision = replace(supervision, coordinates=True)
        layer = getattr(args, layer_flag) if layer_flag else supervision.layer
        try:
            loss = GroundingLoss.for_supervision(
                model, supervision, weight, layer, heads, args.coordinate_weight, weight
            )
        except ValueError as error:
            flag = "--" + weight_flag.replace("_", "-")
            raise ValueError(
                f"{flag} supervises the {name!r} attention (grounding.SUPERVISIONS) but "
                f"this model cannot take it: {error}. Set {flag} 0 or use a larger LLM."
            ) from error
        losses.append(loss)
    return losses


def answer_path_terms(model: Any, args: argparse.Namespace) -> tuple[list[Callable], list[Any]]:
    """The losses and training-time forcings on the path from a found option or evidence to the
    answer word (--early-answer-weight, --option-letter-weight, --force-option-head)."""
    from eval.testbed.training.grounding import EarlyAnswerLoss, OptionHeadForcing, OptionLetterLoss

    losses: list[Callable] = []
    forcings: list[Any] = []
    if args.early_answer_weight > 0:
        try:
            losses.append(EarlyAnswerLoss(model, args.early_answer_weight, args.early_answer_layer))
        except ValueError as error:
            raise ValueError(f"--early-answer-layer: {error}") from error
    if args.option_letter_weight > 0:
        if args.letter_weight <= 0:
            raise ValueError(
                "--option-letter-weight needs the option words and their letters, which come "
                "with the letter supervision; pass --letter-weight > 0 as well"
            )
        losses.append(OptionLetterLoss(model, args.option_letter_weight, args.readout_layer))
    if args.force_option_head:
        if args.option_weight <= 0:
            raise ValueError(
                "--force-option-head forces the option head onto the right option, which needs "
                "the option supervision's targets; pass --option-weight > 0 as well"
            )
        forcings.append(OptionHeadForcing(model, args.readout_layer))
    return losses, forcings


def patch_label_sets_for(
    examples: Sequence[ImageExample], pixels: torch.Tensor
) -> list[dict[str, np.ndarray]]:
    """Per-image patch labels (testbed scene metadata + the cached pixels the model sees)."""
    from eval.testbed.patch_labels import patch_labels

    missing = [e.key for e in examples if not e.meta]
    if missing:
        raise ValueError(
            f"grounding needs testbed scene metadata; {len(missing)} images have none "
            f"(first: {missing[0]}). Train on a `crossget data make` export or drop "
            "every --*-weight flag of the grounding group."
        )
    return [
        patch_labels(example.meta, pixels[i].permute(1, 2, 0).numpy())
        for i, example in enumerate(examples)
    ]


def grounded_dataset(
    examples: Sequence[ImageExample],
    processor: Any,
    image_seq_length: int,
    progress: bool = False,
    isolate_turns: bool = True,
    neighbour_query: str = "last",
) -> PackedVQADataset:
    """Packed turns with every attention target of training/grounding.SUPERVISIONS, from the
    testbed scene metadata (for inspecting a trained model's heads, or tests)."""
    pixels = cache_pixels(examples, processor.image_processor, progress=progress)
    return PackedVQADataset(
        examples,
        pixels,
        processor.tokenizer,
        image_seq_length,
        patch_label_sets=patch_label_sets_for(examples, pixels),
        isolate_turns=isolate_turns,
        neighbour_query=neighbour_query,
    )


@dataclass
class PixelNormalizingCollator:
    """Right-pads tokens and turns cached uint8 pixels into normalised `pixel_values` (or
    stacks cached vision features, which the trainer projects: `image_encoder_outputs`)."""

    pad_token_id: int
    image_mean: Sequence[float]
    image_std: Sequence[float]
    rescale_factor: float = 1 / 255

    def __call__(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in batch)
        extra: dict[str, torch.Tensor] = {}
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        for key, fill in ((TURN_IDS_KEY, -1), ("position_ids", 0)):
            if key in batch[0]:
                padded = torch.full((len(batch), length), fill, dtype=torch.long)
                for row, item in enumerate(batch):
                    padded[row, : len(item[key])] = item[key]
                extra[key] = padded
        collated = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **extra,
        }
        if TALLY_KEY in batch[0]:
            collated[TALLY_KEY] = torch.stack([item[TALLY_KEY] for item in batch])
        if VISION_FEATURES_KEY in batch[0]:
            collated[VISION_FEATURES_KEY] = torch.stack(
                [item[VISION_FEATURES_KEY] for item in batch]
            )
        else:
            pixels = torch.stack([item["pixels"] for item in batch])
            collated["pixel_values"] = normalize_pixels(
                pixels, self.image_mean, self.image_std, self.rescale_factor
            )
        for supervision in SUPERVISIONS.values():
            positions_key, masks_key = supervision.positions_key, supervision.masks_key
            if positions_key not in batch[0]:
                continue
            slots = max(1, max(len(item[positions_key]) for item in batch))
            width = max(item[masks_key].shape[1] for item in batch)
            positions = torch.full((len(batch), slots), -1, dtype=torch.long)
            masks = torch.zeros((len(batch), slots, width), dtype=torch.bool)
            for row, item in enumerate(batch):
                k, w = item[masks_key].shape
                positions[row, :k] = item[positions_key]
                masks[row, :k, :w] = item[masks_key]
            collated[positions_key] = positions
            collated[masks_key] = masks
        return collated


def collator_for(processor: Any) -> PixelNormalizingCollator:
    image_processor = processor.image_processor
    return PixelNormalizingCollator(
        pad_token_id=processor.tokenizer.pad_token_id,
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        rescale_factor=float(image_processor.rescale_factor),
    )


# ----------------------------------------------------------------------------- training


def isolated_turns_mask(turn_ids: torch.Tensor, model: Any) -> torch.Tensor:
    """(B, 1, T, T) mask from per-token turn ids (0 = shared prefix, -1 = padding): causal,
    and a turn's tokens see the prefix and their own turn only. Boolean for sdpa; additive for
    eager attention, which adds the mask to its scores."""
    from eval.testbed.training.grounding import turn_visibility

    allowed = turn_visibility(turn_ids)[:, None]
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class ShuffledLengthBatches(torch.utils.data.Sampler[int]):
    """Indices whose consecutive `batch_size` runs are sequences of about equal length, the
    runs in random order.

    Random batches of packed testbed sequences are about a quarter padding (a counting image
    packs 3 questions, a text image 12), so equal lengths make a step 1.37x faster. But a
    length is nearly a family, so each step then sees one family. Transformers'
    LengthGroupedSampler, which also keeps tens of same-length batches in a row, took the
    from-scratch reference recipe to 39.1 % on validation; this sampler, which shuffles the
    batches, to 60.3 % (random batches: 81.9 %). Opt-in for data whose lengths do not follow
    its tasks. Draws from torch's global RNG, like Trainer's own samplers, so a seeded run
    (and its resume) sees the same order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths)).tolist()
        order.sort(key=lambda index: self.lengths[index])  # stable: random within a length
        size = self.batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        if not batches:
            return
        # a short last batch stays last, so every other batch keeps its boundaries
        full = batches if len(batches[-1]) == size else batches[:-1]
        for position in torch.randperm(len(full)).tolist():
            yield from full[position]
        if len(full) < len(batches):
            yield from batches[-1]


def _trainer_class() -> type:
    from transformers import Trainer

    class TestbedTrainer(Trainer):
        """Trainer whose loss is the LM loss plus any `extra_losses` terms (a hook for e.g.
        a merging-consistency or distillation loss)."""

        extra_losses: list[Callable[[Any, dict[str, Any], Any], torch.Tensor]]

        def __init__(
            self,
            *args: Any,
            extra_losses: Sequence[Callable] = (),
            forcings: Sequence[Any] = (),
            **kwargs: Any,
        ):
            super().__init__(*args, **kwargs)
            self.extra_losses = list(extra_losses)
            # Training-time teacher forcing (e.g. OptionHeadForcing): `prepare(inputs)` before
            # a training forward, `release()` after it; evaluation forwards run unforced.
            self.forcings = list(forcings)

        def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
            if isinstance(resume_from_checkpoint, str):
                finished = finished_checkpoint_output(self, resume_from_checkpoint)
                if finished is not None:
                    return finished
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if self.args.train_sampling_strategy == "group_by_length" and hasattr(
                dataset, "lengths"
            ):
                return ShuffledLengthBatches(
                    dataset.lengths(),
                    self.args.train_batch_size * self.args.gradient_accumulation_steps,
                )
            return super()._get_train_sampler(train_dataset)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            # Side inputs for the extra terms only; the model's forward must not see them.
            side = {key: inputs.pop(key) for key in SIDE_KEYS if key in inputs}
            use_cached_features(model, inputs)
            if TURN_IDS_KEY in side:
                inputs["attention_mask"] = isolated_turns_mask(side[TURN_IDS_KEY], model)
            forced = self.forcings if model.training else []
            for forcing in forced:
                forcing.prepare({**inputs, **side})
            try:
                loss, outputs = super().compute_loss(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            finally:
                for forcing in forced:
                    forcing.release()
            if self.extra_losses:
                full_inputs = {**inputs, **side}
                extra = sum(term(model, full_inputs, outputs) for term in self.extra_losses)
                if model.training and self._lm_loss_scaled_for_ga(num_items_in_batch):
                    # The LM loss is already normalised over the whole accumulated batch (the
                    # Trainer will not divide it); the extra terms are per-micro-batch means.
                    extra = extra / self.current_gradient_accumulation_steps
                loss = loss + extra
            return (loss, outputs) if return_outputs else loss

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            """transformers' own version loads a checkpoint's weights with a non-strict
            `load_state_dict` and without the key renaming `save_pretrained` applied (LLaVA is
            saved under its legacy `language_model.model.*` names), so `--resume` would go on
            silently from freshly initialised weights. `from_pretrained` undoes the renaming, and
            the strict copy fails loudly on anything that still does not match."""
            from transformers import PreTrainedModel

            target = self.model if model is None else model
            if not isinstance(target, PreTrainedModel):  # e.g. a peft model: its own adapter path
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            dtype = next(target.parameters()).dtype
            restored = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype)
            target.load_state_dict(restored.state_dict(), strict=True)

        def _lm_loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
            """The Trainer's own rule (training_step) for "loss already scaled for GA"."""
            if self.loss_is_scaled_for_ga is not None:
                return bool(self.loss_is_scaled_for_ga)
            return bool(
                (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                or self.compute_loss_func is not None
            )

    return TestbedTrainer


def plot_losses(history: Sequence[dict[str, float]], png_path: Path) -> None:
    """Loss curve as a PNG (Agg backend, so it works headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not points:
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([s for s, _ in points], [v for _, v in points], label="train loss (answer tokens)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    try:
        with atomic_output(png_path, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=100)
    finally:
        plt.close(figure)


def _loss_logger(json_path: Path, png_path: Path, resume_step: int) -> Any:
    from transformers import TrainerCallback

    class LossLogger(TrainerCallback):
        """Keeps loss.json current after every log and draws the curve at the end."""

        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []
            self.started = time.time()
            if resume_step and json_path.is_file():
                previous = json.loads(json_path.read_text(encoding="utf-8"))
                self.history = [h for h in previous.get("history", []) if h["step"] <= resume_step]

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
            if not logs or not state.is_world_process_zero:
                return
            entry = {"step": state.global_step, "epoch": state.epoch or 0.0}
            entry.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
            entry["wall_s"] = time.time() - self.started
            self.history.append(entry)
            write_json_atomic(json_path, {"history": self.history}, indent=1)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
            if state.is_world_process_zero:
                write_json_atomic(json_path, {"history": self.history}, indent=1)
                plot_losses(self.history, png_path)

    return LossLogger()


def trainer_arguments(args: argparse.Namespace, output_dir: Path, **overrides: Any) -> Any:
    """The `TrainingArguments` both training entries share, from their common flags."""
    from transformers import TrainingArguments

    warmup: float = args.warmup if args.warmup < 1 else int(args.warmup)
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=warmup,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=args.no_progress,
    )
    return TrainingArguments(**(settings | overrides))


def build_model_and_processor(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model to train: a fresh tiny LLaVA (`--init-reference`) or a saved folder."""
    if args.init_reference:
        return build_reference(size=args.model_size, image_size=args.image_size, seed=args.seed)
    if args.model is None:
        raise SystemExit("error: pass --model DIR or --init-reference")
    return load_reference(args.model)


def _save_final(model: Any, processor: Any, final_dir: Path) -> None:
    """Writes the model and processor file by file with os.replace, leaving other files (such
    as a README) in `final_dir` alone."""
    import tempfile

    final_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final_dir.parent, prefix=f".{final_dir.name}.tmp-") as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), final_dir / name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget testbed-train",
        description="Train a LLaVA-style model on testbed / LLaVA-format VQA data "
        "(loss on answer tokens only).",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        type=Path,
        required=True,
        help="export root from `eval.testbed.data make` (uses hf/), a `save_to_disk` folder, "
        "or a LLaVA-format JSON file",
    )
    data.add_argument(
        "--split", default="train", help="split to train on (ignored for a JSON file)"
    )
    data.add_argument(
        "--image-folder",
        type=Path,
        default=None,
        help="folder the LLaVA JSON image names are relative to (default: JSON's sibling images/)",
    )
    data.add_argument(
        "--no-pack",
        action="store_true",
        help="one sequence per question instead of packing all questions of an image together",
    )
    data.add_argument(
        "--share-turns",
        action="store_true",
        help="let a packed question see the image's earlier questions and answers (default: "
        "each sees the image and itself only, at the positions it has alone, as at evaluation)",
    )
    data.add_argument(
        "--max-turns",
        type=int,
        default=0,
        help="at most this many questions per packed sequence (0 = all of the image's)",
    )
    data.add_argument(
        "--families",
        default="",
        help="comma list: train only on these testbed question families (e.g. a first "
        "curriculum stage on attribute,small); default: all",
    )
    data.add_argument(
        "--family-weights",
        default="",
        help="comma list of FAMILY=W: the language stage shows the images of FAMILY W times per "
        "epoch, evenly spread (counting=3: a counting image carries 3 questions where a text "
        "image carries 12, so counting gets a small share of the answers; attribute=0.5: half "
        "of a family that is learnt already); default: every image once",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        type=named_models.existing_folder_argument,
        default=None,
        help="a named model (reference) or a folder to from_pretrained",
    )
    model.add_argument(
        "--init-reference",
        action="store_true",
        help="build the tiny reference LLaVA from scratch instead of loading --model",
    )
    model.add_argument(
        "--model-size",
        default="cpu-small",
        choices=sorted(MODEL_SIZES),
        help="size preset for --init-reference (see eval/testbed/model.py MODEL_SIZES)",
    )
    model.add_argument(
        "--image-size", type=int, default=224, help="image side for --init-reference (224 or 336)"
    )
    stage = parser.add_argument_group(
        "vision pretraining (testbed only: dense patch labels from the scene metadata)"
    )
    stage.add_argument(
        "--vision-pretrain-steps",
        type=int,
        default=0,
        help="first train the vision tower for N steps on per-patch labels (colour, shape, "
        "object centres, digits, characters, position) of the train split; 0 = skip",
    )
    stage.add_argument(
        "--vision-pretrain-lr", type=float, default=2e-3, help="peak learning rate of that stage"
    )
    stage.add_argument(
        "--vision-pretrain-batch-size", type=int, default=32, help="images per step of that stage"
    )
    stage.add_argument(
        "--vision-count-label",
        action="store_true",
        help="that stage also teaches every patch of a shape how many shapes in the image share "
        "its colour and shape (of a handwritten digit: how many cells show that digit), so a "
        "counting question can read the count where it reads a colour",
    )
    stage.add_argument(
        "--vision-tally-label",
        action="store_true",
        help="that stage also teaches the centre patch of every large object its colour and "
        "shape as one class, and that of every handwritten digit its digit, so that "
        "--tally-weight's head can sum kinds with a linear read of each patch",
    )
    stage.add_argument(
        "--vision-neighbour-label",
        action="store_true",
        help="that stage also teaches every patch of a shape the colour of the shape clearly "
        "nearest to it and of the one clearly farthest from it (the testbed's 30 %% margin), so "
        "a nearest/farthest question can read the answer off the anchor's patches, where the "
        "LLM's own choice among objects was right about a third of the time. Measured with "
        "the reference recipe: it needs --vision-pretrain-steps 2400 (at 1200 digits fell "
        "from 93 to 45 %%), then the tower is right on 90 %% (nearest) and 97 %% (farthest) of "
        "shape patches. In the shipped recipe (with --vision-pretrain-steps 2400): validation "
        "85.4 %% against 84.0 %% without it, test spatial 65.0 %% against 58.5 %%",
    )
    stage.add_argument(
        "--freeze-vision",
        action="store_true",
        help="keep the vision tower frozen in the language stage (as LLaVA keeps CLIP frozen)",
    )
    stage.add_argument(
        "--cache-vision-features",
        action="store_true",
        help="with --freeze-vision: run the frozen tower once per image before the language "
        "stage and train the projector and LLM on its cached output (same features, no tower "
        "forward per step; memory: images x visual tokens x tower width floats)",
    )
    parser.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch sequences of about equal length together, the batches in random order "
        "(ShuffledLengthBatches), so a batch pads to its own length rather than to the longest "
        "of a random draw: packed testbed sequences run from an image with 3 questions to one "
        "with 12, and random batches are about a quarter padding. Not for the testbed recipe: "
        "there a length is a question family, and one-family steps fell to 60.3 %% on "
        "validation from 81.9 %%",
    )
    ground = parser.add_argument_group(
        "grounding (testbed only: which patches each colour/shape/digit word names)"
    )
    ground.add_argument(
        "--grounding-weight",
        type=float,
        default=0.0,
        help="weight of the word-to-patch attention loss (training/grounding.py) added to the "
        "answer loss in the language stage; 0 = off",
    )
    ground.add_argument(
        "--grounding-layer", type=int, default=0, help="LLM layer of the word-to-patch loss"
    )
    ground.add_argument(
        "--grounding-heads",
        type=int,
        default=1,
        help="how many heads (the first N) of that layer are supervised",
    )
    ground.add_argument(
        "--grounding-coordinates",
        action="store_true",
        help="with --coordinate-weight: the word-to-patch heads' first two output channels "
        "must also give the row and column of the named thing, so a word knows where its "
        "thing is after the first layer (the nearest/farthest head's query needs that)",
    )
    ground.add_argument(
        "--question-weight",
        type=float,
        default=0.0,
        help="first layer, heads 1 and 3: the position that predicts the answer attends to the "
        "question's first run of colour/shape/digit words and to the rest (it gathers what is "
        "asked, in order); 0 = off",
    )
    ground.add_argument(
        "--letter-weight",
        type=float,
        default=0.0,
        help="first layer, head 2: each multiple-choice option word attends to its letter; 0 = off",
    )
    ground.add_argument(
        "--readout-weight",
        type=float,
        default=0.0,
        help="head 0 of --readout-layer: the position that predicts the answer attends to the "
        "question's grounded words, which now carry what they saw; 0 = off",
    )
    ground.add_argument(
        "--evidence-weight",
        type=float,
        default=0.0,
        help="heads 1 and 2 of --evidence-layer: the position that predicts the answer attends "
        "to the patches of the first and of the second thing the question names (a code's "
        "letter and digit); 0 = off",
    )
    ground.add_argument(
        "--count-weight",
        type=float,
        default=0.0,
        help="head --count-head of --evidence-layer, for 'how many' questions: attention spread "
        "evenly over BOS and the centre patch of every thing to count, so its share holds the "
        "count; 0 = off",
    )
    ground.add_argument(
        "--tally-weight",
        type=float,
        default=0.0,
        help="head 0 of --evidence-layer, at every answer: attention spread evenly over all "
        "patches, and the head's first channels, read as counts, must give how many "
        "things of each colour-and-shape and each handwritten digit the image holds (Huber, in "
        "things); a count with a fixed denominator, where --count-weight's sink share needs a "
        "hundredth's precision for 7-9 things; 0 = off. In the shipped recipe (1.0), with "
        "--vision-tally-label and the counting grid centred on patches; on the older grid, "
        "where a thing's centre sat on a corner of four patches, it gained nothing (counting "
        "48 %% against 47 %% on validation; see the model card)",
    )
    ground.add_argument(
        "--neighbour-query",
        choices=NEIGHBOUR_QUERIES,
        default="last",
        help="with --neighbour-weight: which of the anchor's words asks for the nearest/"
        "farthest object: its last word (default) or its colour word, which in a spatial "
        "scene names the anchor alone (its shape may be shared)",
    )
    ground.add_argument(
        "--count-head",
        type=int,
        default=SUPERVISIONS["count"].head,
        help="which head of --evidence-layer the count loss trains (default: %(default)s, the "
        "first-thing evidence head, which reads other questions' answers; a free head keeps "
        "the count share apart from --coordinate-weight's position channels)",
    )
    ground.add_argument(
        "--count-sink-weight",
        type=float,
        default=1.0,
        help="with --count-weight: BOS counts as this many things in the count head's target, "
        "so it gets k / (n + k) of the attention instead of 1 / (n + 1); k > 1 spreads the "
        "shares of large counts further apart (8 vs 9 things: 0.026 apart at k = 4, 0.011 at "
        "k = 1)",
    )
    ground.add_argument(
        "--option-weight",
        type=float,
        default=0.0,
        help="head 3 of --readout-layer: the position that predicts the answer attends to the "
        "right multiple-choice option word (which carries its letter); 0 = off",
    )
    ground.add_argument(
        "--neighbour-weight",
        type=float,
        default=0.0,
        help="head 1 of the second-to-last layer, for nearest/farthest questions: the anchor "
        "object's last word attends to the object the answer names (useful with three or more "
        "LLM layers, where a later layer can read it back); 0 = off",
    )
    ground.add_argument(
        "--coordinate-weight",
        type=float,
        default=0.0,
        help="with --evidence-weight: the first two channels of the evidence and second heads' "
        "output must give the row and column of the thing they read (squared error), so that "
        "'where is A relative to B?' can subtract two positions; 0 = off",
    )
    ground.add_argument(
        "--early-answer-weight",
        type=float,
        default=0.0,
        help="the LM head read off the residual after --early-answer-layer must already give "
        "the answer word (for a multiple-choice question, with --option-weight, the right "
        "option's word), so the last layer's option head has an answer to match; needs no scene "
        "metadata; 0 = off",
    )
    ground.add_argument(
        "--early-answer-layer",
        type=int,
        default=-2,
        help="LLM layer whose output --early-answer-weight reads (negative counts from the end; "
        "any layer before the last)",
    )
    ground.add_argument(
        "--option-letter-weight",
        type=float,
        default=0.0,
        help="with --letter-weight: the option head's value at every option word, read through "
        "its slice of o_proj and the LM head, must give that option's letter (cross-entropy), "
        "so the head that finds the right option also carries its letter; 0 = off",
    )
    ground.add_argument(
        "--force-option-head",
        action="store_true",
        help="with --option-weight: in training, the option head's output at a multiple-choice "
        "answer is the value of the right option word (its attention made one-hot there), so "
        "the answer loss learns to read the letter from that head; inference is unchanged",
    )
    ground.add_argument(
        "--readout-layer",
        type=int,
        default=-1,
        help="LLM layer for the readout and option losses (negative counts from the end)",
    )
    ground.add_argument(
        "--evidence-layer",
        type=int,
        default=-1,
        help="LLM layer for the evidence and count losses (negative counts from the end)",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)"
    )
    optim.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    optim.add_argument("--batch-size", type=int, default=32, help="sequences per device per step")
    optim.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    optim.add_argument(
        "--lr-scheduler", default="cosine", choices=["cosine", "linear"], help="decay after warmup"
    )
    optim.add_argument(
        "--warmup", type=float, default=0.05, help="warmup: ratio of total steps if < 1, else steps"
    )
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    optim.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast for the forward of both stages (weights, gradients and optimizer "
        "stay fp32): on a CPU with AVX512-BF16 (or AMX) about 1.4x the steps per second of the "
        "reference model's language stage; also on GPUs",
    )
    optim.add_argument(
        "--seed", type=int, default=0, help="seed for init, shuffling and turn order"
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--output-dir", type=Path, required=True, help="checkpoints, logs, final model"
    )
    run.add_argument(
        "--final-dir",
        type=Path,
        default=None,
        help="where the final model + processor go (default: OUTPUT_DIR/final)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output-dir"
    )
    run.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    run.add_argument("--save-total-limit", type=int, default=2, help="checkpoints to keep")
    run.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps")
    run.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = leave torch's default)"
    )
    run.add_argument(
        "--eval-split",
        default=None,
        help="after training, evaluate the final model on this split of --data (e.g. validation)",
    )
    run.add_argument("--eval-limit", type=int, default=0, help="evaluate on at most N questions")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def optional_patch_labels(args: argparse.Namespace) -> tuple[str, ...]:
    """The opt-in stage-1 targets (OPTIONAL_LABEL_CLASSES keys) the flags ask for."""
    from eval.testbed.patch_labels import NEIGHBOUR_LABELS

    labels: tuple[str, ...] = ("like_count",) if args.vision_count_label else ()
    labels += NEIGHBOUR_LABELS if args.vision_neighbour_label else ()
    return labels + (("tally",) if args.vision_tally_label else ())


def flag_conflict(args: argparse.Namespace) -> str | None:
    """The first flag value or combination that cannot run, as a message naming the fix;
    checked before any data is read or anything is written."""
    if not args.count_sink_weight > 0:
        return (
            f"--count-sink-weight must be > 0 (BOS counts as that many things in the count "
            f"head's target), got {args.count_sink_weight}; pass 1 for the plain 1 / (n + 1) "
            "target"
        )
    if args.cache_vision_features and not args.freeze_vision:
        return (
            "--cache-vision-features caches a frozen tower's output, but the tower trains in "
            "the language stage; add --freeze-vision or drop the flag"
        )
    if args.grounding_coordinates and not (
        args.coordinate_weight > 0 and args.grounding_weight > 0
    ):
        return (
            "--grounding-coordinates asks the word-to-patch heads for positions, weighted by "
            "--coordinate-weight; pass --grounding-weight > 0 and --coordinate-weight > 0 too"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """CLI entry: `crossget testbed-train --help` (or `python -m eval.testbed.training.train`)."""
    args = build_parser().parse_args(argv)
    from transformers import Trainer, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    try:
        family_weights = parse_family_weights(args.family_weights)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    conflict = flag_conflict(args)
    if conflict:
        print(f"error: {conflict}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = None
    vision_stage = args.output_dir / "vision_pretrain"
    if args.resume:
        resume_from = get_last_checkpoint(str(args.output_dir))
        if resume_from is None and not (args.vision_pretrain_steps > 0 and vision_stage.is_dir()):
            print(
                f"error: --resume but no checkpoint-* folder in {args.output_dir}", file=sys.stderr
            )
            return 2
    elif args.vision_pretrain_steps > 0 and vision_stage.is_dir() and any(vision_stage.iterdir()):
        # Without this, a new run would silently pick up an old run's tower or checkpoints.
        print(
            f"error: {vision_stage} holds an earlier vision pretraining run; pass --resume to "
            "continue it or choose a fresh --output-dir",
            file=sys.stderr,
        )
        return 2

    model, processor = build_model_and_processor(args)
    examples = load_examples(args.data, args.split, args.image_folder)
    if args.families:
        examples = select_families(examples, args.families.split(","))
    present = {turn.family for example in examples for turn in example.turns}
    if set(family_weights) - present:
        print(
            f"error: --family-weights names {sorted(set(family_weights) - present)}, which the "
            f"training data does not have; its families: {sorted(present - {''})}",
            file=sys.stderr,
        )
        return 2
    pixels = cache_pixels(examples, processor.image_processor, progress=not args.no_progress)
    grounded = any(getattr(args, flag) > 0 for flag, _ in SUPERVISION_FLAGS.values())
    dataset = PackedVQADataset(
        examples,
        pixels,
        processor.tokenizer,
        image_seq_length=model.config.image_seq_length,
        pack_per_image=not args.no_pack,
        max_turns=args.max_turns,
        patch_label_sets=patch_label_sets_for(examples, pixels) if grounded else None,
        isolate_turns=not args.share_turns,
        family_weights=family_weights,
        neighbour_query=args.neighbour_query,
    )
    extra_losses = grounding_losses(model, args) if grounded else []
    answer_losses, forcings = answer_path_terms(model, args)
    extra_losses += answer_losses
    if args.vision_pretrain_steps > 0:
        from eval.testbed.training.vision_pretrain import run_vision_pretrain

        run_vision_pretrain(
            model,
            pixels,
            [e.meta for e in examples],
            processor.image_processor,
            vision_stage,
            steps=args.vision_pretrain_steps,
            batch_size=args.vision_pretrain_batch_size,
            learning_rate=args.vision_pretrain_lr,
            seed=args.seed,
            progress=not args.no_progress,
            bf16=args.bf16,
            optional_labels=optional_patch_labels(args),
        )
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    if args.cache_vision_features:
        dataset.use_vision_features(
            cache_vision_features(
                model,
                pixels,
                processor.image_processor,
                bf16=args.bf16,
                progress=not args.no_progress,
            )
        )
    n_questions = sum(len(e.turns) for e in examples)
    print(
        f"{len(examples)} images, {n_questions} questions, {len(dataset)} sequences; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )
    training_args = trainer_arguments(
        args,
        args.output_dir,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
    )
    resume_step = int(Path(resume_from).name.split("-")[-1]) if resume_from else 0
    trainer: Trainer = _trainer_class()(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator_for(processor),
        # saved beside every checkpoint's weights, so `load_reference` / `evaluate` / the
        # attention report open a checkpoint folder as they open the final one
        processing_class=processor,
        extra_losses=extra_losses,
        forcings=forcings,
        callbacks=[
            _loss_logger(args.output_dir / "loss.json", args.output_dir / "loss.png", resume_step)
        ],
    )
    started = time.time()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.time() - started
    final_dir = args.final_dir or args.output_dir / "final"
    if trainer.is_world_process_zero():
        _save_final(trainer.model, processor, final_dir)
        summary = {
            "wall_time_s": wall,
            "steps": trainer.state.global_step,
            "images": len(examples),
            "questions": n_questions,
            "final_dir": str(final_dir),
            "argv": sys.argv[1:] if argv is None else argv,
        }
        write_json_atomic(args.output_dir / "train_summary.json", summary, indent=1)
        print(f"trained {trainer.state.global_step} steps in {wall / 60:.1f} min -> {final_dir}")
        if args.eval_split:
            from eval.testbed.evaluate import evaluate_folder

            evaluate_folder(
                final_dir,
                args.data,
                args.eval_split,
                limit=args.eval_limit,
                output=args.output_dir / f"eval_{args.eval_split}.json",
                progress=not args.no_progress,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "ImageExample",
    "PackedVQADataset",
    "PixelNormalizingCollator",
    "Turn",
    "build_parser",
    "cache_pixels",
    "grounded_dataset",
    "load_examples",
    "main",
]
