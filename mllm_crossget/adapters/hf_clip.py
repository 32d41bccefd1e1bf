"""CrossGET inside Hugging Face CLIP vision encoders, by swapping the class of each instance.

``CLIPEncoderLayer`` and ``CLIPEncoder`` instances get a subclass (created once per original
class) whose ``forward`` merges tokens; weights, state-dict keys and the output-capture hooks
are untouched, and ``remove`` restores the original class.  Per-forward state — token sizes,
the cross token, the plan — travels as arguments and return values, never as module
attributes, so gradient checkpointing recomputes exactly what ran.

The cross token is appended after the visible tokens inside each layer only: it reads the
image (its query against all keys) but is masked out as a key, so it never changes the
visible tokens and never appears in captured hidden states.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..config import CrossGETConfig
from ..cross_tokens import unwrap_cross_tokens
from ..guidance import cross_row_importance, mean_received_attention, standardized_importance
from ..merge import Matching, bipartite_matching, complete_graph_matching

__all__ = [
    "EncoderPlan",
    "MergingEncoderOutput",
    "patch_clip_encoder",
    "unpatch_clip_encoder",
]


@dataclass(frozen=True)
class EncoderPlan:
    """What one encoder call does: how many layers run and ``r`` for each of them."""

    layer_r: tuple[int, ...]
    matching: str = "complete_graph"
    guidance: str = "cross"
    proportional_attention: bool = True
    track_source: bool = False
    importance_norm: str = "raw"
    importance_weight: float = 1.0
    max_sources_per_destination: int | None = None
    hub_guard: str = "defer"

    @property
    def num_layers(self) -> int:
        return len(self.layer_r)

    @property
    def merges(self) -> bool:
        return any(self.layer_r)

    @property
    def uses_cross_token(self) -> bool:
        return self.merges and self.guidance in ("cross", "attention", "query")

    @classmethod
    def from_config(cls, config: CrossGETConfig, layer_r: Sequence[int]) -> EncoderPlan:
        return cls(
            layer_r=tuple(layer_r),
            matching=config.matching,
            guidance=config.guidance,
            proportional_attention=config.proportional_attention,
            track_source=config.track_source,
            importance_norm=config.importance_norm,
            importance_weight=config.importance_weight,
            max_sources_per_destination=config.max_sources_per_destination,
            hub_guard=config.hub_guard,
        )


@dataclass
class MergingEncoderOutput(BaseModelOutput):
    """The encoder's output plus what merging produced (sizes, cross states, source map).

    ``first_patch`` [B, T]: for every output token, the lowest input index it holds (CLS is
    index 0), which the LLaVA adapter turns into the token's position in the LLM.
    """

    token_size: Tensor | None = None
    first_patch: Tensor | None = None
    cross_states: tuple[Tensor, ...] | None = None
    source_map: Tensor | None = None


def _attention_bias(
    token_size: Tensor, with_cross: bool, proportional: bool, dtype: torch.dtype
) -> Tensor | None:
    """[B, 1, 1, T]: log(size) per visible key and -inf for the cross token's key."""
    if not proportional and not with_cross:
        return None
    bias = token_size.log() if proportional else torch.zeros_like(token_size)
    if with_cross:
        bias = torch.cat([bias, bias.new_full((bias.shape[0], 1), -torch.inf)], dim=1)
    return bias[:, None, None, :].to(dtype)


