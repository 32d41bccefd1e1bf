"""``torch.compile`` on a CrossGET model: graph breaks, recompilations, speed beside eager.

Builds a LLaVA-shaped model (random weights; the bench's size flags), applies CrossGET at one
budget, and compiles the whole ``LlavaForConditionalGeneration``.  Reports:

- the graph breaks ``torch._dynamo.explain`` finds in one forward, with their reasons;
- how many times dynamo compiled frames over ``--requests`` forwards with new pixels and
  prompts of the same shape (``torch._dynamo.utils.counters``: a fixed budget must not
  recompile per request);
- median forward (prefill) time, compiled and eager, timed alternately in one run.

    python -m eval.compile_check --budget 144 --requests 6
    python -m eval.compile_check --llm-width 128 --vision-width 64 --vision-layers 4 \\
        --image-size 112 --budget 16            # seconds, for a test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import mllm_crossget as crossget
from eval.bench_llava import llava_7b_config
from mllm_crossget.config import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.compile_check",
        description="torch.compile a CrossGET LLaVA model: graph breaks, recompilations per "
        "request, compiled vs eager forward time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--budget", type=int, default=144, help="CrossGET visual tokens")
    parser.add_argument("--method", default="crossget", help="token-reduction method")
    parser.add_argument("--requests", type=int, default=6, help="forwards after the first")
    parser.add_argument("--llm-layers", type=int, default=2, help="LLaMA-7B-wide layers")
    parser.add_argument("--llm-width", type=int, default=4096, help="LLM width")
    parser.add_argument("--vision-width", type=int, default=1024, help="tower width")
    parser.add_argument("--vision-layers", type=int, default=24, help="tower layers")
    parser.add_argument("--image-size", type=int, default=336, help="image side in pixels")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text tokens")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="weights and pixels (bf16: for GPUs and CPUs with AVX512-BF16/AMX kernels)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    return parser


def _where(frames: Sequence[Any]) -> str:
    """The innermost frame of this project or of transformers, as ``path:line``."""
    for frame in reversed(frames):
        for root in ("mllm_crossget/", "transformers/"):
            if root in frame.filename:
                return f"{root}{frame.filename.split(root, 1)[1]}:{frame.lineno}"
    return "elsewhere"


def graph_breaks(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """``torch._dynamo.explain`` of one forward: graph and break counts, reasons, locations."""
    import torch._dynamo as dynamo

    dynamo.reset()
    explanation = dynamo.explain(model)(**inputs)
    reasons: Counter[str] = Counter()
    locations: Counter[str] = Counter()
    for item in explanation.break_reasons:
        reasons[str(getattr(item, "reason", item)).splitlines()[0][:160]] += 1
        locations[_where(getattr(item, "user_stack", []) or [])] += 1
    return {
        "graph_count": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "reasons": dict(reasons),
        "locations": dict(locations),
    }


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[], dict[str, Any]]]:
    """The CrossGET LLaVA of the size flags, and a maker of new requests of one shape."""
    config = llava_7b_config(
        args.llm_layers,
        "sdpa",
        llm_width=args.llm_width,
        vision_width=args.vision_width,
        vision_layers=args.vision_layers,
        image_size=args.image_size,
    )
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = LlavaForConditionalGeneration._from_config(config).to(dtype).eval()
    crossget.apply(model, crossget.CrossGETConfig(visual_tokens=args.budget, method=args.method))
    visual = crossget.num_visual_tokens(model)
    generator = torch.Generator().manual_seed(0)

    def request() -> dict[str, torch.Tensor]:
        text = torch.randint(5, 32000, (1, args.prompt_tokens), generator=generator)
        image = torch.full((1, visual), config.image_token_id)
        ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
        pixels = torch.randn(1, 3, args.image_size, args.image_size, generator=generator).to(dtype)
        return {"input_ids": ids, "pixel_values": pixels, "logits_to_keep": 1}

    return model, request


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    torch.set_num_threads(args.threads)
    model, request = build(args)
    visual = crossget.num_visual_tokens(model)

    inputs = request()
    with torch.inference_mode():
        breaks = graph_breaks(model, inputs)
        dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=args.backend)
        start = time.perf_counter()
        compiled(**inputs)
        first_s = time.perf_counter() - start
        frames_after_first = counters["stats"]["unique_graphs"]
        eager_s: list[float] = []
        compiled_s: list[float] = []
        for _ in range(args.requests):
            step = request()
            for fn, times in ((compiled, compiled_s), (model, eager_s)):
                start = time.perf_counter()
                fn(**step)
                times.append(time.perf_counter() - start)
        graphs_total = counters["stats"]["unique_graphs"]
        recompiles = sum(counters["recompiles"].values())
    crossget.remove(model)
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "visual_tokens": visual,
        "graph_count": breaks["graph_count"],
        "graph_breaks": breaks["graph_breaks"],
        "break_reasons": breaks["reasons"],
        "break_locations": breaks["locations"],
        "graphs_after_first_request": frames_after_first,
        "graphs_after_all_requests": graphs_total,
        "recompiles": recompiles,
        "first_compiled_call_s": first_s,
        "eager_median_s": statistics.median(eager_s),
        "compiled_median_s": statistics.median(compiled_s),
        "compiled_speedup": statistics.median(eager_s) / statistics.median(compiled_s),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.json is not None:
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
