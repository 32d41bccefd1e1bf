"""Redraws docs/img/pretrained_mini_curve.png, the learning curve of the shipped
`pretrained-mini` weights, from the loss histories shipped beside them: every segment listed
in eval/testbed/pretrained_mini_weights/lineage.json (written by the trainer's ``--ship``; a
run continued from the shipped weights adds a segment), one after the other.

    python docs/img/pretrained_mini_curve.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mllm_crossget.named_models import PRETRAINED_MINI_WEIGHTS  # noqa: E402

OUT = Path(__file__).with_name("pretrained_mini_curve.png")
STYLE = {  # stage -> (colour, legend label)
    "stage1": ("tab:blue", "stage 1: projector, caption tokens"),
    "stage2": (
        "tab:orange",
        "stage 2: projector + LoRA, answer tokens (+ caption tokens where mixed in)",
    ),
}


def segments() -> list[dict]:
    return json.loads((PRETRAINED_MINI_WEIGHTS / "lineage.json").read_text())["segments"]


def history(name: str) -> list[tuple[int, float]]:
    rows = json.loads((PRETRAINED_MINI_WEIGHTS / name).read_text())["history"]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def smoothed(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean: each logged loss is one small batch (8 captions or 4 conversations),
    so it is noisy."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1)
        for i in range(len(values))
    ]


def main() -> None:
    figure, axis = plt.subplots(figsize=(8, 3.8))
    offset, labelled = 0, set()
    for index, segment in enumerate(segments()):
        rows = history(segment["history"])
        stage = segment["stage"]
        steps = [offset + step for step, _ in rows]
        losses = [loss for _, loss in rows]
        colour, label = STYLE[stage]
        axis.plot(steps, losses, color=colour, alpha=0.3, linewidth=1)
        axis.plot(
            steps,
            smoothed(losses),
            color=colour,
            linewidth=2,
            label=None if stage in labelled else label,
        )
        labelled.add(stage)
        text = f"LR {segment['lr']:g}"
        validation = segment.get("validation")
        if validation:  # chance (about 23 %) is in the title
            text += f"\nval {100 * validation['accuracy']:.1f} %"
        height = 0.98 if index % 2 == 0 else 0.84  # neighbours of short segments do not overlap
        axis.text(
            offset + 5,
            height,
            text,
            transform=axis.get_xaxis_transform(),
            va="top",
            fontsize=7,
            color="dimgrey",
        )
        if offset:
            axis.axvline(offset, color="grey", linestyle=":", linewidth=1)
        offset += int(segment["steps"])
    axis.set_xlabel("optimizer step (all segments of the shipped weights, in order)")
    axis.set_ylabel("loss per target token")
    axis.set_title(
        "pretrained-mini: LLaVA-1.5 recipe, 224 px, 2 CPU cores (validation chance about 23 %)"
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
