"""One merging encoder layer for every pre-norm ViT block, described per layer type.

Every block CrossGET merges in is ``x = x + ls1(out(attn(norm1(x)))); x = x + ls2(mlp(norm2(x)))``
with its own names for the parts.  A layer type is described by a function that binds one
layer instance to :class:`BlockOps` (a few lines each, see ``LAYER_OPS``): how to normalise,
how to get q/k/v (separate or fused projections), the output projection with its layer scale,
the MLP branch with its norm and layer scale, the softmax scale and the attention dropout.
:func:`merging_block` is the one forward all of them share:

* the cross token (when ``state.cross`` is set) becomes ``stopgrad(cross) + offset``, reads
  every attendable token with its own query row (that row is the importance) and is masked
  out as a key, so it never changes the other tokens; with ``plan.cross_token_attended`` it is
  a full member of the attention instead (a key of size 1, bias ``log 1 = 0``, that also reads
  itself; causal towers keep it masked, it has read their future), still never merged;
* proportional attention: ``log(size)`` of each key as a float additive mask;
* the merge runs after attention, on the keys' head mean as the metric; sizes, protected
  flags and positions follow the matching, and the MLP runs on the merged sequence.

Hugging Face layers (CLIP, SigLIP, DINOv2, BLIP-2's ViT) run it through a swapped instance
class (:func:`patch_layers`): per-forward state travels as positional tensor arguments and
return values (sizes detached), so gradient checkpointing recomputes exactly what ran;
without a CrossGET step the layer runs its original forward, bit for bit.  open_clip blocks
and CLIP text towers call :func:`merging_block` directly with their :class:`BlockOps`.

Causal towers (CLIP text).  Merging reorders nothing (survivors keep their order), but a merged
token may hold members from several positions.  Each token carries the *latest* original
position of its members, and token ``q`` may attend token ``k`` iff ``pos[k] <= pos[q]``: no
token ever sees information from its future, and a merged token becomes visible once its last
member would have been.  With no merge this is exactly the usual causal mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput

from ..config import CrossGETConfig
from ..guidance import cross_row_importance, mean_received_attention, standardized_importance
from ..merge import Matching, bipartite_matching, complete_graph_matching

__all__ = [
    "LAYER_OPS",
    "BlockOps",
    "EncoderPlan",
    "LayerStep",
    "MergingEncoderOutput",
    "TokenState",
    "layer_ops",
    "merging_block",
    "patch_layers",
    "run_encoder",
    "unpatch_layers",
]


# ------------------------------------------------------------------ plan and outputs


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
    cross_token_attended: bool = False
    cross_token_to_llm: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_r)

    @property
    def merges(self) -> bool:
        return any(self.layer_r)

    @property
    def uses_cross_token(self) -> bool:
        """The cross token runs when a layer merges, and always when it is part of the model
        (attended by the image tokens or handed to the LLM), so those outputs never depend on
        whether this budget merges."""
        runs = self.merges or self.cross_token_attended or self.cross_token_to_llm
        return runs and self.guidance in ("cross", "attention", "query")

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
            cross_token_attended=config.cross_token_attended,
            cross_token_to_llm=config.cross_token_to_llm,
        )


@dataclass
class MergingEncoderOutput(BaseModelOutput):
    """The encoder's output plus what merging produced (sizes, cross states, source map).

    ``first_patch`` [B, T]: for every output token, the lowest input index it holds (CLS, when
    the tower has one, is index 0), which the LLaVA adapter turns into the token's position in
    the LLM.
    """

    token_size: Tensor | None = None
    first_patch: Tensor | None = None
    cross_states: tuple[Tensor, ...] | None = None
    source_map: Tensor | None = None


# ------------------------------------------------------------------ the layer description


@dataclass(frozen=True)
class BlockOps:
    """One pre-norm block, bound to its modules.

    ``qkv`` maps the normed ``[B, T, C]`` to three ``[B, H, T, D]`` tensors; ``out`` is the
    attention output projection including the first layer scale (and drop-path); ``mlp`` is
    the second residual *branch* (``ls2(mlp(norm2(x)))``, the residual is added here).
    ``eager`` asks for explicit attention probabilities instead of SDPA (the layer was loaded
    with ``attn_implementation="eager"``).
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    out: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    scale: float
    dropout: float = 0.0
    eager: bool = False


def _heads(x: Tensor, head_dim: int) -> Tensor:
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def _separate(q: nn.Module, k: nn.Module, v: nn.Module, head_dim: int) -> Callable[..., Any]:
    return lambda x: (_heads(q(x), head_dim), _heads(k(x), head_dim), _heads(v(x), head_dim))


