"""``llm_proportional_attention``: log(size) on reduced visual tokens' keys inside the LLM.

The claims tested: the 4-D mask equals a naive float64 construction; a token of size s with
the bias is exactly s copies of itself to the LLM; a CrossGET LLaVA with the option gives the
logits of its own LLM run by hand on the naive mask (float64); sizes count every patch once;
decode steps and beams after a reduced prefill see the same bias as a full recomputation; and
the option is refused, with the fix, where it cannot run.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from PIL import Image
from tiny_models import (
    NUM_PATCHES,
    encode,
    greedy,
    prompts_with_image,
    random_images,
    tiny_clip_vision,
    tiny_llava,
    tiny_processor,
)
from transformers import LlamaConfig, LlamaForCausalLM

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.adapters import llm_size_bias
from mllm_crossget.peers.reduction import patches_per_token

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = prompts_with_image([1, 3, 6])  # different lengths: left padding in every batch


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return random_images(3, seed=0)


def naive_mask(padding: torch.Tensor, bias: torch.Tensor, queries: int) -> torch.Tensor:
    """Loops: key k is visible to query q (absolute position past + q) when k <= that
    position and k is a real token; visible entries carry the key's bias."""
    batch, keys = padding.shape
    past = keys - queries
    lowest = torch.finfo(torch.float64).min
    out = torch.full((batch, 1, queries, keys), lowest, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for k in range(keys):
                if k <= past + q and padding[b, k]:
                    out[b, 0, q, k] = float(bias[b, k]) if k < bias.shape[1] else 0.0
    return out


@pytest.mark.parametrize(("queries", "past"), [(6, 0), (1, 6), (3, 4)])
def test_biased_mask_equals_the_naive_construction(queries: int, past: int) -> None:
    generator = torch.Generator().manual_seed(0)
    keys = past + queries
    padding = torch.ones(3, keys, dtype=torch.long)
    padding[1, :2] = 0  # left padding
    padding[2, :1] = 0
    bias = torch.rand(3, max(keys - 1, 1), generator=generator, dtype=torch.float64)
    got = llm_size_bias.biased_mask(padding, bias, queries, past, torch.float64)
    torch.testing.assert_close(got, naive_mask(padding, bias, queries), rtol=0, atol=0)
    no_padding = llm_size_bias.biased_mask(None, bias, queries, past, torch.float64)
    torch.testing.assert_close(
        no_padding, naive_mask(torch.ones_like(padding), bias, queries), rtol=0, atol=0
    )


def test_visual_key_bias_places_log_sizes_on_placeholders() -> None:
    ids = torch.tensor([[0, 5, 9, 9, 6], [9, 9, 9, 7, 8]])
    sizes = [torch.tensor([2.0, 3.0]), torch.tensor([1.0, 4.0, 1.0])]
    bias = llm_size_bias.visual_key_bias(ids, 9, sizes, torch.float64)
    expected = torch.zeros(2, 5, dtype=torch.float64)
    expected[0, 2:4] = torch.tensor([math.log(2), math.log(3)], dtype=torch.float64)
    expected[1, :3] = torch.tensor([0.0, math.log(4), 0.0], dtype=torch.float64)
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="5 image placeholders but the visual tokens carry 4"):
        llm_size_bias.visual_key_bias(ids, 9, sizes[:1] + [torch.ones(2)], torch.float64)


def test_a_token_of_size_s_is_s_copies_of_itself_to_the_llm() -> None:
    """Three copies of one embedding at one position, visible to each other, against the
    single token with log 3 on its key: every other token's output is the same."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config._attn_implementation = "sdpa"
    llm = LlamaForCausalLM(config).double().eval()
    embeds = torch.randn(1, 6, 32, dtype=torch.float64)  # t0 t1 t2 v t3 t4
    positions = torch.arange(6)[None]
    bias = torch.zeros(1, 6, dtype=torch.float64)
    bias[0, 3] = math.log(3)
    merged_mask = llm_size_bias.biased_mask(None, bias, 6, 0, torch.float64)
    with torch.no_grad():
        merged = llm(
            inputs_embeds=embeds, attention_mask=merged_mask, position_ids=positions
        ).logits
        copies = torch.cat([embeds[:, :3], embeds[:, 3:4].expand(1, 3, 32), embeds[:, 4:]], 1)
        copy_positions = torch.tensor([[0, 1, 2, 3, 3, 3, 4, 5]])
        visible = torch.tril(torch.ones(8, 8, dtype=torch.bool))
        visible[3:6, 3:6] = True  # the copies see each other, as the one token sees itself
        copy_mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
        copy_mask = copy_mask.masked_fill(~visible, torch.finfo(torch.float64).min)
        expanded = llm(
            inputs_embeds=copies, attention_mask=copy_mask, position_ids=copy_positions
        ).logits
    keep = [0, 1, 2, 3, 6, 7]  # text tokens and one of the copies
    torch.testing.assert_close(expanded[:, keep], merged, rtol=1e-10, atol=1e-10)
    without_bias = llm(inputs_embeds=embeds, position_ids=positions).logits.detach()
    assert (without_bias[:, 4:] - merged[:, 4:]).abs().max() > 1e-3  # the bias matters


def _llm_inputs(model: Any, inputs: Any) -> dict[str, torch.Tensor]:
    """What the LLaVA model hands its language model (captured by a pre-hook)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        captured.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured


