"""The authors-faithful cross token (issue 32): attended by the image tokens as a key
(``cross_token_attended``) and handed to the LLM as one extra visual token
(``cross_token_to_llm``).  Defaults keep today's masked, dropped cross token."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_towers import tiny_tower_llava
from tiny_models import (
    cross_tokens_of,
    encode,
    lm_labels,
    placeholders,
    prompts_with_image,
    random_images,
    single_thread,
    tiny_clip_vision,
    tiny_llava,
    tiny_processor,
)

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.adapters.vit_layer import EncoderPlan, LayerStep, layer_ops
from mllm_crossget.merge import complete_graph_matching

PROMPTS = prompts_with_image([1, 3, 6])  # different lengths: left padding in every batch
BOTH = {"cross_token_attended": True, "cross_token_to_llm": True}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _build(config: CrossGETConfig, **kwargs: Any) -> tuple[Any, Any]:
    return crossget.apply(tiny_llava(**kwargs), config, tiny_processor())


# ------------------------------------------------------------------ config


def test_options_default_off_round_trip_and_validate() -> None:
    config = CrossGETConfig(visual_tokens=16)
    assert not config.cross_token_attended and not config.cross_token_to_llm
    on = CrossGETConfig(visual_tokens=16, guidance="query", **BOTH)
    assert CrossGETConfig.from_dict(on.to_dict()) == on
    assert '"cross_token_to_llm": true' in on.to_json_string()
    for name in BOTH:
        with pytest.raises(ValueError, match=f"{name} must be True or False"):
            CrossGETConfig(visual_tokens=16, **{name: 1})
        for bad in ({"guidance": "none"}, {"guidance": "text"}, {"method": "tome"}):
            with pytest.raises(ValueError, match=f"{name}=True needs the vision cross token"):
                CrossGETConfig(visual_tokens=16, **bad, **{name: True})
        with pytest.raises(ValueError, match=name):
            CrossGETConfig(visual_tokens=16, method="pool", **{name: True})


def test_to_llm_is_refused_outside_llava_1_5() -> None:
    with pytest.raises(ValueError, match="cross_token_to_llm=False"):
        crossget.apply(
            tiny_clip_vision(), CrossGETConfig(visual_tokens=16, cross_token_to_llm=True)
        )
    # Attended works with every family: a CLIP tower merges with it.
    model = crossget.apply(
        tiny_clip_vision(), CrossGETConfig(visual_tokens=16, cross_token_attended=True)
    )
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out.last_hidden_state.shape[1] == crossget.num_visual_tokens(model)


# ------------------------------------------------------------------ the gradient reaching P


def _vision_prompt_grad(config: CrossGETConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer gradient norms [L] of the LM loss (nothing else) on ``P`` and on ``T``."""
    model, processor = _build(config)
    model.train()
    inputs = encode(processor, random_images(3), PROMPTS)
    model(**inputs, labels=lm_labels(inputs), use_cache=False).loss.backward()
    tokens = cross_tokens_of(model)
    return tokens.vision_prompts.grad.norm(dim=1), tokens.text_prompts.grad.norm(dim=1)


def test_lm_loss_gives_the_vision_prompts_a_useful_gradient() -> None:
    """Measured on this tiny LLaVA (3 vision layers run, 16 tokens per image, zero prompts):
    masked 1.4e-05 in all (per layer 6.6e-06, 1.1e-05, 4.7e-06); attended 5.8e-04 (3.5e-04,
    3.9e-04, 2.5e-04); both options 1.6e-02 (3.4e-04, 3.5e-04, 1.6e-02); T about 0.48 in
    every case.  Asserted with an order of magnitude of room below each measured ratio."""
    masked, text = _vision_prompt_grad(CrossGETConfig(visual_tokens=16))
    attended, _ = _vision_prompt_grad(CrossGETConfig(visual_tokens=16, cross_token_attended=True))
    both, _ = _vision_prompt_grad(CrossGETConfig(visual_tokens=16, **BOTH))
    assert masked.norm() < 1e-3 * text.norm()  # today's token: the LM loss barely reaches P
    # Attended: every layer's prompt gets a direct path (the image tokens read it).
    assert bool((attended > 3 * masked).all()), (attended, masked)
    # Handed to the LLM: the last state reaches the loss directly, >= 100x in all.
    assert both.norm() > 100 * masked.norm(), (both, masked)
    assert bool((both > 3 * masked).all()), (both, masked)
    assert both.norm() > 1e-2 * text.norm()


# ------------------------------------------------------------------ token counts


