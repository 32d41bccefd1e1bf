"""Per-token importance scores that steer who merges and how much each member weighs."""

from __future__ import annotations

from torch import Tensor

__all__ = ["cross_row_importance", "mean_received_attention"]


def cross_row_importance(
    cross_query: Tensor, keys: Tensor, scaling: float, key_bias: Tensor | None = None
) -> Tensor:
    """The cross token's attention over the other tokens, averaged over heads: [B, N].

    One query row costs O(N) per head, so the main attention can stay on SDPA/FlashAttention,
    which never materialise probabilities.  ``cross_query`` is [B, H, 1, D], ``keys``
    [B, H, N, D] (the cross token's own key excluded); ``key_bias`` [B, 1, 1, N] is the same
    proportional-attention bias the layer uses, so importance matches what attention does.
    """
    logits = (cross_query.float() @ keys.float().transpose(-1, -2)) * scaling  # [B, H, 1, N]
    if key_bias is not None:
        logits = logits + key_bias.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, :]


def mean_received_attention(attention_probs: Tensor, num_visible: int) -> Tensor:
    """Attention each visible token receives from the visible tokens, averaged: [B, N].

    This is the authors' LLaVA importance term; it needs full probabilities (eager attention).
    """
    visible = attention_probs[:, :, :num_visible, :num_visible]
    return visible.float().mean(dim=(1, 2))