def _fused(linear: Callable[[Tensor], Tensor], head_dim: int) -> Callable[..., Any]:
    """q/k/v from one ``[q; k; v]`` projection (BLIP-2's ``qkv``, open_clip's ``in_proj``)."""

    def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, tokens, _ = x.shape
        mixed = linear(x).view(batch, tokens, 3, -1, head_dim).permute(2, 0, 3, 1, 4)
        return mixed[0], mixed[1], mixed[2]

    return qkv


def _eager(attention: nn.Module) -> bool:
    config = getattr(attention, "config", None)
    return getattr(config, "_attn_implementation", None) == "eager"


def clip_ops(layer: nn.Module) -> BlockOps:
    """``CLIPEncoderLayer`` and ``SiglipEncoderLayer`` (same names, separate projections)."""
    attn = layer.self_attn
    return BlockOps(
        norm1=layer.layer_norm1,
        qkv=_separate(attn.q_proj, attn.k_proj, attn.v_proj, attn.head_dim),
        out=attn.out_proj,
        mlp=lambda x: layer.mlp(layer.layer_norm2(x)),
        scale=attn.scale,
        dropout=float(attn.dropout),
        eager=_eager(attn),
    )


def blip2_ops(layer: nn.Module) -> BlockOps:
    """``Blip2EncoderLayer`` / ``InstructBlipEncoderLayer``: one fused ``qkv`` linear."""
    attn = layer.self_attn
    return BlockOps(
        norm1=layer.layer_norm1,
        qkv=_fused(attn.qkv, attn.head_dim),
        out=attn.projection,
        mlp=lambda x: layer.mlp(layer.layer_norm2(x)),
        scale=attn.scale,
        dropout=float(attn.attention_dropout),
        eager=_eager(attn),
    )


def dinov2_ops(layer: nn.Module) -> BlockOps:
    """``Dinov2Layer``: ``q/k/v/o_proj`` and a ``Dinov2LayerScale`` on each branch."""
    attn = layer.attention
    return BlockOps(
        norm1=layer.norm1,
        qkv=_separate(attn.q_proj, attn.k_proj, attn.v_proj, attn.head_dim),
        out=lambda x: layer.drop_path(layer.layer_scale1(attn.o_proj(x))),
        mlp=lambda x: layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))),
        scale=attn.scaling,
        dropout=float(attn.attention_dropout),
        eager=_eager(attn),
    )


def open_clip_ops(block: nn.Module) -> BlockOps:
    """open_clip ``ResidualAttentionBlock``: ``nn.MultiheadAttention``'s stacked in_proj."""
    attn = block.attn
    head_dim = attn.embed_dim // attn.num_heads
    return BlockOps(
        norm1=block.ln_1,
        qkv=_fused(lambda x: F.linear(x, attn.in_proj_weight, attn.in_proj_bias), head_dim),
        out=lambda x: block.ls_1(attn.out_proj(x)),
        mlp=lambda x: block.ls_2(block.mlp(block.ln_2(x))),
        scale=head_dim**-0.5,
        dropout=float(attn.dropout),
    )


# Layer class name -> its description (names, so no model class needs importing).
LAYER_OPS: dict[str, Callable[[nn.Module], BlockOps]] = {
    "CLIPEncoderLayer": clip_ops,
    "SiglipEncoderLayer": clip_ops,
    "Blip2EncoderLayer": blip2_ops,
    "InstructBlipEncoderLayer": blip2_ops,
    "Dinov2Layer": dinov2_ops,
    "ResidualAttentionBlock": open_clip_ops,
}


def layer_ops(layer: nn.Module) -> BlockOps:
    """The :class:`BlockOps` of any supported layer (its original class decides)."""
    for cls in type(layer).__mro__:
        describe = LAYER_OPS.get(cls.__name__)
        if describe is not None:
            return describe(layer)
    raise TypeError(
        f"CrossGET has no description of {type(layer).__name__}; supported encoder layers: "
        f"{', '.join(LAYER_OPS)}"
    )


# ------------------------------------------------------------------ the one merging forward


