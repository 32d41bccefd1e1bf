"""How much of what an image tells a model survives token reduction, measured through the
loss of its caption, where answer accuracy cannot measure it.

A model whose answers are still at chance (pretrained-mini, so far) gives every method the
same chance accuracy; its captions do read the image (`eval.image_reliance --captions`:
p = 3e-6 on the shipped weights). For each image, its scene caption is scored after a
description prompt (what stage 1 of the pretrained-mini recipe trains on):

* ``full``: with all visual tokens, unmodified;
* ``other``: with the tokens of another image of the same family, the loss the model
  gives the caption knowing nothing of this image;
* each method at each budget, with the image's own tokens reduced.

``kept = (other - setting) / (other - full)`` is the share of the image's effect on the
caption loss that a setting keeps (1: all of it, 0: none, as if shown another image).
Exact sign tests, per image: each setting against ``full``, and CrossGET against each peer at
the same budget (which one gives the caption the lower loss).

    python -m eval.caption_fidelity --model pretrained-mini --data data/pm224 --split test \\
        --per-family 25 --budgets 192,128,64 --methods crossget,tome,visionzip,divprune
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import mllm_crossget as crossget
from eval import metrics
from eval.image_reliance import answer_loss, caption_items, load_reliance_model
from eval.run import add_crossget_option_argument, configure, parse_crossget_options
from eval.tasks import Item, load_task
from mllm_crossget.config import write_json_atomic

FULL, OTHER = "full", "other"


def one_item_per_image(items: Sequence[Item]) -> list[Item]:
    """The first question of each image: a caption belongs to the image, not the question."""
    seen: set[str] = set()
    kept = []
    for item in items:
        key = str(item.image_path or item.item_id)
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept


def other_image_of(items: Sequence[Item], shift: int) -> list[int]:
    """For each item, the index of the image ``shift`` places on within its own family
    (wrapping around): an image of the same kind that says nothing about this one."""
    by_family: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_family.setdefault(str(item.group), []).append(index)
    partner = [0] * len(items)
    for family, members in by_family.items():
        if len(members) < 2 or shift % len(members) == 0:
            raise ValueError(
                f"family {family!r} has {len(members)} image(s): --shift {shift} would show "
                "a caption its own image; use more images per family (--per-family) or "
                "another --shift"
            )
        for position, index in enumerate(members):
            partner[index] = members[(position + shift) % len(members)]
    return partner


def settings(methods: Sequence[str], budgets: Sequence[int]) -> list[tuple[str, int]]:
    return [(method, budget) for budget in budgets for method in methods]


def label(method: str, budget: int) -> str:
    return f"{method}/{budget}"


def measure(
    model: Any,
    processor: Any,
    items: Sequence[Item],
    methods: Sequence[str],
    budgets: Sequence[int],
    shift: int,
    progress: bool = True,
    guidance: str = "cross",
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Per image: the caption loss in every setting (one setting at a time over all images,
    so that each method is applied once). ``guidance`` and ``options`` (CrossGETConfig
    fields) apply to method crossget only, as in ``crossget eval``."""
    partner = other_image_of(items, shift)
    images = [item.load_image().convert("RGB") for item in items]
    rows: list[dict[str, Any]] = [
        {"id": item.item_id, "family": item.group, "loss": {}} for item in items
    ]
    crossget.remove(model, processor)
    for index, item in enumerate(tqdm(items, desc="full / other", disable=not progress)):
        rows[index]["loss"][FULL] = answer_loss(model, processor, item, images[index])
        other = images[partner[index]]
        rows[index]["loss"][OTHER] = answer_loss(model, processor, item, other)
    for method, budget in settings(methods, budgets):
        reduced = configure(model, processor, method, str(budget), guidance, None, options=options)
        name = label(method, budget)
        for index, item in enumerate(tqdm(items, desc=name, disable=not progress)):
            rows[index]["loss"][name] = answer_loss(model, reduced, item, images[index])
        crossget.remove(model, processor)
    return rows


def kept_share(rows: Sequence[dict[str, Any]], name: str) -> float:
    """(mean other - mean setting) / (mean other - mean full) over ``rows``."""
    mean = {k: sum(r["loss"][k] for r in rows) / len(rows) for k in (FULL, OTHER, name)}
    span = mean[OTHER] - mean[FULL]
    return (mean[OTHER] - mean[name]) / span if span != 0 else float("nan")


def sign_test(rows: Sequence[dict[str, Any]], first: str, second: str) -> dict[str, Any]:
    """Images where ``first`` gives the caption the lower loss, where ``second`` does, p."""
    test = metrics.paired_comparison(
        [r["loss"][first] < r["loss"][second] for r in rows],
        [r["loss"][second] < r["loss"][first] for r in rows],
    )
    return {"first_lower": test.only_first, "second_lower": test.only_second, "p": test.p_value}


