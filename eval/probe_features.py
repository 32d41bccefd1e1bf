"""Can a linear map read the testbed's objects from a LLaVA's visual tokens?

A model that answers at chance may lack the information (the tower does not see colours, the
projector throws them away) or fail to read it (the LLM has not learned to). This probe tells
the two apart: for every object of the testbed's shape scenes it takes the visual token of the
patch under the object's box centre, from the tower's feature layer (what the projector
reads) and after the projector (what the LLM reads), fits a multinomial logistic regression
for the object's colour and for its shape on one split's images, and scores it on another's.
High probe accuracy with a model at chance means the visual tokens carry the answer and the
LLM does not read it.

    python -m eval.probe_features --model pretrained-mini --weights runs/pm-bf16/stage1 \\
        --data data/pm224 --train-images 400 --eval-images 200

Every item of a split is read (images decoded) before the first images are taken: on a large
training split (the reference model's 96,000 questions) fit on ``--train-split validation``
and score on ``--eval-split test`` instead. Only what the LLaVA itself computes is used (no merging: CrossGET is not applied).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from eval.tasks import Item, load_task
from mllm_crossget.config import write_json_atomic

__all__ = ["ObjectTokens", "centre_patch", "collect", "fit_probe", "image_key", "main"]

LABELS = ("colour", "shape")


@dataclass
class ObjectTokens:
    """One row per object: its token at the feature layer, after the projector, its labels."""

    tower: np.ndarray  # [M, vision width]
    projected: np.ndarray  # [M, LLM width]
    labels: dict[str, list[str]]
    images: int


def centre_patch(box: Sequence[float], image_size: int, grid: int) -> int:
    """Raster index of the patch under the centre of ``box`` (x0, y0, x1, y1 in pixels of a
    square image of ``image_size``) on a ``grid`` x ``grid`` patch grid."""
    x = (box[0] + box[2]) / 2 / image_size
    y = (box[1] + box[3]) / 2 / image_size
    column = min(max(int(x * grid), 0), grid - 1)
    row = min(max(int(y * grid), 0), grid - 1)
    return row * grid + column


def image_key(item: Item) -> str:
    """Which image an item asks about: its file, else its testbed id without the question
    suffix (``s2000029-0000000-q3`` -> ``s2000029-0000000``); several questions share one."""
    if item.image_path:
        return str(item.image_path)
    stem, sep, number = item.item_id.rpartition("-q")
    return stem if sep and number.isdigit() else item.item_id


def _scene_objects(item: Item) -> list[dict[str, Any]] | None:
    meta = item.extra.get("meta")
    if isinstance(meta, str):
        meta = json.loads(meta)
    if not isinstance(meta, dict) or not meta.get("objects"):
        return None
    objects = meta["objects"]
    if not all({"box", "colour", "shape"} <= set(obj) for obj in objects):
        return None
    return objects


@torch.inference_mode()
def visual_tokens(model: Any, processor: Any, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The image's patch tokens [N, C] at the model's feature layer (the selection LLaVA
    makes: CLS dropped under strategy 'default') and after its projector [N, C_llm]."""
    from eval.testbed.training.pretrained_mini import tower_features

    inner = model.model
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"probe_features reads one feature layer, the model has {layer!r}")
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    pixels = pixels.to(next(inner.vision_tower.parameters()).dtype)
    features = tower_features(model, pixels, bf16=False)
    return features[0].float(), inner.multi_modal_projector(features)[0].float()


