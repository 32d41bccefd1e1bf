"""The public API's rough edges a new user hits: per-call budgets, remove without the
processor, config validation order and types, r clamping, FLOPs of ToMe, method names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tiny_models import (
    NUM_PATCHES,
    prompts_with_image,
    random_images,
    single_thread,
    tiny_llava,
    tiny_processor,
)

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.flops import flops_report

ZERO_IS_NOT_FULL = "0 does not mean full"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _placeholders(processor: object, images: list, prompt: str) -> list[int]:
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    runs, previous = [], False
    for token in ids:
        if token == 99 and previous:
            runs[-1] += 1
        elif token == 99:
            runs.append(1)
        previous = token == 99
    return runs


# --------------------------------------------------------------------------- budget()
def test_budget_refuses_full_and_zero_with_the_fix() -> None:
    full = r"crossget.budget\[0\]='full'.*crossget.remove"
    with pytest.raises(ValueError, match=full), crossget.budget(["full", 64]):
        pass
    for bad in (0, [64, 0], True, [1.5]):
        with pytest.raises(ValueError, match=ZERO_IS_NOT_FULL), crossget.budget(bad):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="empty list"), crossget.budget([]):
        pass
    with pytest.raises(ValueError, match=ZERO_IS_NOT_FULL):  # the config says the same
        CrossGETConfig(visual_tokens=0)


def test_more_budgets_than_images_says_so() -> None:
    model = tiny_llava().eval()
    model, processor = crossget.apply(model, CrossGETConfig(visual_tokens=32), tiny_processor())
    images = random_images(2)
    prompt = "w1 <image> w2 <image> w3"
    with crossget.budget([32, 48]):
        assert _placeholders(processor, images, prompt) == [32, 48]
    three = "3 per-image budgets but the processor received 2 images"
    with pytest.raises(ValueError, match=three), crossget.budget([32, 48, 40]):
        processor(images=images, text=[prompt], return_tensors="pt")
    with pytest.raises(ValueError, match="one budget per image"), crossget.budget([32]):
        processor(images=images, text=[prompt], return_tensors="pt")


# --------------------------------------------------------------------------- remove()
@torch.no_grad()
def test_remove_without_the_processor_restores_it_too() -> None:
    model = tiny_llava().eval()
    processor = tiny_processor()
    original_class = type(processor)
    images = random_images(1)
    prompt = prompts_with_image([3])[0]
    before = processor(images=images, text=[prompt], return_tensors="pt")
    expected = model(**before).logits
    model, processor = crossget.apply(model, CrossGETConfig(visual_tokens=32), processor)
    assert _placeholders(processor, images, prompt) == [32]
    crossget.remove(model)  # the processor is not passed
    assert type(processor) is original_class
    assert _placeholders(processor, images, prompt) == [NUM_PATCHES]
    after = processor(images=images, text=[prompt], return_tensors="pt")
    assert torch.equal(model(**after).logits, expected)  # bit-exact, and no token mismatch
    model.generate(**after, max_new_tokens=2, do_sample=False)


def test_reapplying_without_the_processor_keeps_it_in_step() -> None:
    model = tiny_llava().eval()
    model, processor = crossget.apply(model, CrossGETConfig(visual_tokens=32), tiny_processor())
    crossget.apply(model, CrossGETConfig(visual_tokens=48))  # processor not passed again
    images = random_images(1)
    prompt = prompts_with_image([2])[0]
    assert _placeholders(processor, images, prompt) == [48]
    with torch.no_grad():
        model(**processor(images=images, text=[prompt], return_tensors="pt"))


# --------------------------------------------------------------------------- config
def test_config_reports_the_bad_method_first_and_takes_any_case() -> None:
    with pytest.raises(ValueError, match=r"^method must be one of crossget, tome.*got 'foo'"):
        CrossGETConfig(method="foo")  # no budget either: the method is the first problem
    tome = CrossGETConfig(method="ToMe", visual_tokens=32)
    assert tome.method == "tome" and tome.matching == "bipartite" and tome.guidance == "none"
    assert CrossGETConfig(method=" CrossGET ", r=2).method == "crossget"
    assert CrossGETConfig(method="FastV", visual_tokens=16).method == "fastv"


@pytest.mark.parametrize(
    ("field", "value"),
    [("visual_tokens", True), ("visual_tokens", False), ("r", True), ("r", [2, True])],
)
def test_bools_are_not_budgets(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        CrossGETConfig(**{field: value})


def test_r_past_what_a_layer_can_merge_warns_with_the_result() -> None:
    model = tiny_llava().eval()
    with pytest.warns(UserWarning, match=r"r=100 .*clamped in 3 layers.*8 visual tokens"):
        crossget.apply(model, CrossGETConfig(r=100))
    assert crossget.num_visual_tokens(model) == 8  # 65 -> 33 -> 17 -> 9, CLS dropped
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crossget.apply(model, CrossGETConfig(r=16))  # reachable: no warning
    assert crossget.num_visual_tokens(model) == NUM_PATCHES - 3 * 16


# --------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("method", ["tome", "crossget", "pool"])
def test_flops_report_kept_tokens_for_every_method(method: str) -> None:
    model = tiny_llava().eval()
    crossget.apply(model, CrossGETConfig(visual_tokens=24, method=method))
    report = flops_report(model)
    assert report.visual_tokens == 24 and report.kept_tokens == 24
    fastv = tiny_llava().eval()
    crossget.apply(fastv, CrossGETConfig(visual_tokens=24, method="fastv", fastv_layer=1))
    pruned = flops_report(fastv)
    assert pruned.visual_tokens == NUM_PATCHES and pruned.kept_tokens == 24
