"""Stage 1 of the testbed reference recipe: dense patch-label pretraining of the vision tower.

LLaVA-1.5 trains its language side on top of a CLIP tower that was pretrained elsewhere and is
kept frozen. The testbed model has no pretrained tower, so this stage plays CLIP's part: the
tower learns, from the train split's scene metadata only (eval/testbed/patch_labels.py), to
say per patch what is drawn there. The heads are thrown away afterwards; only the tower's
weights carry over into the language-model stage (eval/testbed/training/train.py).

It runs through the same transformers `Trainer` as the main stage, so it works on CPU, on a
GPU, and under `accelerate launch` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from eval.testbed.patch_labels import label_sizes, patch_labels
from eval.testbed.training.pixels import normalize_pixels
from mllm_crossget.config import atomic_output

LABEL_PREFIX = "patch_"
POSITIONAL = ("row", "column")  # labels every patch has; the others are 0 for "nothing here"


def feature_layer_count(model: Any) -> int:
    """How many encoder layers produce the hidden state LLaVA reads (`vision_feature_layer`)."""
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision pretraining needs a single vision_feature_layer, got {layer!r}")
    n_layers = model.config.vision_config.num_hidden_layers
    return layer if layer >= 0 else n_layers + 1 + layer


class PatchLabelDataset(torch.utils.data.Dataset):
    """Cached uint8 pixels plus the dense labels of each image (computed once, up front)."""

    def __init__(self, pixels: torch.Tensor, metas: Sequence[str | None]) -> None:
        if len(metas) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(metas)} metadata entries")
        missing = [i for i, meta in enumerate(metas) if not meta]
        if missing:
            raise ValueError(
                f"{len(missing)} images have no scene metadata (first: #{missing[0]}); vision "
                "pretraining needs the testbed's hf/ export, not LLaVA JSON"
            )
        self.pixels = pixels
        self.labels: list[dict[str, torch.Tensor]] = []
        for image_pixels, meta in zip(pixels, metas, strict=True):
            hwc = image_pixels.permute(1, 2, 0).numpy()
            labels = patch_labels(meta, np.ascontiguousarray(hwc))
            self.labels.append({k: torch.from_numpy(v) for k, v in labels.items()})

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {LABEL_PREFIX + k: v for k, v in self.labels[index].items()}
        item["pixels"] = self.pixels[index]
        return item


@dataclass
class PatchLabelCollator:
    """Stacks labels and normalises pixels exactly as the LLaVA stage's collator does."""

    image_mean: Sequence[float]
    image_std: Sequence[float]
    rescale_factor: float = 1 / 255

    def __call__(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {
            key: torch.stack([item[key] for item in batch])
            for key in batch[0]
            if key.startswith(LABEL_PREFIX)
        }
        pixels = torch.stack([item["pixels"] for item in batch])
        out["pixel_values"] = normalize_pixels(
            pixels, self.image_mean, self.image_std, self.rescale_factor
        )
        return out


class PatchLabelModel(nn.Module):
    """The LLaVA vision tower with one linear head per label on the layer LLaVA reads.

    The tower module is shared with the LLaVA model (not copied), so training here updates the
    LLaVA weights in place. Layers after the feature layer get no gradient and stay as they are.
    """

    def __init__(self, llava: Any, optional_labels: Sequence[str] = ()) -> None:
        super().__init__()
        self.vision_tower = llava.model.vision_tower
        self.feature_layer = llava.config.vision_feature_layer
        feature_layer_count(llava)  # validates the layer choice
        width = llava.config.vision_config.hidden_size
        grid = llava.config.vision_config.image_size // llava.config.vision_config.patch_size
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict(
            {
                name: nn.Linear(width, classes)
                for name, classes in label_sizes(grid, optional_labels).items()
            }
        )

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch features LLaVA's projector reads (CLS dropped: it has no label)."""
        hidden = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        return self.norm(hidden.hidden_states[self.feature_layer][:, 1:])

    def forward(self, pixel_values: torch.Tensor, **labels: torch.Tensor) -> dict[str, Any]:
        patches = self.features(pixel_values)
        total = patches.new_zeros(())
        for name, head in self.heads.items():
            logits = head(patches).flatten(0, 1)
            target = labels[LABEL_PREFIX + name].flatten()
            per_patch = nn.functional.cross_entropy(logits, target, reduction="none")
            total = total + per_patch.mean()
            if name not in POSITIONAL:
                # Objects cover a few patches out of 256 (an object centre: one); without a
                # term of their own, "nothing here" everywhere is a fine first answer and the
                # heads stall on it.
                present = target != 0
                if present.any():
                    total = total + per_patch[present].mean()
        return {"loss": total}

    @torch.no_grad()
    def accuracy(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per label: accuracy on patches whose label is not 0 (row/column: on all patches)."""
        patches = self.features(batch["pixel_values"])
        result = {}
        for name, head in self.heads.items():
            predicted = head(patches).argmax(-1)
            target = batch[LABEL_PREFIX + name]
            mask = torch.ones_like(target, dtype=torch.bool)
            if name not in POSITIONAL:
                mask = target != 0
            if mask.any():
                result[name] = float((predicted[mask] == target[mask]).float().mean())
        return result


__all__ = [
    "PatchLabelCollator",
    "PatchLabelDataset",
    "PatchLabelModel",
    "feature_layer_count",
    "run_vision_pretrain",
]


VISION_WEIGHTS = "vision_tower.safetensors"


def run_vision_pretrain(
    model: Any,
    pixels: torch.Tensor,
    metas: Sequence[str | None],
    image_processor: Any,
    output_dir: Any,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: bool = True,
    bf16: bool = False,
    optional_labels: Sequence[str] = (),
) -> dict[str, float]:
    """Trains `model`'s vision tower in place on patch labels, or reloads a finished stage.

    The stage keeps its own Trainer checkpoints in `output_dir` and resumes from the last one;
    when it completes it writes the tower's weights to `output_dir/vision_tower.safetensors`,
    so a later `--resume` of the main stage skips it entirely.
    """
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from eval.testbed.training.resume import finished_checkpoint_output

    output_dir = Path(output_dir)
    done = output_dir / VISION_WEIGHTS
    tower = model.model.vision_tower
    if done.is_file():
        tower.load_state_dict(load_file(str(done)))
        print(f"vision pretraining already done: loaded {done}")
        return {}
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = PatchLabelDataset(pixels, metas)
    wrapper = PatchLabelModel(model, optional_labels)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        max_grad_norm=1.0,
        logging_steps=max(1, min(50, steps // 10)),
        save_steps=max(1, steps // 4),
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=not progress,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = PatchLabelCollator(
        list(image_processor.image_mean),
        list(image_processor.image_std),
        float(image_processor.rescale_factor),
    )
    trainer = Trainer(model=wrapper, args=args, train_dataset=dataset, data_collator=collator)
    checkpoint = get_last_checkpoint(str(output_dir))
    if finished_checkpoint_output(trainer, checkpoint) is None:
        trainer.train(resume_from_checkpoint=checkpoint)
    wrapper.eval()
    sample = collator([dataset[i] for i in range(min(len(dataset), 64))])
    accuracy = wrapper.accuracy(sample)
    if trainer.is_world_process_zero():
        with atomic_output(done) as tmp:
            save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(tmp))
        print(
            "vision pretraining patch accuracy (train sample): "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in accuracy.items())
        )
    return accuracy