def collect(
    model: Any, processor: Any, items: Sequence[Item], images: int, progress: bool = True
) -> ObjectTokens:
    """The tokens under every object of the first ``images`` distinct scene images."""
    seen: set[str] = set()
    chosen: list[tuple[Item, list[dict[str, Any]]]] = []
    for item in items:
        objects = _scene_objects(item)
        key = image_key(item)
        if objects is None or key in seen:
            continue
        seen.add(key)
        chosen.append((item, objects))
        if len(chosen) == images:
            break
    tower, projected = [], []
    labels: dict[str, list[str]] = {name: [] for name in LABELS}
    for item, objects in tqdm(chosen, desc="visual tokens", disable=not progress):
        image = item.load_image().convert("RGB")
        if image.size[0] != image.size[1]:
            raise ValueError(f"{item.item_id}: the probe expects square testbed images")
        features, after = visual_tokens(model, processor, image)
        grid = int(round(features.shape[0] ** 0.5))
        if grid * grid != features.shape[0]:
            raise ValueError(f"{features.shape[0]} visual tokens are not a square patch grid")
        for obj in objects:
            index = centre_patch(obj["box"], image.size[0], grid)
            tower.append(features[index].numpy())
            projected.append(after[index].numpy())
            for name in LABELS:
                labels[name].append(str(obj[name]))
    if not tower:
        raise ValueError("no scene with object metadata (colour, shape, box) in these items")
    return ObjectTokens(np.stack(tower), np.stack(projected), labels, len(chosen))


def fit_probe(
    train: np.ndarray, train_labels: Sequence[str], test: np.ndarray, test_labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy of a standardised multinomial logistic regression, beside the majority
    class of the training labels scored on the test labels (what a constant guess gets)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train), list(train_labels))
    predicted = probe.predict(scaler.transform(test))
    truth = np.asarray(test_labels)
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    majority = values[int(np.argmax(counts))]
    return {
        "accuracy": float((predicted == truth).mean()),
        "majority": float((truth == majority).mean()),
        "n": len(truth),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.probe_features",
        description=(
            "Linear probes of object colour and shape on a LLaVA's visual tokens (feature "
            "layer and after the projector), trained on one testbed split, scored on another."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="pretrained-mini", help="named model or folder")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="pretrained-mini only: a run's own weights (e.g. runs/X/stage1) instead of the "
        "shipped ones",
    )
    parser.add_argument("--data", type=Path, required=True, help="testbed export root")
    parser.add_argument("--train-split", default="train", help="split the probes are fit on")
    parser.add_argument("--eval-split", default="validation", help="split they are scored on")
    parser.add_argument("--train-images", type=int, default=400, help="scene images to fit on")
    parser.add_argument("--eval-images", type=int, default=200, help="scene images to score on")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| visual tokens | label | probe accuracy | majority class | objects scored |",
        "|---|---|---|---|---|",
    ]
    for where in ("feature layer", "after projector"):
        for name in LABELS:
            row = result["probes"][where][name]
            lines.append(
                f"| {where} | {name} | {100 * row['accuracy']:.1f} % | "
                f"{100 * row['majority']:.1f} % | {row['n']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("train_images", "eval_images"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from eval.image_reliance import load_reliance_model

    model, processor = load_reliance_model(args.model, args.weights)
    model.eval()
    progress = not args.no_progress
    items = {
        split: load_task("testbed", args.data, split)
        for split in {args.train_split, args.eval_split}
    }
    train = collect(model, processor, items[args.train_split], args.train_images, progress)
    test = collect(model, processor, items[args.eval_split], args.eval_images, progress)
    probes: dict[str, dict[str, Any]] = {}
    for where, attribute in (("feature layer", "tower"), ("after projector", "projected")):
        probes[where] = {
            name: fit_probe(
                getattr(train, attribute),
                train.labels[name],
                getattr(test, attribute),
                test.labels[name],
            )
            for name in LABELS
        }
    result = {
        "model": args.model,
        "weights": None if args.weights is None else str(args.weights),
        "data": str(args.data),
        "train": {"split": args.train_split, "images": train.images, "objects": len(train.tower)},
        "eval": {"split": args.eval_split, "images": test.images, "objects": len(test.tower)},
        "probes": probes,
    }
    print(markdown(result))
    if args.out is not None:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
