"""`crossget visualize`: which patches of one image ended up in which visual token, per method.

One panel per method on the image the model sees.  Patches that share a token (merged by
CrossGET/ToMe, pooled, or VisionZip's contextual tokens) get that token's colour and a
border around the group; a patch that is a token on its own stays untinted; dropped patches
are darkened.  CrossGET/ToMe read the encoder's ``source_map`` (``track_source=True``);
feature-stage peers report their assignment; FastV's kept positions come from the KV cache
after a prefill with ``--prompt`` (its choice depends on the prompt).

    crossget visualize --testbed-seed 3 --budget 64 --out runs/visualize.png
    crossget visualize --image cat.jpg --methods crossget,visionzip,fastv
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

import mllm_crossget as crossget
from mllm_crossget import named_models
from mllm_crossget.adapters.llava import attention_module, tower_kind
from mllm_crossget.adapters.vit_layer import run_encoder
from mllm_crossget.config import atomic_output
from mllm_crossget.cross_tokens import unwrap_cross_tokens
from mllm_crossget.peers import FEATURE_METHODS, METHOD_NAMES
from mllm_crossget.peers.encoder import reduce_after_encoder
from mllm_crossget.peers.fastv import STATE_ATTR

__all__ = ["assignment_for", "main", "render"]


def _config(method: str, budget: int, model: nn.Module) -> crossget.CrossGETConfig:
    extra: dict[str, Any] = {}
    if method == "fastv":
        extra["fastv_layer"] = min(2, model.config.text_config.num_hidden_layers - 1)
    return crossget.CrossGETConfig(visual_tokens=budget, method=method, track_source=True, **extra)


@torch.no_grad()
def assignment_for(
    model: nn.Module, processor: Any, method: str, budget: int, pixels: Tensor, prompt: str
) -> np.ndarray:
    """[rows, cols] int array: the visual token each patch ended up in (-1 = dropped)."""
    tower = model.model.vision_tower
    patch = tower.config.patch_size
    height, width = pixels.shape[-2:]
    grid = (height // patch, width // patch)
    crossget.remove(model, processor)
    crossget.apply(model, _config(method, budget, model), processor)
    try:
        if method == "fastv":
            assignment = _fastv_assignment(model, processor, pixels, prompt)
        else:
            plan = model.crossget_planner.plan(height, width)
            kind = tower_kind(tower)
            layers = kind.layers(tower)
            hidden = kind.embed(tower, pixels)
            if method in FEATURE_METHODS:
                _, assignment = reduce_after_encoder(
                    lambda embeds, plan_: run_encoder(layers, embeds, plan_).last_hidden_state,
                    attention_module(layers[plan.num_layers - 1]),
                    hidden,
                    plan,
                    grid,
                    kind.has_cls,
                    False,
                    budget,
                    method,
                    model.crossget_config.seed,
                )
                assignment = assignment[0]
            else:
                prompts = unwrap_cross_tokens(model.model.crossget_tokens).vision_prompts
                encoded = run_encoder(
                    layers, hidden, plan, has_cls=kind.has_cls, cross_offsets=prompts
                )
                start = int(kind.has_cls)  # tokens x patches, CLS excluded
                source = encoded.source_map[0, start:, start:]
                assignment = source.argmax(dim=0)
    finally:
        crossget.remove(model, processor)
    return assignment.cpu().numpy().reshape(grid)


def _fastv_assignment(model: nn.Module, processor: Any, pixels: Tensor, prompt: str) -> Tensor:
    from transformers import DynamicCache

    image_token = processor.image_token
    text = prompt if image_token in prompt else f"{image_token}\n{prompt}"
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    count = crossget.num_visual_tokens(model, tuple(pixels.shape[-2:]))
    image_id = model.config.image_token_id
    position = int((ids[0] == image_id).nonzero()[0])
    ids = torch.cat(
        [ids[:, :position], torch.full((1, count), image_id), ids[:, position + 1 :]], dim=1
    )
    cache = DynamicCache(config=model.config.text_config)
    model(input_ids=ids, pixel_values=pixels, past_key_values=cache, use_cache=True)
    kept = getattr(cache, STATE_ATTR).index[0]
    patches = kept[(kept >= position) & (kept < position + count)] - position
    assignment = torch.full((count,), -1, dtype=torch.long)
    assignment[patches] = torch.arange(patches.numel())
    return assignment


def _palette(count: int, seed: int = 0) -> np.ndarray:
    """Distinct-ish colours in a shuffled order, so neighbouring tokens differ."""
    import matplotlib

    hues = np.random.default_rng(seed).permutation(max(count, 1)) / max(count, 1)
    hsv = np.stack([hues, np.full_like(hues, 0.75), np.full_like(hues, 0.95)], axis=1)
    return matplotlib.colors.hsv_to_rgb(hsv)


def overlay(image: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """The image (H, W, 3 in [0, 1]) with merged groups tinted and dropped patches dark."""
    rows, cols = assignment.shape
    patch_h, patch_w = image.shape[0] // rows, image.shape[1] // cols
    tokens, sizes = np.unique(assignment[assignment >= 0], return_counts=True)
    size_of = dict(zip(tokens.tolist(), sizes.tolist(), strict=True))
    colors = _palette(int(assignment.max()) + 1)
    out = image.copy()
    for r in range(rows):
        for c in range(cols):
            token = int(assignment[r, c])
            cell = out[r * patch_h : (r + 1) * patch_h, c * patch_w : (c + 1) * patch_w]
            if token < 0:
                cell *= 0.25
            elif size_of[token] > 1:
                cell[:] = 0.45 * cell + 0.55 * colors[token]
            # A border wherever the right or lower neighbour belongs to another token.
            if c + 1 < cols and assignment[r, c + 1] != token:
                cell[:, -1] = 1.0
            if r + 1 < rows and assignment[r + 1, c] != token:
                cell[-1, :] = 1.0
    return out


def _displayed(pixels: Tensor, processor: Any) -> np.ndarray:
    """The model's input image, un-normalised to [0, 1] (what the patches really cover)."""
    images = processor.image_processor
    mean = torch.tensor(images.image_mean)[:, None, None]
    std = torch.tensor(images.image_std)[:, None, None]
    array = (pixels[0].float().cpu() * std + mean).clamp(0, 1)
    return array.permute(1, 2, 0).numpy().copy()


