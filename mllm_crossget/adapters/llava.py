"""CrossGET inside Hugging Face LLaVA (``LlavaForConditionalGeneration``) with a CLIP,
SigLIP or DINOv2 tower.

The ``LlavaModel`` instance gets a subclass that computes image features itself: only the
vision layers up to ``vision_feature_layer`` run, merging as planned (every tower's layers go
through :mod:`.vit_layer`); CLS is dropped per ``vision_feature_select_strategy``; features go
to the LLM through LLaVA's own ``mm_encoder_outputs`` route, which accepts a different token
count per image.  Text cross tokens are forward pre-hooks on the LLM's decoder layers
(removable handles).

Towers (:data:`TOWERS`): ``CLIPVisionModel`` (CLS, ``pre_layrnorm``), ``Dinov2Model`` (CLS,
layer scales, positions interpolated to the input size by its embeddings) and
``SiglipVisionModel`` (no CLS).  A tower without CLS needs
``vision_feature_select_strategy="full"`` (``"default"`` would drop a patch as if it were
CLS); nothing is protected or dropped, and the cross token starts as the mean patch.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..config import CrossGETConfig
from ..cross_tokens import unwrap_cross_tokens
from ..guidance import text_relevance
from ..loss import symmetric_js_divergence
from ..peers import FEATURE_METHODS, fastv
from ..peers.encoder import reduce_after_encoder
from ..peers.reduction import first_patch_of_tokens, patches_per_token
from . import llm_size_bias
from .family import Family
from .vit_layer import patch_layers, run_encoder, unpatch_layers

__all__ = [
    "BUDGET_OVERRIDE",
    "TOWERS",
    "TowerKind",
    "attention_module",
    "tower_kind",
    "LlavaRuntime",
    "MergedImageFeatures",
    "original_position_ids",
    "patch_llava",
    "unpatch_llava",
]

# Per-call budgets (one per image, or one for all), set by ``crossget.budget(...)``.
BUDGET_OVERRIDE: contextvars.ContextVar[Sequence[int] | int | None] = contextvars.ContextVar(
    "crossget_budget_override", default=None
)


@dataclass(frozen=True)
class TowerKind:
    """How LLaVA's adapter runs one vision-tower class: its embeddings (everything before the
    first layer, as the tower's own forward computes them), its layer list and whether index
    0 is a class token."""

    name: str
    has_cls: bool
    embed: Any  # Callable[[nn.Module, Tensor], Tensor]: (tower, pixels) -> [I, T, C]
    layers: Any  # Callable[[nn.Module], Sequence[nn.Module]]


TOWERS: dict[str, TowerKind] = {
    kind.name: kind
    for kind in (
        TowerKind(
            "CLIPVisionModel",
            True,
            lambda tower, pixels: tower.pre_layrnorm(tower.embeddings(pixels)),
            lambda tower: tower.encoder.layers,
        ),
        TowerKind(
            "SiglipVisionModel",
            False,
            lambda tower, pixels: tower.embeddings(pixels),
            lambda tower: tower.encoder.layers,
        ),
        TowerKind(
            "Dinov2Model",
            True,
            lambda tower, pixels: tower.embeddings(pixels),
            lambda tower: tower.encoder.layer,
        ),
    )
}


def tower_kind(tower: nn.Module) -> TowerKind:
    """The :class:`TowerKind` of a vision tower instance (by its original class name)."""
    for cls in type(tower).__mro__:
        if cls.__name__ in TOWERS:
            return TOWERS[cls.__name__]
    raise TypeError(
        f"CrossGET's LLaVA adapter supports the vision towers {', '.join(TOWERS)}; got "
        f"{type(tower).__name__}"
    )


@dataclass
class LastForward:
    """What the last forward produced that the alignment loss needs (overwritten per call)."""

    vision_cross: list[Tensor] = field(default_factory=list)  # per merging layer [I, C_vis]
    text_cross: list[Tensor] = field(default_factory=list)  # per LLM layer [B, C_llm]
    image_rows: Tensor | None = None  # row of each image in the batch
    visual_tokens: list[int] = field(default_factory=list)
    visual_sizes: list[Tensor] = field(default_factory=list)  # per image [K_i]: patches held


@dataclass
class MergedImageFeatures(BaseModelOutputWithPooling):
    """LLaVA's image features (``pooler_output``, one tensor per image) and their origin.

    ``first_patch[i]`` [K_i]: for each visual token, the index of the first token of the
    unreduced feature sequence (``unreduced[i]`` tokens) it stands for.
    """

    first_patch: list[Tensor] | None = None
    unreduced: list[int] | None = None
    token_size: list[Tensor] | None = None  # per image [K_i]: unreduced tokens each one holds


@dataclass
class LlavaRuntime:
    config: CrossGETConfig
    planner: Any  # mllm_crossget.planner.TowerPlanner
    original_model_class: type
    hook_handles: list[Any] = field(default_factory=list)
    last: LastForward = field(default_factory=LastForward)
    llm_key_bias: bool = False  # llm_proportional_attention, resolved for this model


@dataclass
class _TextCrossContext:
    """What the LLM-layer hooks need during one forward (held in a context variable)."""

    prompts: Tensor  # [L_llm, C]
    first_positions: Tensor | None  # [B] first real (non-pad) token of each row
    collected: list[Tensor] = field(default_factory=list)


_TEXT_CONTEXT: contextvars.ContextVar[_TextCrossContext | None] = contextvars.ContextVar(
    "crossget_text_context", default=None
)


def _image_runs(input_ids: Tensor, image_token_id: int) -> tuple[list[int], list[int], list[int]]:
    """(row, start, length) of each contiguous run of image placeholders, in reading order."""
    rows: list[int] = []
    starts: list[int] = []
    lengths: list[int] = []
    is_image = (input_ids == image_token_id).to(torch.int8)
    padded = torch.nn.functional.pad(is_image, (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]
    for row in range(input_ids.shape[0]):
        run_starts = (edges[row] == 1).nonzero().flatten().tolist()
        run_ends = (edges[row] == -1).nonzero().flatten().tolist()
        for start, end in zip(run_starts, run_ends, strict=True):
            rows.append(row)
            starts.append(start)
            lengths.append(end - start)
    return rows, starts, lengths


def original_position_ids(
    base: Tensor,
    rows: Sequence[int],
    starts: Sequence[int],
    first_patch: Sequence[Tensor],
    unreduced: Sequence[int],
) -> Tensor:
    """LLM positions under which reduced images sit where the unreduced ones sat.

    Each visual token of an image whose run starts at ``starts[i]`` in row ``rows[i]`` takes
    the position of its first patch in the unreduced run (``first_patch[i]``, indices into the
    ``unreduced[i]`` tokens), and everything after the run keeps its unreduced distance to it.
    Every row is then shifted by the tokens it lost, so its last token keeps the position it
    has in ``base``: rotary attention only sees differences of positions, so the shift is
    invisible to the model, and generate()'s next position (last + 1) needs no stored state.
    """
    positions = base.clone()
    removed = torch.zeros(base.shape[0], dtype=base.dtype, device=base.device)
    for row, start, first, full in zip(rows, starts, first_patch, unreduced, strict=True):
        length = first.shape[0]
        if length and not torch.compiler.is_compiling() and int(first.max()) >= full:
            raise ValueError(f"a visual token's first patch {int(first.max())} is >= {full}")
        anchor = positions[row, start].clone()
        positions[row, start : start + length] = anchor + first.to(positions)
        positions[row, start + length :] += full - length
        removed[row] += full - length
    return positions - removed[:, None]


def _base_position_ids(input_ids: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """The positions the LLM would use: the caller's, else arange after the cache (as Llama)."""
    given = kwargs.get("position_ids")
    batch, length = input_ids.shape
    if given is not None:
        if given.dim() != 2:
            raise ValueError(
                f"llm_positions='original' needs 2-D position_ids, got shape {tuple(given.shape)};"
                " use CrossGETConfig(llm_positions='compact') for multi-axis positions"
            )
        return given.expand(batch, -1)
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(length, device=input_ids.device) + past).expand(batch, -1)


