"""Peers behind the same budget API: exact K, generate, mixed budgets, remove, and each
selection rule against a naive reference.

The tiny LLaVA (``tiny_models``) feeds 64 patch tokens per image (8 x 8 grid) to a 2-layer
LLM, so FastV runs with ``fastv_layer=1`` here (the paper's K=2 needs a deeper LLM).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image
from tiny_models import (
    IMAGE_TOKEN_ID,
    NUM_PATCHES,
    hook_counts,
    llm_cache_lengths,
    prefill_flops,
    prompts_with_image,
    random_images,
    single_thread,
    tiny_llava,
    tiny_processor,
)
from transformers import BatchFeature, DynamicCache

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.adapters.vit_layer import run_encoder
from mllm_crossget.peers import FEATURE_METHODS, METHOD_NAMES, FeatureInputs
from mllm_crossget.peers.divprune import divprune_indices
from mllm_crossget.peers.encoder import reduce_after_encoder
from mllm_crossget.peers.fastv import STATE_ATTR, run_keeps
from mllm_crossget.peers.pool import pool_grid_shape, pool_tokens
from mllm_crossget.peers.random_drop import random_indices
from mllm_crossget.peers.reduction import first_patch_of_tokens
from mllm_crossget.peers.visionzip import contextual_count, visionzip_tokens

PEERS = ("visionzip", "divprune", "pool", "random", "fastv")
ALL = ("crossget", "tome", *PEERS)
PROMPTS = prompts_with_image([1, 3, 6])  # left padding in every batch


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return random_images(3, seed=0)


def config(method: str, **budget: Any) -> CrossGETConfig:
    extra = {"fastv_layer": 1} if method == "fastv" else {}
    return CrossGETConfig(method=method, **(budget or {"visual_tokens": 16}), **extra)


def build(method: str, attn: str = "sdpa", **budget: Any) -> tuple[Any, Any]:
    return crossget.apply(tiny_llava(attn), config(method, **budget), tiny_processor())


def encode(processor: Any, images: list[Image.Image], prompts: list[str]) -> BatchFeature:
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def greedy(model: Any, inputs: BatchFeature, new_tokens: int = 3, **kwargs: Any) -> Any:
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )


# ------------------------------------------------------------------- config and planner


def test_unknown_method_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="one of crossget, tome, visionzip"):
        CrossGETConfig(visual_tokens=16, method="sparsevlm")


@pytest.mark.parametrize("method", PEERS)
def test_r_budget_is_rejected_for_peers(method: str) -> None:
    with pytest.raises(ValueError, match="merging methods"):
        CrossGETConfig(r=13, method=method)


def test_tome_method_is_bipartite_without_guidance_and_round_trips(tmp_path: Any) -> None:
    tome = CrossGETConfig(r=13, method="tome")
    assert (tome.matching, tome.guidance) == ("bipartite", "none")
    tome.save_pretrained(tmp_path)
    assert CrossGETConfig.from_pretrained(tmp_path) == tome
    with pytest.raises(ValueError, match="bipartite"):
        CrossGETConfig(r=13, method="tome", guidance="query")


def test_peers_need_a_llava_model() -> None:
    from tiny_models import tiny_clip_vision

    with pytest.raises(
        ValueError, match="LlavaForConditionalGeneration .one tower pass per image. only"
    ):
        crossget.apply(tiny_clip_vision(), CrossGETConfig(visual_tokens=16, method="pool"))


def test_fastv_layer_out_of_range_is_rejected_before_patching() -> None:
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"fastv_layer=2 must be in \[1, 1\]"):
        crossget.apply(model, CrossGETConfig(visual_tokens=16, method="fastv"))
    assert not crossget.is_applied(model)


@pytest.mark.parametrize("method", PEERS)
def test_keep_ratio_and_range(method: str) -> None:
    model, _ = build(method, keep_ratio=0.25)
    assert model.crossget_planner.kept_tokens(56, 56) == 16
    with pytest.raises(ValueError, match=r"outside \[1, 64\]"):
        crossget.num_visual_tokens(model, visual_tokens=65)


# ---------------------------------------------------------------------- exactly K tokens


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("k", [NUM_PATCHES, 40, 13, 9])
def test_every_method_reaches_the_llm_with_exactly_k(
    method: str, k: int, images: list[Image.Image]
) -> None:
    model, processor = build(method, visual_tokens=k)
    inputs = encode(processor, images, PROMPTS)
    placeholders = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    expected_input = NUM_PATCHES if method == "fastv" else k
    assert placeholders == [expected_input] * 3
    assert crossget.num_visual_tokens(model) == expected_input
    assert model.crossget_planner.kept_tokens(56, 56) == k
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    assert [f.shape[0] for f in features.pooler_output] == [expected_input] * 3
    lengths = llm_cache_lengths(model, inputs)
    width = inputs["input_ids"].shape[1]
    if method == "fastv":  # layer 0 sees all, layer 1 (from fastv_layer on) exactly K
        assert lengths == [width, width - NUM_PATCHES + k]
    else:
        assert lengths == [width, width]


@pytest.mark.parametrize("method", PEERS)
def test_one_token_budget(method: str, images: list[Image.Image]) -> None:
    model, processor = build(method, visual_tokens=1)
    inputs = encode(processor, images[:1], PROMPTS[:1])
    out = greedy(model, inputs)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3


# ------------------------------------------------------------- generate, budgets, remove


@pytest.mark.parametrize("method", ALL)
def test_generate_greedy_and_beams_are_deterministic(
    method: str, images: list[Image.Image]
) -> None:
    model, processor = build(method)
    inputs = encode(processor, images, PROMPTS)
    first, second = greedy(model, inputs), greedy(model, inputs)
    assert torch.equal(first.sequences, second.sequences)
    beams = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
    assert beams.shape == first.sequences.shape
    uncached = greedy(model, inputs, use_cache=False)
    if method == "fastv":
        # Without a cache FastV re-ranks at every step (as its authors' code): step 1 agrees.
        torch.testing.assert_close(first.scores[0], uncached.scores[0], atol=1e-5, rtol=0)
    else:
        assert torch.equal(first.sequences, uncached.sequences)
    rebuilt, processor = build(method)  # a fresh apply gives the same answers (seeded)
    assert torch.equal(
        greedy(rebuilt, encode(processor, images, PROMPTS)).sequences, first.sequences
    )


@pytest.mark.parametrize("method", ALL)
def test_mixed_budgets_match_each_image_alone(method: str, images: list[Image.Image]) -> None:
    model, processor = build(method)
    budgets = [8, 16, 40]
    with crossget.budget(budgets):
        batch = encode(processor, images, PROMPTS)
        with torch.no_grad():
            together = model(**batch).logits[:, -1]
        beams = model.generate(**batch, max_new_tokens=2, do_sample=False, num_beams=2)
        lengths = llm_cache_lengths(model, batch)
    assert beams.shape[0] == 3
    placeholders = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert placeholders == ([NUM_PATCHES] * 3 if method == "fastv" else budgets)
    if method == "fastv":
        width = batch["input_ids"].shape[1]
        # Rows are padded to the longest kept row (filler entries are masked out).
        assert lengths == [width, width - NUM_PATCHES + max(budgets)]
    for row, k in enumerate(budgets):
        with crossget.budget(k):
            alone = encode(processor, [images[row]], [PROMPTS[row]])
            with torch.no_grad():
                single = model(**alone).logits[:, -1]
        torch.testing.assert_close(together[row : row + 1], single, atol=2e-5, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_remove_is_bit_exact(method: str, images: list[Image.Image]) -> None:
    model, processor = tiny_llava(), tiny_processor()
    inputs = encode(processor, images, PROMPTS)
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = hook_counts(model)
    reference = greedy(model, inputs).sequences
    model, processor = crossget.apply(model, config(method), processor)
    greedy(model, encode(processor, images, PROMPTS))
    crossget.remove(model, processor)
    again = encode(processor, images, PROMPTS)
    with torch.no_grad():
        after = model(**again).logits
    assert torch.equal(before, after)
    assert torch.equal(greedy(model, again).sequences, reference)
    assert hook_counts(model) == hooks


@pytest.mark.parametrize("method", PEERS)
def test_analytic_flops_equal_the_flop_counter(method: str) -> None:
    model = crossget.apply(tiny_llava("eager"), config(method, visual_tokens=13))
    report = crossget.flops_report(model, prompt_length=10)
    assert prefill_flops(model, report.visual_tokens) == report.total
    assert report.as_dict()["kept_tokens"] == 13


# ------------------------------------------------------- selection rules vs references


def brute_force_divprune(points: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min with explicit loops over every candidate (1 - cosine distance)."""
    n = points.shape[0]
    unit = points / points.norm(dim=1, keepdim=True)

    def dist(i: int, j: int) -> float:
        return 1.0 - float(unit[i] @ unit[j])

    nearest = [min(dist(i, j) for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        candidates = [i for i in range(n) if i not in chosen]
        chosen.append(max(candidates, key=lambda i: (min(dist(i, j) for j in chosen), -i)))
    return sorted(chosen)


@pytest.mark.parametrize("k", [1, 2, 4, 7, 10])
def test_divprune_equals_brute_force_greedy(k: int) -> None:
    points = torch.randn(2, 10, 5, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got = divprune_indices(points, k)
    for row in range(2):
        assert got[row].tolist() == brute_force_divprune(points[row], k)


def test_divprune_max_min_is_near_the_exhaustive_optimum() -> None:
    points = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    unit = points / points.norm(dim=1, keepdim=True)
    distance = 1 - unit @ unit.T

    def spread(subset: Any) -> float:
        return min(float(distance[i, j]) for i, j in itertools.combinations(subset, 2))

    best = max(spread(s) for s in itertools.combinations(range(10), 4))
    greedy_spread = spread(divprune_indices(points[None], 4)[0].tolist())
    assert greedy_spread >= 0.5 * best  # the greedy 2-approximation of max-min dispersion


def test_pooling_equals_a_hand_computation() -> None:
    grid = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # 4 x 4, value = index
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    means = [sum(b) / 4 for b in blocks]
    four = pool_tokens(FeatureInputs(grid, (4, 4)), 4)
    assert four.tokens.flatten().tolist() == means
    assert four.assignment[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    three = pool_tokens(FeatureInputs(grid, (4, 4)), 3)  # 2 x 2, the last cell trimmed
    assert three.tokens.flatten().tolist() == means[:3]
    assert (three.assignment[0] == -1).sum() == 4
    eight = pool_tokens(FeatureInputs(grid, (4, 4)), 8)  # 2 x 4: vertical pairs
    pairs = [(r * 8 + c + (r * 8 + c + 4)) / 2 for r in range(2) for c in range(4)]
    assert eight.tokens.flatten().tolist() == pairs
    assert pool_grid_shape(144, (24, 24)) == (12, 12)
    assert pool_grid_shape(13, (8, 8)) == (4, 4)


def test_random_is_seeded_and_the_same_for_every_image() -> None:
    expected = torch.randperm(64, generator=torch.Generator().manual_seed(7))[:10].sort().values
    assert torch.equal(random_indices(64, 10, 7), expected)
    assert not torch.equal(random_indices(64, 10, 7), random_indices(64, 10, 8))
    model, processor = build("random")
    again, _ = build("random")
    pixels = encode(processor, random_images(2), PROMPTS[:2])["pixel_values"]
    with torch.no_grad():
        a = model.model.get_image_features(pixel_values=pixels).pooler_output
        b = again.model.get_image_features(pixel_values=pixels).pooler_output
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def naive_visionzip(features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, k: int):
    """One image, explicit loops: top-(K-c) CLS attention, strided targets, argmax merge."""
    n = features.shape[0]
    contextual = contextual_count(k)
    dominant = sorted(sorted(range(n), key=lambda i: (-float(attention[i]), i))[: k - contextual])
    rest = [i for i in range(n) if i not in dominant]
    step = max(1, len(rest) // contextual) if contextual else 1
    targets = rest[::step][:contextual]
    unit = keys / keys.norm(dim=1, keepdim=True)
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for i in rest:
        if targets and i not in targets:
            groups[
                max(targets, key=lambda t: (float(unit[i] @ unit[t]), -targets.index(t)))
            ].append(i)
    tokens = [features[i] for i in dominant]
    for t in targets:
        extra = torch.stack([features[i] for i in groups[t]]).mean(0) if groups[t] else 0
        tokens.append(features[t] + extra)
    return dominant, torch.stack(tokens)


@pytest.mark.parametrize("k", [64, 40, 16, 7, 1])
def test_visionzip_keeps_top_cls_attention_and_merges_the_rest(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    features = torch.randn(2, 64, 6, generator=generator, dtype=torch.float64)
    attention = torch.rand(2, 64, generator=generator, dtype=torch.float64)
    keys = torch.randn(2, 64, 4, generator=generator, dtype=torch.float64)
    out = visionzip_tokens(FeatureInputs(features, (8, 8), attention, keys), k)
    for row in range(2):
        dominant, tokens = naive_visionzip(features[row], attention[row], keys[row], k)
        torch.testing.assert_close(out.tokens[row], tokens)
        kept = (out.assignment[row] >= 0) & (out.assignment[row] < len(dominant))
        assert kept.nonzero().flatten().tolist() == dominant
    if contextual_count(k):  # the rest is merged into contextual tokens, nothing dropped
        assert (out.assignment >= 0).all()


def test_visionzip_reads_the_cls_attention_of_the_feature_layer() -> None:
    """The hooked q/k row equals the eager tower's own attention map at the feature layer."""
    model = tiny_llava("eager")
    pixels = torch.randn(2, 3, 56, 56)
    tower = model.model.vision_tower
    with torch.no_grad():
        full = tower(pixels, output_attentions=True, output_hidden_states=True)
        layer = 3 - 1  # vision_feature_layer=-2 of 4 layers: layers 0..2 run
        expected_rows = full.attentions[layer][:, :, 0, 1:].sum(dim=1)
        crossget.apply(model, CrossGETConfig(visual_tokens=10, method="visionzip"))
        hidden = tower.pre_layrnorm(tower.embeddings(pixels))
        plan = model.crossget_planner.plan(56, 56)
        seen: dict[str, torch.Tensor] = {}
        import mllm_crossget.peers.visionzip as module

        original = module.visionzip_tokens

        def spy(inputs: FeatureInputs, k: int) -> Any:
            seen["attention"] = inputs.cls_attention
            torch.testing.assert_close(inputs.features, full.hidden_states[3][:, 1:])
            return original(inputs, k)

        from mllm_crossget.peers import METHODS

        spec = METHODS["visionzip"]
        object.__setattr__(spec, "reduce", spy)
        try:
            layers = tower.encoder.layers

            def encode(embeds: torch.Tensor, plan: Any) -> torch.Tensor:
                return run_encoder(layers, embeds, plan).last_hidden_state

            attention = layers[plan.num_layers - 1].self_attn
            reduce_after_encoder(
                encode, attention, hidden, plan, (8, 8), True, False, 10, "visionzip"
            )
        finally:
            object.__setattr__(spec, "reduce", original)
    torch.testing.assert_close(seen["attention"], expected_rows, atol=1e-5, rtol=1e-4)


def naive_fastv_logits(model: Any, input_ids: torch.Tensor, pixels: torch.Tensor, k: int) -> Any:
    """FastV by hand on an unpatched eager model (one row, no padding, layer K=1).

    Ranking: head-averaged attention of the last token in layer 0 (``output_attentions``);
    then layer 1 runs on the text + kept image tokens at their original positions.
    """
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            pixel_values=pixels,
            output_attentions=True,
            output_hidden_states=True,
        )
        image = (input_ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
        row = out.attentions[0][0].mean(dim=0)[-1]
        ranked = sorted(image.tolist(), key=lambda p: (-float(row[p]), p))[:k]
        keep = sorted(set(range(input_ids.shape[1])) - set(image.tolist()) | set(ranked))
        index = torch.tensor(keep)
        lm = model.model.language_model
        hidden = out.hidden_states[1][:, index]
        cos, sin = lm.rotary_emb(hidden, position_ids=index[None])
        causal = index[None, :] <= index[:, None]
        mask = torch.where(causal, 0.0, torch.finfo(hidden.dtype).min)[None, None]
        hidden = lm.layers[1](
            hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=index[None]
        )
        logits = model.lm_head(lm.norm(hidden))[:, -1]
    return logits, ranked


@pytest.mark.parametrize("k", [5, 16, 40])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fastv_equals_a_naive_reference(k: int, attn: str, images: list[Image.Image]) -> None:
    reference_model, processor = tiny_llava("eager"), tiny_processor()
    inputs = encode(processor, images[:1], PROMPTS[2:])
    expected, ranked = naive_fastv_logits(
        reference_model, inputs["input_ids"], inputs["pixel_values"], k
    )
    model, processor = crossget.apply(tiny_llava(attn), config("fastv", visual_tokens=k), processor)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        got = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    state = getattr(cache, STATE_ATTR)
    image_positions = set((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten().tolist())
    assert sorted(p for p in state.index[0].tolist() if p in image_positions) == sorted(ranked)


@pytest.mark.parametrize("budgets", [12, [8, 16, 40]])
def test_fastv_cached_decode_equals_recomputing_with_the_prefill_selection(
    budgets: Any, images: list[Image.Image]
) -> None:
    """Decode steps through the pruned cache equal full recomputation on the kept tokens
    (mixed budgets: rows padded with masked filler entries)."""
    model, processor = build("fastv", visual_tokens=12)
    with crossget.budget(budgets):
        inputs = encode(processor, images, PROMPTS)
        out = greedy(model, inputs, new_tokens=4)
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            model(**inputs, past_key_values=cache, use_cache=True)
    state = getattr(cache, STATE_ATTR)
    crossget.remove(model, processor)
    lm = model.model.language_model
    sequences = out.sequences
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(sequences)
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        image = torch.cat(features.pooler_output)
        mask = (sequences == IMAGE_TOKEN_ID)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image)
        attention = torch.cat(
            [inputs["attention_mask"], torch.ones(3, sequences.shape[1] - width, dtype=torch.long)],
            dim=1,
        )
        positions = torch.arange(sequences.shape[1])[None].expand(3, -1)
        cos, sin = lm.rotary_emb(embeds, position_ids=positions)
        full_mask = attention[:, None, None, :].bool() & (
            positions[:, None, :, None] >= positions[:, None, None, :]
        )
        hidden = lm.layers[0](embeds, attention_mask=full_mask, position_embeddings=(cos, sin))
        new = torch.arange(width, sequences.shape[1])[None].expand(3, -1)
        index = torch.cat([state.index, new], dim=1)
        valid = torch.cat([state.valid, torch.ones_like(new, dtype=torch.bool)], dim=1)
        short = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        gather = index[..., None].expand(-1, -1, cos.shape[-1])
        short_mask = full_mask.gather(
            2, index[:, None, :, None].expand(-1, 1, -1, full_mask.shape[-1])
        )
        short_mask = short_mask.gather(3, index[:, None, None, :].expand(-1, 1, index.shape[1], -1))
        eye = torch.eye(index.shape[1], dtype=torch.bool)
        short_mask = short_mask & (valid[:, None, None, :] | eye)
        short = lm.layers[1](
            short,
            attention_mask=short_mask,
            position_embeddings=(cos.gather(1, gather), sin.gather(1, gather)),
        )
        logits = model.lm_head(lm.norm(short))
    steps = sequences.shape[1] - width
    for step in range(
        1, steps
    ):  # scores[step] predicts token width + step from position width+step-1
        position = index.shape[1] - steps + step - 1
        torch.testing.assert_close(out.scores[step], logits[:, position], atol=1e-4, rtol=1e-4)


def test_run_keeps_follows_rows_repeated_by_generate() -> None:
    assert run_keeps([0, 1, 2], [8, 16, 40], None) == [8, 16, 40]
    assert run_keeps([0, 1, 2, 3, 4, 5], [8, 16, 40], None) == [8, 8, 16, 16, 40, 40]
    # Two images in row 0, one in row 1, beams of 2: rows 0,1 are row 0; rows 2,3 are row 1.
    assert run_keeps([0, 0, 1, 1, 2, 3], [8, 16, 40], None) == [8, 16, 8, 16, 40, 40]
    assert run_keeps([0, 1], 12, None) == [12, 12]
    assert run_keeps([0, 1], None, 20) == [20, 20]


def test_methods_registry_is_complete() -> None:
    assert set(METHOD_NAMES) == set(ALL)
    assert set(FEATURE_METHODS) == {"visionzip", "divprune", "pool", "random"}


@pytest.mark.parametrize("k", [40, 16, 7, 1])
def test_first_patch_of_every_peer_token_is_its_lowest_patch(k: int) -> None:
    """The LLM position rule of peers: a token sits at the lowest patch it holds."""
    generator = torch.Generator().manual_seed(k)
    features = torch.randn(2, 64, 6, generator=generator)
    inputs = FeatureInputs(
        features, (8, 8), torch.rand(2, 64, generator=generator), torch.randn(2, 64, 4)
    )
    for reduction in (visionzip_tokens(inputs, k), pool_tokens(inputs, k)):
        got = first_patch_of_tokens(reduction.assignment, reduction.tokens.shape[1])
        for row in range(2):
            assignment = reduction.assignment[row].tolist()
            want = [assignment.index(token) for token in range(reduction.tokens.shape[1])]
            assert got[row].tolist() == want
    with pytest.raises(RuntimeError, match="holds no patch"):
        first_patch_of_tokens(torch.tensor([[0, 0, -1]]), 2)
