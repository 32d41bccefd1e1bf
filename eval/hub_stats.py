"""How large CrossGET's merged tokens grow: the hub statistics behind issue 32.

    python -m eval.hub_stats --data data/testbed --split validation --images 100 \\
        --budget 64 --option max_sources_per_destination=1

For each image the vision tower of a LLaVA model runs with CrossGET at ``--budget`` visual
tokens; printed are the mean over images of the largest merged token (in patches) and of the
share of all patches held by the five largest tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mllm_crossget as crossget
from eval.run import load_model, parse_crossget_options
from eval.tasks import load_task
from mllm_crossget.adapters.llava import tower_kind
from mllm_crossget.adapters.vit_layer import run_encoder


def hub_stats(
    model_name: str, data: Path, split: str, images: int, budget: int, options: dict[str, object]
) -> tuple[float, float]:
    model, processor = load_model(model_name, torch.device("cpu"), torch.float32)
    config = crossget.CrossGETConfig(visual_tokens=budget, **options)
    crossget.apply(model, config)
    inner = model.model
    tower = inner.vision_tower
    kind = tower_kind(tower)
    planner = model.crossget_planner
    items = load_task("testbed", data, split, images)
    largest, top5 = [], []
    for item in items:
        pixels = processor.image_processor(item.load_image(), return_tensors="pt")["pixel_values"]
        plan = planner.plan(pixels.shape[-2], pixels.shape[-1])
        with torch.no_grad():  # the tower as the LLaVA adapter runs it
            out = run_encoder(
                kind.layers(tower),
                kind.embed(tower, pixels),
                plan,
                has_cls=kind.has_cls,
                cross_offsets=crossget.cross_tokens(model).vision_prompts,
            )
        size = out.token_size[0, int(kind.has_cls) :]  # patches only (CLS is protected)
        ranked = size.sort(descending=True).values
        largest.append(float(ranked[0]))
        top5.append(float(ranked[:5].sum() / size.sum()))
    crossget.remove(model)
    return sum(largest) / len(largest), sum(top5) / len(top5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.hub_stats", description=__doc__)
    parser.add_argument("--model", default="reference", help="LLaVA model folder or 'reference'")
    parser.add_argument("--data", type=Path, required=True, help="testbed data folder")
    parser.add_argument("--split", default="validation", help="split to take images from")
    parser.add_argument("--images", type=int, default=100, help="how many images")
    parser.add_argument("--budget", type=int, default=64, help="visual tokens per image")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="CrossGETConfig field"
    )
    args = parser.parse_args(argv)
    options = parse_crossget_options(args.option)
    big, share = hub_stats(args.model, args.data, args.split, args.images, args.budget, options)
    print(f"largest token {big:.1f} patches; five largest hold {100 * share:.1f} % of patches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
