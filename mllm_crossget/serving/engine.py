"""One loaded LLaVA model behind a lock: CrossGET settings, prompts and streamed generation.

``crossget chat`` and ``crossget serve`` share this, so the terminal and the HTTP API build
prompts, switch budgets and count tokens the same way. Generation runs in a helper thread that
feeds a ``TextIteratorStreamer``; the caller receives text pieces through a callback while the
engine lock is held, so two requests never touch the model (or its swapped classes) at once.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import mllm_crossget as crossget
from mllm_crossget import named_models
from mllm_crossget.config import budget_error
from mllm_crossget.peers import METHOD_NAMES

__all__ = [
    "FULL",
    "REFERENCE_PROMPT",
    "ChatMessage",
    "Engine",
    "GenerationResult",
    "InvalidSetting",
    "Sampling",
    "Setting",
    "add_model_arguments",
    "build_prompt",
    "engine_from_args",
    "load_model",
    "make_setting",
    "parse_budget",
]

FULL = "full"
# The testbed reference model's format (eval/testbed/model.py); used when the processor has no
# chat template. Later turns repeat the USER/ASSISTANT part, answers end with the EOS token.
REFERENCE_PROMPT = "<image>\nUSER: {question} ASSISTANT:"
METHODS: tuple[str, ...] = (FULL, *METHOD_NAMES)


class InvalidSetting(ValueError):
    """The request cannot run as asked (budget out of range, bad method, too many images).

    Raised before any token is generated, so a server can answer 400 instead of 500.
    """


@dataclass(frozen=True)
class Setting:
    """Which token reduction to use: ``method='full'`` leaves the model untouched."""

    method: str = FULL
    visual_tokens: int | None = None

    def describe(self) -> str:
        if self.method == FULL:
            return "full (CrossGET off)"
        return f"{self.method} K={self.visual_tokens}"


def parse_budget(text: str) -> int | None:
    """``'full'``/``'off'``/``'none'`` -> None (CrossGET off), digits >= 1 -> int; anything
    else, 0 included, is an error with the message the API and the server give."""
    value = text.strip().lower()
    if value in (FULL, "off", "none"):
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidSetting(budget_error(int(value) if value.isdigit() else text, "budget"))
    return int(value)


def make_setting(method: str, visual_tokens: int | None) -> Setting:
    """Normalise a (method, budget) pair; a reduction method without a budget is an error."""
    method = method.strip().lower()
    if method not in METHODS:
        raise InvalidSetting(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == FULL:
        return Setting()
    if visual_tokens is None:
        raise InvalidSetting(f"method={method!r} needs a visual-token budget")
    if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, int) or visual_tokens < 1:
        raise InvalidSetting(budget_error(visual_tokens))
    return Setting(method=method, visual_tokens=visual_tokens)


@dataclass
class ChatMessage:
    """One turn: ``role`` is system, user or assistant; images belong to user turns."""

    role: str
    text: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    """Decoding options; ``temperature`` 0 or None is greedy (the reproducible default)."""

    max_new_tokens: int = 128
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    setting: Setting
    first_token_s: float | None  # from the start of the request, prefill included
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token (the first one is prefill, see first_token_s)."""
        if self.first_token_s is None or self.completion_tokens < 2:
            return 0.0
        decode = self.total_s - self.first_token_s
        return (self.completion_tokens - 1) / decode if decode > 0 else 0.0


def load_model(
    name: str = "reference", dtype: str = "fp32", device: str = "cpu"
) -> tuple[Any, Any]:
    """A named model (``reference``, see :mod:`mllm_crossget.named_models`), a local folder or
    a hub id.

    Raises ``FileNotFoundError``/``OSError`` with a message a command line can print as is.
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    return named_models.load_llava(name, dtype=dtypes[dtype], device=device)


def default_model_name(name: str) -> str:
    """What clients put in ``model``: a folder's own name, else the name as given."""
    path = Path(name)
    return path.name if named_models.get(name) is None and path.is_dir() else name


def build_prompt(processor: Any, messages: Sequence[ChatMessage]) -> str:
    """The processor's chat template when it has one, else the reference format.

    Reference format: ``<image>\\nUSER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:``, each image
    placeholder before the user turn that carries it, a system text first.
    """
    if getattr(processor, "chat_template", None):
        conversation = []
        for message in messages:
            content: list[dict[str, str]] = [{"type": "image"} for _ in message.images]
            content.append({"type": "text", "text": message.text})
            conversation.append({"role": message.role, "content": content})
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", "<image>")
    eos = processor.tokenizer.eos_token or ""
    parts: list[str] = []
    for message in messages:
        if message.role == "system":
            parts.append(f"{message.text}\n")
        elif message.role == "user":
            images = f"{image_token}\n" * len(message.images)
            parts.append(f"{images}USER: {message.text} ASSISTANT:")
        else:
            parts.append(f" {message.text}{eos}")
    return "".join(parts)


