"""Pixel normalisation shared by both training stages (vision pretraining and the language
stage), so that each imports it from here and neither imports the other's module."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize_pixels(
    pixels: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    rescale_factor: float = 1 / 255,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the processor's normalised float pixels."""
    mean = torch.tensor(image_mean).view(1, -1, 1, 1)
    std = torch.tensor(image_std).view(1, -1, 1, 1)
    return (pixels.float() * rescale_factor - mean) / std
