"""How much of the LM loss reaches the vision prompts ``P`` under each cross-token setting.

For each setting (masked = today's default, ``cross_token_attended``, ``cross_token_to_llm``,
both) the model gets CrossGET at one budget with zero prompts, and the answer-token LM loss
(nothing else: no alignment loss) of the first ``--limit`` questions of a testbed split is
back-propagated.  Printed and written: the gradient norm on ``P`` (all layers and per layer)
and on the text prompts ``T``, as one JSON file.

``python -m eval.cross_token_grad --model reference --data data/testbed --split validation``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.config import write_json_atomic
from mllm_crossget.named_models import load_llava

SETTINGS: dict[str, dict[str, bool]] = {
    "masked": {},
    "attended": {"cross_token_attended": True},
    "to_llm": {"cross_token_to_llm": True},
    "both": {"cross_token_attended": True, "cross_token_to_llm": True},
}


def _examples(data: Path, split: str, limit: int) -> list[tuple[Image.Image, str, str]]:
    path = data / "llava" / f"{split}.json"
    if not path.is_file():
        raise SystemExit(
            f"error: no {path}; make the data with `python -m eval.testbed.data make --out {data}`"
        )
    rows = json.loads(path.read_text())[:limit]
    out = []
    for row in rows:
        question = row["conversations"][0]["value"].replace("<image>", "").strip()
        answer = row["conversations"][1]["value"]
        image = Image.open(data / "llava" / "images" / row["image"]).convert("RGB")
        out.append((image, question, answer))
    return out


def measure(
    model_name: str, examples: list[tuple[Image.Image, str, str]], budget: int, options: dict
) -> dict[str, Any]:
    """LM-loss gradient norms on P and T for one setting (a fresh model each time)."""
    from eval.testbed.model import format_prompt

    model, processor = load_llava(model_name)
    model, processor = crossget.apply(
        model, CrossGETConfig(visual_tokens=budget, **options), processor
    )
    model.train()
    for parameter in model.parameters():
        parameter.grad = None
    total = 0.0
    for image, question, answer in examples:
        prompt = format_prompt(question)
        full = processor(images=[image], text=[f"{prompt} {answer}"], return_tensors="pt")
        start = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        labels = full["input_ids"].clone()
        labels[:, :start] = -100
        loss = model(**full, labels=labels, use_cache=False).loss / len(examples)
        loss.backward()
        total += loss.detach().item()
    tokens = crossget.cross_tokens(model)
    vision = tokens.vision_prompts.grad
    text = tokens.text_prompts.grad
    return {
        "options": options,
        "loss": total,
        "P": float(vision.norm()),
        "P_per_layer": [float(v) for v in vision.norm(dim=1)],
        "T": float(text.norm()),
        "T_per_layer": [float(v) for v in text.norm(dim=1)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="reference", help="named model or LLaVA folder")
    parser.add_argument("--data", type=Path, required=True, help="testbed data folder")
    parser.add_argument("--split", default="validation", help="split to read (validation)")
    parser.add_argument("--limit", type=int, default=32, help="questions in the loss (32)")
    parser.add_argument("--budget", type=int, default=64, help="visual tokens per image (64)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (optional)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    examples = _examples(args.data, args.split, args.limit)
    results = {}
    for name, options in SETTINGS.items():
        results[name] = measure(args.model, examples, args.budget, options)
        row = results[name]
        layers = " ".join(f"{v:.1e}" for v in row["P_per_layer"])
        print(
            f"{name:9s} loss {row['loss']:.4f}  |grad P| {row['P']:.2e} ({layers})  "
            f"|grad T| {row['T']:.2e}"
        )
    if args.out is not None:
        write_json_atomic(
            args.out,
            {
                "model": args.model,
                "budget": args.budget,
                "limit": args.limit,
                "split": args.split,
                **results,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
