"""Does a model use the image? Its answer loss with each question's own image against the
loss with another question's image, on the same questions.

Accuracy at chance says a model has not learned to answer; it does not say whether it has
started to read the image. A model that ignores the image gives both losses the same up to
noise; one that reads it gives its own image the lower loss on most questions. The paired
count (own image lower / other image lower) gets an exact two-sided sign test, the McNemar
test `eval.compare_runs` uses for two settings.

    python -m eval.image_reliance --model pretrained-mini --data data/pm224 --split validation \\
        --per-family 3

``--captions`` scores each image's scene caption after a description prompt instead of the
answer (what stage 1 of the pretrained-mini recipe trains on), and ``--weights`` loads a
pretrained-mini run's own projector (+ LoRA), e.g. ``runs/X/stage1`` right after stage 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from eval import metrics
from eval.run import format_prompt, load_model
from eval.tasks import Item, load_task
from mllm_crossget.config import write_json_atomic


@torch.inference_mode()
def answer_loss(model: Any, processor: Any, item: Item, image: Any) -> float:
    """Mean next-token loss of the item's answer after its prompt, shown ``image``."""
    prompt = format_prompt(processor, item.question, None)
    inputs = processor(images=image, text=prompt + item.truth["answer"], return_tensors="pt")
    prompt_length = processor(images=image, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100
    return float(model(**inputs, labels=labels).loss)


def measure(
    model: Any, processor: Any, items: Sequence[Item], shift: int, progress: bool = True
) -> dict[str, Any]:
    """Per item: the loss with its own image and with the image of item ``(i + shift) % n``."""
    if len(items) < 2 or shift % len(items) == 0:
        raise ValueError(
            f"--shift {shift} with {len(items)} questions pairs every question with its own "
            "image; use at least 2 questions and a shift that is not a multiple of their count"
        )
    images = [item.load_image().convert("RGB") for item in items]
    rows = []
    for index, item in enumerate(tqdm(items, desc="answer loss", disable=not progress)):
        other = images[(index + shift) % len(items)]
        rows.append(
            {
                "id": item.item_id,
                "family": item.group,
                "own": answer_loss(model, processor, item, images[index]),
                "other": answer_loss(model, processor, item, other),
            }
        )
    return summarise(rows)


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean losses, and the sign test of own < other, overall and per family."""

    def block(part: Sequence[dict[str, Any]]) -> dict[str, Any]:
        own_lower = [r["own"] < r["other"] for r in part]
        other_lower = [r["other"] < r["own"] for r in part]
        test = metrics.paired_comparison(own_lower, other_lower)
        return {
            "n": len(part),
            "own_loss": sum(r["own"] for r in part) / len(part),
            "other_loss": sum(r["other"] for r in part) / len(part),
            "own_lower": test.only_first,
            "other_lower": test.only_second,
            "p_value": test.p_value,
        }

    families = dict.fromkeys(r["family"] for r in rows)
    return {
        "overall": block(rows),
        "families": {f: block([r for r in rows if r["family"] == f]) for f in families},
        "rows": list(rows),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| family | n | loss, own image | loss, other image | own lower | other lower | p |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in [*result["families"].items(), ("**overall**", result["overall"])]:
        lines.append(
            f"| {name} | {row['n']} | {row['own_loss']:.3f} | {row['other_loss']:.3f} | "
            f"{row['own_lower']} | {row['other_lower']} | {row['p_value']:.2g} |"
        )
    return "\n".join(lines)


def caption_items(items: Sequence[Item]) -> list[Item]:
    """The same images, each asked for a brief description and scored on its scene caption
    (the testbed's metadata written out, as the pretrained-mini recipe's stage 1 trains)."""
    from eval.testbed.data import caption_turn

    captioned = []
    for item in items:
        meta = item.extra.get("meta")
        if not meta:
            raise ValueError(
                f"item {item.item_id} has no scene metadata: --captions needs a testbed export"
            )
        prompt, caption = caption_turn(item.item_id, meta, item.load_image().size[0])
        captioned.append(
            Item(
                item_id=item.item_id,
                question=prompt,
                truth={"answer": caption},
                image=item.image,
                image_path=item.image_path,
                group=item.group,
            )
        )
    return captioned


def load_reliance_model(name: str, weights: Path | None) -> tuple[Any, Any]:
    """The named model, or pretrained-mini with a run's own trained weights."""
    if weights is None:
        return load_model(name, torch.device("cpu"), torch.float32)
    if name != "pretrained-mini":
        raise ValueError(f"--weights applies to --model pretrained-mini only, not {name!r}")
    from mllm_crossget.pretrained_mini import load_pretrained_mini

    return load_pretrained_mini(weights=weights)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.image_reliance",
        description="Answer loss with each question's own image against another question's "
        "image (exact sign test): whether a model uses the image at all.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="reference", help="a named model or a LLaVA folder")
    parser.add_argument("--data", required=True, help="testbed export root")
    parser.add_argument("--split", default="validation", help="split to read questions from")
    parser.add_argument(
        "--per-family", type=int, default=3, help="the first N questions of each family"
    )
    parser.add_argument(
        "--shift", type=int, default=7, help="question i is also shown the image of i + shift"
    )
    parser.add_argument(
        "--captions",
        action="store_true",
        help="score each image's scene caption after a description prompt, not the answer",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="pretrained-mini only: a run's folder holding projector.safetensors (and adapter/), "
        "e.g. runs/X/stage1 or runs/X/final, instead of the shipped weights",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", default=None, help="write the result (per question too) here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        items = load_task("testbed", args.data, args.split, per_group=args.per_family)
        if args.captions:
            items = caption_items(items)
        model, processor = load_reliance_model(args.model, args.weights)
        result = measure(model, processor, items, args.shift, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        write_json_atomic(args.out, result, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
