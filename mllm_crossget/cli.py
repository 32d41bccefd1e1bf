"""The ``crossget`` command: one entry point whose verbs route to the library and harnesses.

Verbs that need the evaluation harness or recipes (``eval/``, ``recipes/``, shipped in the
same distribution) import them lazily, so the core library never depends on them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module with a `main(argv) -> int`, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "bench": ("eval.bench", "time every method x budget side by side (speed, memory, FLOPs)"),
    "bench-merge": ("eval.bench_merge", "time CGSM vs ToMe matching vs one CLIP-L layer"),
    "bench-blip2": ("eval.bench_blip2", "ViT and generate time of a BLIP-2-shaped model"),
    "bench-clip": ("eval.bench_clip", "image-tower throughput of ViT-B/16 CLIP models"),
    "bench-towers": ("eval.bench_towers", "vision-tower speed: CLIP-L, SigLIP-So400m, DINOv2-S"),
    "bench-serve": ("eval.bench_serve", "concurrent-request load check of `crossget serve`"),
    "chat": ("mllm_crossget.serving.chat", "chat with a LLaVA model about an image, streamed"),
    "clip-eval": ("eval.clip_eval", "CLIP zero-shot / retrieval recall on local files"),
    "clip-train": ("recipes.clip_retrieval", "fine-tune a CrossGET CLIP model for retrieval"),
    "data": ("eval.testbed.data", "generate the offline VQA testbed (`crossget data make ...`)"),
    "demo": ("eval.demo", "the `make demo` job: accuracy, tokens, FLOPs, speed of every method"),
    "eval": ("eval.run", "score methods x budgets on a task (testbed, vqav2, pope, ...)"),
    "finetune": ("recipes.llava_finetune", "LoRA + cross-token recovery fine-tuning of LLaVA"),
    "lm-eval": ("eval.lmeval_plugin", "lm-eval's CLI with the crossget-llava model registered"),
    "serve": ("mllm_crossget.serving.server", "OpenAI-compatible chat-completions HTTP server"),
    "visualize": ("eval.visualize", "draw which patches ended up in which token, per method"),
    "testbed-train": (
        "eval.testbed.training.train",
        "train the testbed's reference model from scratch (`make reference-model`)",
    ),
}

# Verbs that were renamed: running one says where its work went instead of "unknown verb".
RENAMED: dict[str, str] = {
    "train": "`crossget train` was renamed: `crossget testbed-train` trains the testbed's own "
    "reference model from scratch; to recover accuracy of YOUR LLaVA after merging, run "
    "`crossget finetune` (recipes/llava_finetune.py)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget",
        description="CrossGET visual-token merging for multimodal LLMs. "
        "Each verb has its own --help.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, summary) in VERBS.items():
        sub.add_parser(verb, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in RENAMED:
        print(f"crossget: {RENAMED[argv[0]]}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\ncrossget: unknown verb {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    module_name, _ = VERBS[argv[0]]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        print(
            f"crossget {argv[0]}: {module_name} is not available ({error}); install the "
            "project with `pip install -e .` from its checkout",
            file=sys.stderr,
        )
        return 2
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
