"""Vision-tower and prefill time of a LLaVA-1.5-7B-shaped model at several CrossGET budgets.

Random weights give real timings.  The CLIP ViT-L/14-336 tower is full size; the LLM keeps
LLaMA-7B's width but may be cut to a few layers on CPU (``--llm-layers``).  All budgets are
measured side by side in one run and reported as ratios to the full model.

    python -m eval.bench_llava --llm-layers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics

import torch
from tqdm import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mllm_crossget as crossget
from eval.timing import DTYPES, add_timing_arguments, timed
from mllm_crossget.config import write_json_atomic
from mllm_crossget.flops import flops_report


def llava_7b_config(
    llm_layers: int,
    attn: str,
    *,
    llm_width: int = 4096,
    vision_width: int = 1024,
    vision_layers: int = 24,
    image_size: int = 336,
) -> LlavaConfig:
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 (24 layers, 1024 wide) + LLaMA-7B width.

    The keyword sizes shrink it for tests (heads stay 64 wide in the tower and 128 in the
    LLM; MLPs scale like the 7B's: 4x in the tower, 11008/4096 in the LLM); the defaults are
    the real shapes.
    """
    for name, width, head in (("llm_width", llm_width, 128), ("vision_width", vision_width, 64)):
        if width % head:
            raise ValueError(f"{name}={width} must be a multiple of {head} (its head size)")
    if image_size % 14:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size 14")
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_width // 64,
        image_size=image_size,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=llm_width,
        intermediate_size=llm_width * 11008 // 4096,
        num_hidden_layers=llm_layers,
        num_attention_heads=llm_width // 128,
        num_key_value_heads=llm_width // 128,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // 14) ** 2,
    )
    config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    return config


def parse_budget(text: str) -> crossget.CrossGETConfig | None:
    """``full`` -> None, ``r13`` -> r=13, ``144`` -> visual_tokens=144."""
    if text == "full":
        return None
    if text.startswith("r"):
        return crossget.CrossGETConfig(r=int(text[1:]))
    return crossget.CrossGETConfig(visual_tokens=int(text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budgets",
        default="full,r13,144,64",
        help="comma list: full, rN (constant r per layer), or a token count K",
    )
    parser.add_argument(
        "--llm-layers",
        type=int,
        default=2,
        help="LLaMA-7B-wide decoder layers to keep (32 = the full 7B)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images (and prompts) per batch")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per prompt")
    add_timing_arguments(parser, attn_help="attention implementation (sdpa/eager)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = llava_7b_config(args.llm_layers, args.attn)
    model = LlavaForConditionalGeneration(config).to(args.device, DTYPES[args.dtype]).eval()
    pixels = torch.randn(args.batch, 3, 336, 336, device=args.device, dtype=DTYPES[args.dtype])
    text = torch.randint(2, 32000, (args.batch, args.prompt_tokens), device=args.device)
    budgets = args.budgets.split(",")
    setups = []
    for budget in budgets:
        cfg = parse_budget(budget)
        crossget.remove(model)
        visual = 576 if cfg is None else crossget.num_visual_tokens(crossget.apply(model, cfg))
        image_ids = torch.full((args.batch, visual), 32000, device=args.device)
        input_ids = torch.cat([text[:, :1], image_ids, text[:, 1:]], dim=1)
        setups.append(
            (budget, cfg, visual, input_ids, flops_report(model, prompt_length=args.prompt_tokens))
        )
    crossget.remove(model)
    vision_times: dict[str, list[float]] = {b: [] for b in budgets}
    prefill_times: dict[str, list[float]] = {b: [] for b in budgets}
    # Round-robin over budgets so that load changes on a shared machine hit all alike.
    for repeat in tqdm(range(args.warmup + args.repeats), desc="rounds"):
        for budget, cfg, _, input_ids, _ in setups:
            crossget.remove(model)
            if cfg is not None:
                crossget.apply(model, cfg)
            with torch.inference_mode():
                vision_s = timed(
                    lambda: model.model.get_image_features(pixel_values=pixels), args.device
                )
                prefill_s = timed(
                    lambda ids=input_ids: model(
                        input_ids=ids, pixel_values=pixels, logits_to_keep=1
                    ),
                    args.device,
                )
            if repeat >= args.warmup:
                vision_times[budget].append(vision_s)
                prefill_times[budget].append(prefill_s)
    rows = [
        {
            "budget": budget,
            "visual_tokens": visual,
            "vision_s": statistics.median(vision_times[budget]),
            "prefill_s": statistics.median(prefill_times[budget]),
            "flops": flops.total,
        }
        for budget, _, visual, _, flops in setups
    ]
    crossget.remove(model)
    full = rows[0]
    print(
        f"\nLLaVA-1.5-7B shape, LLM layers={args.llm_layers}, batch={args.batch}, "
        f"{args.device} {args.dtype}, medians of {args.repeats}"
    )
    print(
        "| budget | visual tokens | vision tower s | vision speedup | prefill s "
        "| prefill speedup | FLOPs-bound speedup |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["vision_speedup"] = full["vision_s"] / row["vision_s"]
        row["prefill_speedup"] = full["prefill_s"] / row["prefill_s"]
        row["flops_speedup"] = full["flops"] / row["flops"]
        print(
            f"| {row['budget']} | {row['visual_tokens']} | {row['vision_s']:.3f} | "
            f"{row['vision_speedup']:.2f}x | {row['prefill_s']:.3f} | "
            f"{row['prefill_speedup']:.2f}x | {row['flops_speedup']:.2f}x |"
        )
    if args.json:
        write_json_atomic(args.json, {"args": vars(args) | {"json": str(args.json)}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