@dataclass(frozen=True)
class TokenState:
    """One tower's tokens between two blocks (per forward; returned, never stored).

    ``protected`` tokens are never merged (CLS, end-of-text, padding); ``key_valid`` says
    which tokens may be attended (``None``: all); ``position`` is each token's latest original
    position for causal towers (``None``: bidirectional); ``marker`` flags the token to pool
    (end-of-text) so it can be found after merges; ``cross`` is the cross token ``[B, 1, C]``;
    ``protected_prefix`` (a host int, ``None``: unknown) says the protected tokens are exactly
    the first k of every row, as a ViT's CLS is (merges keep survivors in order), so the
    matching clamps ``r`` without reading the mask (no device sync, no graph break).
    """

    hidden: Tensor
    size: Tensor
    protected: Tensor
    key_valid: Tensor | None = None
    position: Tensor | None = None
    marker: Tensor | None = None
    cross: Tensor | None = None
    protected_prefix: int | None = None

    def pooled_index(self) -> Tensor:
        """[B] index of the marked token (the first one when several are marked)."""
        if self.marker is None:
            raise ValueError("this state marks no token to pool")
        return self.marker.to(torch.int8).argmax(dim=1)


def _attention_mask(
    state: TokenState,
    with_cross: bool,
    proportional: bool,
    dtype: torch.dtype,
    cross_attended: bool = False,
) -> Tensor | None:
    """Additive mask ``[B, 1, 1 or T, T]``: ``log(size)`` per key, ``-inf`` for keys that may
    not be attended (padding, the cross token unless ``cross_attended``, causal future).  An
    attended cross token is one token of size 1: its bias is ``log 1 = 0``."""
    size = state.size
    batch, n = size.shape
    masks_cross = with_cross and not cross_attended
    if state.position is None and state.key_valid is None and not proportional and not masks_cross:
        return None
    key_bias = size.log() if proportional else torch.zeros_like(size)
    if state.key_valid is not None:
        key_bias = key_bias.masked_fill(~state.key_valid, -torch.inf)
    if state.position is None:
        if with_cross:
            cross_bias = 0.0 if cross_attended else -torch.inf
            key_bias = torch.cat([key_bias, key_bias.new_full((batch, 1), cross_bias)], dim=1)
        return key_bias[:, None, None, :].to(dtype)
    position = state.position
    allowed = position[:, None, :] <= position[:, :, None]  # [B, query, key]
    rows = key_bias[:, None, :].expand(batch, n, n).masked_fill(~allowed, -torch.inf)
    # A token always sees itself, so no row is empty (e.g. left padding at position 0).
    own = size.log() if proportional else torch.zeros_like(size)
    rows = torch.diagonal_scatter(rows, own, dim1=1, dim2=2)
    if with_cross:
        rows = torch.cat([rows, rows.new_full((batch, n, 1), -torch.inf)], dim=2)
        cross_row = torch.cat([key_bias, key_bias.new_full((batch, 1), -torch.inf)], dim=1)
        rows = torch.cat([rows, cross_row[:, None, :]], dim=1)
    return rows[:, None].to(dtype)


def _keep_positions(matching: Matching, position: Tensor) -> Tensor:
    """A merged token's position is the latest of its members'."""
    latest = position.scatter_reduce(
        1, matching.dst_idx, position.gather(1, matching.src_idx), reduce="amax"
    )
    return matching.keep(latest)


