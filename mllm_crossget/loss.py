"""Cross-token alignment loss (pure tensor math)."""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["symmetric_js_divergence"]


def symmetric_js_divergence(first: Tensor, second: Tensor) -> Tensor:
    """Jensen-Shannon divergence between ``softmax(first)`` and ``softmax(second)``, batch mean.

    JS is symmetric by construction: ``0.5 KL(p||m) + 0.5 KL(q||m)`` with ``m = (p + q) / 2``;
    it is bounded by ``log 2``, so the alignment term cannot swamp the LM loss.
    """
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {tuple(first.shape)} vs {tuple(second.shape)}")
    log_p = first.float().log_softmax(dim=-1)
    log_q = second.float().log_softmax(dim=-1)
    log_m = (log_p.exp() + log_q.exp()).mul(0.5).clamp_min(1e-30).log()
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


JS_UPPER_BOUND = math.log(2.0)
