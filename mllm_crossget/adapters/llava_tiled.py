"""CrossGET in tiled LLaVA models: LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "anyres")
and LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, SigLIP, "anyres-max").

Both cut an image into a *base* tile (the whole image at the tower's size) plus a grid of
``rows x cols`` tiles (``image_grid_pinpoints``), run every tile through the tower, then
stitch the grid tiles' patch maps into one 2-D map, remove the padding border ("unpad"),
(OneVision: shrink it to at most ``max`` tiles' worth, "anyres_max_9") and close each row of
patches with the learned ``image_newline``.

Merged tiles are sets of tokens, not 2-D grids, so CrossGET packs an image instead as

    [base tile's tokens] [row 1 tiles' tokens] <newline> ... [row R tiles' tokens] <newline>

in raster order of the tiles: the newline closes each row of *tiles* instead of each row of
patches (an image without grid tiles — OneVision's multi-image prompts — gets one newline
after its base tile, as in the original).  There is no unpadding and no anyres-max shrink:
the padding border goes through the tower like any patch (it is uniform, so it merges away
first), and the budget sets the size instead.

**Budget rule.**  A budget ``K`` is the image's total placeholder count, newlines included.
With ``R`` newlines and ``T = 1 + rows * cols`` tiles, ``V = K - R`` visual tokens are split
evenly over the tiles, the remainder one each to the first tiles (base first, then raster
order): tile ``t`` keeps ``V // T + (t < V % T)``.  Without a budget (``keep_ratio`` or ``r``)
every tile keeps what the tower planner gives one tile, and ``K`` is their sum plus ``R``.
Each tile is planned like a LLaVA-1.5 image of the tower's size (CLS dropped per the select
strategy), so every count is exact and the processor emits exactly ``K`` placeholders.

Merged tokens take consecutive LLM positions (``llm_positions`` has no effect here: a token
of a merged tile has no place in the unpadded 2-D layout).  A config that merges nothing
(``r=0``, no budget) runs and counts exactly as the original model.  The peers
(``mllm_crossget.peers``) are implemented for LLaVA-1.5 layouts only and are refused.  Videos
(OneVision's ``pixel_values_videos``) pass through unmerged.  The vision cross states kept for
the alignment loss are the base tile's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import CrossGETConfig
from ..cross_tokens import CrossTokens, unwrap_cross_tokens
from . import llava
from .family import Family, check_attention
from .vit_layer import run_encoder

__all__ = ["LLAVA_NEXT", "LLAVA_ONEVISION", "TiledPlanner"]


def _best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(list(size), [list(p) for p in pinpoints])
    return int(height), int(width)


@dataclass(frozen=True)
class TiledPlanner:
    """Exact token counts for tiled images: one ``tile`` planner per tile plus the newlines.

    Sizes given to :meth:`visual_tokens` are the *original* image sizes (the processor's
    ``image_sizes``); ``base_only`` images (OneVision multi-image prompts) have no grid.
    """

    tile: Any  # mllm_crossget.planner.TowerPlanner for one tile
    tile_size: int
    pinpoints: tuple[tuple[int, int], ...]
    anyres_max: int | None = None  # OneVision's "anyres_max_N"; None for LLaVA-NeXT

    @property
    def config(self) -> CrossGETConfig:
        return self.tile.config

    @property
    def layers_run(self) -> int:
        return self.tile.layers_run

    def grid(self, height: int, width: int, base_only: bool = False) -> tuple[int, int]:
        """(rows, cols) of grid tiles for an image of this original size."""
        if base_only:
            return 0, 0
        best_h, best_w = _best_resolution((height, width), self.pinpoints)
        return best_h // self.tile_size, best_w // self.tile_size

    def merges(self, visual_tokens: int | None = None) -> bool:
        """Whether images are merged (and packed CrossGET's way) at all: without a budget and
        with a plan that merges nothing (``r=0``) the model runs exactly as the original."""
        if visual_tokens is not None or self.config.visual_tokens is not None:
            return True
        size = self.tile_size
        return any(self.tile.layer_r(self.tile.input_tokens(size, size)))

    def original_tokens(self, height: int, width: int, base_only: bool = False) -> int:
        """The unmodified model's count: base tile, unpadded grid, a newline per patch row
        (OneVision: shrunk to ``anyres_max`` tiles' worth), as its processor counts."""
        size = self.tile_size
        base = self.tile.unreduced_tokens(size, size)
        rows, cols = self.grid(height, width, base_only)
        if rows == 0:
            return base + 1
        side = size // self.tile.patch_size
        current_h, current_w = side * rows, side * cols
        if width / height > current_w / current_h:
            new_height = int(round(height * (current_w / width), 7))
            current_h -= (current_h - new_height) // 2 * 2
        else:
            new_width = int(round(width * (current_h / height), 7))
            current_w -= (current_w - new_width) // 2 * 2
        features, newlines = current_h * current_w, current_h
        if self.anyres_max is not None:
            ratio = math.sqrt(current_h * current_w / (self.anyres_max * side**2))
            if ratio > 1.1:
                features = int(current_h // ratio) * int(current_w // ratio)
                newlines = int(current_h // ratio)
        return base + features + newlines

    def shares(
        self, height: int, width: int, visual_tokens: int | None = None, base_only: bool = False
    ) -> list[int]:
        """Visual tokens each tile keeps (base first, then grid tiles in raster order)."""
        rows, cols = self.grid(height, width, base_only)
        tiles = 1 + rows * cols
        newlines = max(rows, 1)
        size = self.tile_size
        if visual_tokens is None and self.config.visual_tokens is not None:
            visual_tokens = self.config.visual_tokens
        if visual_tokens is None:
            return [self.tile.visual_tokens(size, size)] * tiles
        spare = visual_tokens - newlines
        if spare < tiles:
            raise ValueError(
                f"visual_tokens={visual_tokens} is too small for a {height}x{width} image: it is "
                f"cut into {tiles} tiles and takes {newlines} newline tokens, so the budget must "
                f"be at least {tiles + newlines} (one token per tile)"
            )
        shares = [spare // tiles + (index < spare % tiles) for index in range(tiles)]
        for share in set(shares):
            try:
                self.tile.visual_tokens(size, size, share)
            except ValueError as error:
                raise ValueError(
                    f"visual_tokens={visual_tokens} for a {height}x{width} image gives each of "
                    f"its {tiles} tiles {share} tokens ({newlines} newlines), which one tile "
                    f"cannot reach: {error}"
                ) from error
        return shares

    def visual_tokens(
        self, height: int, width: int, visual_tokens: int | None = None, base_only: bool = False
    ) -> int:
        """Placeholders for one image of this original size: all tiles plus the newlines."""
        if not self.merges(visual_tokens):
            return self.original_tokens(height, width, base_only)
        rows, _ = self.grid(height, width, base_only)
        return sum(self.shares(height, width, visual_tokens, base_only)) + max(rows, 1)


def _base_only_flags(batch_num_images: Any, num_images: int) -> list[bool]:
    """OneVision: images of a multi-image prompt are encoded from their base tile only."""
    if batch_num_images is None:
        return [False] * num_images
    return [int(n) != 1 for n in batch_num_images for _ in range(int(n))]


def _tiled_get_image_features(
    self: nn.Module,
    pixel_values: Tensor,
    image_sizes: Tensor | None = None,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    *,
    crossget_visual_tokens: Sequence[int] | None = None,
    crossget_query_offset: Tensor | None = None,
    batch_num_images: Any = None,
    **kwargs: Any,
) -> llava.MergedImageFeatures:
    """Merged tiles of each image, packed with newlines per row of tiles (see the module)."""
    runtime: llava.LlavaRuntime = self._crossget_llava
    planner: TiledPlanner = runtime.planner
    config = self.config
    layer = (
        vision_feature_layer if vision_feature_layer is not None else config.vision_feature_layer
    )
    if not isinstance(layer, int):
        raise ValueError(
            f"CrossGET supports a single vision_feature_layer, got {layer!r}: merged layers "
            "have different token counts and cannot be concatenated"
        )
    if image_sizes is None:
        raise ValueError("tiled LLaVA models need image_sizes (the processor returns them)")
    num_images = pixel_values.shape[0]
    budgets = llava._resolve_budgets(crossget_visual_tokens, num_images)
    if not any(planner.merges(budget) for budget in budgets):
        # r=0: the original tiles, unpadding and newlines, bit for bit.
        extra = {} if batch_num_images is None else {"batch_num_images": batch_num_images}
        original = super(type(self), self).get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
            **extra,
        )
        features = list(original.pooler_output)
        runtime.last.vision_cross = []
        runtime.last.visual_tokens = [f.shape[0] for f in features]
        return llava.MergedImageFeatures(
            last_hidden_state=None,
            pooler_output=features,
            first_patch=[torch.arange(f.shape[0], device=f.device) for f in features],
            unreduced=[f.shape[0] for f in features],
        )
    strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
    tower = self.vision_tower
    kind = llava.tower_kind(tower)
    layers = kind.layers(tower)
    base_only = _base_only_flags(batch_num_images, num_images)
    prompts = unwrap_cross_tokens(self.crossget_tokens).vision_prompts
    newline = self.image_newline
    features: list[Tensor] = []
    base_cross: list[Tensor] = []
    for index in range(num_images):
        height, width = (int(v) for v in image_sizes[index].tolist())
        rows, cols = planner.grid(height, width, base_only[index])
        shares = planner.shares(height, width, budgets[index], base_only[index])
        tiles = pixel_values[index][: len(shares)] if pixel_values.dim() == 5 else None
        if tiles is None:
            raise ValueError(
                f"expected 5-D pixel_values [images, tiles, C, H, W], got {tuple(pixel_values.shape)}"
            )
        outputs: list[Tensor | None] = [None] * len(shares)
        groups: dict[int, list[int]] = {}
        for tile, share in enumerate(shares):
            groups.setdefault(share, []).append(tile)
        for share, members in groups.items():
            pixels = tiles[members]
            plan = planner.tile.plan(pixels.shape[-2], pixels.shape[-1], share)
            query = None
            if crossget_query_offset is not None:
                query = crossget_query_offset[index : index + 1].expand(len(members), -1, -1)
            encoded = run_encoder(
                layers,
                kind.embed(tower, pixels),
                plan,
                has_cls=kind.has_cls,
                cross_offsets=prompts,
                query_offset=query,
            )
            selected = encoded.last_hidden_state
            if strategy == "default":
                selected = selected[:, 1:]
            projected = self.multi_modal_projector(selected)
            for position, tile in enumerate(members):
                outputs[tile] = projected[position]
            if 0 in members and encoded.cross_states:
                base = members.index(0)
                base_cross.append(torch.stack([s[base] for s in encoded.cross_states]))
        mark = newline[None].to(outputs[0])
        packed = [outputs[0]]
        for row in range(rows):
            packed.extend(outputs[1 + row * cols : 1 + (row + 1) * cols])
            packed.append(mark)
        if rows == 0:
            packed.append(mark)
        features.append(torch.cat(packed, dim=0))
    runtime.last.vision_cross = []
    if len(base_cross) == num_images:
        runtime.last.vision_cross = list(torch.stack(base_cross, dim=1))  # per layer [I, C]
    runtime.last.visual_tokens = [f.shape[0] for f in features]
    first = [torch.arange(f.shape[0], device=f.device) for f in features]
    return llava.MergedImageFeatures(
        last_hidden_state=None,
        pooler_output=features,
        first_patch=first,  # consecutive positions: original_position_ids leaves them alone
        unreduced=[f.shape[0] for f in features],
    )


# ------------------------------------------------------------------ processor


def _replace_tiled_image_token(self: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    """As many placeholders as the merged tiles and newlines of this image."""
    height, width = (int(v) for v in list(image_inputs["image_sizes"][image_idx]))
    override = llava.BUDGET_OVERRIDE.get()
    if isinstance(override, int) or override is None:
        budget = override
    else:
        if image_idx >= len(override):
            raise ValueError(
                f"crossget.budget got {len(override)} per-image budgets but the processor "
                "received more images; give one budget per image"
            )
        budget = override[image_idx]
    if not self._crossget_planner.merges(budget):
        return super(type(self), self).replace_image_token(image_inputs, image_idx, **kwargs)
    base_only = False
    if "batch_num_images" in image_inputs:
        base_only = _base_only_flags(image_inputs["batch_num_images"], image_idx + 1)[image_idx]
    count = self._crossget_planner.visual_tokens(height, width, budget, base_only)
    return self.image_token * count


def _adjust_processor(processor: Any, planner: Any) -> Any:
    from ..processing import adjust_processor

    return adjust_processor(processor, planner, replace=_replace_tiled_image_token)


# ------------------------------------------------------------------ family callbacks


def _planner(model: nn.Module, config: CrossGETConfig) -> TiledPlanner:
    tile = llava._planner(model, config)
    pinpoints = tuple(tuple(int(v) for v in p) for p in model.config.image_grid_pinpoints)
    aspect = getattr(model.config, "vision_aspect_ratio", None)
    return TiledPlanner(
        tile=tile,
        tile_size=int(model.config.vision_config.image_size),
        pinpoints=pinpoints,
        anyres_max=int(aspect.removeprefix("anyres_max_")) if aspect else None,
    )


def _check(model: nn.Module, config: CrossGETConfig) -> None:
    llava.tower_kind(model.model.vision_tower)
    check_attention(model.config.vision_config, config)
    if not config.merges_in_encoder:
        raise ValueError(
            f"method={config.method!r} (mllm_crossget.peers) is implemented for LLaVA-1.5 "
            f"layouts only; {type(model).__name__} supports the merging methods crossget and tome"
        )
    kind = llava.tower_kind(model.model.vision_tower)
    if not kind.has_cls and model.config.vision_feature_select_strategy == "default":
        raise ValueError(
            f"vision_feature_select_strategy='default' drops the first token as CLS, but a "
            f"{kind.name} tower has no CLS; set config.vision_feature_select_strategy='full'"
        )


def _build_tokens(model: nn.Module, planner: TiledPlanner, config: CrossGETConfig) -> CrossTokens:
    return llava._build_tokens(model, planner.tile, config)


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = int(model.config.vision_config.image_size)
    return size, size


def _patch(model: nn.Module, config: CrossGETConfig, planner: TiledPlanner) -> None:
    llava.patch_llava(model, config, planner, get_image_features=_tiled_get_image_features)


def _family(name: str) -> Family:
    return Family(
        name=name,
        planner=_planner,
        check=_check,
        holder=lambda model: model.model,
        build_tokens=_build_tokens,
        patch=_patch,
        unpatch=llava.unpatch_llava,
        image_size=_image_size,
        alignment_loss=llava._alignment_loss,
        adjust_processor=_adjust_processor,
    )


LLAVA_NEXT = _family("LlavaNextForConditionalGeneration")
LLAVA_ONEVISION = _family("LlavaOnevisionForConditionalGeneration")
