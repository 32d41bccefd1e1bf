"""Tiny random LLaVA-1.5 / CLIP models and a word-level LLaVA processor for integration tests.

Everything is built from config classes (no downloads).  The vision tower sees 56x56 images
in 7x7 patches: 64 patches + CLS, 4 encoder layers; LLaVA uses ``vision_feature_layer=-2``,
so 3 layers run and 64 visual tokens reach the LLM unmerged.  Dropout is 0 everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

__all__ = [
    "hook_counts",
    "prefill_flops",
    "llm_cache_lengths",
    "assert_same_loss_and_grads",
    "crossget_keys",
    "cross_tokens_of",
    "encode",
    "fill_cross_tokens",
    "greedy",
    "lm_labels",
    "loss_and_grads",
    "IMAGE_SIZE",
    "IMAGE_TOKEN_ID",
    "NUM_PATCHES",
    "PAD_TOKEN_ID",
    "PATCH_SIZE",
    "VISION_LAYERS",
    "VOCAB_SIZE",
    "placeholders",
    "prompts_with_image",
    "random_images",
    "single_thread",
    "tiny_clip_vision",
    "tiny_llava",
    "rows_alone_match",
    "save_load_round_trip",
    "text_config_kwargs",
    "tiny_processor",
    "vision_config",
]

IMAGE_SIZE = 56
PATCH_SIZE = 7
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64
VISION_LAYERS = 4
IMAGE_TOKEN_ID = 99
PAD_TOKEN_ID = 0
VOCAB_SIZE = 100


def vision_config(
    layers: int = VISION_LAYERS, image_size: int = IMAGE_SIZE, patch: int = PATCH_SIZE
) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
        attention_dropout=0.0,
    )


def text_config_kwargs(max_positions: int = 256) -> dict[str, Any]:
    """Keyword arguments of the tiny 2-layer text model (``LlamaConfig`` or ``Qwen2Config``)."""
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=max_positions,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=2,
        eos_token_id=3,
    )


def _set_attention(model: torch.nn.Module, attn: str) -> None:
    model.config._attn_implementation = attn
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)


def cross_tokens_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model's learnable CrossGET parameters (``CrossTokens``).

    ``crossget.cross_tokens(model)`` where the library offers that accessor (it knows which
    submodule owns them), else the documented ``model.crossget_tokens`` attribute.
    """
    import mllm_crossget

    accessor = getattr(mllm_crossget, "cross_tokens", None)  # also the name of a submodule
    if callable(accessor):
        return accessor(model)
    return model.crossget_tokens


def crossget_keys(keys: Iterable[str]) -> set[str]:
    """State-dict keys below a ``crossget_tokens`` module, as names relative to it."""
    marker = "crossget_tokens."
    return {key.split(marker, 1)[1] for key in keys if marker in key}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread (restored afterwards).

    The models are so small that thread hand-off costs more than it saves, and on a shared
    2-core machine two spinning OpenMP threads per process slow these tests down several-fold.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_llava(
    attn: str = "sdpa",
    *,
    seed: int = 0,
    layers: int = VISION_LAYERS,
    image_size: int = IMAGE_SIZE,
    patch: int = PATCH_SIZE,
) -> LlavaForConditionalGeneration:
    """A random LLaVA-1.5-shaped model in eval mode (same ``seed`` -> same weights)."""
    torch.manual_seed(seed)
    text = LlamaConfig(**text_config_kwargs(), attention_dropout=0.0)
    config = LlavaConfig(
        vision_config=vision_config(layers, image_size, patch),
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    _set_attention(model, attn)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None  # never stop early: lengths stay comparable
    return model


def tiny_clip_vision(attn: str = "sdpa", *, seed: int = 0) -> CLIPVisionModel:
    """A bare random CLIP vision tower in eval mode: 64 patches + CLS, 4 layers."""
    torch.manual_seed(seed)
    config = vision_config()
    config._attn_implementation = attn
    model = CLIPVisionModel(config).eval()
    _set_attention(model, attn)
    return model


def tiny_processor(image_size: int = IMAGE_SIZE, patch: int = PATCH_SIZE) -> LlavaProcessor:
    """LlavaProcessor with a whitespace word-level tokenizer: ``w0``..``w94``, ``<image>`` = 99."""
    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(95)] + ["<image>"]
    vocab = {word: index for index, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def random_images(count: int, *, seed: int = 0, size: int = IMAGE_SIZE) -> list[Image.Image]:
    """``count`` distinct random RGB images (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
        for _ in range(count)
    ]


def prompts_with_image(lengths: Sequence[int], *, offset: int = 10) -> list[str]:
    """One prompt per length: ``length`` words, then ``<image>``, then two more words."""
    return [
        " ".join(f"w{offset + (row * 7 + i) % 80}" for i in range(n)) + " <image> w5 w6"
        for row, n in enumerate(lengths)
    ]


def encode(processor: Any, images: Sequence[Image.Image], prompts: Sequence[str]) -> Any:
    """The processor's padded batch of ``images`` with ``prompts`` as tensors."""
    return processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)


