"""Peak resident memory of one request, each setting of ``crossget bench`` in a fresh process.

On CPU the allocator gives no peak, and a process that ran other settings first reuses the
memory they freed (the growth of its RSS reads a few MB).  So ``crossget bench`` starts this
module once per setting with the same flags plus ``--only METHOD/BUDGET``: it loads the model,
runs one warm-up request, resets the kernel's high-water mark (``/proc/self/clear_refs``),
runs the measured request and prints one ``BENCH_MEMORY {json}`` line:

- ``base_mb``: resident set before the measured request (weights, caches, the interpreter);
- ``peak_mb``: the kernel's peak resident set (``VmHWM``) during it;
- ``working_mb``: their difference, what the request itself needs (activations, KV cache);
- ``kv_mb``: bytes of the KV cache object the request returned, per request.

glibc is told to return every block above 128 KiB to the system on free
(``MALLOC_MMAP_THRESHOLD_``), so memory the warm-up freed is not silently reused and the
high-water mark sees the measured request's own allocations.  Where ``clear_refs`` cannot be
written (not Linux) the peak is the process's lifetime peak, load included (``reset``: false).

    python -m eval.bench_memory --model reference --only crossget/64 --device cpu
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKER = "BENCH_MEMORY "
MMAP_THRESHOLD = "131072"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current
    except OSError:
        return False
    return True


def resident_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB."""
    try:
        return _status_kb("VmRSS") / 1024, _status_kb("VmHWM") / 1024
    except (OSError, RuntimeError):
        import resource

        import psutil

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return psutil.Process().memory_info().rss / 2**20, peak_kb / 1024


def measure(argv: Sequence[str]) -> dict[str, Any]:
    """Load the bench's model, run the ``--only`` setting twice, measure the second run."""
    from eval import bench

    parser = bench.build_parser()
    parser.add_argument("--only", required=True, help="METHOD/BUDGET, or full")
    args = parser.parse_args(list(argv))
    bench.finish_args(args)
    if args.device != "cpu":
        raise ValueError("eval.bench_memory measures CPU memory; on CUDA bench reads the allocator")
    method, _, budget = args.only.partition("/")
    model, _, processor = bench.load_model(args)
    image_size = bench.input_image_size(model, processor)
    text, pixels = bench.make_inputs(args, model.config, image_size)
    methods, budgets = ([], ["full"]) if method == "full" else ([method], [budget])
    settings, skipped = bench.build_settings(
        model,
        methods,
        budgets,
        args.fastv_layer,
        args.llm_positions,
        processor,
        args.llm_proportional_attention,
    )
    if not settings:
        raise ValueError(f"{args.only}: {'; '.join(skipped) or 'no such setting'}")
    setting = settings[0]
    bench.prepare(model, setting, text, model.config.image_token_id, args.prompt_tokens, processor)
    autocast = bench.autocast_dtype(args)
    with bench.configured(model, setting, processor):
        bench.run_once(model, setting, pixels, "cpu", args.new_tokens, autocast=autocast)
        gc.collect()
        reset = _reset_peak()
        base, _ = resident_mb()
        caches: list[Any] = []
        bench.run_once(
            model, setting, pixels, "cpu", args.new_tokens, autocast=autocast, keep_cache=caches
        )
        _, peak = resident_mb()
        kv = bench.cache_bytes(caches[0]) / pixels.shape[0] / 2**20
    return {
        "label": setting.label,
        "base_mb": base,
        "peak_mb": peak,
        "working_mb": peak - base,
        "kv_mb": kv,
        "reset": reset,
    }


def measure_in_subprocess(argv: Sequence[str], label: str, timeout: float = 3600) -> dict:
    """Run :func:`measure` for one setting in a fresh interpreter; its result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "eval.bench_memory", *argv, "--only", label]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    raise RuntimeError(
        f"memory measurement of {label} failed (exit {done.returncode}): " + " | ".join(tail)
    )


def main(argv: Sequence[str] | None = None) -> int:
    result = measure(sys.argv[1:] if argv is None else argv)
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