@functools.cache
def _counting_streamer_class() -> type:
    """A ``TextIteratorStreamer`` that also notes when the first new token arrived, how many
    came and the last one (EOS means finish_reason 'stop'); built lazily to keep imports light."""
    from transformers import TextIteratorStreamer

    class CountingStreamer(TextIteratorStreamer):
        first_token_time: float | None = None
        count = 0
        last_token: int | None = None

        def put(self, value: torch.Tensor) -> None:
            if not self.next_tokens_are_prompt:
                tokens = value.reshape(-1).tolist()
                if self.first_token_time is None:
                    self.first_token_time = time.perf_counter()
                self.count += len(tokens)
                self.last_token = tokens[-1] if tokens else self.last_token
            super().put(value)

    return CountingStreamer


class _StopScanner:
    """Cuts the text at the first stop string, holding back a tail that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return "" if self.stopped else text


class Engine:
    """A model, its processor and the CrossGET setting currently applied to them.

    ``generate`` holds the lock for the whole request, so concurrent callers queue up. A
    different budget with the same method runs under ``crossget.budget(K)``; a different
    method re-applies CrossGET (cheap: classes are swapped, no weights move).
    """

    def __init__(
        self, model: Any, processor: Any, name: str, default: Setting | None = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.default = default or Setting()
        self.lock = threading.Lock()
        self._applied: str = FULL
        self.check(self.default)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def _configure(self, setting: Setting) -> None:
        """Apply ``setting``'s method (not its budget, which comes from the context)."""
        if setting.method == self._applied:
            return
        try:
            if setting.method == FULL:
                crossget.remove(self.model, self.processor)
            else:
                config = crossget.CrossGETConfig(
                    visual_tokens=setting.visual_tokens, method=setting.method
                )
                crossget.apply(self.model, config, self.processor)
        except (ValueError, TypeError) as error:
            # apply validates before it swaps anything, but do not trust a half state.
            self._applied = "?"
            raise InvalidSetting(str(error)) from error
        self._applied = setting.method

    def visual_tokens(self, setting: Setting) -> int:
        """Visual tokens per image at the model's image size; raises InvalidSetting."""
        with self.lock:
            return self._visual_tokens_locked(setting)

    def _visual_tokens_locked(self, setting: Setting) -> int:
        self._configure(setting)
        vision = self.model.config.vision_config
        if setting.method == FULL:
            patches = (vision.image_size // vision.patch_size) ** 2
            strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
            return patches if strategy == "default" else patches + 1
        try:
            return crossget.num_visual_tokens(self.model, self.image_size, setting.visual_tokens)
        except ValueError as error:
            raise InvalidSetting(str(error)) from error

    def check(self, setting: Setting) -> int:
        """Validate a setting now (at startup, on ``/budget``) rather than at the next request."""
        return self.visual_tokens(setting)

    def _budget_context(self, setting: Setting) -> contextlib.AbstractContextManager[None]:
        if setting.method == FULL:
            return contextlib.nullcontext()
        return crossget.budget(int(setting.visual_tokens or 0))

    def _prepare(self, messages: Sequence[ChatMessage]) -> tuple[dict[str, Any], list[int]]:
        images = [image.convert("RGB") for m in messages for image in m.images]
        prompt = build_prompt(self.processor, messages)
        try:
            inputs = self.processor(
                images=images or None, text=[prompt], return_tensors="pt", padding=False
            )
        except ValueError as error:
            raise InvalidSetting(str(error)) from error
        ids = inputs["input_ids"][0]
        image_id = self.model.config.image_token_id
        runs = _runs(ids.eq(image_id).tolist())
        return inputs.to(self.model.device), runs

    def generate(
        self,
        messages: Sequence[ChatMessage],
        setting: Setting | None = None,
        sampling: Sampling | None = None,
        on_start: Callable[[int, list[int]], None] | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Run one request under the lock; ``on_start(prompt_tokens, visual_tokens)`` fires
        once the prompt is built (after it, errors are the model's, not the request's) and
        ``on_text`` with each decoded piece. ``cancel`` stops generation at the next token."""
        setting = self.default if setting is None else setting
        sampling = sampling or Sampling()
        started = time.perf_counter()
        with self.lock, self._budget_context(setting):
            self._configure(setting)
            if setting.method != FULL:
                self._visual_tokens_locked(setting)  # clear message for a bad budget
            inputs, visual = self._prepare(messages)
            prompt_tokens = int(inputs["input_ids"].shape[1])
            if on_start is not None:
                on_start(prompt_tokens, visual)
            streamer, stopper = self._start(inputs, sampling, cancel)
            scanner = _StopScanner(sampling.stop)
            pieces: list[str] = []
            try:
                for piece in itertools.chain(streamer.iterator, [None]):
                    text = scanner.flush() if piece is None else scanner.feed(piece)
                    if scanner.stopped:
                        stopper.set()
                    if text:
                        pieces.append(text)
                        if on_text is not None:
                            on_text(text)
            except BaseException:
                stopper.set()  # e.g. Ctrl-C in the chat: stop at the next token
                raise
            finally:
                streamer.thread.join()  # never release the lock while the model still runs
            if streamer.error is not None:
                raise streamer.error
        counting = streamer.counting
        finished = time.perf_counter()
        eos = _eos_ids(self.model, self.processor)
        stopped = scanner.stopped or (counting.last_token in eos)
        first = None if counting.first_token_time is None else counting.first_token_time - started
        return GenerationResult(
            text="".join(pieces),
            prompt_tokens=prompt_tokens,
            completion_tokens=counting.count,
            visual_tokens=visual,
            finish_reason="stop" if stopped else "length",
            setting=setting,
            first_token_s=first,
            total_s=finished - started,
        )

    def _start(
        self, inputs: dict[str, Any], sampling: Sampling, cancel: threading.Event | None
    ) -> tuple[_Running, threading.Event]:
        """Start ``generate`` in a thread that carries this context (so the budget applies)."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = threading.Event()

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> Any:
                halt = stop.is_set() or (cancel is not None and cancel.is_set())
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool)

        counting = _counting_streamer_class()(
            self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        tokenizer = self.processor.tokenizer
        options: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "streamer": counting,
            "stopping_criteria": StoppingCriteriaList([Stop()]),
        }
        if tokenizer.pad_token_id is not None:
            options["pad_token_id"] = tokenizer.pad_token_id
        if sampling.temperature:
            options.update(do_sample=True, temperature=sampling.temperature)
            if sampling.top_p is not None:
                options["top_p"] = sampling.top_p
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        running = _Running(counting)

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, **options)
            except Exception as error:  # re-raised in the caller's thread
                running.error = error
                counting.end()  # unblock the iterator

        context = contextvars.copy_context()
        running.thread = threading.Thread(
            target=context.run, args=(work,), name="crossget-generate", daemon=True
        )
        running.thread.start()
        return running, stop


