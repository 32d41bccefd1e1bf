"""What every benchmark shares: dtype names and one synchronised wall-clock measurement."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str | torch.device) -> float:
    """Seconds ``fn`` takes, synchronised before and after on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def add_timing_arguments(parser: argparse.ArgumentParser, attn_help: str) -> None:
    """The flags every model benchmark takes: rounds, threads, device, dtype, attention, JSON."""
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed rounds (each round runs every budget once)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0 = torch's default; 1 is steadier on a shared machine)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="weights and activations dtype (bf16 on a GPU for real shapes)",
    )
    parser.add_argument("--attn", default="sdpa", help=attn_help)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
