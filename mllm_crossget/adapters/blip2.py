"""CrossGET inside BLIP-2 and InstructBLIP (HF ``Blip2ForConditionalGeneration``,
``InstructBlipForConditionalGeneration``).

* **ViT.**  ``Blip2EncoderLayer`` is CLIP's pre-norm layer with a fused ``qkv`` projection,
  so the encoder and layer instances get :mod:`.hf_clip`'s merging subclasses (same
  per-forward state passing, same cross token masked out as a key, same ``log(size)`` bias).
  CLS stays at index 0; every output token, CLS included, goes to the Q-Former.
* **Q-Former.**  Its cross-attention takes any number of image tokens, so the output stays
  ``num_query_tokens`` queries.  Its masks are built inside ``Blip2QFormerModel.forward``
  from ``encoder_attention_mask``, and transformers passes a 4-D mask through unchanged; a
  forward pre-hook on ``model.qformer`` therefore replaces the all-ones mask by the additive
  proportional-attention bias ``log(size)`` ``[B, 1, 1, N]``, which every cross-attention
  layer then adds to its logits.
* **Where the sizes come from.**  The merging encoder returns them next to its hidden states;
  they travel *with the image embeddings*: the encoder's output tensor is tagged in a weak,
  identity-keyed table, the ViT's ``post_layernorm`` carries the tag to its output (the
  tensor BLIP-2 hands to the Q-Former), and the Q-Former hook looks up
  ``encoder_hidden_states``.  This works for ``forward``, ``generate`` (BLIP-2's generate
  calls the towers inline), ``get_image_features`` and a user's own
  ``vision_model -> qformer`` call, and no module holds per-forward state.  A tensor that was
  transformed on the way (``.to(...)``) loses its tag: the Q-Former then reads the merged
  tokens without the bias.
* **InstructBLIP, ``guidance="query"``.**  The instruction already enters the Q-Former
  (``qformer_input_ids``); its mean Q-Former word embedding goes through the
  zero-initialised ``CrossTokens.query_map`` into the ViT width and is added to the vision
  cross token before every layer.  The model instance's class is swapped so that
  ``get_image_features`` (which InstructBLIP's ``forward`` and ``generate`` both call)
  computes that offset; it reaches the ViT encoder for the duration of that call only.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from ..config import CrossGETConfig
from ..cross_tokens import CrossTokens, unwrap_cross_tokens
from ..planner import TowerPlanner
from .family import Family
from .hf_clip import ClipRuntime, patch_clip_encoder, unpatch_clip_encoder

__all__ = ["BLIP2", "INSTRUCTBLIP", "Blip2Runtime", "token_sizes"]

RUNTIME_ATTR = "_crossget_blip2"

# image embeddings (by identity, weakly) -> token sizes [B, N]
_TOKEN_SIZES: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
# InstructBLIP query guidance: the offset of the current get_image_features call
_QUERY_OFFSET: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar(
    "crossget_blip2_query_offset", default=None
)


def token_sizes(image_embeds: Tensor) -> Tensor | None:
    """Sizes [B, N] of merged image embeddings from a patched BLIP ViT (None if unmerged)."""
    return _TOKEN_SIZES.get(image_embeds)


@dataclass
class Blip2Runtime:
    """What :func:`patch` changed, so that :func:`unpatch` can undo exactly that."""

    config: CrossGETConfig
    original_class: type | None = None
    hook_handles: list[Any] = field(default_factory=list)


def _tag_encoder_output(module: nn.Module, args: Any, output: Any) -> None:
    size = getattr(output, "token_size", None)
    if size is not None:
        _TOKEN_SIZES[output.last_hidden_state] = size


def _carry_tag(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
    """``post_layernorm`` keeps the token count: its output stands for the same tokens."""
    if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
        size = _TOKEN_SIZES.get(args[0])
        if size is not None and output.shape[:2] == size.shape:
            _TOKEN_SIZES[output] = size


def _qformer_bias_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Turn the Q-Former's image mask into ``log(size)`` (+ ``-inf`` where masked)."""
    states = kwargs.get("encoder_hidden_states")
    if not isinstance(states, Tensor):
        return None
    size = _TOKEN_SIZES.get(states)
    if size is None:
        return None
    bias = size.to(states.device).log()
    mask = kwargs.get("encoder_attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(
                "CrossGET adds the proportional-attention bias to the Q-Former's 2-D image "
                f"mask; got a {mask.dim()}-D encoder_attention_mask"
            )
        bias = bias.masked_fill(mask.to(bias.device) == 0, -torch.inf)
    dtype = next(module.parameters()).dtype  # the Q-Former's own dtype (fp32 in BLIP-2)
    return args, {**kwargs, "encoder_attention_mask": bias[:, None, None, :].to(dtype)}


def _inject_query_offset(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    offset = _QUERY_OFFSET.get()
    if offset is None or kwargs.get("crossget_query_offset") is not None:
        return None
    return args, {**kwargs, "crossget_query_offset": offset}


def pooled_instruction(
    embeddings: nn.Module, input_ids: Tensor, attention_mask: Tensor | None
) -> Tensor:
    """Mean Q-Former word embedding of each instruction's real (non-padding) tokens [B, C]."""
    keep = (
        attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids).bool()
    )
    embeds = embeddings(input_ids).float() * keep[..., None]
    return embeds.sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp_min(1)