def placeholders(inputs: Any) -> list[int]:
    """``<image>`` placeholders per row of an encoded batch."""
    return (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()


def fill_cross_tokens(model: Any, scale: float = 0.5, seed: int = 1) -> None:
    """Give every learnable CrossGET parameter small random values (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in cross_tokens_of(model).parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.copy_(noise.to(parameter.dtype))


def llm_cache_lengths(model: Any, inputs: Any) -> list[int]:
    """Tokens each LLM layer holds after a prefill (FastV and ``llm_keep_ratio`` shorten the
    layers from their pruning layer on)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
    return [layer.keys.shape[-2] for layer in cache.layers]


def prefill_flops(model: Any, visual_tokens: int, text_tokens: int = 9) -> int:
    """FLOPs ``FlopCounterMode`` counts for one tiny-LLaVA prefill: BOS, ``visual_tokens``
    placeholders, ``text_tokens`` words, one logits row (``flops_report(prompt_length=
    text_tokens + 1)`` counts the same prompt)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.cat(
        [
            torch.ones(1, 1, dtype=torch.long),
            torch.full((1, visual_tokens), IMAGE_TOKEN_ID),
            torch.randint(2, 90, (1, text_tokens)),
        ],
        dim=1,
    )
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=pixels, logits_to_keep=1)
    return counter.get_total_flops()


def hook_counts(model: Any) -> list[tuple[int, int]]:
    """(forward hooks, forward pre-hooks) of every module: ``remove`` must restore them."""
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def greedy(model: Any, inputs: Any, new_tokens: int = 3, **kwargs: Any) -> Any:
    """Greedy ``generate`` that keeps the scores of every step."""
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def rows_alone_match(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    budgets: Sequence[int],
) -> tuple[Any, list[Any]]:
    """Greedy-generate a left-padded batch with one budget per row and assert its counts
    (placeholders and the visual tokens the LLaVA adapter records) and that each row scores
    as that row run alone at its budget.

    Returns the batch generation and the single-row ones, in row order.
    """
    import mllm_crossget as crossget

    with crossget.budget(list(budgets)), torch.no_grad():
        inputs = encode(processor, images, prompts)
        assert placeholders(inputs) == list(budgets)
        assert not inputs["attention_mask"].all()  # left padding in one row
        batch = greedy(model, inputs)
    assert model.model._crossget_llava.last.visual_tokens == list(budgets)
    alones = []
    for row, budget in enumerate(budgets):
        with crossget.budget(budget), torch.no_grad():
            alone = greedy(model, encode(processor, images[row : row + 1], prompts[row : row + 1]))
        for step, (a, b) in enumerate(zip(batch.scores, alone.scores, strict=True)):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=0, msg=f"step {step}")
        alones.append(alone)
    return batch, alones


def lm_labels(inputs: Any) -> torch.Tensor:
    """Language-model labels of an encoded batch: ``<image>`` and padding set to -100."""
    ids = inputs["input_ids"]
    return ids.masked_fill((ids == IMAGE_TOKEN_ID) | (inputs["attention_mask"] == 0), -100)


def loss_and_grads(
    model: Any, inputs: Any, use_reentrant: bool | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LM loss + 0.1 x CrossGET's alignment loss in train mode, and every parameter's gradient.

    ``use_reentrant`` None: no gradient checkpointing; else checkpointing of that kind.
    """
    import mllm_crossget as crossget

    if use_reentrant is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
        )
    model.train()
    loss = model(**inputs, labels=lm_labels(inputs), use_cache=False).loss
    loss = loss + 0.1 * crossget.alignment_loss(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_loss_and_grads(
    result: tuple[torch.Tensor, dict[str, torch.Tensor]],
    reference: tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> None:
    """Two ``loss_and_grads`` results agree: the loss, which parameters got a gradient, and
    each gradient (``torch.testing.assert_close`` defaults)."""
    loss, grads = result
    ref_loss, ref_grads = reference
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], msg=key)


def save_load_round_trip(
    model: Any,
    processor: Any,
    fresh: Any,
    fresh_processor: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    folder: Any,
) -> Any:
    """Save ``model``'s CrossGET state to ``folder``, load it into ``fresh`` and assert the
    loaded model gives bit-identical logits; returns the loaded model."""
    import mllm_crossget as crossget

    inputs = encode(processor, images, prompts)
    with torch.no_grad():
        expected = model(**inputs).logits
    crossget.save_pretrained(model, folder)
    loaded, loaded_processor = crossget.from_pretrained(fresh, folder, fresh_processor)
    with torch.no_grad():
        assert torch.equal(loaded(**encode(loaded_processor, images, prompts)).logits, expected)
    return loaded