def test_llava_logits_equal_its_llm_on_the_naive_mask_in_float64(
    images: list[Image.Image],
) -> None:
    model, processor = crossget.apply(
        tiny_llava().double(), CrossGETConfig(visual_tokens=16), tiny_processor()
    )
    inputs = encode(processor, images, PROMPTS)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        got = model(**inputs).logits
    runtime = model.model._crossget_llava
    assert runtime.llm_key_bias  # None = on for LLaVA-1.5 with sdpa
    sizes = runtime.last.visual_sizes
    assert [int(s.numel()) for s in sizes] == [16, 16, 16]
    assert [float(s.sum()) for s in sizes] == [NUM_PATCHES] * 3  # every patch counted once
    assert all(bool((s >= 1).all()) for s in sizes) and any(bool((s > 1).any()) for s in sizes)

    # the same model with the option off hands the LLM the same embeddings and positions
    crossget.apply(model, CrossGETConfig(visual_tokens=16, llm_proportional_attention=False))
    llm_inputs = _llm_inputs(model, inputs)
    assert llm_inputs["attention_mask"].dim() == 2
    ids = inputs["input_ids"]
    bias = torch.zeros(ids.shape, dtype=torch.float64)
    image_positions = (ids == model.config.image_token_id).nonzero().tolist()
    flat = torch.cat(sizes).double().log()
    for (row, column), value in zip(image_positions, flat, strict=True):
        bias[row, column] = value
    mask = naive_mask(inputs["attention_mask"], bias, ids.shape[1])
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=llm_inputs["inputs_embeds"],
            attention_mask=mask,
            position_ids=llm_inputs["position_ids"],
        ).last_hidden_state
        expected = model.lm_head(hidden)
        off = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-10, atol=1e-10)
    assert (got[real] - off[real]).abs().max() > 1e-6  # and it is not the unweighted model


@pytest.mark.parametrize("mode", ["greedy", "beams"])
def test_decode_steps_keep_the_prefill_bias(mode: str, images: list[Image.Image]) -> None:
    """With the KV cache, later steps read the bias stored at prefill; without it, every step
    re-encodes the image and rebuilds the bias: the two must generate the same."""
    model, processor = crossget.apply(
        tiny_llava(), CrossGETConfig(visual_tokens=8), tiny_processor()
    )
    inputs = encode(processor, images, PROMPTS)
    extra = {"num_beams": 2, "num_return_sequences": 2} if mode == "beams" else {}
    with torch.no_grad():
        cached = greedy(model, inputs, 4, **extra)
        uncached = greedy(model, inputs, 4, use_cache=False, **extra)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    crossget.apply(model, CrossGETConfig(visual_tokens=8, llm_proportional_attention=False))
    with torch.no_grad():
        unweighted = greedy(model, inputs, 4, **extra)
    assert any(
        not torch.allclose(a, b, atol=1e-4)
        for a, b in zip(cached.scores, unweighted.scores, strict=True)
    )


def test_selection_without_merging_leaves_the_llm_bit_identical(
    images: list[Image.Image],
) -> None:
    """DivPrune keeps patches (size 1 each): the option changes nothing, bit for bit."""
    on, processor = crossget.apply(
        tiny_llava(), CrossGETConfig(visual_tokens=16, method="divprune"), tiny_processor()
    )
    inputs = encode(processor, images, PROMPTS)
    with torch.no_grad():
        weighted = on(**inputs).logits
    assert all(bool((s == 1).all()) for s in on.model._crossget_llava.last.visual_sizes)
    off = CrossGETConfig(visual_tokens=16, method="divprune", llm_proportional_attention=False)
    crossget.apply(on, off)
    with torch.no_grad():
        assert torch.equal(on(**inputs).logits, weighted)


def test_patches_per_token_counts_the_assignment() -> None:
    assignment = torch.tensor([[0, 0, 1, -1, 2, 0], [2, 2, 2, 1, 0, -1]])
    expected = torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, 3.0]])
    assert torch.equal(patches_per_token(assignment, 3), expected)


def test_pooled_tokens_weigh_their_window(images: list[Image.Image]) -> None:
    model, processor = crossget.apply(
        tiny_llava(), CrossGETConfig(visual_tokens=16, method="pool"), tiny_processor()
    )
    with torch.no_grad():
        model(**encode(processor, images, PROMPTS))
    sizes = model.model._crossget_llava.last.visual_sizes
    assert all(torch.equal(s, torch.full((16,), 4.0)) for s in sizes)  # 8x8 -> 4x4 windows


def test_where_it_cannot_run_it_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="FastV prunes inside the LLM"):
        CrossGETConfig(visual_tokens=16, method="fastv", llm_proportional_attention=True)
    assert CrossGETConfig(visual_tokens=16, method="fastv").llm_proportional_attention is None
    with pytest.raises(ValueError, match="must be None"):
        CrossGETConfig(visual_tokens=16, llm_proportional_attention="yes")  # type: ignore[arg-type]
    model = tiny_llava()
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="needs 'sdpa' or 'eager' attention"):
        crossget.apply(model, CrossGETConfig(visual_tokens=16, llm_proportional_attention=True))
    assert not crossget.is_applied(model)
    automatic = crossget.apply(model, CrossGETConfig(visual_tokens=16))  # None: off there
    assert not automatic.model._crossget_llava.llm_key_bias
    with pytest.raises(ValueError, match="CLIPVisionModel does not support it"):
        crossget.apply(
            tiny_clip_vision(), CrossGETConfig(visual_tokens=16, llm_proportional_attention=True)
        )


def test_a_static_cache_is_refused_with_the_fix(images: list[Image.Image]) -> None:
    model, processor = crossget.apply(
        tiny_llava(), CrossGETConfig(visual_tokens=8), tiny_processor()
    )
    inputs = encode(processor, images[:1], PROMPTS[:1])
    with pytest.raises(ValueError, match="use generate's default cache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