def merging_block(
    ops: BlockOps,
    state: TokenState,
    *,
    r: int,
    plan: EncoderPlan,
    cross_offset: Tensor | None = None,
    training: bool = False,
    relevance: Callable[[Tensor], Tensor] | None = None,
) -> tuple[TokenState, Matching | None]:
    """Run one block on ``state``, merging ``r`` tokens after attention.

    ``relevance`` (text guidance) maps the visible tokens [B, N, C] to their relevance to each
    image's own prompt [B, N]; it replaces the cross-token importance in the matching score."""
    hidden = state.hidden
    batch, num_visible, width = hidden.shape
    with_cross = state.cross is not None
    sequence = hidden
    if with_cross:
        cross_in = state.cross.detach()
        if cross_offset is not None:
            cross_in = cross_in + cross_offset.to(cross_in.dtype)
        sequence = torch.cat([hidden, cross_in], dim=1)
    query, key, value = ops.qkv(ops.norm1(sequence))
    mask = _attention_mask(
        state, with_cross, plan.proportional_attention, query.dtype, plan.cross_token_attended
    )
    dropout = ops.dropout if training else 0.0
    need_probs = r > 0 and plan.guidance == "attention"
    probs = None
    if need_probs or ops.eager:
        logits = (query @ key.transpose(-1, -2)) * ops.scale
        if mask is not None:
            logits = logits + mask
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        attended = F.dropout(probs, p=dropout, training=training) @ value
    else:
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=ops.scale
        )
    attended = attended.transpose(1, 2).reshape(batch, sequence.shape[1], -1)
    sequence = sequence + ops.out(attended)

    matching = None
    if r > 0:
        visible, cross_out = sequence[:, :num_visible], sequence[:, num_visible:]
        visible_keys = key[:, :, :num_visible]
        metric = visible_keys.mean(dim=1)
        importance = None
        if with_cross and plan.guidance != "none":
            key_bias = None
            if mask is not None:
                key_bias = mask[:, :, -1:, :num_visible]  # the cross row's own bias
            importance = cross_row_importance(
                query[:, :, num_visible:], visible_keys, ops.scale, key_bias
            )
            if need_probs:
                importance = importance + mean_received_attention(probs, num_visible)
        score_importance = importance
        if plan.guidance == "text" and relevance is not None:
            score_importance = relevance(visible)  # [B, N]: each image against its prompt
        score_importance = _scaled_importance(score_importance, state.protected, plan)
        if plan.matching == "bipartite":
            matching = bipartite_matching(
                metric, r, protected=state.protected, protected_prefix=state.protected_prefix
            )
        else:
            matching = complete_graph_matching(
                metric,
                r,
                score_importance,
                state.protected,
                max_sources_per_destination=plan.max_sources_per_destination,
                hub_guard=plan.hub_guard,
                protected_prefix=state.protected_prefix,
            )
        visible, size = matching.merge(visible, state.size, importance)
        state = replace(
            state,
            size=size.detach(),
            protected=matching.keep(state.protected),
            key_valid=None if state.key_valid is None else matching.keep(state.key_valid),
            position=None if state.position is None else _keep_positions(matching, state.position),
            marker=None if state.marker is None else matching.keep(state.marker),
        )
        sequence = torch.cat([visible, cross_out], dim=1)

    sequence = sequence + ops.mlp(sequence)
    end = sequence.shape[1] - (1 if with_cross else 0)
    return replace(
        state, hidden=sequence[:, :end], cross=sequence[:, end:] if with_cross else None
    ), matching


def _scaled_importance(
    importance: Tensor | None, protected: Tensor, plan: EncoderPlan
) -> Tensor | None:
    """The importance term of the matching score: raw x weight, or standardised x weight."""
    if importance is None:
        return None
    if plan.importance_norm == "standard":
        return standardized_importance(importance, protected, plan.importance_weight)
    return importance if plan.importance_weight == 1.0 else importance * plan.importance_weight


# ------------------------------------------------------------------ Hugging Face layers


@dataclass(frozen=True)
class LayerStep:
    """The non-tensor part of one merging layer call (a keyword argument)."""

    r: int
    plan: EncoderPlan
    relevance: Callable[[Tensor], Tensor] | None = None  # text guidance (see merging_block)
    protected_prefix: int | None = None  # see TokenState


def _merging_layer_forward(
    self: nn.Module,
    hidden_states: Tensor,
    *args: Any,
    crossget_step: LayerStep | None = None,
    **kwargs: Any,
) -> Any:
    """Without a step: the original forward, bit for bit.  With one, ``args`` are the tensors
    ``(size, protected, cross, cross_offset)`` and the result is ``(hidden, size, protected,
    cross, src_idx, dst_idx, kept_idx)``; the indices let the caller update a source map
    without the layer holding state."""
    if crossget_step is None:
        return super(type(self), self).forward(hidden_states, *args, **kwargs)
    size, protected, cross, offset = args
    state = TokenState(
        hidden_states, size, protected, cross=cross, protected_prefix=crossget_step.protected_prefix
    )
    state, matching = merging_block(
        layer_ops(self),
        state,
        r=crossget_step.r,
        plan=crossget_step.plan,
        cross_offset=offset,
        training=self.training,
        relevance=crossget_step.relevance,
    )
    if matching is None:
        empty = torch.empty(hidden_states.shape[0], 0, dtype=torch.long, device=size.device)
        return state.hidden, state.size, state.protected, state.cross, empty, empty, empty
    return (
        state.hidden,
        state.size,
        state.protected,
        state.cross,
        matching.src_idx,
        matching.dst_idx,
        matching.kept_idx,
    )


_SUBCLASSES: dict[type, type] = {}
_ORIGINALS: dict[type, type] = {}


def _merging_subclass(original: type) -> type:
    """One subclass per original class (isinstance checks, hooks and checkpointing work)."""
    if original not in _SUBCLASSES:
        patched = type(
            f"CrossGET{original.__name__}",
            (original,),
            {
                "forward": _merging_layer_forward,
                "_crossget_takes_mask": "attention_mask"
                in inspect.signature(original.forward).parameters,
            },
        )
        _SUBCLASSES[original] = patched
        _ORIGINALS[patched] = original
    return _SUBCLASSES[original]


