"""``llm_keep_ratio``: a text-guided second stage inside the LLM after encoder-side reduction.

The tiny LLaVA (``tiny_models``) has a 2-layer LLM, so the stage runs from layer 1
(``fastv_layer=1``), ranked by layer 0's attention of the prompt's last token.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image
from tiny_models import (
    IMAGE_TOKEN_ID,
    encode,
    greedy,
    hook_counts,
    llm_cache_lengths,
    prefill_flops,
    prompts_with_image,
    random_images,
    rows_alone_match,
    tiny_llava,
    tiny_processor,
)
from transformers import DynamicCache

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.peers.fastv import STATE_ATTR, attention_scores, ratio_keep

PROMPTS = prompts_with_image([1, 3, 6])  # left padding in every batch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return random_images(3, seed=0)


def two_stage(method: str = "crossget", ratio: float | None = 0.5, **extra: Any) -> CrossGETConfig:
    return CrossGETConfig(
        method=method, visual_tokens=16, llm_keep_ratio=ratio, fastv_layer=1, **extra
    )


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.5, True, "half"])
def test_a_ratio_outside_0_1_is_refused(ratio: Any) -> None:
    with pytest.raises(ValueError, match="llm_keep_ratio must be in"):
        CrossGETConfig(visual_tokens=16, llm_keep_ratio=ratio)


def test_fastv_with_a_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="method='fastv' already prunes"):
        CrossGETConfig(visual_tokens=16, method="fastv", llm_keep_ratio=0.5)


def test_the_stage_needs_a_layer_before_it() -> None:
    config = CrossGETConfig(visual_tokens=16, llm_keep_ratio=0.5, fastv_layer=2)
    with pytest.raises(ValueError, match=r"fastv_layer=2 must be in \[1, 1\]"):
        crossget.apply(tiny_llava(), config)


def test_ratio_keep_rounds_half_up_and_keeps_one() -> None:
    assert [ratio_keep(n, 0.5) for n in (1, 2, 3, 16, 17)] == [1, 1, 2, 8, 9]
    assert ratio_keep(96, 0.667) == 64
    assert ratio_keep(5, 1.0) == 5
    assert ratio_keep(3, 0.01) == 1


@pytest.mark.parametrize("method", ["crossget", "tome", "divprune"])
@pytest.mark.parametrize("ratio", [0.5, 0.3, 1.0])
def test_later_layers_hold_the_kept_share_of_the_reduced_tokens(
    method: str, ratio: float, images: list[Image.Image]
) -> None:
    model, processor = crossget.apply(tiny_llava(), two_stage(method, ratio), tiny_processor())
    inputs = encode(processor, images, PROMPTS)
    placeholders = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert placeholders == [16] * 3  # the processor still emits the encoder's budget
    width = inputs["input_ids"].shape[1]
    assert llm_cache_lengths(model, inputs) == [width, width - 16 + ratio_keep(16, ratio)]


def naive_two_stage_logits(
    reference: Any, inputs: Any, keep: int
) -> tuple[torch.Tensor, list[int]]:
    """The second stage by hand, on a CrossGET model without it (eager, one row, compact
    positions): rank the image positions by layer 0's head-averaged attention of the last
    token (``output_attentions``: with the size bias when it is on), keep the top ``keep``,
    run layer 1 on the text and the kept tokens at their positions, under the rows and
    columns of the mask layer 1 got (causal, and the size bias)."""
    seen: dict[str, Any] = {}

    def capture(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen["mask"] = kwargs.get("attention_mask")

    lm = reference.model.language_model
    handle = lm.layers[1].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        out = reference(**inputs, output_attentions=True, output_hidden_states=True)
    handle.remove()
    with torch.no_grad():
        input_ids = inputs["input_ids"]
        image = (input_ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
        row = out.attentions[0][0].double().mean(dim=0)[-1]
        ranked = sorted(image.tolist(), key=lambda p: (-float(row[p]), p))[:keep]
        index = torch.tensor(
            sorted(set(range(input_ids.shape[1])) - set(image.tolist()) | set(ranked))
        )
        hidden = out.hidden_states[1][:, index]
        cos, sin = lm.rotary_emb(hidden, position_ids=index[None])
        if seen["mask"] is None:  # no size bias: the causal mask
            causal = index[None, :] <= index[:, None]
            mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None]
        else:
            mask = seen["mask"][:, :, index][:, :, :, index]
        hidden = lm.layers[1](
            hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=index[None]
        )
        logits = reference.lm_head(lm.norm(hidden))[:, -1]
    return logits, ranked


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("sizes", [False, True])
def test_equals_a_naive_reference(
    attn: str, ratio: float, sizes: bool, images: list[Image.Image]
) -> None:
    plain = dict(llm_positions="compact", llm_proportional_attention=sizes)
    reference, processor = crossget.apply(
        tiny_llava("eager"), two_stage(ratio=None, **plain), tiny_processor()
    )
    inputs = encode(processor, images[:1], PROMPTS[2:])
    keep = ratio_keep(16, ratio)
    expected, ranked = naive_two_stage_logits(reference, inputs, keep)
    model, _ = crossget.apply(tiny_llava(attn), two_stage(ratio=ratio, **plain), tiny_processor())
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        got = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    image_positions = set((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten().tolist())
    kept = [p for p in getattr(cache, STATE_ATTR).index[0].tolist() if p in image_positions]
    assert sorted(kept) == sorted(ranked)


def test_the_ranking_reads_the_size_bias_as_the_layer_does() -> None:
    """``attention_scores`` with a key bias equals a float64 softmax of q.k * scale + bias."""
    torch.manual_seed(0)
    lm = tiny_llava().model.language_model
    attn = lm.layers[0].self_attn
    batch, length = 2, 11
    hidden = torch.randn(batch, length, lm.config.hidden_size)
    query, key = attn.q_proj(hidden).detach(), attn.k_proj(hidden).detach()
    positions = torch.arange(length)[None].expand(batch, -1)
    cos, sin = lm.rotary_emb(hidden, position_ids=positions)
    bias = torch.zeros(batch, length)
    bias[:, 2:8] = torch.rand(batch, 6).mul(3).add(1).log()  # log(size) of six visual keys
    last = torch.tensor([length - 1, length - 3])
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 0] = False  # left padding
    got = attention_scores(attn, query, key, (cos, sin), last, valid, bias)
    heads, kv_heads, dim = (
        attn.config.num_attention_heads,
        attn.config.num_key_value_heads,
        attn.head_dim,
    )

    def rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s

    for b in range(batch):
        c, s = cos[b].double(), sin[b].double()
        q = rope(query[b, last[b]].double().view(heads, dim), c[last[b]], s[last[b]])
        k = key[b].double().view(length, kv_heads, dim)
        k = rope(k, c[:, None], s[:, None]).repeat_interleave(heads // kv_heads, dim=1)
        logits = torch.einsum("hd,shd->hs", q, k) * attn.scaling + bias[b].double()
        allowed = valid[b] & (torch.arange(length) <= last[b])
        logits = logits.masked_fill(~allowed, -torch.inf)
        expected = logits.softmax(dim=-1).mean(dim=0)
        torch.testing.assert_close(got[b].double(), expected, atol=1e-6, rtol=1e-5)


def test_ratio_one_changes_nothing(images: list[Image.Image]) -> None:
    """Keeping every token, the second stage is the plain model (size bias included)."""
    inputs_model, processor = crossget.apply(tiny_llava(), two_stage(ratio=None), tiny_processor())
    inputs = encode(processor, images, PROMPTS)
    with torch.no_grad():
        plain = inputs_model(**inputs).logits[:, -1]
    model, _ = crossget.apply(tiny_llava(), two_stage(ratio=1.0), tiny_processor())
    with torch.no_grad():
        staged = model(**inputs).logits[:, -1]
    torch.testing.assert_close(staged, plain, atol=1e-5, rtol=1e-5)


def test_generate_beams_and_mixed_budgets(images: list[Image.Image]) -> None:
    model, processor = crossget.apply(tiny_llava(), two_stage(), tiny_processor())
    inputs = encode(processor, images, PROMPTS)
    first, second = greedy(model, inputs), greedy(model, inputs)
    assert torch.equal(first.sequences, second.sequences)
    beams = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
    assert beams.shape == first.sequences.shape
    budgets = [8, 16, 40]
    # Every generated step of each row of a mixed batch scores as the row alone.
    rows_alone_match(model, processor, images, PROMPTS, budgets)
    with crossget.budget(budgets):
        batch = encode(processor, images, PROMPTS)
        lengths = llm_cache_lengths(model, batch)
    width = batch["input_ids"].shape[1]
    # Only image runs shrink (padding stays); rows are padded to the longest kept row with
    # filler entries that are masked out.
    longest = max(width - n + ratio_keep(n, 0.5) for n in budgets)
    assert lengths == [width, longest]


def test_analytic_flops_equal_the_flop_counter() -> None:
    model = crossget.apply(tiny_llava("eager"), two_stage(ratio=0.5))
    report = crossget.flops_report(model, prompt_length=10)
    assert (report.visual_tokens, report.kept_tokens) == (16, 8)
    assert prefill_flops(model, report.visual_tokens) == report.total


def test_remove_is_bit_exact(images: list[Image.Image]) -> None:
    model, processor = tiny_llava(), tiny_processor()
    inputs = encode(processor, images, PROMPTS)
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = hook_counts(model)
    model, processor = crossget.apply(model, two_stage(), processor)
    greedy(model, encode(processor, images, PROMPTS))
    crossget.remove(model, processor)
    with torch.no_grad():
        after = model(**encode(processor, images, PROMPTS)).logits
    assert torch.equal(before, after)
    assert hook_counts(model) == hooks


def test_a_family_without_a_llava_llm_is_refused() -> None:
    from tiny_models import tiny_clip_vision

    with pytest.raises(ValueError, match="llm_keep_ratio prunes visual tokens inside a LLaVA"):
        crossget.apply(tiny_clip_vision(), CrossGETConfig(visual_tokens=16, llm_keep_ratio=0.5))