def _merging_layer_forward(
    self: nn.Module,
    hidden_states: Tensor,
    token_size: Tensor | None = None,
    cross_state: Tensor | None = None,
    cross_offset: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    layer_r: int = 0,
    plan: EncoderPlan | None = None,
    relevance: Callable[[Tensor], Tensor] | None = None,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """One CLIP layer with proportional attention, guidance and a merge after attention.

    Returns ``(hidden, size, cross_state, src_idx, dst_idx, kept_idx)``; the indices let the
    caller update a source map without the layer holding state.  Without a plan it is the
    original layer, bit for bit (the parent class's forward).
    """
    if plan is None:
        if attention_mask is None and not type(self)._crossget_takes_mask:
            return super(type(self), self).forward(hidden_states, **kwargs)  # BLIP-2 layers
        return super(type(self), self).forward(hidden_states, attention_mask, **kwargs)
    if attention_mask is not None:
        raise ValueError("CrossGET vision layers take no attention mask (image tokens only)")
    batch, num_visible, width = hidden_states.shape
    attn = self.self_attn
    with_cross = cross_state is not None
    sequence = hidden_states
    if with_cross:
        cross_in = cross_state.detach()
        if cross_offset is not None:
            cross_in = cross_in + cross_offset.to(cross_in.dtype)
        sequence = torch.cat([hidden_states, cross_in], dim=1)
    residual = sequence
    normed = self.layer_norm1(sequence)
    shape = (batch, sequence.shape[1], -1, attn.head_dim)
    query, key, value = _project_qkv(attn, normed, shape)

    bias = _attention_bias(token_size, with_cross, plan.proportional_attention, query.dtype)
    implementation = attn.config._attn_implementation
    need_probs = layer_r > 0 and plan.guidance == "attention"
    if need_probs and implementation != "eager":
        raise ValueError(
            "guidance='attention' needs full attention probabilities: load the model with "
            "attn_implementation='eager', or use guidance='cross' (works with SDPA)"
        )
    if bias is not None and implementation.startswith("flash"):
        raise ValueError(
            f"attn_implementation={implementation!r} cannot add the proportional-attention "
            "bias or mask the cross token; load the vision tower with attn_implementation="
            "'sdpa' (or 'eager'), or set proportional_attention=False and guidance='none'"
        )
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, _eager_attention)
    attended, probs = interface(
        attn,
        query,
        key,
        value,
        bias,
        scaling=attn.scale,
        dropout=0.0 if not attn.training else _attention_dropout(attn),
    )
    out_proj = attn.out_proj if hasattr(attn, "out_proj") else attn.projection  # BLIP-2 names
    attended = out_proj(attended.reshape(batch, sequence.shape[1], width).contiguous())
    sequence = residual + attended

    visible, cross_out = (sequence[:, :num_visible], sequence[:, num_visible:])
    src_idx = dst_idx = torch.empty(batch, 0, dtype=torch.long, device=sequence.device)
    kept_idx = torch.arange(num_visible, device=sequence.device).expand(batch, -1)
    if layer_r > 0:
        visible_keys = key[:, :, :num_visible]
        metric = visible_keys.mean(dim=1)
        protected = torch.zeros(batch, num_visible, dtype=torch.bool, device=visible.device)
        protected[:, 0] = True  # CLS
        importance = None
        if with_cross and plan.guidance != "none":
            key_bias = None if bias is None else bias[..., :num_visible]
            importance = cross_row_importance(
                query[:, :, num_visible:], visible_keys, attn.scale, key_bias
            )
            if need_probs:
                importance = importance + mean_received_attention(probs, num_visible)
        score_importance = importance
        if plan.guidance == "text" and relevance is not None:
            score_importance = relevance(visible)  # [B, N]: each image against its prompt
        score_importance = _scaled_importance(score_importance, protected, plan)
        if plan.matching == "bipartite":
            matching = bipartite_matching(metric, layer_r, protected=protected)
        else:
            matching = complete_graph_matching(
                metric,
                layer_r,
                score_importance,
                protected,
                max_sources_per_destination=plan.max_sources_per_destination,
                hub_guard=plan.hub_guard,
            )
        visible, token_size = matching.merge(visible, token_size, importance)
        src_idx, dst_idx, kept_idx = matching.src_idx, matching.dst_idx, matching.kept_idx
        sequence = torch.cat([visible, cross_out], dim=1) if with_cross else visible

    sequence = sequence + self.mlp(self.layer_norm2(sequence))
    hidden_out = sequence[:, : sequence.shape[1] - (1 if with_cross else 0)]
    cross_final = sequence[:, -1:] if with_cross else None
    return hidden_out, token_size.detach(), cross_final, src_idx, dst_idx, kept_idx


def _scaled_importance(
    importance: Tensor | None, protected: Tensor, plan: EncoderPlan
) -> Tensor | None:
    """The importance term of the matching score: raw x weight, or standardised x weight."""
    if importance is None:
        return None
    if plan.importance_norm == "standard":
        return standardized_importance(importance, protected, plan.importance_weight)
    return importance if plan.importance_weight == 1.0 else importance * plan.importance_weight


