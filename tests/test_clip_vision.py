"""Integration tests: CrossGET on a bare Hugging Face ``CLIPVisionModel`` (tiny, random).

For a bare tower the budget counts every token of ``last_hidden_state``, CLS included:
65 tokens (64 patches + CLS) come in, four merging layers can bring them down to 5.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from tiny_models import (
    NUM_PATCHES,
    VISION_LAYERS,
    cross_tokens_of,
    crossget_keys,
    single_thread,
    tiny_clip_vision,
)
from transformers import CLIPVisionModel

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.adapters.hf_clip import MergingEncoderOutput

NUM_TOKENS = NUM_PATCHES + 1  # CLS included
MIN_TOKENS = 5  # 65 -> 33 -> 17 -> 9 -> 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 56, 56, generator=generator)


def patched(config: CrossGETConfig, attn: str = "sdpa", seed: int = 0) -> CLIPVisionModel:
    model = crossget.apply(tiny_clip_vision(attn, seed=seed), config)
    assert isinstance(model, CLIPVisionModel)
    return model


def run(model: CLIPVisionModel, pixels: torch.Tensor, **kwargs: object) -> object:
    with torch.no_grad():
        return model(pixel_values=pixels, **kwargs)


def expected_widths(layer_r: Sequence[int]) -> list[int]:
    """Token count after embeddings and after each layer (each removes min(r, half non-CLS))."""
    widths = [NUM_TOKENS]
    for r in layer_r:
        n = widths[-1]
        widths.append(n - min(r, (n - 1) // 2))
    return widths


def encoder_output(model: CLIPVisionModel, pixels: torch.Tensor) -> MergingEncoderOutput:
    """Call the patched encoder directly (the tower's own embeddings + pre-layernorm)."""
    with torch.no_grad():
        embeds = model.pre_layrnorm(model.embeddings(pixels))
        out = model.encoder(inputs_embeds=embeds)
    assert isinstance(out, MergingEncoderOutput)
    return out


def fill_vision_prompts(model: CLIPVisionModel, scale: float = 0.5, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    prompts = cross_tokens_of(model).vision_prompts
    with torch.no_grad():
        prompts.copy_(torch.randn(prompts.shape, generator=generator) * scale)


@pytest.mark.parametrize("k", [NUM_TOKENS, 40, 20, MIN_TOKENS])
def test_last_hidden_state_has_exactly_k_tokens(k: int, pixels: torch.Tensor) -> None:
    model = patched(CrossGETConfig(visual_tokens=k))
    assert crossget.num_visual_tokens(model, 56) == k
    out = run(model, pixels)
    assert out.last_hidden_state.shape == (3, k, 32)
    assert out.pooler_output.shape == (3, 32)
    assert torch.isfinite(out.last_hidden_state).all()
    assert torch.isfinite(out.pooler_output).all()
    # pooler_output is the post-layernormed token at index 0, i.e. CLS.
    torch.testing.assert_close(out.pooler_output, model.post_layernorm(out.last_hidden_state[:, 0]))


@pytest.mark.parametrize("k", [40, 20, MIN_TOKENS])
def test_cls_stays_first_and_unmerged(k: int, pixels: torch.Tensor) -> None:
    model = patched(CrossGETConfig(visual_tokens=k, track_source=True))
    source = encoder_output(model, pixels).source_map
    assert source is not None
    cls_row = torch.zeros(NUM_TOKENS)
    cls_row[0] = 1.0
    for row in range(source.shape[0]):
        assert torch.equal(source[row, 0], cls_row)  # token 0 holds CLS and nothing else
    assert not source[:, 1:, 0].any()  # no other token absorbed CLS


@pytest.mark.parametrize("config_kwargs", [{"visual_tokens": 20}, {"r": [12, 0, 9, 5]}])
def test_track_source_map_is_a_partition_and_matches_token_size(
    config_kwargs: dict[str, object], pixels: torch.Tensor
) -> None:
    config = CrossGETConfig(track_source=True, **config_kwargs)  # type: ignore[arg-type]
    model = patched(config)
    fill_vision_prompts(model)
    out = encoder_output(model, pixels)
    k = expected_widths(model.crossget_planner.layer_r(NUM_TOKENS))[-1]
    assert out.last_hidden_state.shape == (3, k, 32)
    source, size = out.source_map, out.token_size
    assert source is not None and size is not None
    assert source.shape == (3, k, NUM_TOKENS)
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    # every original token (patch or CLS) belongs to exactly one output token
    assert torch.equal(source.sum(dim=1), torch.ones(3, NUM_TOKENS))
    assert torch.equal(size, source.sum(dim=-1))
    assert torch.equal(size.sum(dim=1), torch.full((3,), float(NUM_TOKENS)))
    # The encoder called directly is what the model's forward runs.
    assert torch.equal(out.last_hidden_state, run(model, pixels).last_hidden_state)
    assert len(out.cross_states) == VISION_LAYERS
    assert all(state.shape == (3, 32) for state in out.cross_states)


def test_source_map_is_off_by_default(pixels: torch.Tensor) -> None:
    out = encoder_output(patched(CrossGETConfig(visual_tokens=20)), pixels)
    assert out.source_map is None
    assert out.token_size is not None and out.token_size.shape == (3, 20)


@pytest.mark.parametrize("config_kwargs", [{"visual_tokens": 20}, {"keep_ratio": 0.5}])
def test_hidden_states_have_no_cross_token_and_planned_widths(
    config_kwargs: dict[str, object], pixels: torch.Tensor
) -> None:
    model = patched(CrossGETConfig(**config_kwargs))  # type: ignore[arg-type]
    fill_vision_prompts(model)
    widths = expected_widths(model.crossget_planner.layer_r(NUM_TOKENS))
    out = run(model, pixels, output_hidden_states=True)
    assert out.hidden_states is not None
    assert len(out.hidden_states) == VISION_LAYERS + 1
    assert [h.shape[1] for h in out.hidden_states] == widths
    assert all(h.shape[0] == 3 and h.shape[2] == 32 for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)  # no cross token appended
    reference = run(tiny_clip_vision(), pixels, output_hidden_states=True)
    assert torch.equal(out.hidden_states[0], reference.hidden_states[0])  # embeddings untouched


def test_cross_token_is_invisible_before_the_first_merge(pixels: torch.Tensor) -> None:
    """Layers that do not merge still carry the cross token, masked out as a key: the
    visible tokens must come out as in the unpatched tower (up to SDPA-with-mask rounding)."""
    model = patched(CrossGETConfig(r=[0, 0, 0, 20]))
    fill_vision_prompts(model, scale=5.0)
    out = run(model, pixels, output_hidden_states=True)
    reference = run(tiny_clip_vision(), pixels, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [NUM_TOKENS] * 4 + [NUM_TOKENS - 20]
    for layer in range(4):
        torch.testing.assert_close(
            out.hidden_states[layer], reference.hidden_states[layer], atol=1e-5, rtol=1e-5
        )


def test_no_merging_is_bit_exact(pixels: torch.Tensor) -> None:
    reference = run(tiny_clip_vision(), pixels, output_hidden_states=True)
    for config in (CrossGETConfig(visual_tokens=NUM_TOKENS), CrossGETConfig(r=0)):
        out = run(patched(config), pixels, output_hidden_states=True)
        assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
        assert torch.equal(out.pooler_output, reference.pooler_output)
        assert len(out.hidden_states) == len(reference.hidden_states)
        for mine, theirs in zip(out.hidden_states, reference.hidden_states, strict=True):
            assert torch.equal(mine, theirs)


def test_remove_is_bit_exact(pixels: torch.Tensor) -> None:
    reference_model = tiny_clip_vision()
    reference = run(reference_model, pixels, output_hidden_states=True)
    keys = list(reference_model.state_dict())

    model = tiny_clip_vision()
    crossget.apply(model, CrossGETConfig(visual_tokens=20))
    crossget.apply(model, CrossGETConfig(visual_tokens=10, track_source=True))
    fill_vision_prompts(model)
    added = set(model.state_dict()) - set(keys)
    assert set(keys) <= set(model.state_dict())
    assert crossget_keys(added) == {"vision_prompts", "text_prompts"}
    assert all("crossget_tokens." in key for key in added)
    assert run(model, pixels).last_hidden_state.shape[1] == 10

    crossget.remove(model)
    assert not crossget.is_applied(model)
    assert list(model.state_dict()) == keys
    assert type(model.encoder).__name__ == "CLIPEncoder"
    out = run(model, pixels, output_hidden_states=True)
    assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(out.pooler_output, reference.pooler_output)
    for mine, theirs in zip(out.hidden_states, reference.hidden_states, strict=True):
        assert torch.equal(mine, theirs)


def test_batch_rows_are_independent(pixels: torch.Tensor) -> None:
    model = patched(CrossGETConfig(visual_tokens=12))
    fill_vision_prompts(model)
    batch = run(model, pixels).last_hidden_state
    for row in range(pixels.shape[0]):
        alone = run(model, pixels[row : row + 1]).last_hidden_state
        torch.testing.assert_close(batch[row], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("guidance", "attn"), [("attention", "eager"), ("none", "sdpa"), ("cross", "eager")]
)
def test_guidance_modes_keep_the_budget(guidance: str, attn: str, pixels: torch.Tensor) -> None:
    model = patched(CrossGETConfig(visual_tokens=20, guidance=guidance), attn=attn)
    out = run(model, pixels)
    assert out.last_hidden_state.shape == (3, 20, 32)
    assert torch.isfinite(out.last_hidden_state).all()


def test_attention_guidance_with_sdpa_raises() -> None:
    with pytest.raises(ValueError, match="eager"):
        crossget.apply(
            tiny_clip_vision("sdpa"), CrossGETConfig(visual_tokens=20, guidance="attention")
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite(dtype: torch.dtype, pixels: torch.Tensor) -> None:
    model = patched(CrossGETConfig(visual_tokens=MIN_TOKENS)).to(dtype)
    out = run(model, pixels.to(dtype))
    assert out.last_hidden_state.dtype == dtype
    assert out.last_hidden_state.shape == (3, MIN_TOKENS, 32)
    assert torch.isfinite(out.last_hidden_state).all()
    assert torch.isfinite(out.pooler_output).all()


def test_gradients_reach_the_vision_prompts(pixels: torch.Tensor) -> None:
    model = patched(CrossGETConfig(visual_tokens=20))
    fill_vision_prompts(model)
    model.train()
    out = model(pixel_values=pixels)
    weights = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(2))
    (out.last_hidden_state * weights).sum().backward()
    grad = cross_tokens_of(model).vision_prompts.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.abs().sum(dim=-1) > 0).all()  # every merging layer's prompt steers a merge


@pytest.mark.parametrize("k", [NUM_TOKENS + 1, 4])
def test_bad_budgets_name_the_valid_range(k: int) -> None:
    with pytest.raises(ValueError, match=rf"visual_tokens={k}") as info:
        crossget.apply(tiny_clip_vision(), CrossGETConfig(visual_tokens=k))
    message = str(info.value)
    if k > NUM_TOKENS:
        assert f"[1, {NUM_TOKENS}]" in message
    else:
        assert "impossible" in message and f"[{MIN_TOKENS}, {NUM_TOKENS}]" in message


def test_save_and_load_round_trip(pixels: torch.Tensor, tmp_path: object) -> None:
    model = patched(CrossGETConfig(visual_tokens=20, schedule="front"), seed=3)
    fill_vision_prompts(model)
    expected = run(model, pixels).last_hidden_state
    crossget.save_pretrained(model, tmp_path)  # type: ignore[arg-type]
    fresh = crossget.from_pretrained(tiny_clip_vision(seed=3), tmp_path)  # type: ignore[arg-type]
    assert fresh.crossget_config == model.crossget_config
    assert torch.equal(run(fresh, pixels).last_hidden_state, expected)


def test_alignment_loss_on_bare_clip_raises_a_clear_error(pixels: torch.Tensor) -> None:
    """Regression (bug in 1afe2e8): ``alignment_loss`` on a bare CLIPVisionModel raised
    ``AttributeError: ... has no attribute 'model'`` instead of a clear RuntimeError."""
    model = patched(CrossGETConfig(visual_tokens=20))
    run(model, pixels)
    with pytest.raises(RuntimeError, match="LLaVA"):
        crossget.alignment_loss(model)


def test_output_attentions_is_not_silently_empty(pixels: torch.Tensor) -> None:
    """Regression (bug in 1afe2e8): with merging, ``output_attentions=True`` (eager) silently
    returned an empty tuple instead of one map per layer or a clear error."""
    model = patched(CrossGETConfig(visual_tokens=20), attn="eager")
    try:
        out = run(model, pixels, output_attentions=True)
    except (ValueError, NotImplementedError):
        return  # refusing clearly is acceptable
    assert out.attentions is not None and len(out.attentions) == VISION_LAYERS
