"""Proportional attention inside the LLM: ``+ log(size)`` on the keys of visual tokens.

Why: a reduced visual token stands for ``size`` patches of the unreduced image.  Inside the
tower, ToMe's proportional attention already gives such a token the attention mass of the
patches it absorbed; the LLM, trained on unreduced images, would otherwise weigh a token that
holds 45 patches like a single patch.  Adding ``log(size_j)`` to every attention logit of
visual key ``j`` (``CrossGETConfig.llm_proportional_attention``) makes the LLM's softmax
treat it as ``size_j`` identical copies of itself, exactly, with no training.

How it runs with Hugging Face's LLMs: the LLaVA adapter turns each forward's 2-D padding mask
into the 4-D additive mask the decoder would build (causal, padding) plus the bias
(:func:`biased_mask`), and hands that to the LLM, which uses a 4-D mask as given.  The bias of
a prefill (:func:`visual_key_bias`) is stored on the KV cache object (:func:`store`) so that
decode steps (``generate``; beams repeat their request's rows and reorder within a request)
rebuild the mask of the keys they attend to; a later prefill on the same cache (a second
image turn) appends its bias.  The mask is an input of every layer, so gradient checkpointing
recomputes exactly what ran.  Needs ``sdpa`` or ``eager`` attention in the LLM (a float mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["STATE_ATTR", "biased_mask", "check", "store", "stored", "visual_key_bias"]

STATE_ATTR = "_crossget_llm_key_bias"  # on the KV cache: [B, K] bias of every cached key


def visual_key_bias(
    input_ids: Tensor, image_token_id: int, sizes: Sequence[Tensor], dtype: torch.dtype
) -> Tensor:
    """[B, S] additive key bias: ``log(size)`` at each image placeholder, 0 elsewhere.

    ``sizes`` holds one [K_i] tensor per image in reading order (row by row, left to right),
    the order in which LLaVA scatters image features into the placeholders.
    """
    is_image = input_ids == image_token_id
    flat = torch.cat([s.reshape(-1) for s in sizes]) if sizes else input_ids.new_empty(0)
    if not torch.compiler.is_compiling():  # data-dependent checks: graph breaks when compiled
        check_sizes(flat, is_image)
    bias = torch.zeros(input_ids.shape, dtype=dtype, device=input_ids.device)
    bias[is_image] = flat.to(device=input_ids.device, dtype=torch.float64).log().to(dtype)
    return bias


def check_sizes(flat: Tensor, is_image: Tensor) -> None:
    """One size per image placeholder, every size at least 1 (sizes count patches)."""
    if flat.numel() != int(is_image.sum()):
        raise ValueError(
            f"the prompt has {int(is_image.sum())} image placeholders but the visual tokens "
            f"carry {flat.numel()} sizes"
        )
    if flat.numel() and bool((flat < 1).any()):
        raise ValueError("a visual token's size is below 1 (sizes count patches)")


def biased_mask(
    attention_mask: Tensor | None,
    key_bias: Tensor,
    query_length: int,
    past_length: int,
    dtype: torch.dtype,
) -> Tensor:
    """[B, 1, Q, K] additive mask: causal, padding, and ``key_bias`` on the keys.

    ``attention_mask`` is the usual 2-D padding mask over all ``K = past_length +
    query_length`` keys (1 = real token; ``None`` = no padding); the queries are the last
    ``query_length`` positions.  Masked entries hold the dtype's most negative number (as
    eager attention uses), so a query with no visible key (left padding) stays finite.
    ``key_bias`` [B, K0] covers the first K0 keys; later keys (generated tokens) get 0.
    """
    batch = key_bias.shape[0]
    device = key_bias.device
    keys = past_length + query_length
    query_position = torch.arange(past_length, keys, device=device)[:, None]
    allowed = (torch.arange(keys, device=device)[None, :] <= query_position)[None, None]
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, keys):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"{(batch, keys)} (past {past_length} + {query_length} new tokens)"
            )
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    bias = torch.zeros(batch, keys, dtype=dtype, device=device)
    covered = min(keys, key_bias.shape[1])
    bias[:, :covered] = key_bias[:, :covered].to(dtype)
    additive = bias[:, None, None, :].expand(batch, 1, query_length, keys)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)


def store(cache: Any, key_bias: Tensor) -> Tensor:
    """Keep this prefill's ``key_bias`` [B, S] on ``cache`` behind the bias of the keys it
    already holds (a later turn); returns the bias of every key, [B, past + S]."""
    if cache is None:
        return key_bias
    past = int(cache.get_seq_length())
    full = key_bias
    if past:
        earlier = stored(cache)
        front = key_bias.new_zeros(key_bias.shape[0], past)
        if earlier is not None and earlier.shape[0] == key_bias.shape[0]:
            kept = min(past, earlier.shape[1])
            front[:, :kept] = earlier[:, :kept]
        full = torch.cat([front, key_bias], dim=1)
    setattr(cache, STATE_ATTR, full)
    return full


def stored(cache: Any) -> Tensor | None:
    """The key bias a prefill left on ``cache`` (None: no cache, or nothing was reduced)."""
    return getattr(cache, STATE_ATTR, None) if cache is not None else None


def check(language_model: nn.Module) -> None:
    """Refuse, before anything is patched, an LLM whose attention cannot take a float mask."""
    implementation = getattr(language_model.config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            "llm_proportional_attention adds log(size) to the LLM's attention logits, which "
            f"needs 'sdpa' or 'eager' attention, got {implementation!r}; load the model with "
            "attn_implementation='sdpa' or set llm_proportional_attention=False"
        )