def _pooled_prompt(
    embeddings: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    image_token_id: int,
    query_mask: Tensor | None = None,
) -> Tensor:
    """Mean input embedding of each row's text tokens (no image placeholders, no padding).

    ``query_mask`` [B, S] restricts the pool to the prompt: training passes it so that the
    teacher-forced answer never conditions the image features (no answer leakage).
    """
    text = input_ids != image_token_id
    if attention_mask is not None:
        text = text & attention_mask.bool()
    if query_mask is not None:
        text = text & query_mask.bool()
    safe_ids = input_ids.masked_fill(~text, 0)
    embeds = embeddings(safe_ids).float() * text[..., None]
    return embeds.sum(dim=1) / text.sum(dim=1, keepdim=True).clamp_min(1)


def _llava_get_image_features(
    self: nn.Module,
    pixel_values: Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    *,
    crossget_visual_tokens: Sequence[int] | None = None,
    crossget_query_offset: Tensor | None = None,
    crossget_text_prompt: tuple[Tensor, Tensor] | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPooling:
    """Merged image features, one tensor per image (lengths may differ per image)."""
    runtime: LlavaRuntime = self._crossget_llava
    config = self.config
    layer = (
        vision_feature_layer if vision_feature_layer is not None else config.vision_feature_layer
    )
    strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise ValueError(
            f"CrossGET supports a single vision_feature_layer, got {layer!r}: merged layers "
            "have different token counts and cannot be concatenated"
        )
    kwargs.pop("image_sizes", None)
    tower = self.vision_tower
    kind = tower_kind(tower)
    layers = kind.layers(tower)

    def encode_unmerged(embeds: Tensor, plan: Any) -> Tensor:
        return run_encoder(layers, embeds, plan).last_hidden_state

    num_images = pixel_values.shape[0]
    budgets = _resolve_budgets(crossget_visual_tokens, num_images)
    groups: dict[int | None, list[int]] = {}
    for index, budget in enumerate(budgets):
        groups.setdefault(budget, []).append(index)
    features: list[Tensor | None] = [None] * num_images
    first_patches: list[Tensor | None] = [None] * num_images
    sizes: list[Tensor | None] = [None] * num_images
    unreduced: list[int] = [0] * num_images
    cross_states: list[list[Tensor]] = []
    order: list[int] = []
    for budget, indices in groups.items():
        pixels = pixel_values[indices]
        plan = runtime.planner.plan(pixels.shape[-2], pixels.shape[-1], budget)
        for index in indices:
            unreduced[index] = runtime.planner.unreduced_tokens(*pixels.shape[-2:])
        hidden = kind.embed(tower, pixels)
        query = crossget_query_offset[indices] if crossget_query_offset is not None else None
        drop_first = strategy == "default"  # CLS (towers without one refuse it at apply)
        if runtime.config.method in FEATURE_METHODS:
            # --- peers (mllm_crossget/peers): the unmerged tower, then exactly K tokens ---
            height, width = pixels.shape[-2:]
            patch = self.config.vision_config.patch_size
            keep_cls = kind.has_cls and not drop_first
            selected, assignment = reduce_after_encoder(
                encode_unmerged,
                attention_module(layers[plan.num_layers - 1]),
                hidden,
                plan,
                grid=(height // patch, width // patch),
                has_cls=kind.has_cls,
                keep_cls=keep_cls,
                k=runtime.planner.visual_tokens(height, width, budget),
                method=runtime.config.method,
                seed=runtime.config.seed,
            )
            projected = self.multi_modal_projector(selected)
            first = first_patch_of_tokens(assignment, selected.shape[1] - int(keep_cls))
            size = patches_per_token(assignment, selected.shape[1] - int(keep_cls))
            if kind.has_cls and not drop_first:  # CLS stays first, patches count after it
                first = torch.cat([torch.zeros_like(first[:, :1]), first + 1], dim=1)
                size = torch.cat([torch.ones_like(size[:, :1]), size], dim=1)
            for position, index in enumerate(indices):
                features[index] = projected[position]
                first_patches[index] = first[position]
                sizes[index] = size[position]
            continue
            # --- end of peers ---
        relevance = None
        if crossget_text_prompt is not None:
            relevance = _relevance_to_prompt(
                self.multi_modal_projector,
                crossget_text_prompt[0][indices],
                crossget_text_prompt[1][indices],
            )
        encoded = run_encoder(
            layers,
            hidden,
            plan,
            has_cls=kind.has_cls,
            cross_offsets=unwrap_cross_tokens(self.crossget_tokens).vision_prompts,
            query_offset=query,
            relevance=relevance,
        )
        selected = encoded.last_hidden_state
        first = encoded.first_patch
        if first is None:  # nothing merged: every token is its own patch
            first = torch.arange(selected.shape[1], device=selected.device).expand(len(indices), -1)
        # counts, never differentiated (a checkpointed tower returns them from its graph)
        size = encoded.token_size.detach() if encoded.token_size is not None else None
        if size is None:
            size = torch.ones(selected.shape[:2], device=selected.device)
        if drop_first:
            selected, first, size = selected[:, 1:], first[:, 1:] - 1, size[:, 1:]
        if plan.cross_token_to_llm and encoded.cross_states:
            selected, first = _append_cross_token(
                selected, first, encoded.cross_states[-1], unreduced[indices[0]]
            )
            size = torch.cat([size, torch.ones_like(size[:, :1])], dim=1)  # the cross token
        projected = self.multi_modal_projector(selected)
        for position, index in enumerate(indices):
            features[index] = projected[position]
            first_patches[index] = first[position]
            sizes[index] = size[position]
        if encoded.cross_states:
            cross_states.append(torch.stack(encoded.cross_states, dim=0))  # [L, I_g, C]
            order.extend(indices)
    runtime.last.vision_cross = []
    if cross_states:
        stacked = torch.cat(cross_states, dim=1)  # [L, I, C] in group order
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        runtime.last.vision_cross = list(stacked[:, inverse.to(stacked.device)])
    runtime.last.visual_tokens = [f.shape[0] for f in features]  # type: ignore[union-attr]
    runtime.last.visual_sizes = [s.detach() for s in sizes]  # type: ignore[union-attr]
    # `pooler_output` as a list is what LLaVA's forward concatenates into placeholders.
    return MergedImageFeatures(
        last_hidden_state=None,
        pooler_output=features,
        first_patch=first_patches,  # type: ignore[arg-type]
        unreduced=unreduced,
        token_size=sizes,  # type: ignore[arg-type]
    )


def _append_cross_token(
    selected: Tensor, first: Tensor, cross: Tensor, unreduced: int
) -> tuple[Tensor, Tensor]:
    """``cross_token_to_llm``: the cross token's final state [I, C] becomes one more visual
    token after the image tokens.  Under ``llm_positions='original'`` it sits at the last
    patch's position of the unreduced run (text keeps its distance to the image)."""
    selected = torch.cat([selected, cross[:, None].to(selected.dtype)], dim=1)
    last = first.new_full((first.shape[0], 1), unreduced - 1)
    return selected, torch.cat([first, last], dim=1)


def _relevance_to_prompt(projector: nn.Module, prompt: Tensor, mask: Tensor) -> Any:
    """guidance='text': a layer's tokens -> their relevance to each image's own prompt [I, N].

    The tokens go through the multimodal projector into the LLM's input space (the projector
    is trained on the feature layer; earlier layers are an approximation) and are compared
    with the prompt's input embeddings (``guidance.text_relevance``).  Nothing is learned.
    """

    def relevance(tokens: Tensor) -> Tensor:
        with torch.no_grad():
            projected = projector(tokens.detach())
        return text_relevance(projected, prompt, mask)

    return relevance


def _text_prompt(
    embeddings: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    image_token_id: int,
    rows: Sequence[int],
    query_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Each image's prompt as input embeddings [I, S, C] and which of them count [I, S]:
    the text of the row its placeholders sit in (no placeholders, no padding; under
    ``query_mask`` only the prompt, never a teacher-forced answer)."""
    text = input_ids != image_token_id
    if attention_mask is not None:
        text = text & attention_mask.bool()
    if query_mask is not None:
        text = text & query_mask.bool()
    index = torch.tensor(list(rows), dtype=torch.long, device=input_ids.device)
    with torch.no_grad():
        embeds = embeddings(input_ids.masked_fill(~text, 0)).detach()
    return embeds[index], text[index]


def _resolve_budgets(explicit: Sequence[int] | None, num_images: int) -> list[int | None]:
    override = explicit if explicit is not None else BUDGET_OVERRIDE.get()
    if override is None:
        return [None] * num_images
    if isinstance(override, int):
        return [override] * num_images
    values = [int(v) for v in override]
    if len(values) != num_images:
        raise ValueError(
            f"got {len(values)} per-image budgets for {num_images} images; give one per image "
            "(in the order the images were passed to the processor) or a single int"
        )
    return values


def _llava_forward(
    self: nn.Module,
    input_ids: Tensor | None = None,
    pixel_values: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    runtime: LlavaRuntime = self._crossget_llava
    parent_forward = super(type(self), self).forward
    if pixel_values is None or kwargs.get("mm_encoder_outputs") is not None:
        llm_mask = None
        cache = kwargs.get("past_key_values")
        key_bias = llm_size_bias.stored(cache) if runtime.llm_key_bias else None
        if key_bias is not None:  # a step after a reduced prefill: its keys keep their weight
            length = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            llm_mask = _biased_llm_mask(self, key_bias, attention_mask, length, cache)
        return _with_text_states(
            self,
            runtime,
            parent_forward,
            input_ids,
            pixel_values,
            attention_mask,
            args,
            kwargs,
            llm_mask,
        )
    if input_ids is None:
        raise ValueError(
            "CrossGET needs input_ids with pixel_values (to find each image's placeholders); "
            "pass input_ids rather than inputs_embeds"
        )
    image_token_id = self.config.image_token_id
    rows, starts, lengths = _image_runs(input_ids, image_token_id)
    if len(lengths) != pixel_values.shape[0]:
        raise ValueError(
            f"found {len(lengths)} runs of image placeholders for {pixel_values.shape[0]} images"
        )
    query_offset = None
    tokens = unwrap_cross_tokens(self.crossget_tokens)
    query_mask = kwargs.pop("crossget_query_mask", None)
    if runtime.config.guidance == "query":
        pooled = _pooled_prompt(
            self.get_input_embeddings(), input_ids, attention_mask, image_token_id, query_mask
        )
        query_offset = tokens.query_offset(pooled[rows])
    text_prompt = None
    if runtime.config.guidance == "text" and runtime.config.merges_in_encoder:
        text_prompt = _text_prompt(
            self.get_input_embeddings(), input_ids, attention_mask, image_token_id, rows, query_mask
        )
    # Under crossget.budget(...) the processor emitted each image's own budget; reading it
    # back from the placeholder runs stays right when generate() repeats images for beams.
    override = BUDGET_OVERRIDE.get()
    per_image = None
    if override is not None:
        if runtime.config.method != "fastv":  # FastV: every image keeps all placeholders
            _check_placeholders_follow_override(lengths, override)
        per_image = lengths
    outputs = self.get_image_features(
        pixel_values=pixel_values,
        crossget_visual_tokens=per_image,
        vision_feature_layer=kwargs.pop("vision_feature_layer", None),
        vision_feature_select_strategy=kwargs.pop("vision_feature_select_strategy", None),
        crossget_query_offset=query_offset,
        # the tiled models' (LLaVA-NeXT, OneVision) inputs; LLaVA-1.5 ignores them
        **{key: kwargs[key] for key in ("image_sizes", "batch_num_images") if key in kwargs},
        crossget_text_prompt=text_prompt,
    )
    produced = [f.shape[0] for f in outputs.pooler_output]
    if produced != lengths:
        raise ValueError(
            f"the prompt has {lengths} image placeholders per image but CrossGET produces "
            f"{produced} visual tokens; the processor was not adjusted: pass it through "
            "`model, processor = crossget.apply(model, config, processor)` (and use the same "
            "`crossget.budget(...)` context for the processor and the model)"
        )
    runtime.last.image_rows = torch.tensor(rows)
    kwargs["mm_encoder_outputs"] = {"image": outputs}
    if runtime.config.llm_positions == "original" and runtime.config.method != "fastv":
        kwargs["position_ids"] = original_position_ids(
            _base_position_ids(input_ids, kwargs),
            rows,
            starts,
            outputs.first_patch,
            outputs.unreduced,
        )
        if attention_mask is None:  # masks must not be inferred from (shifted) positions
            attention_mask = torch.ones_like(input_ids)
    if runtime.config.method == "fastv":
        # --- peers (mllm_crossget/peers/fastv.py): the LLM drops visual tokens after layer K ---
        height, width = pixel_values.shape[-2:]
        keeps = [
            runtime.planner.kept_tokens(height, width, budget)
            for budget in fastv.run_keeps(rows, override, None)
        ]
        with fastv.pruning(input_ids, attention_mask, image_token_id, keeps):
            return _with_text_states(
                self, runtime, parent_forward, input_ids, None, attention_mask, args, kwargs
            )
    llm_mask = key_bias = None
    if runtime.llm_key_bias and _some_token_merged(outputs):
        # Each visual key weighs as the patches it stands for (llm_size_bias.py).
        cache = kwargs.get("past_key_values")
        key_bias = llm_size_bias.store(
            cache,
            llm_size_bias.visual_key_bias(
                input_ids,
                image_token_id,
                outputs.token_size,
                self.get_input_embeddings().weight.dtype,
            ),
        )
        llm_mask = _biased_llm_mask(self, key_bias, attention_mask, input_ids.shape[1], cache)
    second_stage: Any = contextlib.nullcontext()
    if runtime.config.llm_keep_ratio is not None:
        # A second, text-guided stage: from LLM layer K on, each image keeps the reduced tokens
        # its prompt's last token attends to most (peers/fastv.py's ranking and pruning).
        keeps = [fastv.ratio_keep(n, runtime.config.llm_keep_ratio) for n in lengths]
        prefill_bias = None if key_bias is None else key_bias[:, -input_ids.shape[1] :]
        second_stage = fastv.pruning(input_ids, attention_mask, image_token_id, keeps, prefill_bias)
    with second_stage:
        return _with_text_states(
            self, runtime, parent_forward, input_ids, None, attention_mask, args, kwargs, llm_mask
        )


def _biased_llm_mask(
    self: nn.Module,
    key_bias: Tensor,
    attention_mask: Tensor | None,
    query_length: int,
    cache: Any,
) -> Tensor:
    """The 4-D mask the LLM gets under ``llm_proportional_attention`` (llm_size_bias.py)."""
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            "llm_proportional_attention builds the LLM's mask over the keys a dynamic KV cache "
            f"holds; got {type(cache).__name__}: use generate's default cache, or set "
            "llm_proportional_attention=False"
        )
    past = int(cache.get_seq_length()) if cache is not None else 0
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "llm_proportional_attention builds the LLM's 4-D mask from a 2-D padding mask; "
            f"got attention_mask of shape {tuple(attention_mask.shape)}: pass the processor's "
            "2-D mask, or set llm_proportional_attention=False"
        )
    dtype = self.get_input_embeddings().weight.dtype
    return llm_size_bias.biased_mask(attention_mask, key_bias, query_length, past, dtype)


def _check_placeholders_follow_override(lengths: list[int], override: Sequence[int] | int) -> None:
    """Under ``crossget.budget`` the placeholders must be the budgets (maybe repeated by beams)."""
    budgets = [override] if isinstance(override, int) else [int(v) for v in override]
    if isinstance(override, int):
        expected_options = [[override] * len(lengths)]
    elif len(lengths) % max(len(budgets), 1) == 0:
        times = len(lengths) // max(len(budgets), 1)
        expected_options = [
            [b for b in budgets for _ in range(times)],  # repeat_interleave (beams)
            budgets * times,
        ]
    else:
        expected_options = []
    if lengths not in expected_options:
        raise ValueError(
            f"the prompt has {lengths} image placeholders per image but crossget.budget asks "
            f"for {budgets}; the processor was not adjusted: pass it through `model, processor "
            "= crossget.apply(model, config, processor)` and call it inside the same "
            "`crossget.budget(...)` context as the model"
        )


def _some_token_merged(outputs: MergedImageFeatures) -> bool:
    """Whether some visual token stands for more than one patch (then the LLM key bias applies).

    Eager reads the sizes. Under ``torch.compile`` (a data-dependent branch breaks the graph)
    every image with fewer tokens than patches counts: for a method that keeps unmerged
    patches (DivPrune, random) that adds a bias of log 1 = 0, the same attention."""
    if torch.compiler.is_compiling() and outputs.unreduced is not None:
        return any(
            size.shape[0] < full
            for size, full in zip(outputs.token_size, outputs.unreduced, strict=True)
        )
    return bool(torch.cat(outputs.token_size).ne(1).any())


def _with_text_states(
    self: nn.Module,
    runtime: LlavaRuntime,
    parent_forward: Any,
    input_ids: Tensor | None,
    pixel_values: Tensor | None,
    attention_mask: Tensor | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    llm_mask: Tensor | None = None,
) -> Any:
    """Run the parent forward with the text cross tokens active (and their states collected).

    ``llm_mask``: a 4-D mask the LLM gets instead of ``attention_mask`` (which still places
    the text cross token)."""
    given_mask = attention_mask if llm_mask is None else llm_mask
    if not (runtime.config.text_cross_tokens and runtime.config.merges_in_encoder):
        return _call_parent(parent_forward, input_ids, pixel_values, given_mask, args, kwargs)
    first = None
    if attention_mask is not None and attention_mask.dim() == 2:
        # The text cross token sits on each row's first real token, also under left padding.
        first = attention_mask.to(torch.int8).argmax(dim=1)
    context = _TextCrossContext(unwrap_cross_tokens(self.crossget_tokens).text_prompts, first)
    token = _TEXT_CONTEXT.set(context)
    try:
        result = _call_parent(parent_forward, input_ids, pixel_values, given_mask, args, kwargs)
    finally:
        _TEXT_CONTEXT.reset(token)
    if context.collected:
        runtime.last.text_cross = context.collected
    return result


def _call_parent(
    parent_forward: Any,
    input_ids: Tensor | None,
    pixel_values: Tensor | None,
    attention_mask: Tensor | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The parent forward by keyword (LLaVA-NeXT's third positional parameter is image_sizes);
    extra positional arguments keep LLaVA-1.5's order."""
    if args:
        return parent_forward(input_ids, pixel_values, attention_mask, *args, **kwargs)
    return parent_forward(
        input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs
    )


def _text_cross_hook(layer_index: int) -> Any:
    """Before LLM layer l: the first real token's state becomes ``stopgrad(h_0) + T_l``.

    The prompts come from the forward's context, never from a closure over a model, so a
    copied model uses its own cross tokens.
    """

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        context = _TEXT_CONTEXT.get()
        if context is None or not args:
            return None
        hidden = args[0]
        if hidden.shape[1] < 2:  # decoding step: only prefill carries the cross token
            return None
        batch = hidden.shape[0]
        rows = torch.arange(batch, device=hidden.device)
        positions = context.first_positions
        if positions is not None and positions.shape[0] == batch:
            # One first token per row by construction: no data-dependent check (no host sync,
            # no graph break under torch.compile).
            first = torch.zeros(batch, hidden.shape[1], dtype=torch.bool, device=hidden.device)
            first[rows, positions] = True
        else:
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                return None
            first = (position_ids == 0).expand(batch, -1)
            if not bool(first.any()):
                return None
            # Several or no first tokens in a row: cross them, collect nothing.
            one_per_row = bool((first.sum(dim=1) == 1).all())
            positions = first.to(torch.int8).argmax(dim=1) if one_per_row else None
        prompt = context.prompts[layer_index].to(hidden.dtype)
        crossed = torch.where(first[..., None], hidden.detach() + prompt, hidden)
        if positions is not None:
            context.collected.append(crossed[rows, positions])
        return (crossed, *args[1:]), kwargs

    return hook


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention module of a CLIP/SigLIP (``self_attn``) or DINOv2 (``attention``)
    layer: the peers that read attention hook its ``q_proj``/``k_proj``."""
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention


def patch_llava(
    model: nn.Module, config: CrossGETConfig, planner: Any, get_image_features: Any = None
) -> LlavaRuntime:
    """Swap the LlavaModel's class, patch its tower's layers, hook the LLM layers.

    ``get_image_features`` replaces LLaVA-1.5's (the tiled models pack their tiles)."""
    inner = model.model
    patch_layers(tower_kind(inner.vision_tower).layers(inner.vision_tower))
    original = type(inner)
    patched = _llava_subclass(original, get_image_features or _llava_get_image_features)
    inner.__class__ = patched
    runtime = LlavaRuntime(config=config, planner=planner, original_model_class=original)
    inner._crossget_llava = runtime
    # generate() pre-encodes images through get_image_features without the prompt; an
    # instance attribute (not a class patch) makes it pass pixel_values to forward instead,
    # where placeholders are checked and the prompt can guide (guidance="query").
    model._supports_mm_encoder_outputs = _no_pre_encoding
    if config.prunes_in_llm:  # peers/fastv.py: hooks that prune inside the LLM
        runtime.hook_handles += fastv.install(inner.language_model, config.fastv_layer)
    runtime.llm_key_bias = llm_key_bias_applies(model, config, tiled=get_image_features is not None)
    if config.text_cross_tokens and config.merges_in_encoder:
        for index, layer in enumerate(inner.language_model.layers):
            handle = layer.register_forward_pre_hook(_text_cross_hook(index), with_kwargs=True)
            runtime.hook_handles.append(handle)
    return runtime


def unpatch_llava(model: nn.Module) -> None:
    inner = model.model
    runtime: LlavaRuntime | None = getattr(inner, "_crossget_llava", None)
    if runtime is None:
        return
    for handle in runtime.hook_handles:
        handle.remove()
    unpatch_layers(tower_kind(inner.vision_tower).layers(inner.vision_tower))
    inner.__class__ = runtime.original_model_class
    del inner._crossget_llava
    model.__dict__.pop("_supports_mm_encoder_outputs", None)


def _no_pre_encoding() -> bool:
    return False


_LLAVA_SUBCLASSES: dict[tuple[type, Any], type] = {}


def _llava_subclass(original: type, get_image_features: Any) -> type:
    key = (original, get_image_features)
    if key not in _LLAVA_SUBCLASSES:
        _LLAVA_SUBCLASSES[key] = type(
            f"CrossGET{original.__name__}",
            (original,),
            {"forward": _llava_forward, "get_image_features": get_image_features},
        )
    return _LLAVA_SUBCLASSES[key]


def alignment_loss(runtime: LlavaRuntime, projector: nn.Module) -> Tensor:
    """Symmetric JS between vision cross tokens (through the frozen projector) and text ones.

    Vision layers are spread over LLM layers: LLM layer j pairs with vision layer
    ``j * L_vis // L_llm``.  Images pair with the row their placeholders sit in.
    """
    last = runtime.last
    if not last.vision_cross or not last.text_cross or last.image_rows is None:
        raise RuntimeError(
            "no cross-token states from the last forward: run a forward with pixel_values in "
            "training mode with guidance in ('cross', 'attention', 'query') and "
            "text_cross_tokens=True first"
        )
    num_vision, num_text = len(last.vision_cross), len(last.text_cross)
    rows = last.image_rows.to(last.text_cross[0].device)
    total = last.text_cross[0].new_zeros((), dtype=torch.float32)
    for text_layer, text_state in enumerate(last.text_cross):
        vision_state = last.vision_cross[text_layer * num_vision // num_text]
        projected = torch.func.functional_call(
            projector,
            {name: p.detach() for name, p in projector.named_parameters()},
            (vision_state.to(next(projector.parameters()).dtype),),
        )
        total = total + symmetric_js_divergence(projected.float(), text_state[rows].float())
    return total / num_text


# ------------------------------------------------------------------ family callbacks


def feature_layers_run(num_layers: int, feature_layer: int) -> int:
    """Encoder layers needed for hidden state ``feature_layer`` (index 0 = embeddings)."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} out of range for {num_layers}")
    return feature_layer % (num_layers + 1)


def _planner(model: nn.Module, config: CrossGETConfig) -> Any:
    from ..planner import TowerPlanner

    vision_config = model.config.vision_config
    feature_layer = model.config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"CrossGET supports a single vision_feature_layer, this model uses {feature_layer}"
        )
    layers_run = feature_layers_run(vision_config.num_hidden_layers, feature_layer)
    if config.first_merge_layer >= layers_run:
        raise ValueError(
            f"first_merge_layer={config.first_merge_layer} leaves no merging layer: the tower "
            f"runs {layers_run} layers"
        )
    has_cls = tower_kind(model.model.vision_tower).has_cls
    strategy = model.config.vision_feature_select_strategy
    return TowerPlanner(
        config=config,
        patch_size=vision_config.patch_size,
        layers_run=layers_run,
        dropped_tokens=1 if strategy == "default" else 0,
        num_protected=1 if has_cls else 0,
    )


def _check(model: nn.Module, config: CrossGETConfig) -> None:
    from ..peers import get_method
    from .family import check_attention

    kind = tower_kind(model.model.vision_tower)
    check_attention(model.config.vision_config, config)
    strategy = model.config.vision_feature_select_strategy
    if not kind.has_cls and strategy == "default":
        raise ValueError(
            f"vision_feature_select_strategy='default' drops the first token as CLS, but a "
            f"{kind.name} tower has no CLS (it would drop a patch); set the model's "
            "config.vision_feature_select_strategy='full'"
        )
    if not kind.has_cls and get_method(config.method).needs_attention:
        raise ValueError(
            f"method={config.method!r} ranks patches by the CLS token's attention, and a "
            f"{kind.name} tower has no CLS; use crossget, tome, divprune, pool, random or fastv"
        )
    if config.prunes_in_llm:
        fastv.check(model.model.language_model, config.fastv_layer)
    if config.llm_proportional_attention:
        llm_size_bias.check(model.model.language_model)


def llm_key_bias_applies(model: nn.Module, config: CrossGETConfig, tiled: bool = False) -> bool:
    """Whether ``llm_proportional_attention`` runs: True = on (checked in ``_check``), None = on
    for LLaVA-1.5 (not the tiled models) with an sdpa/eager LLM and a method that reduces
    before the LLM, False = off."""
    setting = config.llm_proportional_attention
    if setting is not None:
        return setting
    if tiled or config.method == "fastv":
        return False
    implementation = getattr(model.model.language_model.config, "_attn_implementation", None)
    return (implementation or "eager") in ("sdpa", "eager")


def _build_tokens(model: nn.Module, planner: Any, config: CrossGETConfig) -> Any:
    from ..cross_tokens import CrossTokens

    text_config = model.config.text_config
    return CrossTokens(
        vision_layers=planner.layers_run,
        vision_width=model.config.vision_config.hidden_size,
        text_layers=text_config.num_hidden_layers if config.text_cross_tokens else 0,
        text_width=text_config.hidden_size,
        query_guidance=config.guidance == "query",
    )


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = model.config.vision_config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _alignment_loss(model: nn.Module) -> Tensor:
    inner = model.model
    return alignment_loss(inner._crossget_llava, inner.multi_modal_projector)


def _adjust_processor(processor: Any, planner: Any) -> Any:
    from ..processing import adjust_processor

    return adjust_processor(processor, planner)


LLAVA = Family(
    name="LlavaForConditionalGeneration",
    planner=_planner,
    check=_check,
    holder=lambda model: model.model,
    build_tokens=_build_tokens,
    patch=patch_llava,
    unpatch=unpatch_llava,
    image_size=_image_size,
    alignment_loss=_alignment_loss,
    adjust_processor=_adjust_processor,
    supports_peers=True,
)
