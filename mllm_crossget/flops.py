"""Analytic FLOPs per stage (vision tower, projector, LLM prefill) for a LLaVA/CLIP model.

Counted as ``torch.utils.flop_counter`` counts: 2 FLOPs per multiply-add of every matmul,
linear, convolution and attention product (full ``S x S`` attention, also when causal);
element-wise work is ignored.  Merging adds its similarity matrix and the cross token's row.
Peers (``mllm_crossget.peers``) count what really runs: feature-stage methods run the whole
tower up to the feature layer plus their selection, then K tokens through projector and LLM;
FastV runs every visual token through LLM layers ``< fastv_layer`` and K from there on; so does
``llm_keep_ratio``'s in-LLM stage, after the reduction before the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .peers import get_method
from .peers.fastv import ratio_keep
from .schedule import output_tokens

__all__ = ["FlopsReport", "flops_report"]


@dataclass(frozen=True)
class FlopsReport:
    vision: int
    projector: int
    llm_prefill: int
    visual_tokens: int
    tokens_per_layer: tuple[int, ...] = field(default_factory=tuple)
    # Visual tokens the LLM keeps: FastV's from its pruning layer on, else visual_tokens
    # (flops_report always sets it; None only in a report built by hand).
    kept_tokens: int | None = None
    overhead: int = 0  # FLOPs spent choosing tokens (similarities, attention rows), included

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm_prefill

    def as_dict(self) -> dict[str, int | list[int]]:
        return {
            "vision": self.vision,
            "projector": self.projector,
            "llm_prefill": self.llm_prefill,
            "total": self.total,
            "visual_tokens": self.visual_tokens,
            "kept_tokens": self.visual_tokens if self.kept_tokens is None else self.kept_tokens,
            "overhead": self.overhead,
            "tokens_per_layer": list(self.tokens_per_layer),
        }


def _vision_flops(
    vision_config: object,
    image_size: int,
    layer_r: tuple[int, ...],
    layers_run: int,
    cross_token: bool,
    prefix: int = 1,
) -> tuple[int, tuple[int, ...], int]:
    width = vision_config.hidden_size
    inner = getattr(vision_config, "intermediate_size", None)
    if inner is None:  # DINOv2 states the MLP width as a ratio
        inner = int(width * vision_config.mlp_ratio)
    heads = vision_config.num_attention_heads
    head_dim = width // heads
    patch = vision_config.patch_size
    patches = (image_size // patch) ** 2
    total = 2 * patches * width * 3 * patch * patch  # patch embedding convolution
    n = patches + prefix  # CLS (SigLIP has none)
    counts = []
    overhead = 0
    schedule = layer_r if layer_r else (0,) * layers_run
    for r in schedule:
        t = n + (1 if cross_token else 0)
        total += 4 * 2 * t * width * width  # q, k, v, out projections
        total += 2 * 2 * t * t * width  # QK^T and AV
        removed = min(r, (n - prefix) // 2)
        if removed:
            overhead += 2 * n * n * head_dim  # cosine similarity of head-averaged keys
            if cross_token:
                overhead += 2 * heads * n * head_dim  # cross token's attention row
        n -= removed
        t = n + (1 if cross_token else 0)
        total += 2 * 2 * t * width * inner  # MLP
        counts.append(n)
    return total + overhead, tuple(counts), overhead


def _llm_flops(
    text_config: object, sequence: int, logits_positions: int, layers: int | None = None
) -> int:
    """Decoder FLOPs for ``sequence`` tokens through ``layers`` layers (all by default)."""
    width = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or width // heads
    inner = text_config.intermediate_size
    per_layer = 2 * sequence * width * heads * head_dim * 2  # q and o
    per_layer += 2 * sequence * width * kv_heads * head_dim * 2  # k and v
    per_layer += 2 * 2 * sequence * sequence * heads * head_dim  # QK^T and AV
    per_layer += 3 * 2 * sequence * width * inner  # gate, up, down
    head = 2 * logits_positions * width * text_config.vocab_size
    if layers is not None:
        return layers * per_layer
    return text_config.num_hidden_layers * per_layer + head


def flops_report(
    model: nn.Module,
    image_size: int | None = None,
    prompt_length: int = 64,
    visual_tokens: int | None = None,
    logits_positions: int = 1,
) -> FlopsReport:
    """FLOPs of one image + ``prompt_length`` text tokens through each stage.

    Works on patched and unpatched models (unpatched = full tokens).  ``logits_positions`` is
    how many positions the LM head scores (1 for ``generate``'s prefill).
    """
    config = model.config
    vision_config = getattr(config, "vision_config", config)
    size = image_size or vision_config.image_size
    planner = getattr(model, "crossget_planner", None)
    crossget = getattr(model, "crossget_config", None)
    prefix = 0 if getattr(vision_config, "model_type", "") == "siglip_vision_model" else 1
    if planner is not None and not hasattr(planner, "input_tokens"):
        raise ValueError(
            f"flops_report counts one tower pass per image; {type(model).__name__} encodes "
            "tiles (use crossget.num_visual_tokens for its token counts)"
        )
    if planner is not None:
        n = planner.input_tokens(size, size)
        layer_r = planner.layer_r(n, visual_tokens)
        layers_run = planner.layers_run
        dropped = planner.dropped_tokens
        cross = crossget.uses_cross_token and (
            any(layer_r) or crossget.cross_token_attended or crossget.cross_token_to_llm
        )
        visual = output_tokens(n, layer_r, planner.num_protected) - dropped
        visual += planner.extra_tokens  # cross_token_to_llm: the cross token reaches the LLM
    else:
        # The unpatched tower runs every layer, also those past the feature layer.
        layers_run = vision_config.num_hidden_layers
        dropped = 0
        if hasattr(config, "vision_feature_select_strategy"):
            dropped = 1 if config.vision_feature_select_strategy == "default" else 0
        layer_r, cross = (0,) * layers_run, False
        visual = (size // vision_config.patch_size) ** 2 + prefix - dropped
    vision, counts, overhead = _vision_flops(
        vision_config, size, tuple(layer_r), layers_run, cross, prefix
    )
    kept = None
    if crossget is not None and not crossget.merges_in_encoder:
        visual = planner.visual_tokens(size, size, visual_tokens)
        kept = planner.kept_tokens(size, size, visual_tokens)
        method = get_method(crossget.method)
        if method.overhead is not None:
            patches = (size // vision_config.patch_size) ** 2
            extra = method.overhead(
                patches,
                kept - (1 - dropped),  # the patches kept (a kept CLS is not chosen)
                vision_config.hidden_size,
                vision_config.num_attention_heads,
            )
            vision += extra
            overhead += extra
    if crossget is not None and crossget.llm_keep_ratio is not None:
        kept = ratio_keep(visual, crossget.llm_keep_ratio)  # the in-LLM stage after reduction
    projector = llm = 0
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        text_width = text_config.hidden_size
        projector = 2 * visual * vision_config.hidden_size * text_width
        projector += 2 * visual * text_width * text_width
        llm = _llm_flops(text_config, prompt_length + visual, logits_positions)
        if kept is not None and kept != visual:  # FastV, llm_keep_ratio: shorter from layer K on
            layer = crossget.fastv_layer
            rest = text_config.num_hidden_layers - layer
            short = prompt_length + kept
            llm -= _llm_flops(text_config, prompt_length + visual, 0, rest)
            llm += _llm_flops(text_config, short, 0, rest)
            # The scoring row: the last token's query against every key, in every head.
            heads = text_config.num_attention_heads
            head_dim = getattr(text_config, "head_dim", None) or text_width // heads
            scoring = 2 * (prompt_length + visual) * heads * head_dim
            llm += scoring
            overhead += scoring
    # Every method but FastV keeps what it hands the LLM, through all LLM layers.
    kept = visual if kept is None else kept
    return FlopsReport(vision, projector, llm, visual, counts, kept, overhead)
