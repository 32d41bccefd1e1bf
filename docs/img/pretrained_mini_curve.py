"""Redraws docs/img/pretrained_mini_curve.png, the learning curve of the shipped
`pretrained-mini` weights, from the loss histories shipped beside them
(eval/testbed/pretrained_mini_weights/loss_stage1.json and loss_stage2.json, written by the
trainer's ``--ship``).

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


def history(stage: str) -> list[tuple[int, float]]:
    rows = json.loads((PRETRAINED_MINI_WEIGHTS / f"loss_{stage}.json").read_text())["history"]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def smoothed(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean: each logged loss is one small batch (8 captions or 4 conversations),
    so it is noisy."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1)
        for i in range(len(values))
    ]


def main() -> None:
    stage1, stage2 = history("stage1"), history("stage2")
    offset = stage1[-1][0]
    figure, axis = plt.subplots(figsize=(7, 3.6))
    for label, rows, shift, colour in (
        ("stage 1: projector, caption tokens", stage1, 0, "tab:blue"),
        ("stage 2: projector + LoRA, answer tokens", stage2, offset, "tab:orange"),
    ):
        steps = [step + shift for step, _ in rows]
        losses = [loss for _, loss in rows]
        axis.plot(steps, losses, color=colour, alpha=0.3, linewidth=1)
        axis.plot(steps, smoothed(losses), color=colour, linewidth=2, label=label)
    axis.axvline(offset, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss per target token")
    axis.set_title("pretrained-mini: LLaVA-1.5 recipe, 224 px, 2 CPU cores")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
