"""CrossGET visual-token merging for multimodal LLMs on Hugging Face transformers.

``model, processor = crossget.apply(model, CrossGETConfig(visual_tokens=144), processor)``
"""

from .api import (
    SUPPORTED_MODELS,
    alignment_loss,
    apply,
    budget,
    cross_tokens,
    from_pretrained,
    is_applied,
    num_visual_tokens,
    remove,
    save_pretrained,
)
from .config import CrossGETConfig
from .flops import FlopsReport, flops_report

__all__ = [
    "SUPPORTED_MODELS",
    "CrossGETConfig",
    "FlopsReport",
    "alignment_loss",
    "apply",
    "budget",
    "cross_tokens",
    "flops_report",
    "from_pretrained",
    "is_applied",
    "num_visual_tokens",
    "remove",
    "save_pretrained",
]
__version__ = "0.1.0"
