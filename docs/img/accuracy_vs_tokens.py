"""Redraws docs/img/accuracy_vs_tokens.png with `make demo`'s own plot function.

The accuracies are the overall figures of the `make demo` run on the shipped `reference` model
(7 December 2026, every default as shipped, so `llm_proportional_attention` on) as printed in
README.md's results table; chance is computed here from the
same 350 demo questions (rendered into data/testbed-demo/ when missing, as `make demo` does).
`make demo` draws this plot from its own run into outputs/demo/accuracy_vs_tokens.png.

    python docs/img/accuracy_vs_tokens.py
"""

from __future__ import annotations

from pathlib import Path

from eval.demo import (
    DEFAULT_CACHE,
    DEFAULT_QUESTIONS,
    DEFAULT_SEED,
    ensure_test_split,
    plot_accuracy,
)
from eval.testbed.data import chance_by_family, load_split

FULL = ("full", 256, 85.1)
# method -> accuracy (%) at 192, 128 and 64 visual tokens (README's results table)
MEASURED: dict[str, tuple[float, float, float]] = {
    "crossget": (85.1, 85.1, 81.4),
    "tome": (84.6, 84.9, 78.3),
    "visionzip": (83.4, 81.7, 74.6),
    "divprune": (84.6, 84.3, 77.4),
    "pool": (69.4, 66.0, 58.3),
    "random": (80.6, 71.1, 66.6),
    "fastv": (84.9, 84.6, 84.3),
}
BUDGETS = (192, 128, 64)


def main() -> None:
    data = ensure_test_split(DEFAULT_CACHE, DEFAULT_QUESTIONS, DEFAULT_SEED, 224, progress=False)
    records = list(load_split(data, "test").select(range(DEFAULT_QUESTIONS)))
    chance = chance_by_family(records)
    overall = sum(chance[r["family"]] for r in records) / len(records)
    rows = [{"method": FULL[0], "kept_tokens": FULL[1], "metrics": {"accuracy": FULL[2]}}]
    for method, accuracies in MEASURED.items():
        for budget, accuracy in zip(BUDGETS, accuracies, strict=True):
            rows.append(
                {"method": method, "kept_tokens": budget, "metrics": {"accuracy": accuracy}}
            )
    title = (
        f"reference model, {DEFAULT_QUESTIONS} held-out testbed questions (make demo, "
        "7 Dec 2026); FastV keeps K tokens from LLM layer 2"
    )
    plot_accuracy(rows, overall, Path(__file__).with_suffix(".png"), title)
    print(f"chance {100 * overall:.1f} %; wrote {Path(__file__).with_suffix('.png')}")


if __name__ == "__main__":
    main()
