"""The public entry points: apply, remove, budget, num_visual_tokens, alignment_loss, save/load."""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import blip2, hf_clip, hf_clip_model, llava, llava_tiled
from .adapters import open_clip as open_clip_adapter
from .adapters.family import Family
from .config import CrossGETConfig, atomic_output, budget_error
from .cross_tokens import CrossTokens, unwrap_cross_tokens
from .processing import processor_image_size, restore_processor

__all__ = [
    "SUPPORTED_MODELS",
    "alignment_loss",
    "apply",
    "budget",
    "cross_tokens",
    "from_pretrained",
    "is_applied",
    "num_visual_tokens",
    "remove",
    "save_pretrained",
]

TOKENS_ATTR = "crossget_tokens"
TOKENS_FILE = "crossget_tokens.safetensors"
# A weak reference to the processor that ``apply`` adjusted, so ``remove(model)`` restores it.
PROCESSOR_ATTR = "_crossget_processor"
# Registry keyed by class *name*, so no model class needs importing to check support.
SUPPORTED_MODELS: tuple[str, ...] = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "CLIPVisionModel",
    "Blip2ForConditionalGeneration",
    "InstructBlipForConditionalGeneration",
    "CLIPModel",
    "open_clip.CLIP",  # qualified: "CLIP" alone is too common a class name
)
# Every family describes itself with an ``adapters.family.Family`` record.
_FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        llava.LLAVA,
        llava_tiled.LLAVA_NEXT,
        llava_tiled.LLAVA_ONEVISION,
        hf_clip.CLIP_VISION,
        blip2.BLIP2,
        blip2.INSTRUCTBLIP,
        hf_clip_model.HF_CLIP,
        open_clip_adapter.OPEN_CLIP,
    )
}


def _family(model: nn.Module) -> str:
    name = type(model).__name__
    for candidate in type(model).__mro__:
        if candidate.__name__ in SUPPORTED_MODELS:
            return candidate.__name__
        qualified = f"{candidate.__module__.partition('.')[0]}.{candidate.__name__}"
        if qualified in SUPPORTED_MODELS:
            return qualified
    raise TypeError(
        f"CrossGET does not support {name}; supported model classes: {', '.join(SUPPORTED_MODELS)}"
    )


def apply(
    model: nn.Module, config: CrossGETConfig, processor: Any = None
) -> nn.Module | tuple[nn.Module, Any]:
    """Make ``model`` merge visual tokens; returns the model (and the adjusted processor).

    Idempotent: applying again replaces the previous configuration (learned cross tokens are
    kept when their shapes still fit).  Supported: ``LlavaForConditionalGeneration`` with a
    CLIP, SigLIP or DINOv2 tower, ``LlavaNextForConditionalGeneration`` and
    ``LlavaOnevisionForConditionalGeneration`` (a budget per image split over its tiles, see
    ``adapters.llava_tiled``), a bare ``CLIPVisionModel``, ``Blip2ForConditionalGeneration``,
    ``InstructBlipForConditionalGeneration`` (their processors need no change: the LLM still
    reads ``num_query_tokens``), HF ``CLIPModel`` and open_clip ``CLIP`` (image tower by the
    budget, text tower by ``config.text_r``).  Each family is one ``adapters.family.Family``
    record; every ViT layer runs through ``adapters.vit_layer``.
    """
    if not isinstance(config, CrossGETConfig):
        raise TypeError(f"config must be a CrossGETConfig, got {type(config).__name__}")
    config.validate()
    family = _FAMILIES[_family(model)]
    if not config.merges_in_encoder and not family.supports_peers:
        raise ValueError(
            f"method={config.method!r} (mllm_crossget.peers) is implemented for "
            f"LlavaForConditionalGeneration (one tower pass per image) only; {family.name} "
            "supports the merging methods crossget and tome"
        )
    if (
        config.merges_in_encoder
        and config.guidance == "text"
        and family.name != "LlavaForConditionalGeneration"
    ):
        raise ValueError(
            f"guidance='text' compares visual tokens with the prompt in a LLaVA LLM's input "
            f"space; {family.name} has no such prompt: use guidance='cross' or 'none'"
        )
    if config.cross_token_to_llm and family.name != "LlavaForConditionalGeneration":
        raise ValueError(
            f"cross_token_to_llm hands the vision cross token to a LLaVA-1.5 LLM (one tower "
            f"pass per image); {family.name} does not support it: set cross_token_to_llm=False "
            "(cross_token_attended works with every family)"
        )
    if config.llm_proportional_attention and family.name != "LlavaForConditionalGeneration":
        raise ValueError(
            f"llm_proportional_attention adds log(size) to a LLaVA-1.5 LLM's visual keys; "
            f"{family.name} does not support it: leave llm_proportional_attention at None"
        )
    if config.llm_keep_ratio is not None and family.name != "LlavaForConditionalGeneration":
        raise ValueError(
            f"llm_keep_ratio prunes visual tokens inside a LLaVA-1.5 LLM (one tower pass per "
            f"image); {family.name} does not support it: leave llm_keep_ratio at None"
        )
    family.check(model, config)
    planner = family.planner(model, config)
    # Validate the budget now, at the size the processor feeds (else the config's).
    size = (processor_image_size(processor) if processor is not None else None) or (
        family.image_size(model)
    )
    planner.visual_tokens(*size)
    _warn_if_r_clamped(planner, *size)
    holder = family.holder(model)
    previous = getattr(holder, TOKENS_ATTR, None)
    processor = processor if processor is not None else _adjusted_processor(model)
    if is_applied(model):
        _unpatch(model)
    reference = next(model.parameters())
    tokens = family.build_tokens(model, planner, config).to(reference.device, torch.float32)
    if previous is not None and _same_shapes(unwrap_cross_tokens(previous), tokens):
        tokens.load_state_dict(unwrap_cross_tokens(previous).state_dict())
    holder.add_module(TOKENS_ATTR, tokens)
    family.patch(model, config, planner)
    model.crossget_config = config
    model.crossget_planner = planner
    if processor is None:
        return model
    if family.adjust_processor is not None:
        processor = family.adjust_processor(processor, planner)
        setattr(model, PROCESSOR_ATTR, weakref.ref(processor))
    return model, processor