@dataclass
class _Running:
    counting: Any
    thread: threading.Thread = field(default_factory=threading.Thread)
    error: BaseException | None = None

    @property
    def iterator(self) -> Iterator[str]:
        return iter(self.counting)


def _runs(mask: list[bool]) -> list[int]:
    """Lengths of consecutive True runs: one per image's placeholders."""
    runs: list[int] = []
    previous = False
    for flag in mask:
        if flag and previous:
            runs[-1] += 1
        elif flag:
            runs.append(1)
        previous = flag
    return runs


def _eos_ids(model: Any, processor: Any) -> set[int]:
    ids: set[int] = set()
    for value in (model.generation_config.eos_token_id, processor.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``crossget chat`` and ``crossget serve`` share: which model, which setting."""
    parser.add_argument(
        "--model",
        default="reference",
        help="a named model (reference: the testbed model in eval/testbed/reference_model; "
        "default), a local LLaVA folder, or a hub id",
    )
    parser.add_argument(
        "--budget",
        default=FULL,
        help="visual tokens per image, or 'full' for CrossGET off (default: full)",
    )
    parser.add_argument(
        "--method",
        default="crossget",
        choices=METHOD_NAMES,
        help="token-reduction method used when --budget is a number (default: crossget)",
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="weights' precision: fp32 (default; the reference on CPU), bf16 or fp16 (half "
        "the memory, faster on a GPU; fp16 is slow or unsupported on many CPUs)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def engine_from_args(args: argparse.Namespace, name: str | None = None) -> Engine:
    """Load the model named by ``args`` and validate its CrossGET setting (raises with a
    message: FileNotFoundError/OSError for the model, InvalidSetting for the budget)."""
    budget = parse_budget(args.budget)
    setting = Setting() if budget is None else make_setting(args.method, budget)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device)
    return Engine(model, processor, name or default_model_name(args.model), setting)
