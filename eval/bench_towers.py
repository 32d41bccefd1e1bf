"""Vision-tower speed of CrossGET on CLIP-L, SigLIP-So400m and DINOv2-S shapes, side by side.

Each tower is built from its config class with random weights (random weights give real
timings) and run the way the LLaVA adapter runs it: the tower's embeddings, then its layers up
to the feature layer through :func:`mllm_crossget.adapters.vit_layer.run_encoder`.  ``full``
runs the original layers (no merging); ``50%`` / ``25%`` keep that share of the patch tokens
(CrossGET, ``visual_tokens`` budget, default schedule and cross-token guidance).  All
(tower, setting) pairs are timed round-robin after warm-up, so load changes on a shared
machine hit all of them alike; medians and the speed-up over ``full`` of the same tower are
reported.

=============  =====================================================  ========  ======
tower          shape                                                  image     layers
=============  =====================================================  ========  ======
clip-l         CLIP ViT-L/14 (1024 wide, 16 heads, MLP 4096), CLS     336 px    23/24
siglip-so400m  SigLIP So400m/14 (1152 wide, 16 heads, MLP 4304), no   384 px    26/27
               CLS, strategy "full"
dinov2-s       DINOv2 ViT-S/14 (384 wide, 6 heads, MLP 1536), CLS,    224 px    11/12
               layer scale, positions interpolated from 518 px
=============  =====================================================  ========  ======

    python -m eval.bench_towers --threads 2 --repeats 3 --json runs/bench_towers.json
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from eval.timing import timed
from mllm_crossget.adapters.llava import TOWERS
from mllm_crossget.adapters.vit_layer import EncoderPlan, patch_layers, run_encoder
from mllm_crossget.config import CrossGETConfig, write_json_atomic
from mllm_crossget.planner import TowerPlanner

SHARES = {"full": None, "50%": 0.5, "25%": 0.25}


# The tiny shapes (``--tiny``): 32 wide, 4 heads, 3 layers of which 2 run, 7 px patches on
# 56 px images; each tower adds its own keys (and may override these).
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=7)


def _tower(
    model_class: Any,
    config_class: Any,
    tiny: bool,
    tiny_keys: dict[str, Any],
    full_keys: dict[str, Any],
    image: int,
    layers_run: int,
) -> tuple[Any, int, int]:
    """``(tower, image size, layers run)``: the tiny shape or the full one of a tower class."""
    if tiny:
        return model_class(config_class(**{**TINY, **tiny_keys})), 56, 2
    return model_class(config_class(**full_keys)), image, layers_run


def _clip_l(tiny: bool) -> tuple[Any, int, int]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    full = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    return _tower(
        CLIPVisionModel, CLIPVisionConfig, tiny, dict(intermediate_size=64), full, 336, 23
    )


def _siglip_so400m(tiny: bool) -> tuple[Any, int, int]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    full = dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    tiny_keys = dict(intermediate_size=64, vision_use_head=False)
    return _tower(SiglipVisionModel, SiglipVisionConfig, tiny, tiny_keys, full, 384, 26)


def _dinov2_s(tiny: bool) -> tuple[Any, int, int]:
    from transformers import Dinov2Config, Dinov2Model

    full = dict(
        hidden_size=384,
        mlp_ratio=4,
        num_hidden_layers=12,
        num_attention_heads=6,
        image_size=518,
        patch_size=14,
        layerscale_value=1e-5,
    )
    # 98 px positions interpolated to the 56 px input, as the full shape's 518 -> 224.
    tiny_keys = dict(mlp_ratio=2, image_size=98)
    return _tower(Dinov2Model, Dinov2Config, tiny, tiny_keys, full, 224, 11)


BUILDERS: dict[str, tuple[str, Callable[[bool], tuple[Any, int, int]]]] = {
    "clip-l": ("CLIPVisionModel", _clip_l),
    "siglip-so400m": ("SiglipVisionModel", _siglip_so400m),
    "dinov2-s": ("Dinov2Model", _dinov2_s),
}


def tower_settings(name: str, tiny: bool, batch: int) -> list[tuple[str, Callable[[], Any], int]]:
    """``(setting, run, tokens)`` for one tower: ``run()`` encodes one batch of images."""
    class_name, build = BUILDERS[name]
    torch.manual_seed(0)
    tower, image, layers_run = build(tiny)
    tower.eval()
    kind = TOWERS[class_name]
    layers = kind.layers(tower)
    patch_layers(layers)
    patch = tower.config.patch_size
    patches = (image // patch) ** 2
    pixels = torch.randn(batch, 3, image, image)
    out = []
    for setting, share in SHARES.items():
        if share is None:
            plan = EncoderPlan(layer_r=(0,) * layers_run)
            tokens = patches
        else:
            tokens = round(share * patches)
            planner = TowerPlanner(
                config=CrossGETConfig(visual_tokens=tokens),
                patch_size=patch,
                layers_run=layers_run,
                dropped_tokens=int(kind.has_cls),  # LLaVA drops CLS: K counts patches
                num_protected=int(kind.has_cls),
            )
            plan = planner.plan(image, image, tokens)

        def run(plan: EncoderPlan = plan, tokens: int = tokens, setting: str = setting) -> Any:
            with torch.no_grad():
                hidden = kind.embed(tower, pixels)
                out = run_encoder(layers, hidden, plan, has_cls=kind.has_cls)
            produced = out.last_hidden_state.shape[1] - int(kind.has_cls)
            if produced != tokens:
                raise RuntimeError(f"{name} {setting}: {produced} visual tokens, not {tokens}")
            return out

        out.append((setting, run, tokens))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget bench-towers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--towers",
        nargs="+",
        choices=sorted(BUILDERS),
        default=list(BUILDERS),
        help="tower shapes to time (all in one round-robin run)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images per forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (medians)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (0 = torch's default)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes of the same classes (a smoke test)"
    )
    parser.add_argument("--json", default=None, help="also write the results here (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {name: tower_settings(name, args.tiny, args.batch) for name in args.towers}
    times: dict[tuple[str, str], list[float]] = {}
    rounds = args.warmup + args.repeats
    total = rounds * sum(len(s) for s in runs.values())
    with tqdm(total=total, desc="bench-towers") as bar:
        for round_index in range(rounds):
            for name, settings in runs.items():
                for setting, run, _ in settings:
                    seconds = timed(run, "cpu")
                    if round_index >= args.warmup:
                        times.setdefault((name, setting), []).append(seconds)
                    bar.update()
    rows = []
    for name, settings in runs.items():
        full = statistics.median(times[name, "full"])
        for setting, _, tokens in settings:
            median = statistics.median(times[name, setting])
            rows.append(
                {
                    "tower": name,
                    "setting": setting,
                    "visual_tokens": tokens,
                    "seconds": median,
                    "speedup": full / median,
                }
            )
    print(f"threads={torch.get_num_threads()} batch={args.batch} repeats={args.repeats}")
    print("| tower | setting | visual tokens | s / batch | speed-up |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['tower']} | {row['setting']} | {row['visual_tokens']} | "
            f"{row['seconds']:.3f} | {row['speedup']:.2f}x |"
        )
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