def _adjusted_processor(model: nn.Module) -> Any:
    """The processor an earlier ``apply`` adjusted for ``model``, if it still is and lives."""
    reference = getattr(model, PROCESSOR_ATTR, None)
    processor = reference() if reference is not None else None
    planner = getattr(model, "crossget_planner", None)
    if processor is None or getattr(processor, "_crossget_planner", None) is not planner:
        return None
    return processor


def _warn_if_r_clamped(planner: Any, height: int, width: int) -> None:
    """``r`` asks each layer to merge r tokens; a layer merges at most half of its unprotected
    tokens. Say so when the schedule asks for more, with the number of tokens that results."""
    config = planner.config
    if config.r is None or not config.merges_in_encoder:
        return
    from .schedule import max_merge_count

    if hasattr(planner, "tile"):  # tiled models: every tile runs the same tower plan
        planner, height, width = planner.tile, planner.tile_size, planner.tile_size
    n = planner.input_tokens(height, width)
    clamped = []
    for layer, r in enumerate(planner.layer_r(n)):
        allowed = max_merge_count(n, planner.num_protected)
        if r > allowed:
            clamped.append(f"layer {layer}: {r} -> {allowed}")
        n -= min(r, allowed)
    if clamped:
        shown = ", ".join(clamped[:3]) + (", ..." if len(clamped) > 3 else "")
        warnings.warn(
            f"r={config.r!r} asks more merges than the tower allows (a layer merges at most "
            f"half of its unprotected tokens); clamped in {len(clamped)} layers ({shown}): "
            f"{n - planner.dropped_tokens} visual tokens per {height}x{width} image. Give "
            "visual_tokens=K for an exact count",
            UserWarning,
            stacklevel=3,
        )


def cross_tokens(model: nn.Module) -> CrossTokens:
    """The model's learnable cross tokens (peft's trainable copy when it wraps them)."""
    _require_applied(model)
    return unwrap_cross_tokens(getattr(_FAMILIES[_family(model)].holder(model), TOKENS_ATTR))


