"""What every benchmark shares: dtype names and one synchronised wall-clock measurement."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """The first CPU's model name and feature flags in the text of ``/proc/cpuinfo``."""
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    """This machine's CPU model and flags (Linux; elsewhere what ``platform`` knows, no flags)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or platform.machine(), set()


def cpu_bf16_kernels(flags: set[str]) -> str | None:
    """Which bf16 matrix instructions the CPU has (``amx_bf16``, ``avx512_bf16``) or None.
    Without them torch emulates bf16 matmuls, tens of times slower than fp32, so a bf16 CPU
    timing means something only where this is set."""
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return flag
    return None


def environment(device: str | torch.device) -> dict[str, Any]:
    """What a timing depends on, for every benchmark's report: torch, the device (GPU name,
    or the CPU's model, its bf16 kernels, cores and torch threads)."""
    cpu, flags = _cpu_model_and_flags()
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu,
        "cpu_bf16": cpu_bf16_kernels(flags),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def describe_environment(info: dict[str, Any]) -> str:
    """One line for a table's caption: the GPU, or the CPU with its bf16 kernels and threads."""
    if info.get("gpu"):
        return f"{info['gpu']} (CUDA {info.get('cuda')}), torch {info['torch']}"
    bf16 = info.get("cpu_bf16") or "no bf16 kernels"
    return (
        f"{info['cpu']} ({bf16}; {info['threads']} of {info['cpu_count']} cores), "
        f"torch {info['torch']}"
    )


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