def summarise(
    rows: Sequence[dict[str, Any]], methods: Sequence[str], budgets: Sequence[int]
) -> dict[str, Any]:
    names = [FULL, OTHER, *(label(m, b) for m, b in settings(methods, budgets))]
    by_family: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_family.setdefault(row["family"], []).append(row)
    families = list(by_family)
    table = {}
    for name in names:
        table[name] = {
            "loss": sum(r["loss"][name] for r in rows) / len(rows),
            "kept": kept_share(rows, name),
            "kept_by_family": {f: kept_share(part, name) for f, part in by_family.items()},
            "against_full": sign_test(rows, name, FULL) if name != FULL else None,
        }
    peers = [m for m in methods if m != "crossget"]
    pairs = {}
    if "crossget" in methods:
        for budget in budgets:
            for peer in peers:
                key = f"crossget vs {peer} at {budget}"
                pairs[key] = sign_test(rows, label("crossget", budget), label(peer, budget))
    return {
        "n": len(rows),
        "families": families,
        "image_effect": {
            "overall": image_effect(rows),
            "by_family": {f: image_effect(part) for f, part in by_family.items()},
        },
        "settings": table,
        "crossget_vs_peers": pairs,
    }


def image_effect(rows: Sequence[dict[str, Any]]) -> float:
    """Mean other - mean full: how much the image's own tokens lower its caption's loss (the
    denominator of ``kept``; where it is near 0, ``kept`` says nothing)."""
    return sum(r["loss"][OTHER] - r["loss"][FULL] for r in rows) / len(rows)


def markdown(result: dict[str, Any]) -> str:
    families = result["families"]
    lines = [
        f"Caption loss of {result['n']} images; kept = share of the image's effect on the "
        "loss (other - setting) / (other - full), meaningful where the image effect "
        "(other - full) is clearly above 0; sign test against full per image.",
        "",
        "| setting | caption loss | kept | "
        + " | ".join(f"kept: {f}" for f in families)
        + " | lower than full / higher | p |",
        "|---|---:|---:|" + "---:|" * len(families) + "---|---:|",
    ]
    effect = result["image_effect"]
    lines.append(
        f"| image effect (other - full) | {effect['overall']:.4f} | | "
        + " | ".join(f"{effect['by_family'][f]:.3f}" for f in families)
        + " | | |"
    )
    for name, row in result["settings"].items():
        test = row["against_full"]
        versus = "-" if test is None else f"{test['first_lower']} / {test['second_lower']}"
        p = "-" if test is None else f"{test['p']:.2g}"
        per_family = " | ".join(f"{100 * row['kept_by_family'][f]:.0f} %" for f in families)
        lines.append(
            f"| {name} | {row['loss']:.4f} | {100 * row['kept']:.1f} % | {per_family} | "
            f"{versus} | {p} |"
        )
    if result["crossget_vs_peers"]:
        lines += ["", "| comparison | CrossGET lower | peer lower | p |", "|---|---:|---:|---:|"]
        for key, test in result["crossget_vs_peers"].items():
            lines.append(
                f"| {key} | {test['first_lower']} | {test['second_lower']} | {test['p']:.2g} |"
            )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of ints, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.caption_fidelity",
        description="Caption loss under every token reduction method and budget, between "
        "the full model and another image's tokens: how much of what the image tells the "
        "model each method keeps (exact sign tests per image).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="pretrained-mini", help="a named model or folder")
    parser.add_argument("--data", required=True, help="testbed export root")
    parser.add_argument("--split", default="test", help="split whose images are captioned")
    parser.add_argument(
        "--per-family",
        type=int,
        default=25,
        help="the first N questions of each family (then one caption per image)",
    )
    parser.add_argument(
        "--budgets", type=_ints, default=[192, 128, 64], help="visual tokens per image"
    )
    parser.add_argument(
        "--methods",
        default="crossget,tome,visionzip,divprune",
        help="comma list of encoder-side methods (crossget, tome, or a registered peer)",
    )
    parser.add_argument(
        "--guidance", default="cross", help="CrossGET guidance: cross, query, text, none"
    )
    add_crossget_option_argument(parser)
    parser.add_argument(
        "--shift",
        type=int,
        default=7,
        help="each caption is also shown the image SHIFT places on in its family",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="pretrained-mini only: a run's folder with projector.safetensors (and adapter/) "
        "instead of the shipped weights",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast (CPUs with AVX512-BF16/AMX, GPUs): several times faster there, "
        "~100x slower on CPUs without bf16 kernels",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", default=None, help="write the result (per image too) here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    try:
        items = load_task("testbed", args.data, args.split, per_group=args.per_family)
        items = caption_items(one_item_per_image(items))
        options = parse_crossget_options(args.crossget_option)
        model, processor = load_reliance_model(args.model, args.weights)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            rows = measure(
                model,
                processor,
                items,
                methods,
                args.budgets,
                args.shift,
                not args.no_progress,
                args.guidance,
                options,
            )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = summarise(rows, methods, args.budgets)
    if args.out:
        write_json_atomic(args.out, {**result, "rows": rows}, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
