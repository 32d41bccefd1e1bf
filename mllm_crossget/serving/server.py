"""``crossget serve``: an OpenAI-compatible chat-completions API over one CrossGET model.

    crossget serve --model reference --budget 64 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "reference", "messages": [...]}'

- ``POST /v1/chat/completions``: text and ``image_url`` parts (base64 ``data:`` URLs; local
  paths only under ``--allow-local-files ROOT``), ``stream: true`` for server-sent events in
  OpenAI's chunk format ending with ``data: [DONE]``, and an extension field per request,
  ``"crossget": {"visual_tokens": 64, "method": "crossget"}`` (``"full"`` turns it off), which
  the openai client sends with ``extra_body``. ``usage.prompt_tokens`` counts the visual tokens
  the LLM really reads, so it drops by exactly what the budget saves.
- ``GET /v1/models``, ``GET /health``.

One model, one worker thread: requests queue up and run one at a time (the model's classes are
swapped per setting, which is not safe to share). A request that fails answers 500 and the
server goes on. Errors use OpenAI's ``{"error": {"message", "type", "code"}}`` body.

Limits, checked before a request reaches the model: the body must be ``Content-Type:
application/json`` (else 415); image data URLs must be ``data:image/...`` (else 400); the
prompt, text plus the visual tokens the LLM will read, must fit ``--max-prompt-tokens``
(default: the model's positions) and leave room for one answer token (else 400, code
``context_length_exceeded``), and the answer is cut where the positions end. A non-streamed
request whose client disconnects is cancelled at the next token, as a streamed one is. SIGTERM
(or Ctrl-C) stops accepting connections, gives requests in flight ``--shutdown-grace`` seconds
to finish, then cancels them and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import copy
import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import (
    FULL,
    ChatMessage,
    Engine,
    GenerationResult,
    InvalidSetting,
    Sampling,
    Setting,
    add_model_arguments,
    engine_from_args,
    make_setting,
)

logger = logging.getLogger("crossget.serve")
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- request schema
class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Schema):
    url: str
    detail: str | None = None


class ContentPart(_Schema):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class CrossGETOptions(BaseModel):
    """The per-request extension; unknown keys are refused so a typo does not go unnoticed."""

    model_config = ConfigDict(extra="forbid")
    visual_tokens: int | Literal["full"] | None = None
    method: str | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class ChatRequest(_Schema):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    crossget: CrossGETOptions | None = None


# ----------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error with its HTTP status, rendered as OpenAI's error body."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        415: "unsupported_media_type",
        503: "server_busy",
    }

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}


@dataclass(frozen=True)
class ServerOptions:
    """Limits and policies; every one is a ``crossget serve`` flag."""

    api_key: str | None = None
    allow_local_files: Path | None = None
    max_image_bytes: int = 20 * MIB
    max_image_pixels: int = 4096 * 4096
    max_request_bytes: int = 64 * MIB
    max_new_tokens: int = 256  # when the request gives none
    max_tokens_limit: int = 4096
    max_queue: int = 256
    max_prompt_tokens: int | None = None  # None: the model's positions


# ----------------------------------------------------------------------------- images
def _check_pixels(image: Image.Image, options: ServerOptions) -> None:
    width, height = image.size
    if width * height > options.max_image_pixels:
        raise ApiError(
            413,
            f"image is {width}x{height} = {width * height} pixels; the limit is "
            f"{options.max_image_pixels} (--max-image-pixels)",
            "image_too_large",
        )


def _check_bytes(size: int, options: ServerOptions) -> None:
    if size > options.max_image_bytes:
        raise ApiError(
            413,
            f"image is {size} bytes; the limit is {options.max_image_bytes} (--max-image-bytes)",
            "image_too_large",
        )


def decode_image(data: bytes, options: ServerOptions) -> Image.Image:
    """Bytes -> RGB image; too big -> 413, not an image -> 400 (size checked before decoding)."""
    _check_bytes(len(data), options)
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image, options)  # from the header, before the pixels are decoded
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise ApiError(413, f"image has too many pixels: {error}", "image_too_large") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ApiError(400, f"could not decode the image: {error}", "invalid_image") from error


def load_image_url(url: str, options: ServerOptions) -> Image.Image:
    """A ``data:`` URL, or a local path / ``file://`` URL inside ``--allow-local-files``."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, "image data URLs must look like data:image/png;base64,...")
        mime = header.removeprefix("data:").split(";", 1)[0].strip().lower()
        if not mime.startswith("image/"):
            raise ApiError(
                400,
                f"image data URL has MIME type {mime or '(none)'!r}; image_url parts take images "
                "only: data:image/png;base64,... (or image/jpeg, image/webp, ...)",
                "invalid_image_type",
            )
        _check_bytes(len(payload.rstrip("=")) * 3 // 4, options)  # before decoding it
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ApiError(400, f"image data URL is not valid base64: {error}") from error
        return decode_image(data, options)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise ApiError(
            400,
            "this server does not fetch remote images; send the image as a base64 data URL",
            "remote_image",
        )
    if parsed.scheme not in ("", "file"):
        raise ApiError(400, f"unsupported image URL scheme {parsed.scheme!r}")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
    root = options.allow_local_files
    if root is None:
        raise ApiError(
            403,
            "local image paths are disabled; start the server with --allow-local-files ROOT",
            "local_files_disabled",
        )
    resolved = path.expanduser().resolve()
    if not resolved.is_relative_to(root):
        raise ApiError(403, f"{path} is outside the allowed folder {root}", "path_not_allowed")
    if not resolved.is_file():
        raise ApiError(400, f"no image file at {path}", "image_not_found")
    _check_bytes(resolved.stat().st_size, options)
    return decode_image(resolved.read_bytes(), options)


# ----------------------------------------------------------------------------- request parsing
def _parts(message: Message) -> list[ContentPart]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [ContentPart(type="text", text=message.content)]
    return message.content


def to_chat_messages(request: ChatRequest, options: ServerOptions) -> list[ChatMessage]:
    """OpenAI messages -> engine messages (images decoded; developer turns count as system)."""
    messages: list[ChatMessage] = []
    for index, message in enumerate(request.messages):
        texts: list[str] = []
        images: list[Image.Image] = []
        for part in _parts(message):
            if part.type == "text":
                if part.text is None:
                    raise ApiError(400, f"messages[{index}]: a text part needs 'text'")
                texts.append(part.text)
                continue
            if part.image_url is None:
                raise ApiError(400, f"messages[{index}]: an image_url part needs 'image_url'")
            if message.role != "user":
                raise ApiError(400, f"messages[{index}]: only user messages may carry images")
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(load_image_url(url, options))
        role = "system" if message.role == "developer" else message.role
        messages.append(ChatMessage(role, "\n".join(texts), images))
    return messages


def resolve_setting(options: CrossGETOptions | None, default: Setting) -> Setting:
    """The request's CrossGET setting: its own fields over the server's default."""
    if options is None:
        return default
    method = options.method
    budget = options.visual_tokens
    if budget == FULL or method == FULL:
        return Setting()
    if method is None:
        method = default.method if default.method != FULL else "crossget"
    if budget is None:
        budget = default.visual_tokens
    if budget is None:
        raise InvalidSetting(
            f"crossget.method={method!r} needs crossget.visual_tokens (the server runs full)"
        )
    return make_setting(method, int(budget))


def sampling_for(request: ChatRequest, options: ServerOptions) -> Sampling:
    if request.n != 1:
        raise ApiError(400, "only n=1 is supported")
    limit = request.max_completion_tokens or request.max_tokens or options.max_new_tokens
    if limit > options.max_tokens_limit:
        raise ApiError(
            400, f"max_tokens={limit} is above this server's limit {options.max_tokens_limit}"
        )
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return Sampling(
        max_new_tokens=limit,
        temperature=request.temperature or None,
        top_p=request.top_p,
        seed=request.seed,
        stop=stop,
    )


def _validation_message(error: ValidationError) -> str:
    problems = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}")
    return "invalid request: " + "; ".join(problems)


