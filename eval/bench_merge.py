"""Benchmark: CrossGET matching + merge vs ToMe bipartite vs one CLIP ViT-L/14-336 layer.

Times, in one run and on the same inputs:

1. ``cgsm``: complete-graph soft matching (importance-guided, CLS protected) + ``merge``;
2. ``bipartite``: ToMe bipartite matching (CLS protected) + ``merge``;
3. ``layer``: one ``CLIPEncoderLayer`` forward (hidden 1024, MLP 4096, 16 heads, SDPA,
   random weights) on the full sequence.

Both matchers include the metric's construction (keys averaged over heads, [B, N, head_dim]),
so the overhead they add to a layer is measured as a whole.  Reports median milliseconds and
the ratios CGSM/layer (the overhead budget is 3%), bipartite/layer and CGSM/bipartite.

    python -m eval.bench_merge                  # CPU, fp32, LLaVA-1.5 vision tower shapes
    python -m eval.bench_merge --device cuda --dtype bf16 --json outputs/bench_merge.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eval.timing import DTYPES, describe_environment, environment
from mllm_crossget.config import write_json_atomic
from mllm_crossget.merge import Matching, bipartite_matching, complete_graph_matching

OVERHEAD_TARGET = 0.03  # CGSM + merge should cost at most 3% of one encoder layer (issue 33)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_merge",
        description=(
            "Time CrossGET complete-graph matching + merge, ToMe bipartite matching + merge, "
            "and one CLIP ViT-L/14-336 encoder layer forward, side by side (median ms)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=8, help="images per batch (B)")
    parser.add_argument(
        "--tokens", type=int, default=577, help="sequence length N (CLIP-L/14-336: 576 + CLS)"
    )
    parser.add_argument("--width", type=int, default=1024, help="hidden size of the layer and x")
    parser.add_argument(
        "--heads", type=int, default=16, help="attention heads; metric dim = width / heads"
    )
    parser.add_argument("--r", type=int, default=13, help="tokens removed by one merge")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per operation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per operation first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of x, keys and the layer"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs and weights")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) before timing; by default torch's own setting is kept",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results here"
    )
    args = parser.parse_args(argv)
    if args.width % args.heads:
        parser.error(f"--width {args.width} is not divisible by --heads {args.heads}")
    if min(args.batch, args.tokens, args.repeats) < 1 or min(args.r, args.warmup) < 0:
        parser.error("--batch, --tokens and --repeats must be >= 1; --r and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ops(
    ops: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall-clock milliseconds per call, after ``warmup`` untimed calls of each op.

    The ops are timed round-robin (one call of each per round) so that a change in machine
    load affects all of them alike and the ratios stay meaningful.
    """
    for fn in ops.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def build_layer(width: int, heads: int, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_attention_heads=heads,
        num_hidden_layers=1,
        image_size=336,
        patch_size=14,
        attn_implementation="sdpa",
    )
    layer = CLIPEncoderLayer(config)  # nn.Linear/LayerNorm default init: random weights
    return layer.to(device=device, dtype=dtype).eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    batch, n, width, heads = args.batch, args.tokens, args.width, args.heads
    head_dim = width // heads
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    x = randn(batch, n, width)
    keys = randn(batch, heads, n, head_dim)  # a layer's keys, per head
    importance = torch.rand(batch, n, generator=gen, device=device)
    protected = torch.zeros(batch, n, dtype=torch.bool, device=device)
    protected[:, 0] = True  # CLS
    layer = build_layer(width, heads, dtype, device)

    def cgsm_match() -> Matching:
        return complete_graph_matching(keys.mean(dim=1), args.r, importance, protected)

    def bipartite_match() -> Matching:
        return bipartite_matching(keys.mean(dim=1), args.r, protected)

    def cgsm() -> tuple[Tensor, Tensor]:
        return cgsm_match().merge(x, None, importance)

    def bipartite() -> tuple[Tensor, Tensor]:
        return bipartite_match().merge(x)

    fixed = cgsm_match()

    def merge_only() -> tuple[Tensor, Tensor]:
        return fixed.merge(x, None, importance)

    def forward() -> Tensor:
        return layer(x, None)

    ops = {
        "cgsm": cgsm,
        "bipartite": bipartite,
        "layer": forward,
        "cgsm_match": cgsm_match,
        "bipartite_match": bipartite_match,
        "merge": merge_only,
    }
    with torch.inference_mode():
        merged, _ = cgsm()
        assert merged.shape == (batch, n - min(args.r, (n - 1) // 2), width)
        assert forward().shape == x.shape
        times = time_ops(ops, args.repeats, args.warmup, device)
    median = {name: statistics.median(t) for name, t in times.items()}
    results = {
        name: {"median_ms": median[name], "min_ms": min(t), "max_ms": max(t), "times_ms": t}
        for name, t in times.items()
    }
    ratios = {
        "cgsm/layer": median["cgsm"] / median["layer"],
        "bipartite/layer": median["bipartite"] / median["layer"],
        "cgsm/bipartite": median["cgsm"] / median["bipartite"],
    }
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(device),
        "shapes": {
            "x": [batch, n, width],
            "metric": [batch, n, head_dim],
            "keys": [batch, heads, n, head_dim],
        },
        "results": results,
        "ratios": ratios,
        "overhead_target": OVERHEAD_TARGET,
        "within_target": ratios["cgsm/layer"] <= OVERHEAD_TARGET,
    }


def format_report(report: dict[str, Any]) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [
        f"bench_merge: B={cfg['batch']} N={cfg['tokens']} width={cfg['width']} "
        f"heads={cfg['heads']} r={cfg['r']} device={cfg['device']} dtype={cfg['dtype']} "
        f"repeats={cfg['repeats']} warmup={cfg['warmup']}",
        describe_environment(env),
        "",
        f"{'op':<34}{'median ms':>11}{'min ms':>10}{'max ms':>10}",
    ]
    labels = {
        "cgsm": "CGSM match + merge",
        "bipartite": "bipartite (ToMe) match + merge",
        "layer": "CLIP-L/14-336 encoder layer",
        "cgsm_match": "  breakdown: CGSM match only",
        "bipartite_match": "  breakdown: bipartite match only",
        "merge": "  breakdown: merge only (CGSM)",
    }
    for name, label in labels.items():
        res = report["results"][name]
        if name == "cgsm_match":
            lines.append("")
        lines.append(
            f"{label:<34}{res['median_ms']:>11.2f}{res['min_ms']:>10.2f}{res['max_ms']:>10.2f}"
        )
    ratios = report["ratios"]
    verdict = "ok" if report["within_target"] else "OVER"
    lines += [
        "",
        f"CGSM / layer       {ratios['cgsm/layer']:7.2%}  "
        f"(target <= {report['overhead_target']:.0%}: {verdict})",
        f"bipartite / layer  {ratios['bipartite/layer']:7.2%}",
        f"CGSM / bipartite   {ratios['cgsm/bipartite']:7.2f}x",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(format_report(report))
    if args.json is not None:
        write_json_atomic(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