def test_the_cross_token_is_one_extra_visual_token_with_exact_counts() -> None:
    images = random_images(3)
    model, processor = _build(CrossGETConfig(visual_tokens=16, cross_token_to_llm=True))
    assert crossget.num_visual_tokens(model) == 16  # the budget counts it
    inputs = encode(processor, images, PROMPTS)
    assert placeholders(inputs) == [16, 16, 16]
    with torch.no_grad():
        out = model(**inputs)
    features = out.image_hidden_states
    assert features.shape[0] == 48
    # Not attended, the image tokens are exactly those of a 15-token budget without it ...
    plain, plain_processor = _build(CrossGETConfig(visual_tokens=15))
    with torch.no_grad():
        reference = plain(**encode(plain_processor, images, PROMPTS)).image_hidden_states
    per_image = features.view(3, 16, -1)
    assert torch.equal(per_image[:, :15], reference.view(3, 15, -1))
    # ... and the 16th is the cross token's last state through the projector.
    last_cross = model.model._crossget_llava.last.vision_cross[-1]
    with torch.no_grad():
        projected = model.model.multi_modal_projector(last_cross)
    torch.testing.assert_close(per_image[:, 15], projected)
    # FLOPs count it: the tower's work is the 15-token budget's, the LLM reads 16 tokens.
    report, plain_report = crossget.flops_report(model), crossget.flops_report(plain)
    assert report.visual_tokens == report.kept_tokens == 16
    assert (report.vision, report.tokens_per_layer) == (
        plain_report.vision,
        plain_report.tokens_per_layer,
    )
    assert report.llm_prefill > plain_report.llm_prefill
    # An r budget: one more token than the same r without the option.
    r_model, _ = _build(CrossGETConfig(r=4, cross_token_to_llm=True))
    r_plain, _ = _build(CrossGETConfig(r=4))
    assert crossget.num_visual_tokens(r_model) == crossget.num_visual_tokens(r_plain) + 1
    # The smallest budgets: one image token and the cross token; none is impossible.
    with pytest.raises(ValueError, match="one of them the cross token"):
        _build(CrossGETConfig(visual_tokens=1, cross_token_to_llm=True))


def test_forward_generate_beams_and_mixed_budgets_with_the_cross_token() -> None:
    images = random_images(3)
    model, processor = _build(CrossGETConfig(visual_tokens=16, **BOTH))
    budgets = [16, 30, 9]
    with crossget.budget(budgets):
        inputs = encode(processor, images, PROMPTS)
        assert placeholders(inputs) == budgets
        with torch.no_grad():
            features = model(**inputs).image_hidden_states
        assert features.shape[0] == sum(budgets)
        greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        beams = model.generate(
            **inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False
        )
        for row in range(3):
            with crossget.budget([budgets[row]]):
                single = encode(processor, images[row : row + 1], PROMPTS[row : row + 1])
                alone = model.generate(**single, max_new_tokens=3, do_sample=False)
            assert torch.equal(greedy[row, -alone.shape[1] :], alone[0])
    image_id = model.config.image_token_id
    assert (beams == image_id).sum(dim=1).tolist() == [b for b in budgets for _ in range(2)]


def test_full_budget_still_runs_the_cross_token() -> None:
    """The cross token is part of the model with these options: it runs (and reaches the LLM)
    also when a budget merges nothing, so the count stays exact."""
    model, processor = _build(CrossGETConfig(visual_tokens=16, **BOTH))
    full = crossget.num_visual_tokens(model, visual_tokens=65)  # 64 patches + the cross token
    assert full == 65
    with crossget.budget(65):
        inputs = encode(processor, random_images(1), PROMPTS[:1])
        assert placeholders(inputs) == [65]
        with torch.no_grad():
            assert model(**inputs).image_hidden_states.shape[0] == 65