# ----------------------------------------------------------------------------- prompt length
def full_visual_tokens(model: Any) -> int:
    """Visual tokens per image of the unreduced model at its own image size."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    return patches if strategy == "default" else patches + 1


class PromptLength:
    """Counts a request's prompt tokens (text + the visual tokens the LLM will read) without
    touching the model, so an over-long prompt is refused before it queues for the worker.

    Uses its own copy of the tokenizer (fast tokenizers must not be shared across threads).
    A cheap lower bound (one token per whitespace-separated word, or per longest-vocabulary-
    entry characters) refuses a huge text before it is tokenized at all.
    """

    def __init__(self, engine: Engine, limit: int | None) -> None:
        config = engine.model.config
        text_config = getattr(config, "text_config", config)
        positions = getattr(text_config, "max_position_embeddings", None)
        self.context: int | None = int(positions) if positions else None
        self.limit: int | None = limit if limit is not None else self.context
        if self.limit is not None and self.context is not None and self.limit > self.context:
            raise InvalidSetting(
                f"--max-prompt-tokens {self.limit} is above the model's {self.context} positions"
            )
        self.processor = engine.processor
        self.tokenizer = copy.deepcopy(engine.processor.tokenizer)
        self.lock = threading.Lock()
        self.image_token_id = engine.model.config.image_token_id
        self.full = full_visual_tokens(engine.model)
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.chars_per_token = max(longest, 1) + 1  # +1: a leading space marker

    def visual_per_image(self, setting: Setting) -> int:
        # Every method hands the LLM exactly K tokens, except FastV (all, pruned inside).
        if setting.method in (FULL, "fastv") or setting.visual_tokens is None:
            return self.full
        return int(setting.visual_tokens)

    def check(self, messages: list[ChatMessage], setting: Setting) -> int:
        """The prompt's token count; raises ApiError(400) past the limit."""
        if self.limit is None:
            return 0
        from .engine import build_prompt

        images = sum(len(m.images) for m in messages)
        visual = images * self.visual_per_image(setting)
        prompt = build_prompt(self.processor, messages)
        lower = max(len(prompt.split()), len(prompt) // self.chars_per_token)
        if lower + visual - images > self.limit:
            self._refuse(f"at least {lower + visual - images}", visual)
        with self.lock:
            ids = self.tokenizer(prompt)["input_ids"]
        placeholders = sum(1 for i in ids if i == self.image_token_id)
        total = len(ids) - placeholders + visual
        if total > self.limit:
            self._refuse(str(total), visual)
        if self.context is not None and total >= self.context:
            self._refuse(str(total), visual, "leaves no position for the answer")
        return total

    def _refuse(self, total: str, visual: int, why: str = "") -> None:
        context = f"; the model reads {self.context} positions" if self.context else ""
        raise ApiError(
            400,
            f"prompt is {total} tokens ({visual} of them visual); "
            + (f"it {why}" if why else f"this server's limit is {self.limit} (--max-prompt-tokens")
            + ("" if why else ")")
            + f"{context}: shorten the messages or send fewer images",
            "context_length_exceeded",
        )

    def answer_room(self, total: int) -> int | None:
        """Tokens the answer may take before the positions run out (None: no limit known)."""
        return None if self.context is None else self.context - total


# ----------------------------------------------------------------------------- the worker
@dataclass
class _Event:
    kind: Literal["start", "text", "done", "invalid", "error"]
    payload: Any = None


class ModelWorker:
    """One thread that owns the model: jobs run in arrival order, never two at once."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.pending = 0
        self.served = 0
        self.failed = 0
        self.cancelled = 0  # stopped because the client left or the server shut down
        self._active: set[threading.Event] = set()
        self._count_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossget-model")

    def submit(
        self,
        messages: list[ChatMessage],
        setting: Setting,
        sampling: Sampling,
        stream: bool,
        cancel: threading.Event,
    ) -> asyncio.Queue[_Event]:
        """Queue a job; its events arrive on the returned asyncio queue (this loop's)."""
        with self._count_lock:
            if self.pending >= self.max_queue:
                raise ApiError(503, f"server busy: {self.pending} requests queued (--max-queue)")
            self.pending += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Event] = asyncio.Queue()

        def emit(kind: str, payload: Any = None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, _Event(kind, payload))  # type: ignore[arg-type]
            except RuntimeError:  # the loop is gone (server shutting down)
                cancel.set()

        def job() -> None:
            with self._count_lock:
                self._active.add(cancel)
            try:
                if cancel.is_set():
                    self.cancelled += 1
                    emit("error", "cancelled before it started")
                    return
                result = self.engine.generate(
                    messages,
                    setting,
                    sampling,
                    on_start=lambda prompt, visual: emit("start", (prompt, visual)),
                    on_text=(lambda text: emit("text", text)) if stream else None,
                    cancel=cancel,
                )
                if cancel.is_set():  # stopped early: the client left, or shutdown
                    self.cancelled += 1
                    emit("error", "cancelled")
                    return
                self.served += 1
                emit("done", result)
            except InvalidSetting as error:
                emit("invalid", str(error))
            except Exception as error:
                self.failed += 1
                logger.exception("request failed")
                emit("error", f"{type(error).__name__}: {error}")
            finally:
                with self._count_lock:
                    self.pending -= 1
                    self._active.discard(cancel)

        self._executor.submit(job)
        return events

    def shutdown(self) -> None:
        """Cancel what runs (it stops at its next token) and what waits; do not block."""
        with self._count_lock:
            for cancel in self._active:
                cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- responses
def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _crossget_info(result: GenerationResult) -> dict[str, Any]:
    setting = result.setting
    return {
        "method": setting.method,
        "budget": setting.visual_tokens,
        "visual_tokens": result.visual_tokens,
        "first_token_s": result.first_token_s,
    }


def _completion(request_id: str, model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(result),
        "crossget": _crossget_info(result),
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def create_app(engine: Engine, options: ServerOptions | None = None) -> Any:
    """The FastAPI application: routes, error bodies and the model worker."""
    options = options or ServerOptions()
    if options.allow_local_files is not None:
        options = ServerOptions(
            **{**options.__dict__, "allow_local_files": options.allow_local_files.resolve()}
        )
    worker = ModelWorker(engine, options.max_queue)
    try:
        length = PromptLength(engine, options.max_prompt_tokens)
    except InvalidSetting as error:
        raise ValueError(str(error)) from error

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="mllm_crossget", description=__doc__, version="1", lifespan=lifespan)
    app.state.worker = worker
    app.state.engine = engine
    app.state.options = options

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            ApiError(error.status_code, str(error.detail)).body(), error.status_code
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(ApiError(500, f"{type(error).__name__}: {error}").body(), 500)

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip(), options.api_key):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.name,
            "default": engine.default.describe(),
            "queued": worker.pending,
            "served": worker.served,
            "failed": worker.failed,
            "cancelled": worker.cancelled,
            "max_prompt_tokens": length.limit,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        card = {"id": engine.name, "object": "model", "created": 0, "owned_by": "mllm_crossget"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        content_type = request.headers.get("content-type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(
                415,
                f"Content-Type must be application/json, got {content_type or 'none'!r} (with "
                "curl: -H 'Content-Type: application/json')",
                "unsupported_media_type",
            )
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > options.max_request_bytes:
            raise ApiError(413, f"request body over {options.max_request_bytes} bytes")
        body = await request.body()
        if len(body) > options.max_request_bytes:
            raise ApiError(413, f"request body over {options.max_request_bytes} bytes")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"body is not valid JSON: {error}", "invalid_json") from error
        try:
            chat = ChatRequest.model_validate(payload)
        except ValidationError as error:
            raise ApiError(400, _validation_message(error), "invalid_schema") from error
        if chat.model != engine.name:
            raise ApiError(
                404,
                f"model {chat.model!r} not found; this server serves {engine.name!r}",
                "model_not_found",
            )
        try:
            setting = resolve_setting(chat.crossget, engine.default)
        except InvalidSetting as error:
            raise ApiError(400, str(error), "invalid_crossget") from error
        sampling = sampling_for(chat, options)
        messages = await run_in_threadpool(to_chat_messages, chat, options)
        total = await run_in_threadpool(length.check, messages, setting)
        room = length.answer_room(total)
        if room is not None and sampling.max_new_tokens > room:  # the positions end there
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        cancel = threading.Event()
        events = worker.submit(messages, setting, sampling, chat.stream, cancel)

        async def next_event() -> _Event | None:
            """The job's next event, or None when the client has gone (job cancelled)."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancel.set()
                        logger.info("client disconnected: request cancelled")
                        return None

        try:
            first = await next_event()
        except BaseException:
            cancel.set()  # e.g. cancelled at shutdown while queued
            raise
        if first is None:
            return Response(status_code=499)  # nobody is listening
        if first.kind == "invalid":
            raise ApiError(400, first.payload, "invalid_crossget")
        if first.kind == "error":
            raise ApiError(500, first.payload)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            stream = _stream(events, cancel, request_id, engine.name, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            while True:
                event = await next_event()
                if event is None:
                    return Response(status_code=499)
                if event.kind == "done":
                    return _completion(request_id, engine.name, event.payload)
                if event.kind == "error":
                    raise ApiError(500, event.payload)
        finally:
            cancel.set()  # the client left (or we are done): stop generating

    return app


async def _stream(
    events: asyncio.Queue[_Event],
    cancel: threading.Event,
    request_id: str,
    model: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """OpenAI's chunk sequence: role, content pieces, finish_reason, [usage], [DONE]."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
            **extra,
        }

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event.kind == "text":
                yield _sse(chunk({"content": event.payload}))
            elif event.kind == "done":
                result: GenerationResult = event.payload
                yield _sse(chunk({}, result.finish_reason, crossget=_crossget_info(result)))
                if include_usage:
                    final = chunk({}) | {"choices": [], "usage": _usage(result)}
                    yield _sse(final)
                break
            elif event.kind in ("error", "invalid"):
                yield _sse(ApiError(500, str(event.payload)).body())
                break
        yield _sse("[DONE]")
    finally:
        cancel.set()


