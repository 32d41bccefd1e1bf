"""The learnable parameters CrossGET adds to a model, kept in one module.

One ``nn.Module`` (attached to the model as ``crossget_tokens``) so that peft's
``modules_to_save`` can hold it, a state dict adds only its own keys, and removal is one
``delattr``.  Everything is zero-initialised: with zero prompts the method is training-free
(the cross token is a CLS-like summary of the image, the text cross token the LLM's own
first state).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CrossTokens", "unwrap_cross_tokens"]


class CrossTokens(nn.Module):
    """Vision prompts ``P`` [L_vis, C_vis], text prompts ``T`` [L_llm, C_llm], query map.

    The query map turns the mean input embedding of the prompt's text into an offset of the
    vision cross token (``guidance="query"``): LayerNorm then a zero-initialised linear map,
    so an untrained model behaves exactly like ``guidance="cross"``.
    """

    def __init__(
        self,
        vision_layers: int,
        vision_width: int,
        text_layers: int = 0,
        text_width: int = 0,
        query_guidance: bool = False,
    ) -> None:
        super().__init__()
        self.vision_prompts = nn.Parameter(torch.zeros(vision_layers, vision_width))
        self.text_prompts = nn.Parameter(torch.zeros(text_layers, text_width))
        self.query_map: nn.Sequential | None = None
        if query_guidance:
            if text_width <= 0:
                raise ValueError("query guidance needs the LLM's embedding width (text_width > 0)")
            linear = nn.Linear(text_width, vision_width)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            self.query_map = nn.Sequential(nn.LayerNorm(text_width), linear)

    def query_offset(self, pooled_text: Tensor) -> Tensor:
        """[B, C_text] mean prompt embedding -> [B, 1, C_vis] offset of the vision cross token."""
        if self.query_map is None:
            raise RuntimeError("this model was set up without query guidance")
        weight = self.query_map[1].weight
        return self.query_map(pooled_text.to(weight.dtype))[:, None, :]


def unwrap_cross_tokens(module: nn.Module) -> CrossTokens:
    """The live CrossTokens, unwrapping peft's ``modules_to_save`` copy when present."""
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        return copies[module.active_adapter]
    return module
