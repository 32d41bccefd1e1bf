"""CrossGET in Hugging Face ``CLIPModel`` (both towers), by swapping instance classes.

* Image tower: the ``CLIPEncoder``/``CLIPEncoderLayer`` instances of ``vision_model`` get
  :mod:`.hf_clip`'s merging subclasses, exactly as for a bare ``CLIPVisionModel``; the budget
  counts every token leaving the encoder, CLS included.
* Text tower (``config.text_r > 0``): the ``CLIPTextModel`` instance gets a subclass whose
  forward runs each ``CLIPEncoderLayer`` through :func:`.vit_layer.merging_block` (causal,
  EOT and padding protected, see :mod:`.clip_pair`) and pools at the tracked EOT token.  Its
  layers' classes are not changed.
* The ``CLIPModel`` instance gets a subclass whose ``get_image_features`` /
  ``get_text_features`` (which ``forward`` calls) hand the learnable cross-token prompts to the
  towers and keep the cross states for the alignment loss; ``crossget_tokens`` lives on the
  model.  A tower called directly (``model.vision_model(...)``) merges with zero prompts.

While merging, a tower returns its final states (fewer tokens) and no per-layer hidden states
or attention maps; ``crossget.remove(model)`` restores everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..config import CrossGETConfig
from ..cross_tokens import CrossTokens, unwrap_cross_tokens
from ..planner import TowerPlanner
from . import clip_pair
from .family import Family
from .hf_clip import ClipRuntime, EncoderPlan, patch_clip_encoder, unpatch_clip_encoder
from .vit_layer import clip_ops

__all__ = ["HF_CLIP", "MergedTextOutput", "clip_layer_ops", "eot_index"]

RUNTIME_ATTR = "_crossget_clip"
TEXT_PLAN_ATTR = "_crossget_text_plan"


@dataclass
class MergedTextOutput(BaseModelOutputWithPooling):
    """The text tower's output after merging: fewer tokens, their sizes and which are real."""

    token_size: Tensor | None = None
    attention_mask: Tensor | None = None
    cross_states: tuple[Tensor, ...] | None = None


clip_layer_ops = clip_ops  # a CLIPEncoderLayer as BlockOps (kept name)


