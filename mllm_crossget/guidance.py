"""Per-token importance scores that steer who merges and how much each member weighs."""

from __future__ import annotations

import torch
from torch import Tensor

from .merge import exact_dtypes

__all__ = [
    "cross_row_importance",
    "mean_received_attention",
    "standardized_importance",
    "text_relevance",
]


@exact_dtypes
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


def standardized_importance(
    importance: Tensor, protected: Tensor | None = None, weight: float = 1.0
) -> Tensor:
    """``weight`` x the importance standardised per row over the unprotected tokens: [B, N].

    A raw attention row is about 1/N per token while best similarities bunch near 1, so
    added as is it is either noise (CLS attention of an untrained cross token) or nothing.
    Standardised (zero mean, unit deviation over the mergeable tokens of each image), its
    scale is known and ``weight`` says how many similarity units one deviation is worth.
    Protected tokens get 0 (they never merge); a row with no spread gets all zeros.
    """
    values = importance.double() if importance.dtype == torch.float64 else importance.float()
    mask = torch.ones_like(values, dtype=torch.bool) if protected is None else ~protected.bool()
    count = mask.sum(dim=1, keepdim=True).clamp_min(1)
    mean = (values * mask).sum(dim=1, keepdim=True) / count
    centred = (values - mean) * mask
    std = (centred.square().sum(dim=1, keepdim=True) / count).sqrt()
    scaled = torch.where(std > 0, centred / std.clamp_min(1e-12), torch.zeros_like(centred))
    return scaled * weight


@exact_dtypes
def text_relevance(projected: Tensor, prompt: Tensor, prompt_mask: Tensor) -> Tensor:
    """Training-free relevance of each visual token to its own prompt: [B, N].

    ``projected`` [B, N, C] are the visual tokens in the LLM's input space (after the
    multimodal projector), ``prompt`` [B, T, C] the input embeddings of each row's prompt
    tokens and ``prompt_mask`` [B, T] which of them count.  For every prompt token the cosine
    similarities to the image's tokens are standardised over the image (so a template word
    that is equally close to every token contributes nothing that stands out), and a visual
    token's relevance is its largest standardised similarity to any prompt token: it is
    high for the patches that look like what one word of the question names.
    """
    work = torch.float64 if projected.dtype == torch.float64 else torch.float32
    tokens = projected.to(work)
    tokens = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    words = prompt.to(work)
    words = words / words.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = tokens @ words.transpose(1, 2)  # [B, N, T]
    mean = cosine.mean(dim=1, keepdim=True)
    std = cosine.std(dim=1, unbiased=False, keepdim=True)
    z = torch.where(std > 0, (cosine - mean) / std.clamp_min(1e-12), torch.zeros_like(cosine))
    z = z.masked_fill(~prompt_mask.bool()[:, None, :], -torch.inf)
    relevance = z.amax(dim=-1)
    return torch.where(torch.isfinite(relevance), relevance, torch.zeros_like(relevance))
