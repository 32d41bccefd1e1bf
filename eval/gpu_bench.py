"""The GPU benchmark in one call: the full LLaVA-1.5-7B shape, every method, bench_merge.

On a CUDA machine (``eval/gpu_bench.sh`` runs this) it times, in one process:

1. ``crossget bench`` on the LLaVA-1.5-7B shape (CLIP ViT-L/14-336 + all 32 LLaMA-7B layers,
   random weights) in bf16 with SDPA: every method at full/288/144/64 visual tokens, with the
   CUDA allocator's peak memory and the KV cache per request;
2. ``eval.bench_merge`` on cuda: CrossGET matching + merge vs ToMe's vs one CLIP-L layer;

and writes ``gpu_bench.json`` (both reports, the environment, wall times) and
``gpu_bench.md`` (both tables) atomically into ``--out``.  It is sized to finish in a few
minutes on one H100 (the model is built on the GPU, never on the CPU first).  The size flags
shrink everything so that a test runs the same code on CPU in seconds:

    eval/gpu_bench.sh --out runs/gpu_bench
    python -m eval.gpu_bench --device cpu --dtype fp32 --llm-layers 2 --llm-width 128 \\
        --vision-width 64 --vision-layers 2 --image-size 56 --budgets full,8 --merge-batch 1 \\
        --merge-width 64 --merge-heads 1 --merge-tokens 17 --merge-r 4 --out /tmp/gpu_bench
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eval import bench, bench_merge
from eval.timing import describe_environment, environment
from mllm_crossget.config import atomic_write_text
from mllm_crossget.peers import METHOD_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.gpu_bench",
        description="One-call GPU benchmark: crossget bench on the full LLaVA-1.5-7B shape "
        "(every method x budget, bf16, SDPA) plus bench_merge, into one JSON and one "
        "Markdown table. The size flags shrink it for a CPU test.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_bench"), help="output folder")
    parser.add_argument("--device", default=default_device, help="cuda (or cpu for a test)")
    parser.add_argument("--dtype", choices=sorted(bench.DTYPES), default="bf16", help="weights")
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma list")
    parser.add_argument("--budgets", default="full,288,144,64", help="comma list (see bench)")
    parser.add_argument("--llm-layers", type=int, default=32, help="LLaMA-7B-wide layers")
    parser.add_argument("--llm-width", type=int, default=4096, help="LLM width (test: 128)")
    parser.add_argument("--vision-width", type=int, default=1024, help="tower width (test: 64)")
    parser.add_argument("--vision-layers", type=int, default=24, help="tower layers")
    parser.add_argument("--image-size", type=int, default=336, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=1, help="requests per generate call")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (a CPU test)")
    parser.add_argument("--merge-batch", type=int, default=8, help="bench_merge: images")
    parser.add_argument("--merge-tokens", type=int, default=577, help="bench_merge: tokens")
    parser.add_argument("--merge-width", type=int, default=1024, help="bench_merge: width")
    parser.add_argument("--merge-heads", type=int, default=16, help="bench_merge: heads")
    parser.add_argument("--merge-r", type=int, default=13, help="bench_merge: r per merge")
    parser.add_argument("--merge-repeats", type=int, default=20, help="bench_merge: runs")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both benchmarks; the combined report (also written to ``--out``)."""
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench_argv = [
        "--model=llava-7b-shape",
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--attn={args.attn}",
        f"--methods={args.methods}",
        f"--budgets={args.budgets}",
        f"--llm-layers={args.llm_layers}",
        f"--llm-width={args.llm_width}",
        f"--vision-width={args.vision_width}",
        f"--vision-layers={args.vision_layers}",
        f"--image-size={args.image_size}",
        f"--batch={args.batch}",
        f"--prompt-tokens={args.prompt_tokens}",
        f"--new-tokens={args.new_tokens}",
        f"--repeats={args.repeats}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        # The allocator's peak on CUDA; a CPU run is a test of this script, not a measurement.
        f"--memory={'allocator' if args.device == 'cuda' else 'none'}",
        f"--out={args.out / 'bench'}",
    ]
    bench.main(bench_argv)
    bench_s = time.perf_counter() - started
    if args.device == "cuda":
        torch.cuda.empty_cache()
    merge_argv = [
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--batch={args.merge_batch}",
        f"--tokens={args.merge_tokens}",
        f"--width={args.merge_width}",
        f"--heads={args.merge_heads}",
        f"--r={args.merge_r}",
        f"--repeats={args.merge_repeats}",
    ]
    if args.device == "cpu":
        merge_argv.append(f"--threads={args.threads}")
    merge = bench_merge.run(bench_merge.parse_args(merge_argv))
    merge_text = bench_merge.format_report(merge)
    print(merge_text)
    bench_report = json.loads((args.out / "bench" / "bench.json").read_text())
    report = {
        "environment": environment(args.device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_s": {"bench": bench_s, "total": time.perf_counter() - started},
        "bench": bench_report,
        "bench_merge": merge,
    }
    table = (
        f"# GPU benchmark ({describe_environment(report['environment'])})\n\n"
        + (args.out / "bench" / "bench.md").read_text()
        + "\n## Matching + merge vs one CLIP-L/14-336 layer\n\n```\n"
        + merge_text
        + "\n```\n\n"
        + f"Wall time: {report['wall_s']['total']:.0f} s "
        f"(bench {report['wall_s']['bench']:.0f} s).\n"
    )
    atomic_write_text(args.out / "gpu_bench.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / "gpu_bench.md", table)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: --device cuda but torch sees no GPU (use --device cpu)")
    report = run(args)
    print(
        f"\nwrote {args.out / 'gpu_bench.json'} and gpu_bench.md in {report['wall_s']['total']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