def eot_index(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """Where ``CLIPTextModel`` pools: the largest id for legacy configs (eos id 2), else the
    first ``eos_token_id``."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def _text_forward(
    self: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    *,
    crossget_prompts: Tensor | None = None,
    **kwargs: Any,
) -> MergedTextOutput:
    """``CLIPTextModel.forward`` with merging; pools at the EOT token wherever it ended up."""
    plan: EncoderPlan = getattr(self, TEXT_PLAN_ATTR)
    if input_ids is None:
        raise ValueError("You have to specify input_ids")
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        raise ValueError(
            "per-layer hidden states and attention maps are not available while CrossGET merges "
            "text tokens; call crossget.remove(model) to inspect them"
        )
    ids = input_ids.view(-1, input_ids.shape[-1])
    hidden = self.embeddings(input_ids=ids, position_ids=position_ids)
    state = clip_pair.text_state(
        hidden,
        eot_index(ids, self.eos_token_id),
        attention_mask,
        causal=True,
        with_cross=plan.uses_cross_token,
    )
    blocks = [clip_layer_ops(layer) for layer in self.encoder.layers]
    state, cross_states = clip_pair.run_tower(
        blocks, state, plan, crossget_prompts, training=self.training
    )
    last = self.final_layer_norm(state.hidden)
    rows = torch.arange(last.shape[0], device=last.device)
    return MergedTextOutput(
        last_hidden_state=last,
        pooler_output=last[rows, state.pooled_index()],
        token_size=state.size,
        attention_mask=state.key_valid,
        cross_states=cross_states,
    )


def _get_image_features(
    self: nn.Module, pixel_values: Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any
) -> BaseModelOutputWithPooling:
    runtime: clip_pair.PairRuntime = getattr(self, RUNTIME_ATTR)
    plan = runtime.planner.plan(pixel_values.shape[-2], pixel_values.shape[-1])
    if not plan.merges:
        runtime.last.vision_cross = ()
        return super(type(self), self).get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
    tower = self.vision_model
    hidden = tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    encoded = tower.encoder(
        inputs_embeds=tower.pre_layrnorm(hidden),
        crossget_plan=runtime.planner.plan_for_length(hidden.shape[1]),
        crossget_cross_offsets=unwrap_cross_tokens(self.crossget_tokens).vision_prompts,
        output_attentions=kwargs.get("output_attentions"),
    )
    runtime.last.vision_cross = tuple(encoded.cross_states or ())
    last = encoded.last_hidden_state
    return BaseModelOutputWithPooling(
        last_hidden_state=last,
        pooler_output=self.visual_projection(tower.post_layernorm(last[:, 0])),
    )


def _get_text_features(
    self: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPooling:
    runtime: clip_pair.PairRuntime = getattr(self, RUNTIME_ATTR)
    if runtime.text_plan is None:
        runtime.last.text_cross = ()
        return super(type(self), self).get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
    out = self.text_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        crossget_prompts=unwrap_cross_tokens(self.crossget_tokens).text_prompts,
    )
    runtime.last.text_cross = tuple(out.cross_states or ())
    out.pooler_output = self.text_projection(out.pooler_output)
    return out


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _subclass(original: type, kind: str) -> type:
    key = (original, kind)
    if key not in _SUBCLASSES:
        methods = (
            {"forward": _text_forward}
            if kind == "text"
            else {
                "get_image_features": _get_image_features,
                "get_text_features": _get_text_features,
            }
        )
        _SUBCLASSES[key] = type(f"CrossGET{original.__name__}", (original,), methods)
    return _SUBCLASSES[key]


# ------------------------------------------------------------------ family callbacks


def _planner(model: nn.Module, config: CrossGETConfig) -> TowerPlanner:
    vision = model.config.vision_config
    if config.first_merge_layer >= vision.num_hidden_layers:
        raise ValueError(
            f"first_merge_layer={config.first_merge_layer} leaves no merging layer: the image "
            f"tower has {vision.num_hidden_layers} layers"
        )
    return TowerPlanner(
        config=config,
        patch_size=vision.patch_size,
        layers_run=vision.num_hidden_layers,
        dropped_tokens=0,
    )


def _check(model: nn.Module, config: CrossGETConfig) -> None:
    if not getattr(config, "merges_in_encoder", True):
        raise ValueError("CLIP models support the merging methods (crossget, tome) only")
    if config.guidance == "query":
        raise ValueError(
            "guidance='query' needs a prompt that conditions the image; a CLIP model encodes "
            "images and texts independently: use guidance='cross'"
        )
    vision_impl = model.config.vision_config._attn_implementation or "eager"
    if config.guidance == "attention" and vision_impl != "eager":
        raise ValueError(
            "guidance='attention' needs full attention probabilities: load the model with "
            "attn_implementation='eager', or use guidance='cross' (works with SDPA)"
        )
    if vision_impl.startswith("flash") and (
        config.proportional_attention or config.uses_cross_token
    ):
        raise ValueError(
            f"the image tower uses attn_implementation={vision_impl!r}, which cannot take the "
            "proportional-attention bias or the cross-token mask; load the model with "
            "attn_implementation='sdpa' (or 'eager')"
        )


def _build_tokens(model: nn.Module, planner: TowerPlanner, config: CrossGETConfig) -> CrossTokens:
    text = model.config.text_config
    return CrossTokens(
        vision_layers=planner.layers_run,
        vision_width=model.config.vision_config.hidden_size,
        text_layers=text.num_hidden_layers if config.text_r else 0,
        text_width=text.hidden_size,
    )


def _patch(model: nn.Module, config: CrossGETConfig, planner: TowerPlanner) -> None:
    encoder = model.vision_model.encoder
    patch_clip_encoder(
        encoder,
        ClipRuntime(
            config=config, num_layers=len(encoder.layers), plan_for=planner.plan_for_length
        ),
    )
    runtime = clip_pair.PairRuntime(
        config=config,
        planner=planner,
        text_plan=clip_pair.text_plan(config, model.config.text_config.num_hidden_layers),
        original_class=type(model),
    )
    if runtime.text_plan is not None:
        text_model = model.text_model
        runtime.text_original_class = type(text_model)
        text_model.__class__ = _subclass(type(text_model), "text")
        setattr(text_model, TEXT_PLAN_ATTR, runtime.text_plan)
    model.__class__ = _subclass(type(model), "model")
    setattr(model, RUNTIME_ATTR, runtime)


def _unpatch(model: nn.Module) -> None:
    runtime: clip_pair.PairRuntime | None = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        return
    unpatch_clip_encoder(model.vision_model.encoder)
    if runtime.text_original_class is not None:
        model.text_model.__class__ = runtime.text_original_class
        delattr(model.text_model, TEXT_PLAN_ATTR)
    model.__class__ = runtime.original_class
    delattr(model, RUNTIME_ATTR)


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = model.config.vision_config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _alignment_loss(model: nn.Module) -> Tensor:
    runtime: clip_pair.PairRuntime = getattr(model, RUNTIME_ATTR)
    image_norm = clip_pair.frozen(model.vision_model.post_layernorm)
    image_proj = clip_pair.frozen(model.visual_projection)
    text_norm = clip_pair.frozen(model.text_model.final_layer_norm)
    text_proj = clip_pair.frozen(model.text_projection)
    return clip_pair.alignment_loss(
        runtime.last,
        lambda x: image_proj(image_norm(x)),
        lambda x: text_proj(text_norm(x)),
    )


HF_CLIP = Family(
    name="CLIPModel",
    planner=_planner,
    check=_check,
    holder=lambda model: model,
    build_tokens=_build_tokens,
    patch=_patch,
    unpatch=_unpatch,
    image_size=_image_size,
    alignment_loss=_alignment_loss,
)
