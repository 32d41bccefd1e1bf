"""CrossGET in tiled LLaVA models: LLaVA-NeXT (CLIP tower, CLS dropped) and LLaVA-OneVision
(SigLIP tower, no CLS, strategy "full"), built tiny from config classes.

Tiles are 28 px (7 px patches: 16 patches a tile); ``image_grid_pinpoints`` 28x56, 56x28 and
56x56, so a 30x60 image is a base tile plus a 1x2 grid (3 tiles, 1 newline) and a 50x45
image a base tile plus a 2x2 grid (5 tiles, 2 newlines).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    assert_same_loss_and_grads,
    encode,
    fill_cross_tokens,
    greedy,
    loss_and_grads,
    placeholders,
    rows_alone_match,
    save_load_round_trip,
    text_config_kwargs,
    tiny_processor,
)
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig

MODELS = ("next", "onevision")
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
SIZES = [(30, 60), (50, 45)]  # (height, width): 1x2 and 2x2 grids
PROMPTS = ["w1 <image> w2", "w3 w4 w5 w6 <image> w7"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def tiny_tiled(name: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        attention_dropout=0.0,
    )
    text = text_config_kwargs(max_positions=512)
    if name == "next":
        config: Any = LlavaNextConfig(
            vision_config=CLIPVisionConfig(projection_dim=32, **common),
            text_config=LlamaConfig(**text),
            image_token_id=IMAGE_TOKEN_ID,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(config)
    else:
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(vision_use_head=False, **common),
            text_config=Qwen2Config(**text),
            image_token_id=IMAGE_TOKEN_ID,
            video_token_id=98,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1",  # the shrink shows in the unmerged counts
        )
        model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():  # a newline embedding that cannot be mistaken for a visual token
        model.model.image_newline.copy_(torch.randn(32) * 3)
    model.eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    return model


def tiled_processor(name: str) -> Any:
    tokenizer = tiny_processor().tokenizer
    if name == "next":
        images = LlavaNextImageProcessor(
            size={"shortest_edge": 28},
            crop_size={"height": 28, "width": 28},
            image_grid_pinpoints=PINPOINTS,
        )
        return LlavaNextProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            patch_size=7,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token="<image>",
        )
    images = LlavaOnevisionImageProcessor(
        size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS
    )
    return LlavaOnevisionProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        image_token="<image>",
        video_token="w98",
        vision_aspect_ratio="anyres_max_1",
    )


def build(name: str, config: CrossGETConfig, seed: int = 0) -> tuple[Any, Any]:
    return crossget.apply(tiny_tiled(name, seed), config, tiled_processor(name))


# ------------------------------------------------------------------ the budget rule


@pytest.mark.parametrize("name", MODELS)
def test_budget_is_split_evenly_over_tiles_base_first(name: str) -> None:
    model = crossget.apply(tiny_tiled(name), CrossGETConfig(visual_tokens=20))
    planner = model.crossget_planner
    assert planner.grid(30, 60) == (1, 2) and planner.grid(50, 45) == (2, 2)
    # 30x60: 3 tiles, 1 newline -> 19 = 7 + 6 + 6; 50x45: 5 tiles, 2 newlines -> 18.
    assert planner.shares(30, 60) == [7, 6, 6]
    assert planner.shares(50, 45) == [4, 4, 4, 3, 3]
    assert planner.shares(50, 45, 12) == [2, 2, 2, 2, 2]
    assert planner.visual_tokens(50, 45, 12) == 12
    assert crossget.num_visual_tokens(model, (50, 45)) == 20
    with pytest.raises(ValueError, match="must be at least 7"):
        planner.visual_tokens(50, 45, 6)
    ratio = crossget.apply(tiny_tiled(name), CrossGETConfig(keep_ratio=0.5)).crossget_planner
    per_tile = ratio.tile.visual_tokens(28, 28)
    assert ratio.visual_tokens(50, 45) == 5 * per_tile + 2


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [20, 14])
def test_exact_visual_tokens_and_newline_per_row_of_tiles(name: str, k: int, images: list) -> None:
    model, processor = build(name, CrossGETConfig(visual_tokens=k))
    inputs = encode(processor, images, PROMPTS)
    assert placeholders(inputs) == [k, k]
    with torch.no_grad():
        out = model(**inputs)
        assert model.model._crossget_llava.last.visual_tokens == [k, k]
        assert torch.isfinite(out.logits).all()
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    newline = model.model.image_newline
    planner = model.crossget_planner
    for image, (height, width) in zip(features, SIZES, strict=True):
        shares = planner.shares(height, width)
        rows, cols = planner.grid(height, width)
        expected, at = [], shares[0]
        for row in range(rows):
            at += sum(shares[1 + row * cols : 1 + (row + 1) * cols])
            expected.append(at)
            at += 1
        assert at == image.shape[0] == k
        is_newline = (image == newline).all(dim=1).nonzero().flatten().tolist()
        assert is_newline == expected


@pytest.mark.parametrize("name", MODELS)
def test_generate_two_budgets_left_padding_match_rows_alone(name: str, images: list) -> None:
    model, processor = build(name, CrossGETConfig(visual_tokens=16))
    fill_cross_tokens(model)
    rows_alone_match(model, processor, images, PROMPTS, [20, 12])


@pytest.mark.parametrize("name", MODELS)
def test_r0_is_the_original_model_and_remove_is_bit_exact(name: str, images: list) -> None:
    reference = tiny_tiled(name)
    processor = tiled_processor(name)
    inputs = encode(processor, images, PROMPTS)
    with torch.no_grad():
        expected = reference(**inputs).logits
        expected_generate = greedy(reference, inputs).sequences
    model = tiny_tiled(name)
    _, adjusted = crossget.apply(model, CrossGETConfig(r=0), processor)
    r0_inputs = encode(adjusted, images, PROMPTS)
    assert torch.equal(r0_inputs["input_ids"], inputs["input_ids"])
    planner = model.crossget_planner
    assert placeholders(inputs) == [planner.visual_tokens(h, w) for h, w in SIZES]
    with torch.no_grad():
        assert torch.equal(model(**r0_inputs).logits, expected)
    crossget.apply(model, CrossGETConfig(visual_tokens=14), processor)
    merged = encode(processor, images, PROMPTS)
    assert placeholders(merged) == [14, 14]
    with torch.no_grad():
        greedy(model, merged)
    crossget.remove(model, processor)
    assert all(not type(m).__name__.startswith("CrossGET") for m in model.modules())
    assert not any("crossget" in key for key in model.state_dict())
    restored = encode(processor, images, PROMPTS)
    assert torch.equal(restored["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**restored).logits, expected)
        assert torch.equal(greedy(model, restored).sequences, expected_generate)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("name", MODELS)
def test_gradient_checkpointing_gives_the_same_gradients(name: str, images: list) -> None:
    def run(checkpointing: bool) -> tuple[Any, dict]:
        model, processor = build(name, CrossGETConfig(visual_tokens=16))
        fill_cross_tokens(model)
        inputs = encode(processor, images, PROMPTS)
        return loss_and_grads(model, inputs, False if checkpointing else None)

    reference = run(False)
    assert_same_loss_and_grads(run(True), reference)
    ref_grads = reference[1]
    assert ref_grads["model.crossget_tokens.vision_prompts"].abs().sum() > 0
    assert ref_grads["model.image_newline"].abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_cross_tokens_round_trip(name: str, images: list, tmp_path: Any) -> None:
    model, processor = build(name, CrossGETConfig(visual_tokens=16))
    fill_cross_tokens(model)
    fresh, fresh_processor = tiny_tiled(name), tiled_processor(name)
    save_load_round_trip(model, processor, fresh, fresh_processor, images, PROMPTS, tmp_path)


def test_onevision_multi_image_prompt_uses_base_tiles_and_one_newline_each(images: list) -> None:
    model, processor = build("onevision", CrossGETConfig(visual_tokens=10))
    inputs = encode(processor, [images], ["w1 <image> w2 <image>"])
    assert inputs["batch_num_images"].tolist() == [2]
    assert placeholders(inputs) == [20]
    with torch.no_grad():
        model(**inputs)
    assert model.model._crossget_llava.last.visual_tokens == [10, 10]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["visionzip", "pool", "fastv"])
def test_peers_are_refused_with_the_reason(name: str, method: str) -> None:
    with pytest.raises(ValueError, match="implemented for LlavaForConditionalGeneration"):
        crossget.apply(tiny_tiled(name), CrossGETConfig(visual_tokens=16, method=method))
