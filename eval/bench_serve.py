"""Load check for ``crossget serve``: N concurrent chat requests with an image, CrossGET on/off.

Starts the server in this process on a free loopback port, then for each setting (CrossGET at
a budget, and full) fires ``--requests`` streamed requests at once (asyncio + httpx), each with
its own base64 image, the budget sent per request in the ``crossget`` field. Reports how many
were answered, latency p50/p95, time to first token and throughput. The model is one worker,
so requests queue: latency grows with the queue, and the budget's effect shows in how fast the
queue drains. Every request has a timeout and the whole run a deadline, so it always ends.

    python -m eval.bench_serve                        # random LLaVA of the reference's shape
    python -m eval.bench_serve --model reference --requests 50 --out outputs/bench_serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from mllm_crossget.serving.engine import Engine, InvalidSetting, Setting, load_model
from mllm_crossget.serving.server import BackgroundServer, ServerOptions, create_app

RANDOM_MODELS = {"random-tiny": ("cpu-tiny", 112), "random-small": ("cpu-small", 224)}
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "gray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_serve",
        description="Concurrent-request load check of crossget serve, CrossGET vs full.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="random-small",
        help="random-small (untrained, reference shape: 224 px, 256 visual tokens), "
        "random-tiny (112 px, 64 tokens), reference, or a LLaVA folder",
    )
    parser.add_argument("--requests", type=int, default=50, help="concurrent requests per setting")
    parser.add_argument(
        "--budget", type=int, default=None, help="CrossGET visual tokens (default: full / 4)"
    )
    parser.add_argument("--method", default="crossget", help="token-reduction method")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer length per request")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per setting")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    return parser


def load(name: str) -> tuple[Any, Any]:
    if name in RANDOM_MODELS:
        from eval.testbed.model import build_reference

        size, image_size = RANDOM_MODELS[name]
        model, processor = build_reference(size=size, image_size=image_size, seed=0)
        return model.eval(), processor
    return load_model(name)


def make_images(count: int, size: int) -> list[str]:
    """Distinct small scenes (a colored shape on a colored ground) as PNG data URLs."""
    urls = []
    for index in range(count):
        image = Image.new("RGB", (size, size), COLORS[index % len(COLORS)])
        draw = ImageDraw.Draw(image)
        offset = (index * 7) % (size // 2)
        box = (offset, offset, offset + size // 2, offset + size // 2)
        draw.ellipse(box, fill=COLORS[(index + 3) % len(COLORS)])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


async def one_request(
    client: Any, url: str, model: str, image: str, crossget: dict[str, Any], max_tokens: int
) -> dict[str, Any]:
    """One streamed request; returns latency, time to first content and the usage."""
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what color is the circle?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "crossget": crossget,
    }
    started = time.perf_counter()
    first: float | None = None
    usage: dict[str, int] | None = None
    done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"ok": False, "error": f"{response.status_code} {response.text[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if first is None and choice["delta"].get("content"):
                        first = time.perf_counter() - started
    except Exception as error:  # a timeout or a dropped connection counts as unanswered
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    latency = time.perf_counter() - started
    return {"ok": done, "latency": latency, "first": first, "usage": usage}


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def run_setting(
    base_url: str, model: str, images: list[str], crossget: dict[str, Any], args: Any
) -> dict[str, Any]:
    import httpx

    url = base_url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=len(images) + 1)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        await one_request(client, url, model, images[0], crossget, args.max_tokens)  # warm-up
        started = time.perf_counter()
        tasks = [
            one_request(client, url, model, image, crossget, args.max_tokens) for image in images
        ]
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.timeout)
        except asyncio.TimeoutError:
            results = [{"ok": False, "error": "run deadline"}] * len(images)
        wall = time.perf_counter() - started
    answered = [r for r in results if r["ok"]]
    latencies = [r["latency"] for r in answered]
    firsts = [r["first"] for r in answered if r["first"] is not None]
    prompt = sorted({r["usage"]["prompt_tokens"] for r in answered if r["usage"]})
    return {
        "crossget": crossget,
        "requests": len(images),
        "answered": len(answered),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:3],
        "wall_s": wall,
        "requests_per_s": len(answered) / wall if wall > 0 else 0.0,
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "first_token_p50_s": _percentile(firsts, 0.5),
        "prompt_tokens": prompt,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']} ({report['visual_tokens_full']} visual tokens full), "
        f"{report['requests']} concurrent requests, {report['max_tokens']} new tokens each, "
        f"torch threads {report['threads']}",
        "",
        "| setting | answered | p50 latency | p95 latency | p50 first token | req/s | "
        "prompt tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["settings"]:
        lines.append(
            f"| {row['name']} | {row['answered']}/{row['requests']} | "
            f"{row['latency_p50_s']:.2f} s | {row['latency_p95_s']:.2f} s | "
            f"{row['first_token_p50_s']:.2f} s | {row['requests_per_s']:.2f} | "
            f"{','.join(str(t) for t in row['prompt_tokens'])} |"
        )
        if row["errors"]:
            lines.append(f"  errors: {row['errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, processor = load(args.model)
    except FileNotFoundError as error:  # a --model typo: named_models says what exists
        print(f"crossget bench-serve: {error}", file=sys.stderr)
        return 2
    engine = Engine(model, processor, "bench")
    full_tokens = engine.check(Setting())
    budget = args.budget or full_tokens // 4
    try:
        engine.check(Setting(args.method, budget))
    except InvalidSetting as error:
        print(f"bench_serve: {error}")
        return 2
    images = make_images(args.requests, engine.image_size)
    options = ServerOptions(max_queue=args.requests * 2 + 8, max_tokens_limit=args.max_tokens)
    settings = [
        (f"{args.method} K={budget}", {"visual_tokens": budget, "method": args.method}),
        (f"full ({full_tokens})", {"visual_tokens": "full"}),
    ]
    rows = []
    with BackgroundServer(create_app(engine, options)) as server:
        for name, crossget in settings:
            row = asyncio.run(run_setting(server.url, engine.name, images, crossget, args))
            rows.append({"name": name, **row})
    report = {
        "model": args.model,
        "visual_tokens_full": full_tokens,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "settings": rows,
    }
    print(format_report(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0 if all(row["answered"] == row["requests"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
