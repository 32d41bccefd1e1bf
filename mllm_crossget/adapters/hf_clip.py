"""CrossGET inside Hugging Face ViT encoders that are called as a whole (a bare
``CLIPVisionModel``, BLIP-2's ViT), by swapping the class of each instance.

The encoder instance gets a subclass whose ``forward`` runs :func:`.vit_layer.run_encoder`
over its layers, which get :mod:`.vit_layer`'s merging subclasses; weights, state-dict keys
and the output-capture hooks are untouched, and ``remove`` restores the original classes.
Per-forward state — token sizes, the cross token, the plan — travels as arguments and return
values, never as module attributes, so gradient checkpointing recomputes exactly what ran.

The bare ``CLIPVisionModel`` family record lives here too: its cross tokens sit on the
encoder, every output token (CLS included) counts, and it has no language side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..config import CrossGETConfig
from ..cross_tokens import CrossTokens, unwrap_cross_tokens
from .family import Family, check_attention
from .vit_layer import (
    EncoderPlan,
    MergingEncoderOutput,
    patch_layers,
    run_encoder,
    unpatch_layers,
)

__all__ = [
    "CLIP_VISION",
    "ClipRuntime",
    "EncoderPlan",
    "MergingEncoderOutput",
    "patch_clip_encoder",
    "unpatch_clip_encoder",
]


def _merging_encoder_forward(
    self: nn.Module,
    inputs_embeds: Tensor,
    attention_mask: Tensor | None = None,
    *,
    crossget_plan: EncoderPlan | None = None,
    crossget_cross_offsets: Tensor | None = None,
    crossget_query_offset: Tensor | None = None,
    **kwargs: Any,
) -> MergingEncoderOutput:
    """Run the first ``plan.num_layers`` layers, merging as planned (see ``run_encoder``)."""
    runtime: ClipRuntime = self._crossget_runtime
    plan = crossget_plan if crossget_plan is not None else runtime.default_plan(inputs_embeds)
    if crossget_cross_offsets is None and hasattr(self, "crossget_tokens") and plan.merges:
        # A bare CLIP tower holds its cross tokens on the encoder itself.
        crossget_cross_offsets = unwrap_cross_tokens(self.crossget_tokens).vision_prompts
    return run_encoder(
        self.layers,
        inputs_embeds,
        plan,
        has_cls=True,
        cross_offsets=crossget_cross_offsets,
        query_offset=crossget_query_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


@dataclass
class ClipRuntime:
    """Configuration the patched encoder reads (never per-forward state)."""

    config: CrossGETConfig
    num_layers: int
    plan_for: Any  # Callable[[int], EncoderPlan]: input length -> plan
    original_classes: dict[type, type] = field(default_factory=dict)

    def default_plan(self, inputs_embeds: Tensor) -> EncoderPlan:
        return self.plan_for(inputs_embeds.shape[1])


_SUBCLASS_CACHE: dict[type, type] = {}


def _encoder_subclass(original: type) -> type:
    if original not in _SUBCLASS_CACHE:
        _SUBCLASS_CACHE[original] = type(
            f"CrossGET{original.__name__}", (original,), {"forward": _merging_encoder_forward}
        )
    return _SUBCLASS_CACHE[original]


def patch_clip_encoder(encoder: nn.Module, runtime: ClipRuntime) -> None:
    """Swap the classes of an HF encoder (``.layers``) and its layers; remember the originals."""
    if hasattr(encoder, "_crossget_runtime"):
        unpatch_clip_encoder(encoder)
    patch_layers(encoder.layers)
    original = type(encoder)
    patched = _encoder_subclass(original)
    runtime.original_classes[patched] = original
    encoder.__class__ = patched
    encoder._crossget_runtime = runtime


def unpatch_clip_encoder(encoder: nn.Module) -> None:
    runtime: ClipRuntime | None = getattr(encoder, "_crossget_runtime", None)
    if runtime is None:
        return
    unpatch_layers(encoder.layers)
    encoder.__class__ = runtime.original_classes.get(type(encoder), type(encoder))
    del encoder._crossget_runtime


# ------------------------------------------------------------------ bare CLIPVisionModel


def _planner(model: nn.Module, config: CrossGETConfig) -> Any:
    from ..planner import TowerPlanner

    layers = model.config.num_hidden_layers
    if config.first_merge_layer >= layers:
        raise ValueError(
            f"first_merge_layer={config.first_merge_layer} leaves no merging layer: the tower "
            f"runs {layers} layers"
        )
    return TowerPlanner(
        config=config, patch_size=model.config.patch_size, layers_run=layers, dropped_tokens=0
    )


def _check(model: nn.Module, config: CrossGETConfig) -> None:
    check_attention(model.config, config)


def _build_tokens(model: nn.Module, planner: Any, config: CrossGETConfig) -> CrossTokens:
    return CrossTokens(
        vision_layers=planner.layers_run,
        vision_width=model.config.hidden_size,
        query_guidance=config.guidance == "query",
    )


def _patch(model: nn.Module, config: CrossGETConfig, planner: Any) -> None:
    runtime = ClipRuntime(
        config=config, num_layers=len(model.encoder.layers), plan_for=planner.plan_for_length
    )
    patch_clip_encoder(model.encoder, runtime)


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = model.config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _no_alignment(model: nn.Module) -> Tensor:
    raise RuntimeError(
        f"alignment_loss pairs vision and text cross tokens of a LLaVA model; "
        f"{type(model).__name__} has no language side"
    )


CLIP_VISION = Family(
    name="CLIPVisionModel",
    planner=_planner,
    check=_check,
    holder=lambda model: model.encoder,
    build_tokens=_build_tokens,
    patch=_patch,
    unpatch=lambda model: unpatch_clip_encoder(model.encoder),
    image_size=_image_size,
    alignment_loss=_no_alignment,
)
