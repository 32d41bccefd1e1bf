"""What every benchmark shares: dtype names and one synchronised wall-clock measurement."""

from __future__ import annotations

import time
from collections.abc import Callable

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