def render(
    model: nn.Module,
    processor: Any,
    image: Image.Image,
    methods: Sequence[str],
    budget: int,
    out: Path,
    prompt: str = "What is in the image?",
) -> Path:
    """Write a PNG grid (original + one panel per method) atomically to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    pixels = pixels.to(next(model.parameters()).device, next(model.parameters()).dtype)
    shown = _displayed(pixels, processor)
    panels = [("input", shown, "")]
    for method in methods:
        assignment = assignment_for(model, processor, method, budget, pixels, prompt)
        kept = int((assignment >= 0).sum())
        tokens = len(np.unique(assignment[assignment >= 0]))
        caption = f"{tokens} tokens, {kept}/{assignment.size} patches used"
        panels.append((method, overlay(shown, assignment), caption))
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (title, picture, caption) in zip(axes.flat, panels, strict=False):
        axis.imshow(picture)
        axis.set_title(f"{title}\n{caption}" if caption else title, fontsize=9)
    figure.suptitle(f"budget: {budget} visual tokens", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output(out, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget visualize",
        description="Draw which patches of one image ended up in which visual token, per "
        "method (merged groups tinted, dropped patches dark), as one PNG grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, default=None, help="an image file")
    source.add_argument(
        "--testbed-seed", type=int, default=0, help="else: the testbed image of this seed"
    )
    parser.add_argument(
        "--methods", default=",".join(METHOD_NAMES), help="comma list of methods to draw"
    )
    parser.add_argument("--budget", type=int, default=64, help="visual tokens per image (K)")
    parser.add_argument(
        "--prompt", default="what is in the image?", help="FastV's prompt (its choice reads it)"
    )
    parser.add_argument(
        "--model",
        default="reference",
        help="a named model (reference: the testbed model, random weights until trained; "
        "default), a LLaVA folder, or a hub id",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/visualize.png"), help="PNG path")
    return parser


def _load(name: str) -> tuple[nn.Module, Any]:
    """`--model` through the library's named-model registry; the reference model's shape with
    random weights while it is not trained (or shipped) yet."""
    entry = named_models.get(name)
    untrained = entry is not None and not (entry.folder() / "config.json").is_file()
    if untrained and entry.name == "reference":
        from eval.testbed.model import build_reference

        model, processor = build_reference(seed=0)
        return model.eval(), processor
    return named_models.load_llava(name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, processor = _load(args.model)
    except named_models.UnknownModelError as error:
        print(f"crossget visualize: {error}", file=sys.stderr)
        return 2
    if args.image is not None:
        image = Image.open(args.image)
    else:
        from eval.testbed.data import generate_examples

        size = model.config.vision_config.image_size
        image = generate_examples(1, args.testbed_seed, image_size=size)[0]["image"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    path = render(model, processor, image, methods, args.budget, args.out, args.prompt)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
