"""`crossget bench`: every method at every budget, side by side, in one run.

For each (method, budget) the same batch goes through ``model.generate`` and hooks time its
stages: the vision tower (``get_image_features``), the LLM prefill, time to first token (from
the ``generate`` call to the end of the first forward) and decode tokens/s (the rest of the
call).  Rounds go round-robin over all settings (load changes on a shared machine hit all
alike) after warm-up rounds; medians are reported.  Memory per setting: the KV cache's bytes
per request, summed over the tensors of the cache object ``generate`` returns, beside the
analytic size (2 x layers x KV heads x head size x cached tokens x bytes); and the peak
memory of a request — on CUDA the allocator's peak (``max_memory_allocated``) in the first
round, on CPU the peak resident set (``VmHWM``) of a fresh process per setting that loads the
model, runs one warm-up request and then the measured one (``eval.bench_memory``).  Next to
the measurements:
``crossget.flops_report`` FLOPs and the FLOPs-bound speedup, the measured speedup over the
unmodified model, and the token-choosing overhead (matching+merging or selection alone, timed
on tensors of the real shapes).  Writes ``bench.json``, ``bench.md`` and ``speedup.png`` (and
``pareto.png`` with ``--accuracy``) atomically into ``--out``.  On CPU one intra-op thread is
the default (``--threads``): on a shared host, OpenMP threads contending with other processes
made the runs several times slower and far noisier.  ``full`` is the unmodified Hugging Face
model (it runs every vision layer and projects all 576 tokens); the FLOPs count that too.

    crossget bench --model reference --out runs/bench
    crossget bench --model llava-7b-shape --llm-layers 1 --repeats 2 --out runs/bench7b
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

import mllm_crossget as crossget
from eval.bench_memory import measure_in_subprocess
from eval.timing import DTYPES, describe_environment, environment
from mllm_crossget import named_models
from mllm_crossget.config import LLM_POSITION_MODES, atomic_output, atomic_write_text
from mllm_crossget.flops import FlopsReport
from mllm_crossget.merge import bipartite_matching, complete_graph_matching
from mllm_crossget.peers import MERGING_METHODS, METHOD_NAMES, FeatureInputs, get_method
from mllm_crossget.peers import fastv as fastv_peer
from mllm_crossget.processing import processor_image_size

# `llava-7b-shape` is built here with random weights; any other --model is a named model
# (mllm_crossget.named_models), a LLaVA folder or a hub id.
SHAPE_MODEL = "llava-7b-shape"
MEMORY_NOTES = {
    "process": "peak MB: peak resident set (VmHWM) of a fresh process per setting during one "
    "request after a warm-up one; working MB: that peak minus the resident set before it.",
    "allocator": "peak MB: CUDA max_memory_allocated during the first request of the setting "
    "(weights included); working MB: that peak minus what was allocated before it.",
    "none": "peak memory not measured (--memory none).",
}

# ------------------------------------------------------------------------------ settings


@dataclass
class Setting:
    """One (method, budget) column of the comparison."""

    method: str  # "full" for the unmodified model
    budget: str
    config: crossget.CrossGETConfig | None
    visual_tokens: int = 0  # what the LLM receives per image
    kept_tokens: int = 0  # what its later layers keep (FastV) — else the same
    flops: FlopsReport | None = None
    input_ids: Tensor | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)  # peak/working/KV MB
    overhead_s: float = 0.0

    @property
    def label(self) -> str:
        return "full" if self.method == "full" else f"{self.method}/{self.budget}"


def add_llm_positions_argument(parser: argparse.ArgumentParser) -> None:
    """``--llm-positions`` for every harness that builds LLaVA configs (one help text)."""
    parser.add_argument(
        "--llm-positions",
        choices=LLM_POSITION_MODES,
        default="original",
        help="rotary positions of reduced visual tokens in the LLM: original = where their "
        "first patch sat, text keeps its distance to the image; compact = consecutive (the "
        "authors' code). Applies to every encoder-side method; FastV keeps its own",
    )


LLM_PROPORTIONAL_CHOICES = {"auto": None, "on": True, "off": False}


def add_llm_proportional_argument(parser: argparse.ArgumentParser) -> None:
    """``--llm-proportional-attention`` for every harness that builds LLaVA configs."""
    parser.add_argument(
        "--llm-proportional-attention",
        choices=tuple(LLM_PROPORTIONAL_CHOICES),
        default="auto",
        help="log(size) on reduced visual tokens' keys in the LLM, so a merged token weighs "
        "as the patches it holds: auto = on for LLaVA-1.5 with every method that reduces "
        "before the LLM (FastV: off), on, off (the LLM weighs every token as one patch)",
    )


def split_two_stage(budget: str) -> tuple[str, float | None]:
    """``"128@0.5"`` -> ``("128", 0.5)``: K tokens from the encoder, then the LLM keeps R of
    them (``llm_keep_ratio``); a budget without ``@`` -> ``(budget, None)``."""
    head, at, ratio = budget.partition("@")
    if not at:
        return budget, None
    try:
        return head, float(ratio)
    except ValueError:
        raise ValueError(f"K@R wants a keep ratio after '@', got {ratio!r}") from None


def parse_budget(
    method: str,
    text: str,
    fastv_layer: int,
    llm_positions: str = "original",
    llm_proportional: str = "auto",
) -> crossget.CrossGETConfig:
    """``rN`` -> r=N (merging methods), ``K`` -> visual_tokens=K, ``0.25`` -> keep_ratio,
    ``K@R`` -> visual_tokens=K from the encoder, then the LLM keeps R of them from layer
    ``fastv_layer`` on (``llm_keep_ratio``: the question's attention picks them)."""
    extra: dict[str, Any] = {"fastv_layer": fastv_layer} if method == "fastv" else {}
    text, ratio = split_two_stage(text)
    if ratio is not None:
        if method == "fastv":
            raise ValueError("K@R (llm_keep_ratio) follows an encoder-side method, not fastv")
        extra["llm_keep_ratio"] = ratio
        extra["fastv_layer"] = fastv_layer
    extra["llm_positions"] = llm_positions
    if method != "fastv":
        extra["llm_proportional_attention"] = LLM_PROPORTIONAL_CHOICES[llm_proportional]
    if text.startswith("r"):
        if method not in MERGING_METHODS:
            raise ValueError(f"r applies to the merging methods {', '.join(MERGING_METHODS)}")
        return crossget.CrossGETConfig(r=int(text[1:]), method=method, **extra)
    if "." in text:
        return crossget.CrossGETConfig(keep_ratio=float(text), method=method, **extra)
    return crossget.CrossGETConfig(visual_tokens=int(text), method=method, **extra)


def build_settings(
    model: nn.Module,
    methods: Sequence[str],
    budgets: Sequence[str],
    fastv_layer: int,
    llm_positions: str = "original",
    processor: Any = None,
    llm_proportional: str = "auto",
) -> tuple[list[Setting], list[str]]:
    """Valid settings (full first) and a note for each skipped combination (a budget is
    judged at the size ``processor`` feeds when one is given, else at the config's size).

    FastV's ``fastv_layer`` is lowered to the LLM's last layer - 1 for shallow models (noted).
    """
    wanted_fastv_layer = fastv_layer
    settings: list[Setting] = []
    skipped: list[str] = []
    if "full" in budgets:
        settings.append(Setting("full", "full", None))
    llm_layers = model.config.text_config.num_hidden_layers
    fastv_layer = min(wanted_fastv_layer, llm_layers - 1)
    for method in methods:
        for budget in budgets:
            if budget == "full":
                continue
            prunes_in_llm = method == "fastv" or "@" in budget
            if prunes_in_llm and fastv_layer < 1:
                skipped.append(
                    f"{method}/{budget}: the LLM has {llm_layers} layer(s); pruning inside it "
                    "needs a layer after its scoring layer (use --llm-layers >= 2)"
                )
                continue
            try:
                config = parse_budget(method, budget, fastv_layer, llm_positions, llm_proportional)
                crossget.remove(model, processor)
                crossget.apply(model, config, processor)
            except ValueError as error:
                skipped.append(f"{method}/{budget}: {error}")
                continue
            note = ""
            if prunes_in_llm and fastv_layer != wanted_fastv_layer:
                note = f"K={fastv_layer}: the LLM has {llm_layers} layers"
            settings.append(Setting(method, budget, config, note=note))
    crossget.remove(model, processor)
    return settings, skipped


def prepare(
    model: nn.Module,
    setting: Setting,
    text: Tensor,
    image_token_id: int,
    prompt_tokens: int,
    processor: Any = None,
) -> None:
    """Apply the setting once to read token counts, FLOPs and build its input ids, at the
    size ``processor`` feeds (default: the tower config's)."""
    image_size = input_image_size(model, processor)
    crossget.remove(model, processor)
    if setting.config is not None:
        crossget.apply(model, setting.config, processor)
        setting.visual_tokens = crossget.num_visual_tokens(model, image_size)
    flops = crossget.flops_report(model, image_size=image_size, prompt_length=prompt_tokens)
    if setting.config is None:
        setting.visual_tokens = flops.visual_tokens
    setting.flops = flops
    setting.kept_tokens = flops.as_dict()["kept_tokens"]  # type: ignore[assignment]
    batch = text.shape[0]
    image = torch.full((batch, setting.visual_tokens), image_token_id, device=text.device)
    setting.input_ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    crossget.remove(model, processor)


# ------------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Hooks that time the vision tower, the LLM and each top-level forward of one call.

    ``get_image_features`` is wrapped on the ``LlavaModel`` instance (an instance attribute,
    removed on exit), so it is timed wherever ``generate`` or ``forward`` calls it.
    """

    def __init__(self, model: nn.Module, device: str) -> None:
        self.model, self.device = model, device
        self.forward_ends: list[float] = []
        self.vision: list[tuple[float, float]] = []
        self.llm: list[tuple[float, float]] = []
        self._handles: list[Any] = []

    def _now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def __enter__(self) -> StageTimer:
        inner = self.model.model
        original = inner.get_image_features
        starts: list[float] = []

        @functools.wraps(original)  # generate() reads its signature to pre-encode images
        def timed_features(*args: Any, **kwargs: Any) -> Any:
            start = self._now()
            result = original(*args, **kwargs)
            self.vision.append((start, self._now()))
            return result

        inner.get_image_features = timed_features
        language = inner.language_model
        self._handles = [
            language.register_forward_pre_hook(lambda *_: starts.append(self._now())),
            language.register_forward_hook(lambda *_: self.llm.append((starts.pop(), self._now()))),
            self.model.register_forward_hook(lambda *_: self.forward_ends.append(self._now())),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self.model.model.__dict__.pop("get_image_features", None)


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of a KV cache object (every layer)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is None:  # a legacy tuple of (key, value) pairs
        layers = cache
    total = 0
    for layer in layers:
        pair = (layer.keys, layer.values) if hasattr(layer, "keys") else tuple(layer)
        total += sum(t.numel() * t.element_size() for t in pair if isinstance(t, Tensor))
    return total


def analytic_kv_bytes(
    model: nn.Module, setting: Setting, new_tokens: int, dtype: torch.dtype
) -> int:
    """Bytes one request's KV cache must hold after ``generate``: 2 (K and V) x layers x KV
    heads x head size x cached tokens x element size.  The cache holds the prompt with its
    visual tokens and every generated token but the last; FastV's layers from K on hold only
    its kept visual tokens."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = text.num_key_value_heads or text.num_attention_heads
    assert setting.input_ids is not None
    length = setting.input_ids.shape[1] + new_tokens - 1
    per_token = 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    pruned_from = text.num_hidden_layers
    if setting.config is not None and setting.config.prunes_in_llm:
        pruned_from = setting.config.fastv_layer
    dropped = setting.visual_tokens - setting.kept_tokens
    tokens = sum(
        length - (dropped if layer >= pruned_from else 0) for layer in range(text.num_hidden_layers)
    )
    return per_token * tokens


def autocast_context(device: str, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def run_once(
    model: nn.Module,
    setting: Setting,
    pixels: Tensor,
    device: str,
    new_tokens: int,
    *,
    autocast: torch.dtype | None = None,
    keep_cache: list[Any] | None = None,
) -> dict[str, float]:
    """One ``generate`` call of ``new_tokens`` tokens; returns the stage times of this call.

    With ``keep_cache`` (a list) the call returns its KV cache object, appended there.
    """
    ids = setting.input_ids
    assert ids is not None
    with (
        StageTimer(model, device) as timer,
        torch.inference_mode(),
        autocast_context(device, autocast),
    ):
        start = timer._now()
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=0,
            return_dict_in_generate=keep_cache is not None,
        )
        end = timer._now()
    if keep_cache is not None:
        keep_cache.append(output.past_key_values)
    first_end = timer.forward_ends[0]
    vision = sum(b - a for a, b in timer.vision if b <= first_end)
    decode_s = end - first_end
    tokens = ids.shape[0] * (new_tokens - 1)
    return {
        "vision_s": vision,
        "prefill_s": timer.llm[0][1] - timer.llm[0][0],
        "ttft_s": first_end - start,
        "decode_tok_s": tokens / decode_s if decode_s > 0 and tokens else float("nan"),
    }


def measure_cache(
    model: nn.Module,
    setting: Setting,
    pixels: Tensor,
    device: str,
    new_tokens: int,
    autocast: torch.dtype | None,
) -> dict[str, float]:
    """Run one request and read its KV cache (and on CUDA the allocator's peak)."""
    caches: list[Any] = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = run_once(
        model, setting, pixels, device, new_tokens, autocast=autocast, keep_cache=caches
    )
    batch = pixels.shape[0]
    kv_dtype = autocast or next(model.parameters()).dtype
    memory = {
        "kv_mb": cache_bytes(caches[0]) / batch / 2**20,
        "kv_analytic_mb": analytic_kv_bytes(model, setting, new_tokens, kv_dtype) / 2**20,
    }
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        memory |= {"peak_mb": peak / 2**20, "working_mb": (peak - base) / 2**20}
    setting.memory.update(memory)
    return times


def time_round_robin(
    model: nn.Module,
    settings: Sequence[Setting],
    pixels: Tensor,
    device: str,
    new_tokens: int,
    warmup: int,
    repeats: int,
    progress: bool = True,
    autocast: torch.dtype | None = None,
    processor: Any = None,
) -> None:
    """Fill ``setting.samples`` (and its KV cache / CUDA memory) of every setting
    (``processor``: the budgets are applied as `build_settings` judged them).

    Rounds go round-robin (one call of each setting per round) so that load changes on a
    shared machine hit every setting alike; the first round reads the KV cache and CUDA
    memory, and the first ``warmup`` rounds are not kept.
    """
    rounds = warmup + repeats
    with tqdm(total=rounds * len(settings), desc="timing", unit="run", disable=not progress) as bar:
        for round_index in range(rounds):
            for setting in settings:
                bar.set_postfix_str(setting.label)
                with configured(model, setting, processor):
                    if round_index == 0:
                        times = measure_cache(model, setting, pixels, device, new_tokens, autocast)
                    else:
                        times = run_once(
                            model, setting, pixels, device, new_tokens, autocast=autocast
                        )
                    if round_index >= warmup or warmup == 0:
                        for key, value in times.items():
                            setting.samples.setdefault(key, []).append(value)
                bar.update()


@contextmanager
def configured(model: nn.Module, setting: Setting, processor: Any = None) -> Iterator[None]:
    crossget.remove(model, processor)
    if setting.config is not None:
        crossget.apply(model, setting.config, processor)
    try:
        yield
    finally:
        crossget.remove(model, processor)


# ------------------------------------------------------------- choosing-tokens overhead


def overhead_fn(
    model: nn.Module, setting: Setting, batch: int, device: str, image_size: int | None = None
) -> Callable[[], Any]:
    """The token-choosing work of one setting alone, on random tensors of the real shapes.

    Merging methods: matching + merge of every merging layer (their ``r`` and token counts).
    Feature methods: the selection on [B, N, C] features.  FastV, and the second stage of a
    ``K@R`` budget: the scoring row and top-K inside the LLM (added to the encoder's part).
    """
    if setting.config is None:
        return lambda: None
    if setting.config.method == "fastv":
        return llm_scoring_fn(model, setting, batch, device)
    encoder = encoder_choosing_fn(model, setting, batch, device, image_size)
    if setting.config.llm_keep_ratio is None:
        return encoder
    scoring = llm_scoring_fn(model, setting, batch, device)

    def both() -> None:
        encoder()
        scoring()

    return both


def encoder_choosing_fn(
    model: nn.Module, setting: Setting, batch: int, device: str, image_size: int | None
) -> Callable[[], Any]:
    """Matching + merge of every merging layer, or a feature method's selection."""
    assert setting.config is not None
    vision = model.config.vision_config
    width, heads = vision.hidden_size, vision.num_attention_heads
    dtype = next(model.parameters()).dtype
    size = image_size or vision.image_size
    planner = model.crossget_planner
    patches = (size // vision.patch_size) ** 2

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    method = setting.config.method
    if method in MERGING_METHODS:
        n = planner.input_tokens(size, size)
        layers: list[tuple[int, Tensor, Tensor, Tensor, Tensor | None]] = []
        for r in planner.layer_r(n):
            if r:
                protected = torch.zeros(batch, n, dtype=torch.bool, device=device)
                protected[:, 0] = True  # CLS
                importance = None if method == "tome" else randn(batch, n).float()
                metric, hidden = randn(batch, n, width // heads), randn(batch, n, width)
                layers.append((r, metric, hidden, protected, importance))
                n -= min(r, (n - 1) // 2)

        def merge_all() -> None:
            for r, metric, hidden, protected, importance in layers:
                if method == "tome":
                    matching = bipartite_matching(metric, r, protected=protected)
                else:
                    matching = complete_graph_matching(metric, r, importance, protected)
                matching.merge(hidden, None, importance)

        return merge_all
    spec = get_method(method)
    grid = size // vision.patch_size
    inputs = FeatureInputs(
        randn(batch, patches, width),
        (grid, grid),
        torch.rand(batch, patches, device=device),
        randn(batch, patches, width // heads),
        setting.config.seed,
    )
    # The encoder emits visual_tokens (with K@R the LLM later keeps kept_tokens of them).
    return lambda: spec.reduce(inputs, setting.visual_tokens)  # type: ignore[misc]


def llm_scoring_fn(
    model: nn.Module, setting: Setting, batch: int, device: str
) -> Callable[[], Any]:
    """FastV's scoring row in layer K - 1 (the prompt's last token's attention to every visual
    token) and its top-K: what FastV and the ``llm_keep_ratio`` stage add to a prefill."""
    assert setting.config is not None and setting.input_ids is not None
    dtype = next(model.parameters()).dtype

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    text = model.config.text_config
    layer = model.model.language_model.layers[setting.config.fastv_layer - 1].self_attn
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = text.num_key_value_heads or text.num_attention_heads
    length = setting.input_ids.shape[1]
    query = randn(batch, length, text.num_attention_heads * head_dim)
    key = randn(batch, length, kv_heads * head_dim)
    rotary = (randn(batch, length, head_dim), randn(batch, length, head_dim))
    last = torch.full((batch,), length - 1, device=device)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    keep = setting.kept_tokens

    def score() -> None:
        scores = fastv_peer.attention_scores(layer, query, key, rotary, last, valid)
        scores[:, 1 : 1 + setting.visual_tokens].topk(keep, dim=1)

    return score


def median_time(fn: Callable[[], Any], repeats: int, device: str) -> float:
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(max(repeats, 1)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------- models


def load_model(args: argparse.Namespace) -> tuple[nn.Module, str, Any]:
    """The model, a one-line description of it and its processor (None for shapes)."""
    dtype = DTYPES[args.dtype]
    if args.model != SHAPE_MODEL:
        entry = named_models.get(args.model)
        if entry is not None and entry.name == "reference":
            folder = entry.folder()
            if not (folder / "config.json").is_file():
                from eval.testbed.model import build_reference

                model, processor = build_reference(seed=args.seed)
                description = "testbed reference architecture, random weights (not trained yet)"
                return model.to(args.device, dtype).eval(), description, processor
        model, processor = named_models.load_llava(args.model, dtype=dtype, device=args.device)
        if entry is not None:
            return model, f"named model {entry.name!r} ({entry.folder()})", processor
        return model, f"LLaVA {args.model}", processor
    from transformers import LlavaForConditionalGeneration

    from eval.bench_llava import llava_7b_config

    config = llava_7b_config(
        args.llm_layers,
        args.attn,
        llm_width=args.llm_width,
        vision_width=args.vision_width,
        vision_layers=args.vision_layers,
        image_size=args.image_size,
    )
    torch.manual_seed(args.seed)
    # Built directly on the target device in the target dtype (a device context), so a full
    # 7B never materialises on the CPU first.
    with torch.device(args.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    description = (
        f"LLaVA-1.5-7B shape (CLIP ViT-L/14-336 + LLaMA-7B width, {args.llm_layers} LLM "
        "layers), random weights"
    )
    shape = (args.llm_width, args.vision_width, args.vision_layers, args.image_size)
    if shape != (4096, 1024, 24, 336):
        description = (
            f"LLaVA-shaped test model (LLM width {args.llm_width}, {args.llm_layers} layers; "
            f"tower width {args.vision_width}, {args.vision_layers} layers, "
            f"{args.image_size} px), random weights"
        )
    return model.eval(), description, None


def input_image_size(model: nn.Module, processor: Any) -> int:
    """The square side the tower is fed: the processor's, else the tower config's (they
    differ for pretrained-mini, whose config keeps DINOv2's native 518-px grid)."""
    size = processor_image_size(processor) if processor is not None else None
    if size is None:
        return int(model.config.vision_config.image_size)
    if size[0] != size[1]:
        raise ValueError(f"bench times square images; the processor feeds {size}")
    return size[0]


# ---------------------------------------------------------------------------- reporting


def result_rows(settings: Sequence[Setting]) -> list[dict[str, Any]]:
    full = next((s for s in settings if s.method == "full"), None)
    rows = []
    for setting in settings:
        medians = {k: statistics.median(v) for k, v in setting.samples.items() if v}
        flops = setting.flops
        assert flops is not None
        row: dict[str, Any] = {
            "method": setting.method,
            "budget": setting.budget,
            "visual_tokens": setting.visual_tokens,
            "kept_tokens": setting.kept_tokens,
            **medians,
            "memory": setting.memory,
            "flops": flops.as_dict(),
            "overhead_ms": setting.overhead_s * 1e3,
            "note": setting.note,
            "samples": setting.samples,  # every timed round, for other statistics
        }
        if full is not None and full.flops is not None:
            row["flops_speedup"] = full.flops.total / flops.total
            base = {k: statistics.median(v) for k, v in full.samples.items() if v}
            for key in ("ttft_s", "vision_s", "prefill_s"):
                if key in base and key in medians:
                    name = "speedup" if key == "ttft_s" else key.replace("_s", "_speedup")
                    row[name] = base[key] / medians[key]
        rows.append(row)
    return rows


def load_accuracy(path: Path, metric: str | None) -> tuple[dict[tuple[str, str], float], str]:
    """``(method, budget) -> value`` from ``crossget eval``'s results.json (and the metric)."""
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if not rows:
        raise ValueError(f"{path} holds no result rows")
    names = list(rows[0]["metrics"])
    chosen = metric or names[0]
    values = {}
    for row in rows:
        value = row["metrics"].get(chosen)
        if isinstance(value, (int, float)):
            values[(str(row["method"]), str(row["budget"]))] = float(value)
    if not values:
        raise ValueError(f"no numeric {chosen!r} in {path}; metrics there: {names}")
    return values, chosen


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def markdown(
    rows: Sequence[dict[str, Any]],
    header: str,
    skipped: Sequence[str],
    accuracy: dict[tuple[str, str], float] | None = None,
    metric: str = "",
) -> str:
    columns = [
        "method",
        "budget",
        "visual tokens (LLM in)",
        "kept (LLM)",
        "vision s",
        "prefill s",
        "TTFT s",
        "decode tok/s",
        "peak MB",
        "working MB",
        "KV MB/req",
        "KV analytic MB",
        "GFLOPs",
        "FLOPs-bound x",
        "measured x",
        "overhead ms",
    ]
    if accuracy is not None:
        columns.append(metric)
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            row["method"] + (f" ({row['note']})" if row["note"] else ""),
            row["budget"],
            str(row["visual_tokens"]),
            str(row["kept_tokens"]),
            _fmt(row.get("vision_s"), ".3f"),
            _fmt(row.get("prefill_s"), ".3f"),
            _fmt(row.get("ttft_s"), ".3f"),
            _fmt(row.get("decode_tok_s"), ".1f"),
            _fmt(row["memory"].get("peak_mb"), ".0f"),
            _fmt(row["memory"].get("working_mb"), ".0f"),
            _fmt(row["memory"].get("kv_mb"), ".2f"),
            _fmt(row["memory"].get("kv_analytic_mb"), ".2f"),
            _fmt(row["flops"]["total"] / 1e9, ".2f"),
            _fmt(row.get("flops_speedup"), ".2f"),
            _fmt(row.get("speedup"), ".2f"),
            _fmt(row.get("overhead_ms"), ".2f"),
        ]
        if accuracy is not None:
            cells.append(_fmt(accuracy.get((row["method"], row["budget"])), ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Skipped:", *[f"- {note}" for note in skipped]]
    return "\n".join(lines) + "\n"


def save_figure(figure: Any, path: Path) -> None:
    """savefig through atomic_output, so a half-written PNG never replaces the last one."""
    with atomic_output(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")


def plot_speedup(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Measured TTFT speedup vs visual tokens per method, with its FLOPs bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    full = next((r for r in rows if r["method"] == "full"), None)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "full"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, method in enumerate(methods):
        points = sorted(
            (r["kept_tokens"], r.get("speedup"), r.get("flops_speedup"))
            for r in rows
            if r["method"] == method
        )
        if full is not None:
            points.append((full["kept_tokens"], 1.0, 1.0))
        tokens = [p[0] for p in points]
        color = colors[index % len(colors)]
        if all(p[1] is not None for p in points):
            axis.plot(tokens, [p[1] for p in points], "o-", color=color, label=method)
        if all(p[2] is not None for p in points):
            axis.plot(tokens, [p[2] for p in points], "--", color=color, alpha=0.6)
    axis.axhline(1.0, color="grey", lw=0.8)
    axis.set_xlabel("visual tokens kept (FastV: from its pruning layer on)")
    axis.set_ylabel("speedup of time to first token vs full")
    axis.set_title(title + "\n(solid: measured, dashed: FLOPs bound)", fontsize=9)
    axis.legend(fontsize=8)
    save_figure(figure, path)
    plt.close(figure)


def plot_pareto(
    rows: Sequence[dict[str, Any]],
    accuracy: dict[tuple[str, str], float],
    metric: str,
    path: Path,
) -> None:
    """Accuracy vs visual tokens per method, and the Pareto front over all methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_of = {(r["method"], r["budget"]): r["kept_tokens"] for r in rows}
    points = []
    for (method, budget), value in accuracy.items():
        tokens = tokens_of.get((method, budget))
        if tokens is None and budget.isdigit():
            tokens = int(budget)
        if tokens is not None:
            points.append((method, tokens, value))
    if not points:
        raise ValueError("no accuracy row matches a (method, budget) of this bench")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(p[0] for p in points):
        mine = sorted((t, v) for m, t, v in points if m == method)
        axis.plot([t for t, _ in mine], [v for _, v in mine], "o-", label=method)
    front, best = [], -float("inf")
    for _, tokens, value in sorted(points, key=lambda p: (p[1], -p[2])):
        if value > best:
            front.append((tokens, value))
            best = value
    axis.step([t for t, _ in front], [v for _, v in front], "k:", where="post", label="Pareto")
    axis.set_xlabel("visual tokens kept")
    axis.set_ylabel(metric)
    axis.legend(fontsize=8)
    save_figure(figure, path)
    plt.close(figure)


# ------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget bench",
        description="Time every method at every budget side by side: vision tower, prefill, "
        "time to first token, decode tokens/s, peak memory, analytic FLOPs and the "
        "FLOPs-bound speedup, measured speedup vs the unmodified model, and the overhead of "
        "choosing tokens. Writes bench.json, bench.md and PNG plots into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="reference",
        help="reference: the testbed's tiny LLaVA (eval/testbed/reference_model, or its "
        "architecture with random weights until trained); llava-7b-shape: LLaVA-1.5-7B "
        "shapes with random weights (--llm-layers decoder layers); or any other named model, "
        "LLaVA folder or hub id",
    )
    parser.add_argument(
        "--llm-layers",
        type=int,
        default=None,
        help="llava-7b-shape: LLaMA-7B-wide decoder layers (default 32 on cuda, 2 on cpu)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHOD_NAMES),
        help=f"comma list of methods ({', '.join(METHOD_NAMES)})",
    )
    parser.add_argument(
        "--budgets",
        default="full,r13,144,64",
        help="comma list: full (the unmodified model), rN (r per layer; merging methods "
        "only), K visual tokens, a keep ratio like 0.25, or K@R: K tokens from the encoder, "
        "then the LLM keeps R of them from layer --fastv-layer on, chosen by the question's "
        "attention (llm_keep_ratio; e.g. 128@0.5 ends with 64)",
    )
    parser.add_argument(
        "--llm-width",
        type=int,
        default=4096,
        help="llava-7b-shape: LLM hidden size (128-wide heads; 4096 = LLaMA-7B); smaller "
        "only to test the harness",
    )
    parser.add_argument(
        "--vision-width",
        type=int,
        default=1024,
        help="llava-7b-shape: vision tower hidden size (64-wide heads; 1024 = CLIP-L)",
    )
    parser.add_argument(
        "--vision-layers", type=int, default=24, help="llava-7b-shape: vision tower layers"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=336,
        help="llava-7b-shape: image side in pixels (14-pixel patches; 336 = 576 patches)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images (and prompts) per batch")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text tokens per prompt")
    parser.add_argument(
        "--new-tokens", type=int, default=8, help="tokens generated per call (decode rate)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (medians)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first (the first measures memory)"
    )
    parser.add_argument(
        "--fastv-layer",
        type=int,
        default=2,
        help="FastV's K, and the layer K@R budgets prune from (lowered to the LLM's last "
        "layer - 1 for shallow models, noted)",
    )
    add_llm_positions_argument(parser)
    add_llm_proportional_argument(parser)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu"
    )
    parser.add_argument(
        "--autocast",
        choices=("none", *sorted(DTYPES)),
        default="none",
        help="run every request under torch.autocast to this dtype (e.g. bf16 on an "
        "AVX-512/AMX CPU); --dtype still sets the weights",
    )
    parser.add_argument(
        "--memory",
        choices=("auto", "process", "allocator", "none"),
        default="auto",
        help="peak memory: process = a fresh CPU process per setting reads its peak resident "
        "set (VmHWM) around one request after a warm-up; allocator = CUDA "
        "max_memory_allocated; none = KV cache only; auto = allocator on cuda, process on cpu",
    )
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa/eager)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads; 0 = torch's default. 1 by default: on a shared host, "
        "OpenMP threads contending with other processes made runs slower and noisier",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument(
        "--accuracy",
        type=Path,
        default=None,
        help="results.json of `crossget eval`: adds an accuracy column and pareto.png",
    )
    parser.add_argument(
        "--accuracy-metric", default=None, help="metric of --accuracy to use (default: first)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="folder for bench.json/md/png"
    )
    return parser


def finish_args(args: argparse.Namespace) -> None:
    """Device-dependent defaults and the thread count (shared with ``eval.bench_memory``)."""
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.llm_layers is None:
        args.llm_layers = 32 if args.device == "cuda" else 2
    if args.memory == "auto":
        args.memory = "allocator" if args.device == "cuda" else "process"
    if args.memory == "allocator" and args.device != "cuda":
        raise ValueError("--memory allocator reads the CUDA allocator: use it with --device cuda")
    if args.memory == "process" and args.device != "cpu":
        raise ValueError("--memory process measures CPU processes: use it with --device cpu")
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)


def autocast_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return None if args.autocast == "none" else DTYPES[args.autocast]


def make_inputs(
    args: argparse.Namespace, config: Any, image_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """The prompt tokens [B, prompt] (no image token among them) and pixels, from the seed."""
    vocab = config.text_config.vocab_size
    size = image_size or config.vision_config.image_size
    generator = torch.Generator().manual_seed(args.seed)
    text = torch.randint(5, vocab, (args.batch, args.prompt_tokens), generator=generator)
    text = text.masked_fill(text == config.image_token_id, 5).to(args.device)
    pixels = torch.randn(args.batch, 3, size, size, generator=generator)
    return text, pixels.to(args.device, DTYPES[args.dtype])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    finish_args(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        get_method(method)  # a clear error for a typo, before any model is built
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    accuracy = metric = None
    if args.accuracy is not None:
        accuracy, metric = load_accuracy(args.accuracy, args.accuracy_metric)
    autocast = autocast_dtype(args)

    if args.model not in (SHAPE_MODEL, "reference"):
        try:  # a --model typo stops here, with the known names, before any work
            named_models.resolve(args.model)
        except named_models.UnknownModelError as error:
            raise SystemExit(f"crossget bench: {error}") from None
    torch.manual_seed(args.seed)
    model, description, processor = load_model(args)
    config = model.config
    image_size = input_image_size(model, processor)
    text, pixels = make_inputs(args, config, image_size)
    settings, skipped = build_settings(
        model,
        methods,
        budgets,
        args.fastv_layer,
        args.llm_positions,
        processor,
        args.llm_proportional_attention,
    )
    for setting in settings:
        prepare(model, setting, text, config.image_token_id, args.prompt_tokens, processor)
    if args.memory == "process":
        # One fresh process per setting, while this one holds no model (two copies of a
        # large model would not fit beside each other on a small machine).
        labels = [setting.label for setting in settings]
        del model
        gc.collect()
        for setting in tqdm(settings, desc="memory (a process per setting)"):
            result = measure_in_subprocess(argv, setting.label)
            assert result["label"] == setting.label, (result, labels)
            setting.memory.update({k: result[k] for k in ("peak_mb", "working_mb", "base_mb")})
            setting.memory["process_kv_mb"] = result["kv_mb"]
        torch.manual_seed(args.seed)
        model, _, processor = load_model(args)
    time_round_robin(
        model,
        settings,
        pixels,
        args.device,
        args.new_tokens,
        args.warmup,
        args.repeats,
        autocast=autocast,
        processor=processor,
    )
    for setting in tqdm(settings, desc="overhead"):
        with configured(model, setting, processor), autocast_context(args.device, autocast):
            fn = overhead_fn(model, setting, args.batch, args.device, image_size)
            setting.overhead_s = median_time(fn, max(args.repeats, 5), args.device)

    rows = result_rows(settings)
    threads = torch.get_num_threads() if args.device == "cpu" else None
    machine = environment(args.device)
    header = (
        f"**{description}**; batch {args.batch}, {args.prompt_tokens} prompt tokens, "
        f"{args.new_tokens} new tokens, {args.device} {args.dtype} weights {args.attn}"
        + (f" under {args.autocast} autocast" if autocast is not None else "")
        + (f" ({threads} threads)" if threads else "")
        + f", medians of {args.repeats} after {args.warmup} warm-up. TTFT = vision + prefill "
        "+ first logits; measured x = TTFT speedup; overhead = choosing tokens alone. "
        + MEMORY_NOTES[args.memory]
        + f" Machine: {describe_environment(machine)}."
        + " KV MB/req: bytes of the KV cache object generate returned, per request; KV "
        "analytic: 2 x layers x KV heads x head size x cached tokens x bytes."
    )
    table = markdown(rows, header, skipped, accuracy, metric or "")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": description,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "environment": machine,
        "rows": rows,
        "skipped": skipped,
    }
    atomic_write_text(args.out / "bench.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / "bench.md", table)
    plot_speedup(rows, args.out / "speedup.png", description)
    if accuracy is not None:
        plot_pareto(rows, accuracy, metric or "", args.out / "pareto.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
