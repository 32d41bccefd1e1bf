"""One pre-norm transformer block with CrossGET merging, for towers the HF-CLIP vision path
does not cover: open_clip blocks (``nn.MultiheadAttention`` hides its keys) and CLIP *text*
towers (causal, padded, pooled at the end-of-text token).

A block is described by :class:`BlockOps` (how to normalise, project q/k/v, project the
attention output and run the MLP branch), built by the adapter from the block's own modules;
the block's class is never changed.  Everything that changes from layer to layer travels in a
:class:`TokenState` that each call returns: token sizes, which tokens are protected, which
may be attended, the causal positions, the end-of-text marker and the cross token.

Causal towers.  Merging reorders nothing (survivors keep their order), but a merged token may
hold members from several positions.  Each token carries the *latest* original position of
its members, and token ``q`` may attend token ``k`` iff ``pos[k] <= pos[q]``: no token ever
sees information from its future, and a merged token becomes visible once its last member
would have been.  With no merge this is exactly the usual causal mask.  (The authors' CLIP
code instead rebuilds a plain lower-triangular mask over the merged slots, which lets tokens
between a destination and a later source see that source.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..guidance import cross_row_importance, mean_received_attention
from ..merge import Matching, bipartite_matching, complete_graph_matching
from .hf_clip import EncoderPlan

__all__ = ["BlockOps", "TokenState", "merging_block"]


@dataclass(frozen=True)
class BlockOps:
    """How to run one pre-norm block: ``x += out(attn(norm1(x)))``, then ``x = mlp(x)``.

    ``qkv`` maps ``[B, T, C]`` to three ``[B, H, T, D]`` tensors; ``out`` includes the
    output projection and any layer scale; ``mlp`` returns the block's output including its
    residual (``x + ls_2(mlp(ln_2(x)))``).
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    out: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    scale: float
    dropout: float = 0.0


@dataclass(frozen=True)
class TokenState:
    """One tower's tokens between two blocks (per forward; returned, never stored).

    ``protected`` tokens are never merged (CLS, end-of-text, padding); ``key_valid`` says
    which tokens may be attended (``None``: all); ``position`` is each token's latest original
    position for causal towers (``None``: bidirectional); ``marker`` flags the token to pool
    (end-of-text) so it can be found after merges; ``cross`` is the cross token ``[B, 1, C]``.
    """

    hidden: Tensor
    size: Tensor
    protected: Tensor
    key_valid: Tensor | None = None
    position: Tensor | None = None
    marker: Tensor | None = None
    cross: Tensor | None = None

    def pooled_index(self) -> Tensor:
        """[B] index of the marked token (the first one when several are marked)."""
        if self.marker is None:
            raise ValueError("this state marks no token to pool")
        return self.marker.to(torch.int8).argmax(dim=1)


def _attention_mask(
    state: TokenState, with_cross: bool, proportional: bool, dtype: torch.dtype
) -> Tensor | None:
    """Additive mask ``[B, 1, 1 or T, T]``: ``log(size)`` per key, ``-inf`` for keys that may
    not be attended (padding, the cross token, causal future)."""
    size = state.size
    batch, n = size.shape
    if state.position is None and state.key_valid is None and not proportional and not with_cross:
        return None
    key_bias = size.log() if proportional else torch.zeros_like(size)
    if state.key_valid is not None:
        key_bias = key_bias.masked_fill(~state.key_valid, -torch.inf)
    if state.position is None:
        if with_cross:
            key_bias = torch.cat([key_bias, key_bias.new_full((batch, 1), -torch.inf)], dim=1)
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
) -> tuple[TokenState, Matching | None]:
    """Run one block on ``state``, merging ``r`` tokens after attention.

    The cross token (when ``state.cross`` is set) becomes ``stopgrad(cross) + cross_offset``,
    reads every attendable token with its own query row (its attention row is the importance)
    and is masked out as a key, so it never changes the other tokens.
    """
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
    mask = _attention_mask(state, with_cross, plan.proportional_attention, query.dtype)
    dropout = ops.dropout if training else 0.0
    need_probs = r > 0 and plan.guidance == "attention"
    probs = None
    if need_probs:
        logits = (query @ key.transpose(-1, -2)) * ops.scale
        if mask is not None:
            logits = logits + mask
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        attended = F.dropout(probs, p=dropout, training=training) @ value
    else:
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=ops.scale
        )
    attended = attended.transpose(1, 2).reshape(batch, sequence.shape[1], width)
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
            if probs is not None:
                importance = importance + mean_received_attention(probs, num_visible)
        if plan.matching == "bipartite":
            matching = bipartite_matching(metric, r, protected=state.protected)
        else:
            matching = complete_graph_matching(metric, r, importance, state.protected)
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

    sequence = ops.mlp(sequence)
    end = sequence.shape[1] - (1 if with_cross else 0)
    return replace(
        state, hidden=sequence[:, :end], cross=sequence[:, end:] if with_cross else None
    ), matching
