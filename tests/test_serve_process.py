"""`crossget serve` as users run it: a real server process on 127.0.0.1 (free port), the tiny
untrained LLaVA (1,024 positions, 64 visual tokens per image), bounded requests and time.

Prompt-length limits, cancelling a request whose client left, SIGTERM with a request in
flight, and the media types a request may use.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
POSITIONS = 1024  # the tiny model's max_position_embeddings
FULL_TOKENS = 64
START_TIMEOUT = 180.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _serve(model_dir: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "mllm_crossget.cli", "serve", "--model", str(model_dir)]
    command += ["--served-model-name", "tiny", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(
        [*command, *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited: {process.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("server did not start in time")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module")
def limited(model_dir: Path) -> Iterator[str]:
    """A server that takes prompts of at most 200 tokens."""
    with _serve(model_dir, "--max-prompt-tokens", "200", "--max-tokens-limit", "2000") as (
        url,
        _,
    ):
        yield url


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 64-layer LLM: about 10 ms a token on one core here. The 1-layer
    model writes 1,000 tokens in under half a second on a fast core, which let requests finish
    before a test could leave them or stop the server under them."""
    from transformers import LlavaForConditionalGeneration

    from eval.testbed.model import build_reference

    tiny, processor = build_reference(size="cpu-tiny", image_size=112, seed=0)
    config = tiny.config
    config.text_config.num_hidden_layers = 64
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("slow-model")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def slow(slow_model_dir: Path) -> Iterator[str]:
    """A server on the slow model."""
    with _serve(slow_model_dir, "--max-tokens-limit", "2000") as (url, _):
        yield url


def _chat(url: str, body: dict[str, Any], timeout: float = 60.0, **headers: str) -> Any:
    return httpx.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"content-type": "application/json", **headers},
        timeout=timeout,
    )


def _text(words: int, max_tokens: int = 2, **extra: Any) -> dict[str, Any]:
    content = " ".join(["circle"] * words)
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _with_image(words: int, url: str, **extra: Any) -> dict[str, Any]:
    parts = [
        {"type": "text", "text": " ".join(["circle"] * words)},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 1}


def _health(url: str) -> dict[str, Any]:
    return httpx.get(url + "/health", timeout=10).json()


# ----------------------------------------------------------------------------- prompt length
def test_prompt_past_the_limit_is_refused_before_any_model_work(limited: str) -> None:
    served = _health(limited)["served"]
    too_long = _chat(limited, _text(300))
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "limit is 200 (--max-prompt-tokens" in error["message"]
    assert f"{POSITIONS} positions" in error["message"]
    # 200,000 words (1.2 MB): refused at once, without tokenizing, and the worker never saw it.
    started = time.monotonic()
    huge = _chat(limited, _text(200_000))
    assert huge.status_code == 400 and "at least" in huge.json()["error"]["message"]
    assert time.monotonic() - started < 20
    assert _health(limited)["served"] == served
    assert _chat(limited, _text(100)).status_code == 200  # under the limit: answered


def test_visual_tokens_count_toward_the_prompt(limited: str) -> None:
    """150 words + 64 full visual tokens is past 200; with a budget of 32 it fits."""
    body = _with_image(150, "data:image/png;base64," + _png())
    full = _chat(limited, body)
    assert full.status_code == 400
    assert f"({FULL_TOKENS} of them visual)" in full.json()["error"]["message"]
    reduced = _chat(limited, {**body, "crossget": {"visual_tokens": 32}})
    assert reduced.status_code == 200, reduced.text
    assert reduced.json()["usage"]["prompt_tokens"] <= 200