def test_remove_restores_the_model_bit_exactly() -> None:
    model, processor = tiny_llava(), tiny_processor()
    inputs = encode(processor, random_images(3), PROMPTS)
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_generate = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    model, processor = crossget.apply(model, CrossGETConfig(visual_tokens=16, **BOTH), processor)
    with torch.no_grad():
        model(**encode(processor, random_images(3), PROMPTS))
    crossget.remove(model, processor)
    assert not any("crossget" in key for key in model.state_dict())
    assert (
        encode(processor, random_images(3), PROMPTS)["input_ids"].shape == inputs["input_ids"].shape
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
        assert torch.equal(
            model.generate(**inputs, max_new_tokens=3, do_sample=False), expected_generate
        )


# ------------------------------------------------------------------ one layer, by hand


def _naive_attended_layer(
    layer: Any,
    x: torch.Tensor,
    size: torch.Tensor,
    cross: torch.Tensor,
    protected: torch.Tensor,
    r: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer token by token in float64 with the cross token a full member: every query
    (the cross token's too) attends the n image tokens with ``log(size)`` and the cross token
    with ``log(1) = 0``; the importance is the cross row over the image tokens alone; CGSM on
    the head-mean image keys; ensemble ``size * exp(importance)``; the MLP on the merged image
    tokens and on the cross token.  Returns (merged image tokens, cross token)."""
    ops = layer_ops(layer)
    seq = torch.cat([x, cross], dim=1)[0]  # [n + 1, C]
    n, width = x.shape[1], x.shape[2]
    heads = 4
    head_dim = width // heads
    q, k, v = (t[0] for t in ops.qkv(ops.norm1(seq[None])))  # [H, n + 1, D]
    bias = [math.log(float(size[0, j])) for j in range(n)] + [0.0]
    attended = torch.zeros(n + 1, heads, head_dim, dtype=x.dtype)
    importance = torch.zeros(n, dtype=x.dtype)
    for i in range(n + 1):
        for h in range(heads):
            logits = torch.stack([(q[h, i] @ k[h, j]) * ops.scale + bias[j] for j in range(n + 1)])
            weights = logits.softmax(dim=0)
            attended[i, h] = sum(weights[j] * v[h, j] for j in range(n + 1))
            if i == n:
                importance += logits[:n].softmax(dim=0) / heads
    seq = seq + ops.out(attended.reshape(1, n + 1, width))[0]
    matching = complete_graph_matching(k[:, :n].mean(dim=0)[None], r, importance[None], protected)
    weight = size[0].double() * torch.exp(importance - importance.max())
    tokens = []
    for kept in matching.kept_idx[0].tolist():
        members = [kept] + [
            int(s)
            for s, d in zip(matching.src_idx[0], matching.dst_idx[0], strict=True)
            if int(d) == kept
        ]
        total = sum(weight[m] for m in members)
        tokens.append(sum(weight[m] * seq[m] for m in members) / total)
    merged = torch.cat([torch.stack(tokens), seq[n:]])
    merged = merged + ops.mlp(merged[None])[0]
    return merged[:-1], merged[-1:]


@pytest.mark.parametrize("tower", ["siglip", "dinov2"])
def test_attended_layer_equals_a_naive_float64_reference(tower: str) -> None:
    model = tiny_tower_llava(tower, dtype=torch.float64)
    crossget.apply(model, CrossGETConfig(r=8, cross_token_attended=True))
    encoder = model.model.vision_tower.encoder
    layer = encoder.layers[1] if tower == "siglip" else encoder.layer[1]
    generator = torch.Generator().manual_seed(5)
    n = 30
    x = torch.randn(1, n, 32, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 4, (1, n), generator=generator).float()
    cross = torch.randn(1, 1, 32, generator=generator, dtype=torch.float64)
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[:, 0] = tower == "dinov2"  # CLS
    step = LayerStep(7, EncoderPlan(layer_r=(0, 7), cross_token_attended=True))
    masked_step = LayerStep(7, EncoderPlan(layer_r=(0, 7)))
    with torch.no_grad():
        hidden, new_size, _, new_cross, *_ = layer(
            x, size, protected, cross, None, crossget_step=step
        )
        masked, *_ = layer(x, size, protected, cross, None, crossget_step=masked_step)
        expected, expected_cross = _naive_attended_layer(layer, x, size, cross, protected, 7)
    assert hidden.shape == (1, n - 7, 32) and float(new_size.sum()) == float(size.sum())
    # The library scores importance in float32 (guidance.cross_row_importance): 1e-6.
    torch.testing.assert_close(hidden[0], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(new_cross[0], expected_cross, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(hidden, masked)  # the image tokens did read the cross token


# ------------------------------------------------------------------ the measuring script


def test_cross_token_grad_script_measures_every_setting(
    testbed: Path, model_dir: Path, tmp_path: Path
) -> None:
    from eval.cross_token_grad import SETTINGS, main

    out = tmp_path / "grad.json"
    args = ["--model", str(model_dir), "--data", str(testbed), "--limit", "2", "--budget", "40"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["budget"] == 40 and set(SETTINGS) <= set(result)
    for name in SETTINGS:
        row = result[name]
        assert math.isfinite(row["loss"]) and row["T"] > 0
        assert len(row["P_per_layer"]) == len(result["masked"]["P_per_layer"])
    assert result["both"]["P"] > result["masked"]["P"]
    with pytest.raises(SystemExit, match="no .*missing.*validation.json"):
        main(["--model", str(model_dir), "--data", str(tmp_path / "missing")])
