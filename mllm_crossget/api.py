"""The public entry points: apply, remove, budget, num_visual_tokens, alignment_loss, save/load."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import blip2, hf_clip, hf_clip_model, llava
from .adapters import open_clip as open_clip_adapter
from .adapters.family import Family
from .config import CrossGETConfig, atomic_output
from .cross_tokens import CrossTokens, unwrap_cross_tokens
from .peers import fastv
from .planner import TowerPlanner
from .processing import adjust_processor, restore_processor

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
# Registry keyed by class *name*, so no model class needs importing to check support.
SUPPORTED_MODELS: tuple[str, ...] = (
    "LlavaForConditionalGeneration",
    "CLIPVisionModel",
    "Blip2ForConditionalGeneration",
    "InstructBlipForConditionalGeneration",
    "CLIPModel",
    "open_clip.CLIP",  # qualified: "CLIP" alone is too common a class name
)
# Families that describe themselves with an ``adapters.family.Family`` record.
_FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
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


def _feature_layers_run(num_layers: int, feature_layer: int) -> int:
    """Encoder layers needed for hidden state ``feature_layer`` (index 0 = embeddings)."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} out of range for {num_layers}")
    return feature_layer % (num_layers + 1)


def _planner(model: nn.Module, config: CrossGETConfig) -> TowerPlanner:
    family = _family(model)
    if family == "LlavaForConditionalGeneration":
        vision_config = model.config.vision_config
        feature_layer = model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise ValueError(
                f"CrossGET supports a single vision_feature_layer, this model uses {feature_layer}"
            )
        layers_run = _feature_layers_run(vision_config.num_hidden_layers, feature_layer)
        strategy = model.config.vision_feature_select_strategy
        dropped = 1 if strategy == "default" else 0
    else:
        vision_config = model.config
        layers_run, dropped = vision_config.num_hidden_layers, 0
    if config.first_merge_layer >= layers_run:
        raise ValueError(
            f"first_merge_layer={config.first_merge_layer} leaves no merging layer: the tower "
            f"runs {layers_run} layers"
        )
    return TowerPlanner(
        config=config,
        patch_size=vision_config.patch_size,
        layers_run=layers_run,
        dropped_tokens=dropped,
    )


def _check_attention(model: nn.Module, config: CrossGETConfig) -> None:
    vision_config = getattr(model.config, "vision_config", model.config)
    implementation = getattr(vision_config, "_attn_implementation", None) or "eager"
    if implementation.startswith("flash") and (
        (config.merges_in_encoder and config.proportional_attention) or config.uses_cross_token
    ):
        raise ValueError(
            f"the vision tower uses attn_implementation={implementation!r}, which cannot take "
            "the proportional-attention bias or the cross-token mask; load it with "
            "attn_implementation='sdpa' (or 'eager'), or use proportional_attention=False and "
            "guidance='none'"
        )
    if config.uses_cross_token and config.guidance == "attention" and implementation != "eager":
        raise ValueError(
            "guidance='attention' needs full attention probabilities: load the model with "
            "attn_implementation='eager', or use guidance='cross' (works with SDPA)"
        )


def apply(
    model: nn.Module, config: CrossGETConfig, processor: Any = None
) -> nn.Module | tuple[nn.Module, Any]:
    """Make ``model`` merge visual tokens; returns the model (and the adjusted processor).

    Idempotent: applying again replaces the previous configuration (learned cross tokens are
    kept when their shapes still fit).  Supported: ``LlavaForConditionalGeneration`` with a
    CLIP tower, a bare ``CLIPVisionModel``, ``Blip2ForConditionalGeneration``,
    ``InstructBlipForConditionalGeneration`` (their processors need no change: the LLM still
    reads ``num_query_tokens``), HF ``CLIPModel`` and open_clip ``CLIP`` (image tower by the
    budget, text tower by ``config.text_r``).
    """
    if not isinstance(config, CrossGETConfig):
        raise TypeError(f"config must be a CrossGETConfig, got {type(config).__name__}")
    config.validate()
    family = _family(model)
    if not config.merges_in_encoder and family != "LlavaForConditionalGeneration":
        raise ValueError(
            f"method={config.method!r} (mllm_crossget.peers) is implemented for LLaVA models "
            f"only; {family} supports the merging methods crossget and tome"
        )
    if (
        config.merges_in_encoder
        and config.guidance == "text"
        and (family != "LlavaForConditionalGeneration")
    ):
        raise ValueError(
            f"guidance='text' compares visual tokens with the prompt in a LLaVA LLM's input "
            f"space; {family} has no such prompt: use guidance='cross' or 'none'"
        )
    if family in _FAMILIES:
        return _apply_family(_FAMILIES[family], model, config, processor)
    _check_attention(model, config)
    if config.method == "fastv":
        fastv.check(model.model.language_model, config.fastv_layer)
    planner = _planner(model, config)
    # Validate the budget now, on the model's own image size, not at the first forward.
    vision_config = getattr(model.config, "vision_config", model.config)
    planner.visual_tokens(vision_config.image_size, vision_config.image_size)

    holder = _tokens_holder(model, family)
    previous = getattr(holder, TOKENS_ATTR, None)
    if is_applied(model):
        remove(model)
    tokens = _build_tokens(model, family, planner, config)
    if previous is not None and _same_shapes(unwrap_cross_tokens(previous), tokens):
        tokens.load_state_dict(unwrap_cross_tokens(previous).state_dict())
    holder.add_module(TOKENS_ATTR, tokens)
    if family == "LlavaForConditionalGeneration":
        llava.patch_llava(model, config, planner)
    else:
        runtime = hf_clip.ClipRuntime(
            config=config, num_layers=len(model.encoder.layers), plan_for=planner.plan_for_length
        )
        hf_clip.patch_clip_encoder(model.encoder, runtime)
    model.crossget_config = config
    model.crossget_planner = planner
    if processor is not None:
        return model, adjust_processor(processor, planner)
    return model


