"""ViT and end-to-end ``generate`` time of a BLIP-2-shaped model at several CrossGET budgets.

Random weights give real timings.  The shapes are BLIP-2 OPT-2.7B's: EVA ViT-g/14 at 224 px
(1408 wide, 16 heads, MLP 6144; 256 patches + CLS), a BERT-base Q-Former (12 layers,
cross-attention every 2nd layer, 32 queries) and OPT-2.7B's width (2560, 32 heads).  On a CPU
the full depths are too slow, so the ViT keeps ``--vit-layers`` of its 39 layers (default 6)
and the LLM ``--llm-layers`` of its 32 (default 2); every merging layer of the shortened ViT
removes more tokens than a layer of the full one would for the same budget.

BLIP-2's LLM always reads 32 query tokens, whatever the ViT yields: merging speeds up the ViT
and the Q-Former's cross-attention, not the LLM.  The end-to-end ratio therefore depends on
how much of the total the ViT is (here: a 6-layer ViT against a 2-layer LLM).

    python -m eval.bench_blip2 --threads 1 --repeats 5 [--schedule front]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from tqdm import tqdm
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
)

import mllm_crossget as crossget
from eval.timing import DTYPES, add_timing_arguments, timed
from mllm_crossget.config import write_json_atomic

IMAGE_TOKEN = 50265


def blip2_opt_config(vit_layers: int, llm_layers: int, attn: str) -> Blip2Config:
    """BLIP-2 OPT-2.7B shapes with the ViT and the LLM cut to a few layers."""
    vision = Blip2VisionConfig(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=vit_layers,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        qkv_bias=True,
        initializer_range=0.02,  # the default 1e-10 makes a random ViT output constants
    )
    qformer = Blip2QFormerConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        encoder_hidden_size=1408,
        cross_attention_frequency=2,
    )
    text = OPTConfig(
        hidden_size=2560,
        ffn_dim=10240,
        num_hidden_layers=llm_layers,
        num_attention_heads=32,
        vocab_size=50304,
        word_embed_proj_dim=2560,
        max_position_embeddings=2048,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=IMAGE_TOKEN,
    )
    config._attn_implementation = attn
    return config


def parse_budget(text: str, schedule: str = "even") -> crossget.CrossGETConfig | None:
    """``full`` -> None, ``50%`` -> keep_ratio=0.5, ``rN`` -> r=N, ``K`` -> visual_tokens=K."""
    if text == "full":
        return None
    if text.endswith("%"):
        return crossget.CrossGETConfig(keep_ratio=float(text[:-1]) / 100, schedule=schedule)
    if text.startswith("r"):
        return crossget.CrossGETConfig(r=int(text[1:]))
    return crossget.CrossGETConfig(visual_tokens=int(text), schedule=schedule)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budgets",
        default="full,50%,25%",
        help="comma list: full, P%% (keep P%% of the patch tokens), rN, or a token count K",
    )
    parser.add_argument(
        "--schedule",
        choices=("even", "front", "decreasing"),
        default="even",
        help="how a budget is spread over the ViT layers (front = merge early, fastest)",
    )
    parser.add_argument("--vit-layers", type=int, default=6, help="ViT-g layers (39 in BLIP-2)")
    parser.add_argument("--llm-layers", type=int, default=2, help="OPT-2.7B layers (32 = full)")
    parser.add_argument("--batch", type=int, default=2, help="images (and prompts) per batch")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="text tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generate() produces")
    add_timing_arguments(parser, attn_help="attention implementation (sdpa/eager)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = blip2_opt_config(args.vit_layers, args.llm_layers, args.attn)
    model = Blip2ForConditionalGeneration(config).to(args.device, DTYPES[args.dtype]).eval()
    model.generation_config.eos_token_id = None  # always generate --new-tokens tokens
    dtype = DTYPES[args.dtype]
    pixels = torch.randn(args.batch, 3, 224, 224, device=args.device, dtype=dtype)
    text = torch.randint(4, 50000, (args.batch, args.prompt_tokens), device=args.device)
    images = torch.full((args.batch, 32), IMAGE_TOKEN, device=args.device)
    input_ids = torch.cat([images, text], dim=1)
    budgets = args.budgets.split(",")
    configs = {budget: parse_budget(budget, args.schedule) for budget in budgets}
    vit_tokens = {}
    for budget, cfg in configs.items():
        crossget.remove(model)
        full = (224 // 14) ** 2 + 1
        vit_tokens[budget] = (
            full if cfg is None else crossget.num_visual_tokens(crossget.apply(model, cfg))
        )
    vision_times: dict[str, list[float]] = {b: [] for b in budgets}
    generate_times: dict[str, list[float]] = {b: [] for b in budgets}
    # Round-robin over budgets so that load changes on a shared machine hit all alike.
    for repeat in tqdm(range(args.warmup + args.repeats), desc="rounds"):
        for budget, cfg in configs.items():
            crossget.remove(model)
            if cfg is not None:
                crossget.apply(model, cfg)
            with torch.inference_mode():
                vision_s = timed(lambda: model.vision_model(pixel_values=pixels), args.device)
                generate_s = timed(
                    lambda: model.generate(
                        pixel_values=pixels,
                        input_ids=input_ids,
                        max_new_tokens=args.new_tokens,
                        do_sample=False,
                    ),
                    args.device,
                )
            if repeat >= args.warmup:
                vision_times[budget].append(vision_s)
                generate_times[budget].append(generate_s)
    crossget.remove(model)
    rows = [
        {
            "budget": budget,
            "vit_tokens": vit_tokens[budget],
            "vision_s": statistics.median(vision_times[budget]),
            "generate_s": statistics.median(generate_times[budget]),
        }
        for budget in budgets
    ]
    reference = rows[0]
    print(
        f"\nBLIP-2 OPT-2.7B shape, ViT-g width x {args.vit_layers} layers, OPT-2.7B width x "
        f"{args.llm_layers} layers, batch={args.batch}, {args.new_tokens} new tokens, "
        f"schedule={args.schedule}, "
        f"{args.device} {args.dtype}, threads={torch.get_num_threads()}, medians of "
        f"{args.repeats}"
    )
    print("| budget | ViT tokens | ViT s | ViT speedup | generate s | generate speedup |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        row["vision_speedup"] = reference["vision_s"] / row["vision_s"]
        row["generate_speedup"] = reference["generate_s"] / row["generate_s"]
        print(
            f"| {row['budget']} | {row['vit_tokens']} | {row['vision_s']:.3f} | "
            f"{row['vision_speedup']:.2f}x | {row['generate_s']:.3f} | "
            f"{row['generate_speedup']:.2f}x |"
        )
    if args.json:
        write_json_atomic(args.json, {"args": vars(args) | {"json": str(args.json)}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
