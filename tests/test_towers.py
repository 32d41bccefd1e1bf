"""CrossGET in LLaVA with SigLIP and DINOv2 towers, through the one merging layer (vit_layer).

Tiny random models from config classes: 56 px images in 7 px patches (64 patches).
* SigLIP: no CLS, ``vision_feature_select_strategy="full"``, 3 of 4 layers run (feature layer
  -2): 64 visual tokens unmerged, nothing protected, nothing dropped.
* DINOv2: CLS, layer scales initialised to 0.5 and then randomised per channel (so a missing
  or misplaced layer scale shows), ``image_size=98`` in the config so the position embeddings
  are interpolated to the 56 px input as the pretrained-mini model does (518 -> 224/336),
  feature layer -1 with strategy "default" (4 layers run, CLS dropped).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from PIL import Image
from tiny_models import (
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    PATCH_SIZE,
    assert_same_loss_and_grads,
    cross_tokens_of,
    encode,
    fill_cross_tokens,
    greedy,
    loss_and_grads,
    placeholders,
    prompts_with_image,
    random_images,
    rows_alone_match,
    save_load_round_trip,
    text_config_kwargs,
    tiny_processor,
)
from transformers import (
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.adapters.vit_layer import EncoderPlan, LayerStep, layer_ops
from mllm_crossget.merge import complete_graph_matching
from mllm_crossget.peers import METHOD_NAMES

TOWERS = ("siglip", "dinov2")
PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64
PROMPTS = prompts_with_image([1, 4])  # different lengths: left padding in every batch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return random_images(2, seed=3)


def tiny_tower_llava(
    tower: str,
    *,
    seed: int = 0,
    attn: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    feature: tuple[int, str] | None = None,
) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        patch_size=PATCH_SIZE,
        attention_dropout=0.0,
    )
    if tower == "siglip":
        vision: Any = SiglipVisionConfig(
            intermediate_size=64, image_size=IMAGE_SIZE, vision_use_head=False, **common
        )
        layer, strategy = -2, "full"
    else:
        common.pop("attention_dropout")
        vision = Dinov2Config(
            mlp_ratio=2,
            image_size=98,
            layerscale_value=0.5,
            attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
            **common,
        )
        layer, strategy = -1, "default"
    if feature is not None:
        layer, strategy = feature
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_config_kwargs()),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    if tower == "dinov2":
        generator = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("lambda1"):
                    parameter.copy_(0.2 + torch.rand(parameter.shape, generator=generator))
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    return model.to(dtype)


def processor_for(tower: str) -> Any:
    processor = tiny_processor()
    if tower == "siglip":  # no CLS: the unadjusted processor counts patches only
        processor.vision_feature_select_strategy = "full"
        processor.num_additional_image_tokens = 0
    return processor


def unreduced(tower: str) -> int:
    return PATCHES  # SigLIP: 64 patches, strategy full; DINOv2: 64 patches + CLS, CLS dropped


def build(tower: str, config: CrossGETConfig, **kwargs: Any) -> tuple[Any, Any]:
    return crossget.apply(tiny_tower_llava(tower, **kwargs), config, processor_for(tower))


# ------------------------------------------------------------------ exact counts


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("k", [48, 20, 13])
def test_exact_visual_tokens_through_forward(tower: str, k: int, images: list) -> None:
    model, processor = build(tower, CrossGETConfig(visual_tokens=k))
    inputs = encode(processor, images, PROMPTS)
    assert placeholders(inputs) == [k, k]
    assert crossget.num_visual_tokens(model, IMAGE_SIZE) == k
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]
    assert model.model._crossget_llava.last.visual_tokens == [k, k]
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("tower", TOWERS)
def test_generate_two_budgets_left_padding_match_rows_alone(tower: str, images: list) -> None:
    model, processor = build(tower, CrossGETConfig(visual_tokens=32))
    fill_cross_tokens(model)
    batch, alones = rows_alone_match(model, processor, images, PROMPTS, [24, 12])
    for row, alone in enumerate(alones):
        assert batch.sequences[row, -3:].tolist() == alone.sequences[0, -3:].tolist()


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("tower", TOWERS)
def test_r0_is_identical_to_the_unmodified_model_and_remove_is_bit_exact(
    tower: str, images: list
) -> None:
    reference = tiny_tower_llava(tower)
    processor = processor_for(tower)
    inputs = encode(processor, images, PROMPTS)
    assert placeholders(inputs) == [unreduced(tower)] * 2
    with torch.no_grad():
        expected = reference(**inputs).logits
        expected_generate = greedy(reference, inputs).sequences
    model = tiny_tower_llava(tower)
    crossget.apply(model, CrossGETConfig(r=0))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    crossget.apply(model, CrossGETConfig(visual_tokens=16), processor)
    merged_inputs = encode(processor, images, PROMPTS)
    with torch.no_grad():
        model(**merged_inputs)
        greedy(model, merged_inputs)
    crossget.remove(model, processor)
    assert not any("crossget" in key for key in model.state_dict())
    assert all(not type(m).__name__.startswith("CrossGET") for m in model.modules())
    assert placeholders(encode(processor, images, PROMPTS)) == [unreduced(tower)] * 2
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
        assert torch.equal(greedy(model, inputs).sequences, expected_generate)


def _naive_layer(
    layer: Any,
    x: torch.Tensor,
    size: torch.Tensor,
    cross: torch.Tensor,
    protected: torch.Tensor,
    r: int,
) -> torch.Tensor:
    """One layer by hand, token by token in float64: attention with ``log(size)`` per key
    (the cross token attends, is never attended), the cross row's head-mean attention as
    importance, CGSM on the head-mean keys, weighted ensemble ``size * exp(importance)``,
    then the MLP branch (with layer scales for DINOv2)."""
    ops = layer_ops(layer)
    seq = torch.cat([x, cross], dim=1)[0]  # one image [T + 1, C]
    n, width = x.shape[1], x.shape[2]
    heads = 4
    head_dim = width // heads
    normed = ops.norm1(seq[None])[0]
    q, k, v = (t[0] for t in ops.qkv(normed[None]))  # [H, T + 1, D]
    attended = torch.zeros(n + 1, heads, head_dim, dtype=x.dtype)
    importance = torch.zeros(n, dtype=x.dtype)
    for i in range(n + 1):
        for h in range(heads):
            logits = [
                (q[h, i] @ k[h, j]) * ops.scale + math.log(float(size[0, j])) for j in range(n)
            ]
            weights = torch.stack(logits).softmax(dim=0)
            attended[i, h] = sum(weights[j] * v[h, j] for j in range(n))
            if i == n:
                importance += weights / heads
    seq = seq + ops.out(attended.reshape(1, n + 1, width))[0]
    metric = k[:, :n].mean(dim=0)[None]
    matching = complete_graph_matching(metric, r, importance[None], protected)
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
    merged = torch.stack(tokens)
    return merged + ops.mlp(merged[None])[0]


@pytest.mark.parametrize("tower", TOWERS)
def test_merged_sequence_equals_a_naive_float64_reference(tower: str) -> None:
    model = tiny_tower_llava(tower, dtype=torch.float64)
    crossget.apply(model, CrossGETConfig(r=8))
    layer = (
        model.model.vision_tower.encoder.layers[1]
        if tower == "siglip"
        else model.model.vision_tower.encoder.layer[1]
    )
    generator = torch.Generator().manual_seed(5)
    n = 30
    x = torch.randn(1, n, 32, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 4, (1, n), generator=generator).float()
    cross = torch.randn(1, 1, 32, generator=generator, dtype=torch.float64)
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[:, 0] = tower == "dinov2"  # CLS
    plan = EncoderPlan(layer_r=(0, 7))
    with torch.no_grad():
        hidden, new_size, *_ = layer(
            x, size, protected, cross, None, crossget_step=LayerStep(7, plan)
        )
        expected = _naive_layer(layer, x, size, cross, protected, 7)
    assert hidden.shape == (1, n - 7, 32) and float(new_size.sum()) == float(size.sum())
    # The library scores importance in float32 (guidance.cross_row_importance): 1e-6.
    torch.testing.assert_close(hidden[0], expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ training and state


def _loss_and_grads(tower: str, checkpointing: bool, images: list) -> tuple[Any, dict]:
    model, processor = build(tower, CrossGETConfig(visual_tokens=16, guidance="cross"))
    fill_cross_tokens(model)
    inputs = encode(processor, images, PROMPTS)
    return loss_and_grads(model, inputs, True if checkpointing else None)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")
@pytest.mark.parametrize("tower", TOWERS)
def test_gradient_checkpointing_gives_the_same_gradients(tower: str, images: list) -> None:
    reference = _loss_and_grads(tower, False, images)
    assert_same_loss_and_grads(_loss_and_grads(tower, True, images), reference)
    ref_grads = reference[1]
    tower_grads = [n for n in ref_grads if "vision_tower" in n and ref_grads[n].abs().sum() > 0]
    assert len(tower_grads) > 10
    assert any("lambda1" in n for n in tower_grads) == (tower == "dinov2")
    assert ref_grads["model.crossget_tokens.vision_prompts"].abs().sum() > 0


@pytest.mark.parametrize("tower", TOWERS)
def test_save_and_load_cross_tokens_round_trip(tower: str, images: list, tmp_path: Any) -> None:
    model, processor = build(tower, CrossGETConfig(visual_tokens=20))
    fill_cross_tokens(model)
    fresh, fresh_processor = tiny_tower_llava(tower), processor_for(tower)
    loaded = save_load_round_trip(
        model, processor, fresh, fresh_processor, images, PROMPTS, tmp_path
    )
    for name, value in cross_tokens_of(model).state_dict().items():
        assert torch.equal(cross_tokens_of(loaded).state_dict()[name], value), name


def test_cross_token_of_a_cls_less_tower_starts_as_the_mean_patch() -> None:
    """SigLIP has no CLS: the cross token's first input is the mean patch embedding."""
    from mllm_crossget.adapters.vit_layer import run_encoder

    model = tiny_tower_llava("siglip")
    crossget.apply(model, CrossGETConfig(r=4))
    layers = model.model.vision_tower.encoder.layers
    hidden = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(2))
    seen = {}
    original = layers[0].forward

    def spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen["cross"] = args[2]
        seen["protected"] = args[1]
        return original(x, *args, **kwargs)

    layers[0].forward = spy
    try:
        with torch.no_grad():
            out = run_encoder(layers, hidden, EncoderPlan(layer_r=(4, 4, 4)), has_cls=False)
    finally:
        del layers[0].forward
    torch.testing.assert_close(seen["cross"], hidden.mean(dim=1, keepdim=True))
    assert not seen["protected"].any()
    assert out.last_hidden_state.shape == (2, 64 - 12, 32)