# ----------------------------------------------------------------------------- client gone
def test_requests_whose_clients_left_are_cancelled(slow: str) -> None:
    """A streamed request is cancelled when its client closes the stream; a non-streamed one
    whose client gave up while it waited is cancelled before it starts.

    The streamed answer (1,000 tokens of a 64-layer LLM, about 10 s here) is still being
    written when its stream is closed half a second after its first token, so the worker is
    busy with it for as long as the non-streamed client waits: a margin of 20x on this
    machine's speed.
    """
    before = _health(slow)
    body = _text(5, max_tokens=1000, stream=True)
    with httpx.stream("POST", slow + "/v1/chat/completions", json=body, timeout=60) as streamed:
        assert streamed.status_code == 200
        for line in streamed.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
                if delta.get("content"):
                    break  # the first answer token: the worker is generating this request
        # The worker is busy: this one waits in the queue, and its client leaves first.
        with pytest.raises(httpx.ReadTimeout):
            _chat(slow, _text(5, max_tokens=1000), timeout=0.5)
    deadline = time.monotonic() + 60
    while True:
        health = _health(slow)
        if health["queued"] == 0 and health["cancelled"] >= before["cancelled"] + 2:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert health["cancelled"] == before["cancelled"] + 2
    assert health["served"] == before["served"]  # stopped, not answered to nobody
    assert _chat(slow, _text(5)).status_code == 200  # and the worker is free again


# ----------------------------------------------------------------------------- media types
def test_only_json_bodies_and_image_data_urls(limited: str) -> None:
    body = _text(3)
    text_url = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    wrong = _chat(limited, _with_image(3, text_url))
    assert wrong.status_code == 400
    assert "MIME type 'text/plain'" in wrong.json()["error"]["message"]
    raw = httpx.post(
        limited + "/v1/chat/completions",
        content=b'{"model": "tiny"}',
        headers={"content-type": "text/plain"},
        timeout=30,
    )
    assert raw.status_code == 415
    assert "Content-Type must be application/json" in raw.json()["error"]["message"]
    form = httpx.post(limited + "/v1/chat/completions", data={"model": "tiny"}, timeout=30)
    assert form.status_code == 415 and "curl" in form.json()["error"]["message"]
    charset = _chat(limited, body, **{"content-type": "application/json; charset=utf-8"})
    assert charset.status_code == 200


# ----------------------------------------------------------------------------- shutdown
def test_default_limit_then_sigterm_with_a_request_in_flight(slow_model_dir: Path) -> None:
    """One server with the default limits: the model's positions bound the prompt and the
    answer; then SIGTERM while a long answer runs ends the process within the grace (on the
    slow model, six 1,000-token answers take about a minute)."""
    with _serve(slow_model_dir, "--max-tokens-limit", "4000", "--shutdown-grace", "1") as (
        url,
        process,
    ):
        assert _health(url)["max_prompt_tokens"] == POSITIONS  # default: the model's
        over = _chat(url, _text(2000))  # past the model's positions: refused, not garbage
        assert over.status_code == 400
        assert f"limit is {POSITIONS}" in over.json()["error"]["message"]
        answer = _chat(url, _text(1000, max_tokens=500)).json()
        usage = answer["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= POSITIONS
        assert answer["choices"][0]["finish_reason"] == "length"

        # Six 1,000-token answers: one runs, five wait; together they take many seconds.
        outcomes: list[Any] = []

        def ask() -> None:
            try:
                outcomes.append(_chat(url, _text(5, max_tokens=1000), timeout=300).status_code)
            except httpx.HTTPError as error:
                outcomes.append(type(error).__name__)

        clients = [threading.Thread(target=ask) for _ in range(6)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while _health(url)["queued"] < 5:  # (nearly) all six are in
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        took = time.monotonic() - stopped
        for client in clients:
            client.join(timeout=60)
        # uvicorn shuts down cleanly, then re-raises the signal it caught: -SIGTERM.
        assert process.returncode in (0, -signal.SIGTERM)
        print(f"exited {took:.2f} s after SIGTERM; answers: {outcomes}")
        assert took < 1 + 4, f"exited {took:.1f} s after SIGTERM with a 1 s grace"
        # The work in flight was cut, not finished: not every answer reached its client.
        assert len(outcomes) == 6 and outcomes.count(200) < 6
