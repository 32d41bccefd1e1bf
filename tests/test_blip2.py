"""Integration tests: CrossGET in BLIP-2 / InstructBLIP (tiny random models, no downloads).

The ViT sees 56x56 images in 7x7 patches (64 patches + CLS = 65 tokens, 4 layers); every ViT
token goes to the Q-Former, which always returns 4 query tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tiny_models import cross_tokens_of, single_thread
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    OPTConfig,
)

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.adapters.blip2 import token_sizes

NUM_TOKENS = 65
NUM_QUERIES = 4
IMAGE_TOKEN = 99
MIN_TOKENS = 5  # 65 -> 33 -> 17 -> 9 -> 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _configs(vision_cls: type, qformer_cls: type) -> dict[str, dict]:
    vision = vision_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=56,
        patch_size=7,
        qkv_bias=True,
        attention_dropout=0.0,
        initializer_range=0.02,  # the default (1e-10) makes a random ViT output constants
    )
    qformer = qformer_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        encoder_hidden_size=32,
        cross_attention_frequency=1,
        vocab_size=100,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    text = OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return {
        "vision_config": vision.to_dict(),
        "qformer_config": qformer.to_dict(),
        "text_config": text.to_dict(),
    }


def tiny_blip2(attn: str = "sdpa", seed: int = 0) -> Blip2ForConditionalGeneration:
    torch.manual_seed(seed)
    config = Blip2Config(
        **_configs(Blip2VisionConfig, Blip2QFormerConfig),
        num_query_tokens=NUM_QUERIES,
        image_token_index=IMAGE_TOKEN,
    )
    config._attn_implementation = attn
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # fixed lengths: outputs stay comparable
    return model


def tiny_instructblip(seed: int = 0) -> InstructBlipForConditionalGeneration:
    torch.manual_seed(seed)
    config = InstructBlipConfig(
        **_configs(InstructBlipVisionConfig, InstructBlipQFormerConfig),
        num_query_tokens=NUM_QUERIES,
        image_token_index=IMAGE_TOKEN,
    )
    config._attn_implementation = "sdpa"
    model = InstructBlipForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    prompt = [2, 10, 11, 12]
    return {
        "pixel_values": torch.randn(3, 3, 56, 56, generator=generator),
        "input_ids": torch.tensor([[IMAGE_TOKEN] * NUM_QUERIES + prompt] * 3),
    }


@pytest.fixture(scope="module")
def instruct_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    instructions = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [20, 21, 22, 23]])
    return {
        **inputs,
        "qformer_input_ids": instructions,
        "qformer_attention_mask": (instructions != 0).long(),
    }


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> object:
    with torch.no_grad():
        return model(**batch)


def generate(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: object) -> object:
    return model.generate(**batch, max_new_tokens=4, do_sample=False, **kwargs)


@pytest.mark.parametrize("k", [NUM_TOKENS, 40, 20, MIN_TOKENS])
def test_vit_yields_exactly_k_tokens_and_the_qformer_keeps_its_queries(
    k: int, inputs: dict[str, torch.Tensor]
) -> None:
    model = crossget.apply(tiny_blip2(), CrossGETConfig(visual_tokens=k))
    assert crossget.num_visual_tokens(model) == k
    out = forward(model, inputs)
    assert out.vision_outputs.last_hidden_state.shape == (3, k, 32)
    assert out.qformer_outputs.last_hidden_state.shape == (3, NUM_QUERIES, 32)
    assert out.logits.shape == (3, NUM_QUERIES + 4, 100)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("config", [CrossGETConfig(r=0), CrossGETConfig(visual_tokens=NUM_TOKENS)])
def test_no_merging_is_bit_exact(config: CrossGETConfig, inputs: dict[str, torch.Tensor]) -> None:
    reference = tiny_blip2()
    expected, expected_ids = forward(reference, inputs), generate(reference, inputs)
    model = crossget.apply(tiny_blip2(), config)
    out = forward(model, inputs)
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.qformer_outputs.last_hidden_state, expected.qformer_outputs[0])
    assert torch.equal(generate(model, inputs), expected_ids)


def test_remove_is_bit_exact(inputs: dict[str, torch.Tensor]) -> None:
    reference = tiny_blip2()
    expected, expected_ids = forward(reference, inputs), generate(reference, inputs)
    keys = list(reference.state_dict())

    model = tiny_blip2()
    crossget.apply(model, CrossGETConfig(visual_tokens=20))
    crossget.apply(model, CrossGETConfig(keep_ratio=0.25))  # idempotent: replaces the first
    assert forward(model, inputs).vision_outputs.last_hidden_state.shape[1] == 17
    assert not torch.equal(forward(model, inputs).logits, expected.logits)
    crossget.remove(model)
    assert not crossget.is_applied(model)
    assert list(model.state_dict()) == keys
    assert type(model.vision_model.encoder).__name__ == "Blip2Encoder"
    assert not model.qformer._forward_pre_hooks and not model.vision_model.encoder._forward_hooks
    assert torch.equal(forward(model, inputs).logits, expected.logits)
    assert torch.equal(generate(model, inputs), expected_ids)


def test_generate_with_merging_batches_and_beams(inputs: dict[str, torch.Tensor]) -> None:
    model = crossget.apply(tiny_blip2(), CrossGETConfig(visual_tokens=20))
    ids = generate(model, inputs)
    assert ids.shape == (3, inputs["input_ids"].shape[1] + 4)
    beams = generate(model, inputs, num_beams=2)
    assert beams.shape == ids.shape
    # Each row is what the row alone produces (rows never see each other's merges).
    single = {key: value[1:2] for key, value in inputs.items()}
    assert torch.equal(generate(model, single)[0], ids[1])


def test_qformer_reads_merged_tokens_with_proportional_attention(
    inputs: dict[str, torch.Tensor],
) -> None:
    """Attention over a token of size s equals attention over s copies of it: the Q-Former
    output on merged tokens (with the hook's log-size bias) must equal its output, without
    any bias, on the sequence where each token is repeated ``size`` times."""
    model = crossget.apply(tiny_blip2(), CrossGETConfig(visual_tokens=20))
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        size = token_sizes(embeds)
        assert size is not None and size.shape == (3, 20)
        assert torch.equal(size.sum(dim=1), torch.full((3,), float(NUM_TOKENS)))
        queries = model.query_tokens.expand(3, -1, -1)
        merged = model.qformer(query_embeds=queries, encoder_hidden_states=embeds)[0]
        repeated = torch.stack(
            [
                row.repeat_interleave(count.long(), dim=0)
                for row, count in zip(embeds, size, strict=True)
            ]
        )
        assert repeated.shape == (3, NUM_TOKENS, 32)
        expanded = model.qformer(query_embeds=queries, encoder_hidden_states=repeated)[0]
        no_bias = model.qformer(query_embeds=queries, encoder_hidden_states=embeds.clone())[0]
    torch.testing.assert_close(merged, expanded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, no_bias, atol=1e-4)


def test_eager_attention_and_bipartite_matching(inputs: dict[str, torch.Tensor]) -> None:
    for config in (
        CrossGETConfig(visual_tokens=20, guidance="attention"),
        CrossGETConfig(visual_tokens=20, matching="bipartite", guidance="none"),
    ):
        model = crossget.apply(tiny_blip2(attn="eager"), config)
        out = forward(model, inputs)
        assert out.vision_outputs.last_hidden_state.shape == (3, 20, 32)
        assert torch.isfinite(out.logits).all()


def test_guidance_checks_are_clear() -> None:
    with pytest.raises(ValueError, match="InstructBLIP"):
        crossget.apply(tiny_blip2(), CrossGETConfig(visual_tokens=20, guidance="query"))
    with pytest.raises(ValueError, match="eager"):
        crossget.apply(tiny_blip2(), CrossGETConfig(visual_tokens=20, guidance="attention"))
    with pytest.raises(RuntimeError, match="no text cross tokens"):
        crossget.alignment_loss(crossget.apply(tiny_blip2(), CrossGETConfig(visual_tokens=20)))


def test_training_reaches_the_vision_prompts(inputs: dict[str, torch.Tensor]) -> None:
    model = crossget.apply(tiny_blip2(), CrossGETConfig(visual_tokens=20))
    prompts = cross_tokens_of(model).vision_prompts
    with torch.no_grad():
        prompts.copy_(torch.randn(prompts.shape, generator=torch.Generator().manual_seed(1)))
    model.train()
    labels = inputs["input_ids"].clone()
    model(**inputs, labels=labels).loss.backward()
    assert prompts.grad is not None and (prompts.grad.abs().sum(dim=-1) > 0).all()


def test_save_and_load_round_trip(inputs: dict[str, torch.Tensor], tmp_path: object) -> None:
    model = crossget.apply(tiny_blip2(seed=3), CrossGETConfig(visual_tokens=20))
    prompts = cross_tokens_of(model).vision_prompts
    with torch.no_grad():
        prompts.normal_(generator=torch.Generator().manual_seed(2))
    expected = forward(model, inputs).logits
    crossget.save_pretrained(model, tmp_path)  # type: ignore[arg-type]
    fresh = crossget.from_pretrained(tiny_blip2(seed=3), tmp_path)  # type: ignore[arg-type]
    assert torch.equal(forward(fresh, inputs).logits, expected)


def test_instructblip_forward_generate_and_remove(
    instruct_inputs: dict[str, torch.Tensor],
) -> None:
    reference = tiny_instructblip()
    expected = forward(reference, instruct_inputs).logits
    expected_ids = generate(reference, instruct_inputs)
    model = crossget.apply(tiny_instructblip(), CrossGETConfig(visual_tokens=20))
    out = forward(model, instruct_inputs)
    assert out.vision_outputs.last_hidden_state.shape == (3, 20, 32)
    assert out.logits.shape == expected.shape
    assert generate(model, instruct_inputs).shape == expected_ids.shape
    crossget.remove(model)
    assert torch.equal(forward(model, instruct_inputs).logits, expected)
    assert torch.equal(generate(model, instruct_inputs), expected_ids)


def test_instructblip_query_guidance(instruct_inputs: dict[str, torch.Tensor]) -> None:
    """Zero-initialised, query guidance is the plain cross token; trained, each instruction
    steers its own image's merge, and gradients reach the query map."""
    cross = forward(
        crossget.apply(tiny_instructblip(), CrossGETConfig(visual_tokens=20)), instruct_inputs
    )
    model = crossget.apply(tiny_instructblip(), CrossGETConfig(visual_tokens=20, guidance="query"))
    assert type(model).__name__ == "CrossGETInstructBlipForConditionalGeneration"
    query = forward(model, instruct_inputs)
    assert torch.equal(query.logits, cross.logits)

    linear = cross_tokens_of(model).query_map[1]
    with torch.no_grad():
        linear.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(4))
    same_image = {
        key: value[:1].expand(2, *value.shape[1:]) for key, value in instruct_inputs.items()
    }
    same_image["qformer_input_ids"] = instruct_inputs["qformer_input_ids"][:2]
    same_image["qformer_attention_mask"] = instruct_inputs["qformer_attention_mask"][:2]
    steered = forward(model, same_image).vision_outputs.last_hidden_state
    assert not torch.allclose(steered[0], steered[1])  # one image, two instructions

    model.train()
    model(**instruct_inputs, labels=instruct_inputs["input_ids"]).loss.backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert generate(model.eval(), instruct_inputs).shape[0] == 3
    crossget.remove(model)
    assert type(model).__name__ == "InstructBlipForConditionalGeneration"