# ------------------------------------------------------------------ peers and bad input


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "crossget"])
def test_every_peer_works_or_refuses_clearly(tower: str, method: str, images: list) -> None:
    extra = {"fastv_layer": 1} if method == "fastv" else {}
    config = CrossGETConfig(visual_tokens=16, method=method, **extra)
    if tower == "siglip" and method == "visionzip":
        with pytest.raises(ValueError, match="no CLS"):
            build(tower, config)
        return
    model, processor = build(tower, config)
    inputs = encode(processor, images, PROMPTS)
    expected = unreduced(tower) if method == "fastv" else 16
    assert placeholders(inputs) == [expected, expected]
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    assert model.model._crossget_llava.last.visual_tokens == [expected, expected]


def test_cls_less_tower_with_default_strategy_is_refused() -> None:
    model = tiny_tower_llava("siglip")
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        crossget.apply(model, CrossGETConfig(visual_tokens=16))


def test_unknown_layer_type_is_named() -> None:
    with pytest.raises(TypeError, match="no description of Linear"):
        layer_ops(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ each description vs its layer


def _layers_of_every_type() -> dict[str, Any]:
    from tiny_models import tiny_llava
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(0)
    blip = Blip2VisionModel(
        Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
            qkv_bias=True,
        )
    ).eval()
    with torch.no_grad():  # BLIP-2 initialises the q/v biases to zero: make them show
        blip.encoder.layers[0].self_attn.qkv.bias.normal_()
    return {
        "clip": tiny_llava().model.vision_tower.encoder.layers[0],
        "siglip": tiny_tower_llava("siglip").model.vision_tower.encoder.layers[0],
        "dinov2": tiny_tower_llava("dinov2").model.vision_tower.encoder.layer[0],
        "blip2": blip.encoder.layers[0],
    }


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "blip2"])
def test_each_layer_description_reproduces_its_layer(kind: str) -> None:
    """The shared merging forward with nothing to merge equals the library's own forward, so
    each description (q/k/v split, norms, MLP, layer scales) is checked against the model."""
    from mllm_crossget.adapters.vit_layer import TokenState, merging_block

    layer = _layers_of_every_type()[kind]
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    state = TokenState(x, torch.ones(2, 17), torch.zeros(2, 17, dtype=torch.bool))
    with torch.no_grad():
        mine, _ = merging_block(layer_ops(layer), state, r=0, plan=EncoderPlan(layer_r=(0,)))
        theirs = layer(x) if kind == "blip2" else layer(x, None)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(mine.hidden, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tower", TOWERS)
def test_flops_report_counts_the_tower_as_it_runs(tower: str) -> None:
    model = crossget.apply(tiny_tower_llava(tower), CrossGETConfig(visual_tokens=20))
    report = crossget.flops_report(model, image_size=IMAGE_SIZE)
    assert report.visual_tokens == 20
    full = crossget.flops_report(tiny_tower_llava(tower), image_size=IMAGE_SIZE)
    assert full.visual_tokens == PATCHES
    assert 0 < report.vision < full.vision


def test_bench_towers_smoke(tmp_path: Any) -> None:
    import json

    from eval.bench_towers import main

    path = tmp_path / "bench.json"
    argv = ["--tiny", "--repeats", "1", "--warmup", "0", "--threads", "0", "--json", str(path)]
    assert main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["tower"], r["setting"], r["visual_tokens"]) for r in rows] == [
        (tower, setting, tokens)
        for tower in ("clip-l", "siglip-so400m", "dinov2-s")
        for setting, tokens in (("full", 64), ("50%", 32), ("25%", 16))
    ]


def test_dinov2_second_to_last_layer_with_cls_kept() -> None:
    """DINOv2 with vision_feature_layer=-2 and strategy "full": CLS stays and counts."""
    images = random_images(2, seed=8)
    reference = tiny_tower_llava("dinov2", feature=(-2, "full"))
    processor = tiny_processor()
    processor.vision_feature_select_strategy = "full"
    inputs = encode(processor, images, PROMPTS)
    assert placeholders(inputs) == [PATCHES + 1] * 2
    with torch.no_grad():
        expected = reference(**inputs).logits
    model = tiny_tower_llava("dinov2", feature=(-2, "full"))
    crossget.apply(model, CrossGETConfig(r=0))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    _, processor = crossget.apply(model, CrossGETConfig(visual_tokens=30), processor)
    merged = encode(processor, images, PROMPTS)
    assert placeholders(merged) == [30, 30]
    with torch.no_grad():
        model(**merged)
    assert model.model._crossget_llava.last.visual_tokens == [30, 30]
    assert model.crossget_planner.layers_run == 3
