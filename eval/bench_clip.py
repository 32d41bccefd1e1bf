"""Image-tower throughput of ViT-B/16-shaped CLIP models (open_clip and HF) under CrossGET.

Random weights give real timings: open_clip's own ``ViT-B-16`` architecture (built from the
config shipped with open_clip, no weights downloaded) and an HF ``CLIPModel`` with the same
image tower (768 wide, 12 layers, 12 heads, 16 px patches at 224 px: 196 patches + CLS).  Each
budget is timed on the same images, round-robin, and reported as images per second and as a
ratio to the unmerged tower.  ``r16`` is ToMe's and CrossGET's usual ViT-B/16 setting (16
tokens merged per layer: 197 -> 5 tokens); ``tome16`` is the same budget with ToMe's
bipartite matching and no guidance.

    python -m eval.bench_clip --threads 1 --repeats 5 --batch 8
"""

from __future__ import annotations

import argparse
import statistics

import torch
from tqdm import tqdm

import mllm_crossget as crossget
from eval.timing import DTYPES, add_timing_arguments, timed
from mllm_crossget.config import write_json_atomic


def hf_vit_b16(attn: str) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        projection_dim=512,
    )
    text = CLIPTextConfig(num_hidden_layers=2, projection_dim=512)  # unused by the benchmark
    config = CLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict())
    config._attn_implementation = attn
    return CLIPModel(config).eval()


def open_clip_vit_b16() -> torch.nn.Module:
    import open_clip

    return open_clip.create_model("ViT-B-16", pretrained=None).eval()


def parse_budget(text: str) -> crossget.CrossGETConfig | None:
    """``full`` -> None, ``rN`` -> CrossGET r=N, ``tomeN`` -> ToMe r=N, ``K`` -> K tokens."""
    if text == "full":
        return None
    if text.startswith("tome"):
        return crossget.CrossGETConfig(r=int(text[4:]), matching="bipartite", guidance="none")
    if text.startswith("r"):
        return crossget.CrossGETConfig(r=int(text[1:]))
    return crossget.CrossGETConfig(visual_tokens=int(text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budgets",
        default="full,r16,tome16",
        help="comma list: full, rN (CrossGET), tomeN (ToMe), or a token count K",
    )
    parser.add_argument(
        "--families", default="open_clip,hf", help="comma list of open_clip and/or hf"
    )
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    add_timing_arguments(parser, attn_help="HF attention implementation")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    pixels = torch.randn(args.batch, 3, 224, 224, device=args.device, dtype=dtype)
    budgets = args.budgets.split(",")
    rows = []
    for family in args.families.split(","):
        model = (open_clip_vit_b16() if family == "open_clip" else hf_vit_b16(args.attn)).to(
            args.device, dtype
        )

        def encode(model: torch.nn.Module = model, family: str = family) -> object:
            if family == "open_clip":
                return model.encode_image(pixels)
            return model.get_image_features(pixel_values=pixels)

        configs = {budget: parse_budget(budget) for budget in budgets}
        tokens = {}
        for budget, cfg in configs.items():
            crossget.remove(model)
            tokens[budget] = (
                197 if cfg is None else crossget.num_visual_tokens(crossget.apply(model, cfg))
            )
        times: dict[str, list[float]] = {budget: [] for budget in budgets}
        for repeat in tqdm(range(args.warmup + args.repeats), desc=family):
            for budget, cfg in configs.items():
                crossget.remove(model)
                if cfg is not None:
                    crossget.apply(model, cfg)
                with torch.inference_mode():
                    seconds = timed(encode, args.device)
                if repeat >= args.warmup:
                    times[budget].append(seconds)
        crossget.remove(model)
        full = statistics.median(times[budgets[0]])
        for budget in budgets:
            median = statistics.median(times[budget])
            rows.append(
                {
                    "family": family,
                    "budget": budget,
                    "tokens_out": tokens[budget],
                    "images_per_s": args.batch / median,
                    "speedup": full / median,
                }
            )
    print(
        f"\nViT-B/16 image tower, batch={args.batch}, {args.device} {args.dtype}, "
        f"threads={torch.get_num_threads()}, medians of {args.repeats}"
    )
    print("| model | budget | tokens out | images/s | throughput ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['family']} | {row['budget']} | {row['tokens_out']} | "
            f"{row['images_per_s']:.2f} | {row['speedup']:.2f}x |"
        )
    if args.json:
        write_json_atomic(args.json, {"args": vars(args) | {"json": str(args.json)}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