# ----------------------------------------------------------------------------- running it
class BackgroundServer:
    """uvicorn in a daemon thread on a free loopback port: for tests and benchmarks.

    ``with BackgroundServer(app) as server: openai.OpenAI(base_url=server.url + "/v1")``
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def _bytes(text: str) -> int:
    """``20MiB``, ``500k``, ``1048576`` -> bytes."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"k": 1024, "m": MIB, "g": 1024 * MIB}.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in "kmg" else value
    try:
        return int(float(number) * scale)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget serve",
        description="OpenAI-compatible chat-completions server for one LLaVA model with "
        "CrossGET (POST /v1/chat/completions, GET /v1/models, GET /health). Per request: "
        '"crossget": {"visual_tokens": K, "method": NAME} (or "full").',
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients put in 'model' (default: 'reference' or the folder's name)",
    )
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*"
    )
    parser.add_argument(
        "--allow-local-files",
        type=Path,
        default=None,
        metavar="ROOT",
        help="accept image_url paths / file:// URLs inside ROOT (off by default: 403)",
    )
    parser.add_argument(
        "--max-image-bytes", type=_bytes, default=20 * MIB, help="per image (default 20MiB)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="width x height per image (default 4096*4096)",
    )
    parser.add_argument(
        "--max-request-bytes", type=_bytes, default=64 * MIB, help="request body limit (64MiB)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="answer length when a request sets none"
    )
    parser.add_argument(
        "--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask"
    )
    parser.add_argument(
        "--max-queue", type=int, default=256, help="queued requests before 503 (default 256)"
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt, text plus visual tokens, a request may send (400 past it, "
        "before any model work; default: the model's positions, e.g. 1024 for the reference "
        "model; at most that)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="on SIGTERM/Ctrl-C: seconds requests in flight get to finish before they are "
        "cancelled and the server exits (default 10)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(
            f"crossget serve: warning: binding {args.host} exposes the model beyond this "
            "machine" + ("" if args.api_key else "; consider --api-key"),
            file=sys.stderr,
        )
    if args.allow_local_files is not None and not args.allow_local_files.is_dir():
        print(
            f"crossget serve: --allow-local-files {args.allow_local_files} is not a folder",
            file=sys.stderr,
        )
        return 2
    try:
        engine = engine_from_args(args, args.served_model_name)
    except (OSError, InvalidSetting) as error:
        print(f"crossget serve: {error}", file=sys.stderr)
        return 2
    options = ServerOptions(
        api_key=args.api_key,
        allow_local_files=args.allow_local_files,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_request_bytes=args.max_request_bytes,
        max_new_tokens=args.max_new_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        print("crossget serve: --max-prompt-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        app = create_app(engine, options)
    except ValueError as error:
        print(f"crossget serve: {error}", file=sys.stderr)
        return 2
    import uvicorn

    print(
        f"crossget serve: {engine.name} ({engine.default.describe()}) on "
        f"http://{args.host}:{args.port}/v1",
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(args.shutdown_grace, 0.0),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