def _same_shapes(first: nn.Module, second: nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def is_applied(model: nn.Module) -> bool:
    return hasattr(model, "crossget_config")


def remove(model: nn.Module, processor: Any = None) -> nn.Module:
    """Undo :func:`apply`: original classes back, hooks and cross tokens gone.

    The processor that ``apply`` adjusted is restored too, also when it is not passed here
    (``apply`` keeps a weak reference to it), so it emits the full placeholder count again.
    """
    adjusted = _adjusted_processor(model)
    if adjusted is not None:
        restore_processor(adjusted)
    if processor is not None:
        restore_processor(processor)
    if not is_applied(model):
        return model
    return _unpatch(model)


def _unpatch(model: nn.Module) -> nn.Module:
    """Original classes back, hooks and cross tokens gone (the processor is left alone)."""
    if hasattr(model, PROCESSOR_ATTR):
        delattr(model, PROCESSOR_ATTR)
    family = _FAMILIES[_family(model)]
    family.unpatch(model)
    holder = family.holder(model)
    if hasattr(holder, TOKENS_ATTR):
        delattr(holder, TOKENS_ATTR)
    del model.crossget_config
    del model.crossget_planner
    return model


def _require_applied(model: nn.Module) -> None:
    if not is_applied(model):
        raise RuntimeError("CrossGET is not applied to this model: call crossget.apply first")


def num_visual_tokens(
    model: nn.Module,
    image_size: int | tuple[int, int] | None = None,
    visual_tokens: int | None = None,
) -> int:
    """Exact number of visual tokens an image of ``image_size`` yields under the config.

    Default size: what the processor given to ``apply`` feeds, else the tower config's."""
    _require_applied(model)
    if image_size is None:
        adjusted = _adjusted_processor(model)
        fed = processor_image_size(adjusted) if adjusted is not None else None
        image_size = fed or _FAMILIES[_family(model)].image_size(model)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return model.crossget_planner.visual_tokens(height, width, visual_tokens)


def _check_budget_value(value: Any, where: str) -> int:
    """One per-call budget: an int >= 1. ``'full'`` and 0 are not budgets (see ``budget``)."""
    if isinstance(value, str) and value.strip().lower() in ("full", "off", "none"):
        raise ValueError(
            f"{where}={value!r}: 'full' (CrossGET off) is not a per-call budget; give K >= 1 "
            "visual tokens, or call crossget.remove(model, processor) to run the model unreduced "
            '(what `/budget full` in crossget chat and "visual_tokens": "full" in crossget '
            "serve do)"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(budget_error(value, where))
    return value


@contextlib.contextmanager
def budget(visual_tokens: int | Sequence[int]) -> Iterator[None]:
    """Per-call budgets (one int, or one per image) for the processor and the model alike.

    ``with crossget.budget([64, 144, 64]): inputs = processor(...); model.generate(**inputs)``

    Every budget is an int >= 1; a list gives one per image, in the order the images reach
    the processor, and must match their number. Running without reduction ("full") is a
    model-wide state, not a budget: ``crossget.remove(model, processor)``.
    """
    if isinstance(visual_tokens, (str, bytes)) or not isinstance(visual_tokens, Sequence):
        value: int | list[int] = _check_budget_value(visual_tokens, "crossget.budget")
    else:
        value = [
            _check_budget_value(v, f"crossget.budget[{i}]") for i, v in enumerate(visual_tokens)
        ]
        if not value:
            raise ValueError("crossget.budget got an empty list; give one budget per image")
    token = llava.BUDGET_OVERRIDE.set(value)
    try:
        yield
    finally:
        llava.BUDGET_OVERRIDE.reset(token)


def alignment_loss(model: nn.Module) -> Tensor:
    """Symmetric JS alignment loss between vision and text cross tokens of the last forward."""
    _require_applied(model)
    return _FAMILIES[_family(model)].alignment_loss(model)


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the CrossGET config (JSON) and cross-token weights (safetensors), atomically."""
    from safetensors.torch import save_file

    _require_applied(model)
    directory = Path(directory)
    model.crossget_config.save_pretrained(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in cross_tokens(model).state_dict().items()}
    with atomic_output(directory / TOKENS_FILE) as tmp:
        save_file(state, str(tmp))
    return directory


def from_pretrained(
    model: nn.Module, directory: str | os.PathLike[str], processor: Any = None
) -> nn.Module | tuple[nn.Module, Any]:
    """Apply the saved config to ``model`` and load the saved cross tokens."""
    from safetensors.torch import load_file

    config = CrossGETConfig.from_pretrained(directory)
    result = apply(model, config, processor)
    path = Path(directory) / TOKENS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}; save with crossget.save_pretrained(model, dir)")
    cross_tokens(model).load_state_dict(load_file(str(path)))
    return result