def _project_qkv(attn: nn.Module, normed: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """[B, H, T, D] queries, keys, values: CLIP/SigLIP project separately, BLIP-2's ViT
    (``Blip2Attention``/``InstructBlipAttention``) through one fused ``qkv`` linear."""
    if hasattr(attn, "qkv"):
        batch, tokens, _, head_dim = shape
        mixed = attn.qkv(normed).reshape(batch, tokens, 3, -1, head_dim).permute(2, 0, 3, 1, 4)
        return mixed[0], mixed[1], mixed[2]
    return tuple(
        proj(normed).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )


def _attention_dropout(attn: nn.Module) -> float:
    """CLIP stores the probability as ``dropout``, BLIP-2 as ``attention_dropout``."""
    value = getattr(attn, "attention_dropout", None)
    return float(value if value is not None else attn.dropout)


def _eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    logits = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask
    probs = logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def _merging_encoder_forward(
    self: nn.Module,
    inputs_embeds: Tensor,
    attention_mask: Tensor | None = None,
    *,
    crossget_plan: EncoderPlan | None = None,
    crossget_cross_offsets: Tensor | None = None,
    crossget_query_offset: Tensor | None = None,
    crossget_relevance: Callable[[Tensor], Tensor] | None = None,
    **kwargs: Any,
) -> MergingEncoderOutput:
    """Run the first ``plan.num_layers`` layers, merging as planned.

    ``crossget_cross_offsets`` [L, C] are the learnable vision prompts ``P`` (one per layer);
    ``crossget_query_offset`` [B, 1, C] the prompt-conditioned offset (query guidance);
    ``crossget_relevance`` maps a layer's tokens [B, N, C] to their relevance to each image's
    own prompt [B, N] (text guidance, supplied by the LLaVA adapter).  The
    cross token starts as the CLS state and, before each layer, becomes
    ``stopgrad(previous) + P_l (+ query offset)``.
    """
    runtime: ClipRuntime = self._crossget_runtime
    plan = crossget_plan if crossget_plan is not None else runtime.default_plan(inputs_embeds)
    if plan.num_layers > len(self.layers):
        raise ValueError(f"plan runs {plan.num_layers} layers, encoder has {len(self.layers)}")
    if not plan.merges:
        # The original encoder loop, through __call__ so output-capture hooks still fire.
        hidden = inputs_embeds
        for layer in self.layers[: plan.num_layers]:
            hidden = layer(hidden, None, None, None, attention_mask, **kwargs)
        return MergingEncoderOutput(last_hidden_state=hidden)

    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions is not available while CrossGET merges tokens (the merged "
            "layers compute attention themselves); call crossget.remove(model) to inspect "
            "attention maps"
        )
    if crossget_cross_offsets is None and hasattr(self, "crossget_tokens"):
        # A bare CLIP tower holds its cross tokens on the encoder itself.
        crossget_cross_offsets = unwrap_cross_tokens(self.crossget_tokens).vision_prompts
    batch, n, _ = inputs_embeds.shape
    hidden = inputs_embeds
    token_size = torch.ones(batch, n, device=hidden.device, dtype=torch.float32)
    cross_state = hidden[:, :1] if plan.uses_cross_token else None
    source = None
    if plan.track_source:
        source = torch.eye(n, device=hidden.device, dtype=torch.float32).expand(batch, n, n)
    first_patch = torch.arange(n, device=hidden.device).expand(batch, n)
    cross_states: list[Tensor] = []
    for index, layer in enumerate(self.layers[: plan.num_layers]):
        offset = None
        if cross_state is not None:
            offset = crossget_cross_offsets[index] if crossget_cross_offsets is not None else None
            if offset is not None and not torch.is_grad_enabled():
                # A view of a Parameter under no_grad claims requires_grad without a grad_fn,
                # which trips module hooks (e.g. FlopCounterMode's tracker).
                offset = offset.detach()
            if crossget_query_offset is not None:
                offset = crossget_query_offset if offset is None else offset + crossget_query_offset
        hidden, token_size, cross_state, src, dst, kept = layer(
            hidden,
            token_size,
            cross_state,
            offset,
            attention_mask,
            layer_r=plan.layer_r[index],
            plan=plan,
            relevance=crossget_relevance,
        )
        if cross_state is not None:
            cross_states.append(cross_state[:, 0])
        if src.shape[1]:
            matching = Matching(src, dst, kept)
            first_patch = matching.merge_first_patch(first_patch)
            if source is not None:
                source = matching.merge_source(source)
    return MergingEncoderOutput(
        last_hidden_state=hidden,
        token_size=token_size,
        first_patch=first_patch,
        cross_states=tuple(cross_states),
        source_map=source,
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


_SUBCLASS_CACHE: dict[tuple[type, str], type] = {}


def _merging_subclass(original: type, kind: str) -> type:
    """One subclass per original class (so isinstance checks and hooks keep working)."""
    key = (original, kind)
    if key not in _SUBCLASS_CACHE:
        forward = _merging_layer_forward if kind == "layer" else _merging_encoder_forward
        # CLIP layers take (hidden, attention_mask); BLIP-2 layers take hidden states only.
        takes_mask = "attention_mask" in inspect.signature(original.forward).parameters
        _SUBCLASS_CACHE[key] = type(
            f"CrossGET{original.__name__}",
            (original,),
            {"forward": forward, "_crossget_takes_mask": takes_mask},
        )
    return _SUBCLASS_CACHE[key]


def patch_clip_encoder(encoder: nn.Module, runtime: ClipRuntime) -> None:
    """Swap the classes of a CLIP encoder and its layers; remember the originals."""
    if hasattr(encoder, "_crossget_runtime"):
        unpatch_clip_encoder(encoder)
    for module, kind in [(encoder, "encoder"), *((layer, "layer") for layer in encoder.layers)]:
        original = type(module)
        patched = _merging_subclass(original, kind)
        runtime.original_classes[patched] = original
        module.__class__ = patched
    encoder._crossget_runtime = runtime


def unpatch_clip_encoder(encoder: nn.Module) -> None:
    runtime: ClipRuntime | None = getattr(encoder, "_crossget_runtime", None)
    if runtime is None:
        return
    for module in [encoder, *encoder.layers]:
        module.__class__ = runtime.original_classes.get(type(module), type(module))
    del encoder._crossget_runtime