def _apply_family(
    family: Family, model: nn.Module, config: CrossGETConfig, processor: Any
) -> nn.Module | tuple[nn.Module, Any]:
    """``apply`` for self-describing families (their processors need no change)."""
    family.check(model, config)
    planner = family.planner(model, config)
    planner.visual_tokens(*family.image_size(model))  # validate the budget now
    holder = family.holder(model)
    previous = getattr(holder, TOKENS_ATTR, None)
    if is_applied(model):
        remove(model)
    reference = next(model.parameters())
    tokens = family.build_tokens(model, planner, config).to(reference.device, torch.float32)
    if previous is not None and _same_shapes(unwrap_cross_tokens(previous), tokens):
        tokens.load_state_dict(unwrap_cross_tokens(previous).state_dict())
    holder.add_module(TOKENS_ATTR, tokens)
    family.patch(model, config, planner)
    model.crossget_config = config
    model.crossget_planner = planner
    return model if processor is None else (model, processor)


def _tokens_holder(model: nn.Module, family: str) -> nn.Module:
    """The submodule that owns ``crossget_tokens``: it reads them in its own forward, so a
    copied model (``copy.deepcopy``) uses its own copy."""
    if family in _FAMILIES:
        return _FAMILIES[family].holder(model)
    return model.model if family == "LlavaForConditionalGeneration" else model.encoder


def cross_tokens(model: nn.Module) -> CrossTokens:
    """The model's learnable cross tokens (peft's trainable copy when it wraps them)."""
    _require_applied(model)
    return unwrap_cross_tokens(getattr(_tokens_holder(model, _family(model)), TOKENS_ATTR))


def _build_tokens(
    model: nn.Module, family: str, planner: TowerPlanner, config: CrossGETConfig
) -> CrossTokens:
    vision_config = getattr(model.config, "vision_config", model.config)
    text_layers = text_width = 0
    if family == "LlavaForConditionalGeneration":
        text_config = model.config.text_config
        text_width = text_config.hidden_size
        text_layers = text_config.num_hidden_layers if config.text_cross_tokens else 0
    reference = next(model.parameters())
    tokens = CrossTokens(
        vision_layers=planner.layers_run,
        vision_width=vision_config.hidden_size,
        text_layers=text_layers,
        text_width=text_width,
        query_guidance=config.guidance == "query",
    )
    return tokens.to(device=reference.device, dtype=torch.float32)


def _same_shapes(first: nn.Module, second: nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def is_applied(model: nn.Module) -> bool:
    return hasattr(model, "crossget_config")


def remove(model: nn.Module, processor: Any = None) -> nn.Module:
    """Undo :func:`apply`: original classes back, hooks and cross tokens gone."""
    if processor is not None:
        restore_processor(processor)
    if not is_applied(model):
        return model
    if _family(model) in _FAMILIES:
        _FAMILIES[_family(model)].unpatch(model)
    elif _family(model) == "LlavaForConditionalGeneration":
        llava.unpatch_llava(model)
    else:
        hf_clip.unpatch_clip_encoder(model.encoder)
    holder = _tokens_holder(model, _family(model))
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
    """Exact number of visual tokens an image of ``image_size`` yields under the config."""
    _require_applied(model)
    if image_size is None and _family(model) in _FAMILIES:
        image_size = _FAMILIES[_family(model)].image_size(model)
    elif image_size is None:
        image_size = getattr(model.config, "vision_config", model.config).image_size
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return model.crossget_planner.visual_tokens(height, width, visual_tokens)


@contextlib.contextmanager
def budget(visual_tokens: int | Sequence[int]) -> Iterator[None]:
    """Per-call budgets (one int, or one per image) for the processor and the model alike.

    ``with crossget.budget([64, 144, 64]): inputs = processor(...); model.generate(**inputs)``
    """
    token = llava.BUDGET_OVERRIDE.set(
        visual_tokens if isinstance(visual_tokens, int) else list(visual_tokens)
    )
    try:
        yield
    finally:
        llava.BUDGET_OVERRIDE.reset(token)


def alignment_loss(model: nn.Module) -> Tensor:
    """Symmetric JS alignment loss between vision and text cross tokens of the last forward."""
    _require_applied(model)
    if _family(model) in _FAMILIES:
        return _FAMILIES[_family(model)].alignment_loss(model)
    if _family(model) != "LlavaForConditionalGeneration":
        raise RuntimeError(
            f"alignment_loss pairs vision and text cross tokens of a LLaVA model; "
            f"{type(model).__name__} has no language side"
        )
    inner = model.model
    return llava.alignment_loss(inner._crossget_llava, inner.multi_modal_projector)


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
