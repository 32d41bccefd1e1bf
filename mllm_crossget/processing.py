"""Processor glue: emit exactly as many image placeholders as merged visual tokens."""

from __future__ import annotations

from typing import Any

from .adapters.llava import BUDGET_OVERRIDE

__all__ = ["adjust_processor", "processor_image_size", "restore_processor"]


def processor_image_size(processor: Any) -> tuple[int, int] | None:
    """(height, width) of the pixels ``processor`` hands the tower, or None if it does not
    say. This, not the tower config's ``image_size``, is what the budget must fit: a DINOv2
    tower (pretrained-mini) keeps its native 518-px grid in its config and interpolates its
    positions to the processor's 224 or 336 px."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    cropped = getattr(image_processor, "do_center_crop", False)
    spec = getattr(image_processor, "crop_size" if cropped else "size", None)
    if spec is None:
        return None
    read = spec.get if isinstance(spec, dict) else lambda key: getattr(spec, key, None)
    height, width = read("height"), read("width")
    if height and width:
        return int(height), int(width)
    side = read("shortest_edge")
    return (int(side), int(side)) if side else None


def _replace_image_token(self: Any, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
    """The placeholder string for one image: as many tokens as the merged tower yields."""
    height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
    override = BUDGET_OVERRIDE.get()
    if isinstance(override, int) or override is None:
        budget = override
    else:
        if image_idx >= len(override):
            raise ValueError(
                f"crossget.budget got {len(override)} per-image budgets but the processor "
                f"received more images; give one budget per image"
            )
        budget = override[image_idx]
    count = self._crossget_planner.visual_tokens(int(height), int(width), budget)
    self._crossget_images_seen = max(getattr(self, "_crossget_images_seen", 0), image_idx + 1)
    return self.image_token * count


def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The processor's own ``__call__``, then: per-image budgets must match the images."""
    self._crossget_images_seen = 0
    try:
        out = super(type(self), self).__call__(*args, **kwargs)
        override = BUDGET_OVERRIDE.get()
        seen = self._crossget_images_seen
        listed = override is not None and not isinstance(override, int)
        if listed and seen and len(override) != seen:
            raise ValueError(
                f"crossget.budget got {len(override)} per-image budgets but the processor "
                f"received {seen} image{'' if seen == 1 else 's'}; give one budget per image "
                "(in the order the images are passed) or a single int"
            )
        return out
    finally:
        del self._crossget_images_seen


_SUBCLASSES: dict[tuple[type, Any], type] = {}


def adjust_processor(processor: Any, planner: Any, replace: Any = None) -> Any:
    """Swap the processor instance's class so it asks the planner for each image's count.

    ``replace`` is the ``replace_image_token`` to install (default: one image, one tower pass;
    the tiled models pass their own)."""
    replace = replace or _replace_image_token
    if not hasattr(processor, "replace_image_token") or not hasattr(processor, "image_token"):
        raise TypeError(
            f"{type(processor).__name__} has no replace_image_token/image_token; CrossGET can "
            "adjust LlavaProcessor-style processors only"
        )
    original = getattr(processor, "_crossget_original_class", type(processor))
    if (original, replace) not in _SUBCLASSES:
        _SUBCLASSES[original, replace] = type(
            f"CrossGET{original.__name__}",
            (original,),
            {"replace_image_token": replace, "__call__": _call},
        )
    processor.__class__ = _SUBCLASSES[original, replace]
    processor._crossget_original_class = original
    processor._crossget_planner = planner
    return processor


def restore_processor(processor: Any) -> Any:
    original = getattr(processor, "_crossget_original_class", None)
    if original is None:
        return processor
    processor.__class__ = original
    del processor._crossget_original_class
    del processor._crossget_planner
    return processor