def patch_layers(layers: Sequence[nn.Module]) -> None:
    """Swap each layer instance's class to its merging subclass (no-op when already done)."""
    for layer in layers:
        layer_ops(layer)  # fail early, before anything is swapped, on an unknown layer type
    for layer in layers:
        if type(layer) not in _ORIGINALS:
            layer.__class__ = _merging_subclass(type(layer))


def unpatch_layers(layers: Sequence[nn.Module]) -> None:
    for layer in layers:
        layer.__class__ = _ORIGINALS.get(type(layer), type(layer))


def run_encoder(
    layers: Sequence[nn.Module],
    inputs_embeds: Tensor,
    plan: EncoderPlan,
    *,
    has_cls: bool = True,
    cross_offsets: Tensor | None = None,
    query_offset: Tensor | None = None,
    attention_mask: Tensor | None = None,
    relevance: Callable[[Tensor], Tensor] | None = None,
    **kwargs: Any,
) -> MergingEncoderOutput:
    """Run the first ``plan.num_layers`` (patched) layers, merging as planned.

    ``has_cls``: index 0 is a class token, never merged; the cross token starts as its state.
    A tower without CLS (SigLIP) protects nothing and starts the cross token as the mean
    patch embedding: it sits in the residual stream the layers read (the SigLIP head's probe
    is a query for its own pooling attention after the last layer, in another space, and
    towers loaded without the head do not have it).  ``cross_offsets`` [L, C] are the learnable
    vision prompts ``P`` (one per layer); ``query_offset`` [B, 1, C] the prompt-conditioned
    offset (query guidance); ``relevance`` maps a layer's tokens [B, N, C] to their relevance to
    each image's own prompt [B, N] (text guidance, from the LLaVA adapter); before each layer the cross token becomes
    ``stopgrad(previous) + P_l (+ query offset)``.
    """
    if plan.num_layers > len(layers):
        raise ValueError(f"plan runs {plan.num_layers} layers, encoder has {len(layers)}")
    if not plan.merges and not plan.uses_cross_token:
        # The original layers through __call__, so output-capture hooks still fire.
        hidden = inputs_embeds
        for layer in layers[: plan.num_layers]:
            if attention_mask is None and not getattr(layer, "_crossget_takes_mask", True):
                hidden = layer(hidden, **kwargs)
            else:
                hidden = layer(hidden, attention_mask, **kwargs)
        return MergingEncoderOutput(last_hidden_state=hidden)
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions is not available while CrossGET merges tokens (the merged "
            "layers compute attention themselves); call crossget.remove(model) to inspect "
            "attention maps"
        )
    if attention_mask is not None:
        raise ValueError("CrossGET vision layers take no attention mask (image tokens only)")
    batch, n, _ = inputs_embeds.shape
    device = inputs_embeds.device
    hidden = inputs_embeds
    size = torch.ones(batch, n, device=device, dtype=torch.float32)
    protected = torch.zeros(batch, n, dtype=torch.bool, device=device)
    if has_cls:
        protected[:, 0] = True
    cross = None
    if plan.uses_cross_token:
        cross = hidden[:, :1] if has_cls else hidden.mean(dim=1, keepdim=True)
    source = None
    if plan.track_source:
        source = torch.eye(n, device=device, dtype=torch.float32).expand(batch, n, n)
    first_patch = torch.arange(n, device=device).expand(batch, n)
    cross_states: list[Tensor] = []
    for index, layer in enumerate(layers[: plan.num_layers]):
        offset = None
        if cross is not None:
            offset = cross_offsets[index] if cross_offsets is not None else None
            if offset is not None and not torch.is_grad_enabled():
                # A view of a Parameter under no_grad claims requires_grad without a grad_fn,
                # which trips module hooks (e.g. FlopCounterMode's tracker).
                offset = offset.detach()
            if query_offset is not None:
                offset = query_offset if offset is None else offset + query_offset
        hidden, size, protected, cross, src, dst, kept = layer(
            hidden,
            size,
            protected,
            cross,
            offset,
            crossget_step=LayerStep(plan.layer_r[index], plan, relevance, 1 if has_cls else 0),
        )
        if cross is not None:
            cross_states.append(cross[:, 0])
        if src.shape[1]:
            matching = Matching(src, dst, kept)
            first_patch = matching.merge_first_patch(first_patch)
            if source is not None:
                source = matching.merge_source(source)
    return MergingEncoderOutput(
        last_hidden_state=hidden,
        token_size=size,
        first_patch=first_patch,
        cross_states=tuple(cross_states),
        source_map=source,
    )
