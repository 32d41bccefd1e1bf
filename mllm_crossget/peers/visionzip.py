"""VisionZip: dominant tokens by CLS attention plus a few contextual tokens, after the encoder.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025 (code: dvlab-research/VisionZip).  At the feature layer:

1. *dominant*: the ``K - c`` patches that receive the most attention from CLS (attention
   summed over heads) are kept as they are;
2. *contextual*: of the remaining patches, ``c`` targets are taken at a uniform stride (in
   patch order); every other remaining patch joins the target whose head-averaged key is
   most similar (cosine); a contextual token is ``target + mean(its members)``, exactly as
   the authors' code computes it (a target without members stays itself).

``c = round(K * 10 / 64)`` reproduces the authors' splits (54 + 10 for 64 tokens, 108 + 20 for
128, 162 + 30 for 192).  Output order: dominant tokens in patch order, then contextual ones.

Difference from the authors' code: they keep CLS as one of the dominant tokens; here the
model's ``vision_feature_select_strategy`` decides about CLS as for every other method
(LLaVA-1.5 drops it), so all K tokens come from patches.  Ties in the CLS ranking go to the
lower index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..merge import exact_dtypes
from .reduction import FeatureInputs, Reduction

__all__ = ["contextual_count", "visionzip_tokens"]


def contextual_count(k: int) -> int:
    """Contextual tokens for a budget of K (the authors' 10-in-64 ratio, rounded half up)."""
    return (k * 10 + 32) // 64


def visionzip_tokens(inputs: FeatureInputs, k: int) -> Reduction:
    features, attention, keys = inputs.features, inputs.cls_attention, inputs.keys
    if attention is None or keys is None:
        raise ValueError("VisionZip needs the feature layer's CLS attention and keys")
    batch, n, width = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"VisionZip needs 1 <= K <= N={n}, got K={k}")
    contextual = contextual_count(k)
    dominant = k - contextual
    device = features.device
    order = torch.sort(-attention.float(), dim=1, stable=True).indices
    dominant_idx = order[:, :dominant].sort(dim=1).values  # [I, d]
    is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=device)
    is_dominant.scatter_(1, dominant_idx, True)
    assignment = torch.full((batch, n), -1, dtype=torch.long, device=device)
    assignment.scatter_(1, dominant_idx, torch.arange(dominant, device=device).expand(batch, -1))
    parts = [features.gather(1, dominant_idx[..., None].expand(-1, -1, width))]
    if contextual:
        # The rest, in patch order (a stable sort of the flag keeps the order).
        rest_idx = torch.sort(is_dominant.to(torch.uint8), dim=1, stable=True).indices[
            :, : n - dominant
        ]
        context, rest_assignment = _contextual(features, keys, rest_idx, contextual)
        parts.append(context)
        assignment.scatter_(1, rest_idx, rest_assignment + dominant)
    return Reduction(torch.cat(parts, dim=1), assignment)


@exact_dtypes
def _contextual(
    features: Tensor, keys: Tensor, rest_idx: Tensor, count: int
) -> tuple[Tensor, Tensor]:
    """``count`` contextual tokens from the non-dominant patches ``rest_idx`` [I, M]."""
    width = features.shape[-1]
    m = rest_idx.shape[1]
    device = features.device
    step = max(1, m // count)
    target_pos = torch.arange(0, m, step, device=device)[:count]  # positions within the rest
    is_target = torch.zeros(m, dtype=torch.bool, device=device)
    is_target[target_pos] = True
    member_pos = (~is_target).nonzero().flatten()
    rest = features.gather(1, rest_idx[..., None].expand(-1, -1, width))
    rest_keys = keys.gather(1, rest_idx[..., None].expand(-1, -1, keys.shape[-1])).float()
    rest_keys = rest_keys / rest_keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    targets = rest[:, target_pos]
    rest_assignment = torch.empty(rest_idx.shape, dtype=torch.long, device=device)
    rest_assignment[:, target_pos] = torch.arange(count, device=device)
    if member_pos.numel() == 0:
        return targets, rest_assignment
    similarity = rest_keys[:, member_pos] @ rest_keys[:, target_pos].transpose(1, 2)
    choice = similarity.argmax(dim=-1)  # [I, M - c]
    rest_assignment[:, member_pos] = choice
    members = rest[:, member_pos].float()
    sums = torch.zeros(targets.shape, dtype=torch.float32, device=device)
    sums.scatter_add_(1, choice[..., None].expand(-1, -1, width), members)
    counts = torch.zeros(choice.shape[0], count, dtype=torch.float32, device=device)
    counts.scatter_add_(1, choice, torch.ones_like(choice, dtype=torch.float32))
    context = targets.float() + sums / counts.clamp_min(1.0)[..., None]
    return context.to(features.dtype), rest_assignment
