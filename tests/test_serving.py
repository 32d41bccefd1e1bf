"""`crossget chat` and `crossget serve` on the tiny untrained LLaVA (64 visual tokens, >= 32)."""

from __future__ import annotations

import base64
import io
import random
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mllm_crossget import cli
from mllm_crossget.serving import chat
from mllm_crossget.serving.engine import (
    ChatMessage,
    Engine,
    Setting,
    _StopScanner,
    build_prompt,
    load_model,
)

API_KEY = "test-key"
FULL_TOKENS = 64


def _png(size: tuple[int, int] = (120, 90), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    path = folder / "red.png"
    path.write_bytes(_png())
    return path


# ----------------------------------------------------------------------------- engine pieces
def test_stop_scanner_cuts_at_the_first_stop_and_holds_back_prefixes() -> None:
    scanner = _StopScanner(["STOP"])
    assert scanner.feed("hello ST") == "hello "  # "ST" may start "STOP"
    assert scanner.feed("ay") == "STay"
    assert scanner.feed(" and STO") == " and "
    assert scanner.feed("P more") == ""
    assert scanner.stopped and scanner.flush() == ""


def test_reference_prompt_format_over_turns(model_dir: Path) -> None:
    _, processor = load_model(str(model_dir))
    image = Image.new("RGB", (20, 20))
    messages = [
        ChatMessage("user", "what color?", [image]),
        ChatMessage("assistant", "red"),
        ChatMessage("user", "what shape?"),
    ]
    assert build_prompt(processor, messages) == (
        "<image>\nUSER: what color? ASSISTANT: red</s>USER: what shape? ASSISTANT:"
    )


# ----------------------------------------------------------------------------- chat
def test_chat_streams_and_budget_switches_visual_tokens(
    model_dir: Path,
    image_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script = "\n".join(
        [
            "what color is the circle?",
            "/budget 32",
            "what shape is it?",
            "/budget 7",  # out of range: an error, the setting stays
            "/method tome",
            "and now?",
            f"/image {image_file}",
            "/budget full",
            "hello",
            "/method pool",  # while full: remembered for the next /budget
            "/budget 48",
            "one more?",
            "/quit",
            "never asked",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script + "\n"))
    argv = ["--model", str(model_dir), "--image", str(image_file), "--max-new-tokens", "3"]
    assert chat.main([*argv, "--turns", "multi"]) == 0
    out = capsys.readouterr().out
    status = [line for line in out.splitlines() if line.startswith("[")]
    assert len(status) == 5, out
    assert status[0].startswith(f"[{FULL_TOKENS} visual tokens | full")
    assert status[1].startswith("[32 visual tokens | crossget K=32")
    assert status[2].startswith("[32 visual tokens | tome K=32")
    assert status[3].startswith(f"[{FULL_TOKENS} visual tokens | full")
    assert status[4].startswith("[48 visual tokens | pool K=48")
    assert "first token" in status[0] and "tokens/s" in status[0]
    assert "error: visual_tokens=7" in out
    assert "never asked" not in out
    # Same image, two turns: the second prompt holds the first answer and the 32 tokens.
    prompt_tokens = [int(line.rsplit("| ", 1)[1].split()[0]) for line in status]
    assert prompt_tokens[1] > prompt_tokens[0] - (FULL_TOKENS - 32)


def _status_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[")]


def _prompt_tokens(status: str) -> int:
    return int(status.rsplit("| ", 1)[1].split()[0])


def test_chat_keeps_one_turn_for_a_single_turn_model(
    model_dir: Path,
    image_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The testbed model (no chat template, like the reference model) was trained on one
    question per image: every question goes alone with the image, also after /budget."""
    script = ["what color is the circle?", "what color is the circle?", "/budget 32"]
    script += ["what color is the circle?", "/budget 0", "what color is the circle?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    argv = ["--model", str(model_dir), "--image", str(image_file), "--max-new-tokens", "2"]
    assert chat.main(argv) == 0
    out = capsys.readouterr().out
    assert "single-turn model" in out and "--turns multi" in out
    status = _status_lines(out)
    assert len(status) == 4, out
    tokens = [_prompt_tokens(line) for line in status]
    assert tokens[0] == tokens[1]  # the first answer is not sent back
    assert tokens[2] == tokens[0] - (FULL_TOKENS - 32) == tokens[3]
    assert status[2].startswith("[32 visual tokens") and status[3].startswith("[32 visual tokens")
    # /budget 0 is refused with the message the API and the server give; the setting stays.
    assert "error: budget must be an int >= 1, got 0" in out and "0 does not mean full" in out


def test_chat_without_an_image_says_it_is_text_only(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert chat.main(["--model", str(model_dir), "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "no --image: text-only" in out and "/image PATH" in out
    assert _status_lines(out)[0].startswith("[0 visual tokens")


def test_a_model_config_flag_decides_the_turns(model_dir: Path) -> None:
    from types import SimpleNamespace

    model, processor = load_model(str(model_dir))
    assert chat.single_turn_model(model, processor)  # no chat template: single
    model.config.single_turn = False
    assert not chat.single_turn_model(model, processor)
    templated = SimpleNamespace(chat_template="{{ messages }}")
    del model.config.single_turn
    assert not chat.single_turn_model(model, templated)


def test_budget_zero_gets_one_message_in_chat_api_and_server(server: Any) -> None:
    import mllm_crossget as crossget
    from mllm_crossget.serving.engine import InvalidSetting, parse_budget

    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    answer = _post(server, {**ok, "crossget": {"visual_tokens": 0}})
    assert answer.status_code == 400
    served = answer.json()["error"]["message"]
    with pytest.raises(InvalidSetting) as in_chat:
        parse_budget("0")
    with pytest.raises(ValueError) as in_api, crossget.budget(0):
        pass
    tails = {m.split(":", 1)[1] for m in (served, str(in_chat.value), str(in_api.value))}
    assert len(tails) == 1 and "0 does not mean full" in served, tails
    assert parse_budget("full") is None and parse_budget("64") == 64


def test_chat_without_reference_model_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from mllm_crossget import named_models

    entry = replace(named_models.get("reference"), folder=lambda: tmp_path / "missing")
    monkeypatch.setitem(named_models._REGISTRY, "reference", entry)
    assert chat.main(["--model", "reference"]) == 2
    err = capsys.readouterr().err
    assert f"has no files at {tmp_path / 'missing'}" in err and "make reference-model" in err


@pytest.mark.parametrize(("verb", "flag"), [("chat", "--budget"), ("serve", "--api-key")])
def test_help_of_the_new_verbs(verb: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main([verb, "--help"])
    assert stop.value.code == 0
    assert flag in capsys.readouterr().out


# ----------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(model_dir: Path, image_file: Path) -> Iterator[Any]:
    from mllm_crossget.serving.server import BackgroundServer, ServerOptions, create_app

    model, processor = load_model(str(model_dir))
    engine = Engine(model, processor, "tiny", Setting())
    options = ServerOptions(
        api_key=API_KEY,
        allow_local_files=image_file.parent,
        max_image_bytes=300_000,
        max_image_pixels=1000 * 1000,
        max_new_tokens=4,
        max_tokens_limit=64,
    )
    with BackgroundServer(create_app(engine, options)) as running:
        running.engine = engine
        yield running


@pytest.fixture(scope="module")
def client(server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60.0)


def _image_message(url: str, text: str = "what color is the circle?") -> list[dict[str, Any]]:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


def test_models_and_health(client: Any, server: Any) -> None:
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_plain_and_streamed_completions_agree(client: Any) -> None:
    messages = [{"role": "user", "content": "what color is the circle?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    answer = plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 4
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer  # greedy: the same answer, streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_budget_changes_prompt_tokens_by_the_visual_difference(client: Any) -> None:
    messages = _image_message(_data_url(_png()))
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    usage = {}
    for method in ("crossget", "tome", "pool"):
        reduced = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=2,
            extra_body={"crossget": {"visual_tokens": 32, "method": method}},
        )
        usage[method] = reduced.usage.prompt_tokens
        assert reduced.model_extra["crossget"]["visual_tokens"] == [32]
    assert set(usage.values()) == {full.usage.prompt_tokens - (FULL_TOKENS - 32)}
    assert full.model_extra["crossget"]["visual_tokens"] == [FULL_TOKENS]
    off = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=2,
        extra_body={"crossget": {"visual_tokens": "full"}},
    )
    assert off.usage.prompt_tokens == full.usage.prompt_tokens


def test_local_files_only_under_the_allowed_root(
    client: Any, image_file: Path, tmp_path: Path
) -> None:
    import openai

    inside = client.chat.completions.create(
        model="tiny", messages=_image_message(str(image_file)), max_tokens=1
    )
    assert inside.model_extra["crossget"]["visual_tokens"] == [FULL_TOKENS]
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(_png())
    for url in (str(outside), outside.as_uri(), str(image_file.parent / ".." / outside.name)):
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="tiny", messages=_image_message(url))


def _post(server: Any, body: Any, key: str | None = API_KEY, raw: bytes | None = None) -> Any:
    import httpx

    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    url = server.url + "/v1/chat/completions"
    if raw is not None:
        return httpx.post(url, content=raw, headers=headers, timeout=60)
    return httpx.post(url, json=body, headers=headers, timeout=60)


def test_bad_requests_get_clear_errors(server: Any) -> None:
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    big = _png((1200, 1000))  # 1.2 MP > 1 MP
    noisy = Image.frombytes("RGB", (400, 400), random.Random(0).randbytes(400 * 400 * 3))
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")  # > 300 kB
    cases: list[tuple[int, dict[str, Any] | None, bytes | None, str | None, str]] = [
        (400, None, b"{not json", API_KEY, "not valid JSON"),
        (400, {"model": "tiny"}, None, API_KEY, "messages"),
        (400, {**ok, "messages": [{"role": "robot", "content": "x"}]}, None, API_KEY, "role"),
        (401, ok, None, None, "API key"),
        (401, ok, None, "wrong", "API key"),
        (404, {**ok, "model": "gpt-4"}, None, API_KEY, "not found"),
        (
            400,
            {**ok, "messages": _image_message("data:image/png;base64,aGVsbG8=")},
            None,
            API_KEY,
            "decode",
        ),
        (
            400,
            {**ok, "messages": _image_message("data:image/png;base64,@@@")},
            None,
            API_KEY,
            "base64",
        ),
        (
            400,
            {**ok, "messages": _image_message("https://example.com/a.png")},
            None,
            API_KEY,
            "remote",
        ),
        (413, {**ok, "messages": _image_message(_data_url(big))}, None, API_KEY, "pixels"),
        (
            413,
            {**ok, "messages": _image_message(_data_url(buffer.getvalue()))},
            None,
            API_KEY,
            "bytes",
        ),
        (400, {**ok, "crossget": {"visual_tokens": 7}}, None, API_KEY, "visual_tokens=7"),
        (
            400,
            {**ok, "crossget": {"visual_tokens": 65, "method": "pool"}},
            None,
            API_KEY,
            "visual_tokens=65",
        ),
        (
            400,
            {**ok, "crossget": {"visual_tokens": 32, "method": "magic"}},
            None,
            API_KEY,
            "unknown method",
        ),
        (400, {**ok, "crossget": {"budget": 32}}, None, API_KEY, "crossget.budget"),
        (400, {**ok, "max_tokens": 1000}, None, API_KEY, "limit"),
        (400, {**ok, "n": 2}, None, API_KEY, "n=1"),
    ]
    for status, body, raw, key, words in cases:
        response = _post(server, body, key=key, raw=raw)
        assert response.status_code == status, (body, response.text)
        message = response.json()["error"]["message"]
        assert words in message, (status, message)
    assert _post(server, ok).status_code == 200  # still serving


def test_a_failing_request_is_a_500_and_the_server_goes_on(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = server.engine.model

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated failure")

    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    monkeypatch.setattr(model, "generate", broken)
    failed = _post(server, ok)
    assert failed.status_code == 500
    assert "simulated failure" in failed.json()["error"]["message"]
    streamed = _post(server, {**ok, "stream": True})
    assert streamed.status_code == 200 and "simulated failure" in streamed.text
    assert streamed.text.rstrip().endswith("data: [DONE]")
    monkeypatch.undo()
    assert _post(server, ok).status_code == 200


def test_concurrent_requests_queue_and_keep_their_budgets(
    server: Any, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = server.engine.model
    original = model.generate
    active, peak, guard = [0], [0], threading.Lock()

    def counted(*args: Any, **kwargs: Any) -> Any:
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(model, "generate", counted)
    messages = _image_message(_data_url(_png()))
    budgets = [32, "full", 48, 32, "full", 40, 64, 36]

    def ask(budget: int | str) -> tuple[int | str, int, str]:
        answer = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=2,
            stream=budget == 48,
            extra_body={"crossget": {"visual_tokens": budget}},
        )
        if budget == 48:
            return budget, -1, "".join(c.choices[0].delta.content or "" for c in answer)
        return budget, answer.usage.prompt_tokens, answer.choices[0].message.content

    with ThreadPoolExecutor(len(budgets)) as pool:
        results = list(pool.map(ask, budgets))
    assert peak[0] == 1
    tokens = {budget: prompt for budget, prompt, _ in results if prompt >= 0}
    base = tokens["full"] - FULL_TOKENS
    assert tokens == {b: base + (FULL_TOKENS if b == "full" else b) for b in tokens}