def _instructblip_get_image_features(
    self: nn.Module,
    pixel_values: Tensor,
    qformer_input_ids: Tensor,
    qformer_attention_mask: Tensor | None = None,
    interpolate_pos_encoding: bool | None = False,
    **kwargs: Any,
) -> Any:
    """InstructBLIP's own ``get_image_features``, with the instruction steering the merge."""
    tokens = unwrap_cross_tokens(self.vision_model.encoder.crossget_tokens)
    embeddings = self.qformer.get_input_embeddings()
    pooled = pooled_instruction(embeddings, qformer_input_ids, qformer_attention_mask)
    token = _QUERY_OFFSET.set(tokens.query_offset(pooled.to(pixel_values.device)))
    try:
        return super(type(self), self).get_image_features(
            pixel_values,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            **kwargs,
        )
    finally:
        _QUERY_OFFSET.reset(token)


_SUBCLASSES: dict[type, type] = {}


def _query_subclass(original: type) -> type:
    if original not in _SUBCLASSES:
        _SUBCLASSES[original] = type(
            f"CrossGET{original.__name__}",
            (original,),
            {"get_image_features": _instructblip_get_image_features},
        )
    return _SUBCLASSES[original]


# ------------------------------------------------------------------ family callbacks


def _planner(model: nn.Module, config: CrossGETConfig) -> TowerPlanner:
    vision = model.config.vision_config
    if config.first_merge_layer >= vision.num_hidden_layers:
        raise ValueError(
            f"first_merge_layer={config.first_merge_layer} leaves no merging layer: the ViT "
            f"has {vision.num_hidden_layers} layers"
        )
    # Every ViT output token (CLS included) is read by the Q-Former: nothing is dropped.
    return TowerPlanner(
        config=config,
        patch_size=vision.patch_size,
        layers_run=vision.num_hidden_layers,
        dropped_tokens=0,
    )


def _check(model: nn.Module, config: CrossGETConfig, *, reads_instruction: bool) -> None:
    vision_impl = model.config.vision_config._attn_implementation or "eager"
    if vision_impl.startswith("flash") and (
        config.proportional_attention or config.uses_cross_token
    ):
        raise ValueError(
            f"the ViT uses attn_implementation={vision_impl!r}, which cannot take the "
            "proportional-attention bias or the cross-token mask; load the model with "
            "attn_implementation='sdpa' (or 'eager')"
        )
    if config.guidance == "attention" and vision_impl != "eager":
        raise ValueError(
            "guidance='attention' needs full attention probabilities: load the model with "
            "attn_implementation='eager', or use guidance='cross' (works with SDPA)"
        )
    qformer_impl = model.config.qformer_config._attn_implementation or "eager"
    if config.proportional_attention and qformer_impl not in ("sdpa", "eager"):
        raise ValueError(
            f"the Q-Former uses attn_implementation={qformer_impl!r}; proportional attention "
            "adds a float bias to its cross-attention, which only 'sdpa' and 'eager' take "
            "(or set proportional_attention=False)"
        )
    if config.guidance == "query" and not reads_instruction:
        raise ValueError(
            "guidance='query' conditions the vision cross token on the instruction the "
            "Q-Former reads; BLIP-2's Q-Former reads none (InstructBLIP's does): use "
            "guidance='cross' for BLIP-2"
        )


def _build_tokens(model: nn.Module, planner: TowerPlanner, config: CrossGETConfig) -> CrossTokens:
    query = config.guidance == "query"
    return CrossTokens(
        vision_layers=planner.layers_run,
        vision_width=model.config.vision_config.hidden_size,
        text_width=model.config.qformer_config.hidden_size if query else 0,
        query_guidance=query,
    )


def _patch(model: nn.Module, config: CrossGETConfig, planner: TowerPlanner) -> None:
    vision = model.vision_model
    encoder = vision.encoder
    runtime = Blip2Runtime(config=config)
    patch_clip_encoder(
        encoder,
        ClipRuntime(
            config=config, num_layers=len(encoder.layers), plan_for=planner.plan_for_length
        ),
    )
    handles = runtime.hook_handles
    if config.proportional_attention:
        handles.append(encoder.register_forward_hook(_tag_encoder_output))
        handles.append(vision.post_layernorm.register_forward_hook(_carry_tag))
        handles.append(
            model.qformer.register_forward_pre_hook(_qformer_bias_hook, with_kwargs=True)
        )
    if config.guidance == "query":
        handles.append(encoder.register_forward_pre_hook(_inject_query_offset, with_kwargs=True))
        runtime.original_class = type(model)
        model.__class__ = _query_subclass(type(model))
    setattr(model, RUNTIME_ATTR, runtime)


def _unpatch(model: nn.Module) -> None:
    runtime: Blip2Runtime | None = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        return
    for handle in runtime.hook_handles:
        handle.remove()
    unpatch_clip_encoder(model.vision_model.encoder)
    if runtime.original_class is not None:
        model.__class__ = runtime.original_class
    delattr(model, RUNTIME_ATTR)


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = model.config.vision_config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _no_alignment(model: nn.Module) -> Tensor:
    raise RuntimeError(
        f"alignment_loss pairs vision cross tokens with text cross tokens; "
        f"{type(model).__name__} merges in its ViT only and has no text cross tokens"
    )


def _holder(model: nn.Module) -> nn.Module:
    return model.vision_model.encoder


BLIP2 = Family(
    name="Blip2ForConditionalGeneration",
    planner=_planner,
    check=lambda model, config: _check(model, config, reads_instruction=False),
    holder=_holder,
    build_tokens=_build_tokens,
    patch=_patch,
    unpatch=_unpatch,
    image_size=_image_size,
    alignment_loss=_no_alignment,
)

INSTRUCTBLIP = Family(
    name="InstructBlipForConditionalGeneration",
    planner=_planner,
    check=lambda model, config: _check(model, config, reads_instruction=True),
    holder=_holder,
    build_tokens=_build_tokens,
    patch=_patch,
    unpatch=_unpatch,
    image_size=_image_size,
    alignment_loss=_no_alignment,
)
