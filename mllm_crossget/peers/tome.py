"""ToMe as a peer: CrossGET's own encoder adapter with ToMe's bipartite matching, no guidance.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (code: facebookresearch/ToMe).
The matcher is :func:`mllm_crossget.merge.bipartite_matching` (alternate A/B split, the ``r``
most similar A tokens merge into their best B partner, size-weighted average, proportional
attention).  ``CrossGETConfig(method="tome")`` is shorthand for
``CrossGETConfig(matching="bipartite", guidance="none")``: same schedules, same budgets.
"""

from __future__ import annotations

__all__ = ["TOME_SETTINGS"]

# The config fields that make CrossGET's merging adapter behave like ToMe.
TOME_SETTINGS: dict[str, str] = {"matching": "bipartite", "guidance": "none"}
