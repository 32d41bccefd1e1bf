"""Tests for ``mllm_crossget.schedule``: exact token counts and budget -> per-layer ``r``."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_crossget.schedule import (
    constant_schedule,
    max_removable,
    output_tokens,
    schedule_for_ratio,
    schedule_for_tokens,
)

MODES = ("even", "front", "decreasing")
FAST = settings(max_examples=300, deadline=None)

# LLaVA-1.5: CLIP ViT-L/14-336 gives 576 patches + CLS, plus one cross (text-query) token.
LLAVA_TOKENS, LLAVA_PROTECTED, LLAVA_LAYERS = 578, 2, 23


def cap(n: int, protected: int) -> int:
    """One layer removes at most half of the unprotected tokens (spec)."""
    return max(n - protected, 0) // 2


def simulate(n: int, schedule: Sequence[int], protected: int) -> list[int]:
    """Token count before each layer, then the final count (naive reference)."""
    counts = [n]
    for r in schedule:
        n -= min(r, cap(n, protected))
        counts.append(n)
    return counts


def reachable_floor(n: int, layers: int, protected: int) -> int:
    for _ in range(layers):
        n -= cap(n, protected)
    return n


@st.composite
def budgets(draw: st.DrawFn) -> tuple[int, int, int, int, str]:
    """(N, target, L, protected, mode) with a reachable target."""
    n = draw(st.integers(1, 1200))
    protected = draw(st.integers(0, min(n, 4)))
    layers = draw(st.integers(0, 30))
    target = draw(st.integers(reachable_floor(n, layers, protected), n))
    return n, target, layers, protected, draw(st.sampled_from(MODES))


def test_llava_constant_schedule_exact_count() -> None:
    schedule = constant_schedule(13, LLAVA_LAYERS)
    assert schedule == (13,) * 23
    assert output_tokens(LLAVA_TOKENS, schedule, LLAVA_PROTECTED) == 279
    assert output_tokens(577, schedule, 1) == 278  # CLS only
    assert output_tokens(LLAVA_TOKENS, (), LLAVA_PROTECTED) == LLAVA_TOKENS
    assert constant_schedule(5, 0) == ()


def test_output_tokens_applies_the_per_layer_cap() -> None:
    # 10 tokens, 2 protected: caps 4, 2, 1, 0 -> 6, 4, 3, 3.
    assert simulate(10, (100,) * 4, 2) == [10, 6, 4, 3, 3]
    assert output_tokens(10, (100,) * 4, 2) == 3
    assert output_tokens(10, (100,) * 4, 0) == 1
    assert output_tokens(LLAVA_TOKENS, (300,), LLAVA_PROTECTED) == 290


@FAST
@given(
    n=st.integers(1, 2000),
    protected=st.integers(0, 5),
    schedule=st.lists(st.integers(0, 700), max_size=30),
)
def test_output_tokens_matches_naive_simulation(
    n: int, protected: int, schedule: list[int]
) -> None:
    protected = min(protected, n)
    assert output_tokens(n, schedule, protected) == simulate(n, schedule, protected)[-1]
    layers = len(schedule)
    assert max_removable(n, layers, protected) == n - reachable_floor(n, layers, protected)


@FAST
@given(budget=budgets())
def test_schedule_for_tokens_hits_target_exactly(budget: tuple[int, int, int, int, str]) -> None:
    n, target, layers, protected, mode = budget
    schedule = schedule_for_tokens(n, target, layers, protected, mode)  # type: ignore[arg-type]
    assert isinstance(schedule, tuple) and len(schedule) == layers
    assert all(isinstance(r, int) and r >= 0 for r in schedule)
    assert sum(schedule) == n - target
    counts = simulate(n, schedule, protected)
    assert all(
        r <= cap(c, protected) for r, c in zip(schedule, counts[:-1], strict=True)
    )  # never clamped
    assert output_tokens(n, schedule, protected) == target


@FAST
@given(budget=budgets())
def test_front_mode_takes_the_cap_until_done(budget: tuple[int, int, int, int, str]) -> None:
    n, target, layers, protected, _ = budget
    expected, remaining = [], n - target
    for _ in range(layers):
        r = min(cap(n, protected), remaining)
        expected.append(r)
        n, remaining = n - r, remaining - r
    assert schedule_for_tokens(budget[0], target, layers, protected, "front") == tuple(expected)


def _balanced_front_loaded(total: int, layers: int) -> list[int]:
    q, extra = divmod(total, layers)
    return [q + 1] * extra + [q] * (layers - extra)


@FAST
@given(budget=budgets())
def test_even_mode_spread_at_most_one_where_caps_allow(
    budget: tuple[int, int, int, int, str],
) -> None:
    n, target, layers, protected, _ = budget
    if layers == 0:
        return
    balanced = _balanced_front_loaded(n - target, layers)
    counts = simulate(n, balanced, protected)
    if any(r > cap(c, protected) for r, c in zip(balanced, counts[:-1], strict=True)):
        return  # caps bind: an even spread is not possible this way
    schedule = schedule_for_tokens(n, target, layers, protected, "even")
    assert max(schedule) - min(schedule) <= 1


def test_even_mode_llava_578_to_66() -> None:
    schedule = schedule_for_tokens(LLAVA_TOKENS, 66, LLAVA_LAYERS, LLAVA_PROTECTED, "even")
    assert sum(schedule) == 512 and len(schedule) == 23
    assert set(schedule) == {22, 23}
    assert output_tokens(LLAVA_TOKENS, schedule, LLAVA_PROTECTED) == 66


def test_decreasing_mode_is_non_increasing_for_llava() -> None:
    schedule = schedule_for_tokens(LLAVA_TOKENS, 66, LLAVA_LAYERS, LLAVA_PROTECTED, "decreasing")
    assert list(schedule) == sorted(schedule, reverse=True)
    mean = sum(schedule) / len(schedule)
    assert schedule[0] > 1.5 * mean and schedule[-1] < 0.5 * mean  # not just "even"
    assert output_tokens(LLAVA_TOKENS, schedule, LLAVA_PROTECTED) == 66


def test_front_mode_llava() -> None:
    schedule = schedule_for_tokens(LLAVA_TOKENS, 66, LLAVA_LAYERS, LLAVA_PROTECTED, "front")
    assert schedule[:4] == (288, 144, 72, 8) and not any(schedule[4:])


@FAST
@given(
    n=st.integers(1, 1200),
    protected=st.integers(0, 4),
    layers=st.integers(0, 30),
    below=st.integers(1, 50),
)
def test_unreachable_target_names_the_range(
    n: int, protected: int, layers: int, below: int
) -> None:
    protected = min(protected, n)
    floor = reachable_floor(n, layers, protected)
    with pytest.raises(ValueError) as info:
        schedule_for_tokens(n, floor - below, layers, protected)
    message = str(info.value)
    assert re.search(rf"\b{floor}\b", message), message
    assert re.search(rf"\b{n}\b", message), message


def test_impossible_requests_raise() -> None:
    with pytest.raises(ValueError, match=r"smallest reachable count .* is 290"):
        schedule_for_tokens(LLAVA_TOKENS, 100, 1, LLAVA_PROTECTED)
    with pytest.raises(ValueError, match=r"\[290, 578\]"):
        schedule_for_tokens(LLAVA_TOKENS, 100, 1, LLAVA_PROTECTED)
    with pytest.raises(ValueError, match="exceeds"):
        schedule_for_tokens(LLAVA_TOKENS, 579, 23, LLAVA_PROTECTED)
    with pytest.raises(ValueError, match="mode"):
        schedule_for_tokens(LLAVA_TOKENS, 66, 23, LLAVA_PROTECTED, "linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_layers"):
        schedule_for_tokens(LLAVA_TOKENS, 66, -1, LLAVA_PROTECTED)
    with pytest.raises(ValueError, match="num_protected"):
        schedule_for_tokens(10, 5, 3, 11)
    with pytest.raises(ValueError, match="num_tokens"):
        output_tokens(0, (1,))
    assert schedule_for_tokens(LLAVA_TOKENS, LLAVA_TOKENS, 0) == ()
    with pytest.raises(ValueError):
        schedule_for_tokens(LLAVA_TOKENS, 66, 0)


def test_negative_r_raises() -> None:
    with pytest.raises(ValueError, match="r must be >= 0"):
        constant_schedule(-1, 23)
    with pytest.raises(ValueError, match="num_layers"):
        constant_schedule(13, -1)
    with pytest.raises(ValueError, match=r"schedule\[1\] = -2"):
        output_tokens(LLAVA_TOKENS, (13, -2, 13), LLAVA_PROTECTED)


def test_ratio_schedule_llava() -> None:
    # keep 50% of the 576 mergeable tokens: 2 + 288 = 290.
    schedule = schedule_for_ratio(LLAVA_TOKENS, 0.5, LLAVA_LAYERS, LLAVA_PROTECTED)
    assert output_tokens(LLAVA_TOKENS, schedule, LLAVA_PROTECTED) == 290
    assert max(schedule) - min(schedule) <= 1
    full = schedule_for_ratio(LLAVA_TOKENS, 1.0, LLAVA_LAYERS, LLAVA_PROTECTED)
    assert full == (0,) * LLAVA_LAYERS
    with pytest.raises(ValueError, match="keep_ratio"):
        schedule_for_ratio(LLAVA_TOKENS, 0.0, LLAVA_LAYERS, LLAVA_PROTECTED)
    with pytest.raises(ValueError, match="keep_ratio"):
        schedule_for_ratio(LLAVA_TOKENS, 1.5, LLAVA_LAYERS, LLAVA_PROTECTED)


@FAST
@given(
    n=st.integers(2, 1200),
    protected=st.integers(0, 4),
    layers=st.integers(0, 30),
    ratio=st.floats(0.001, 1.0),
    mode=st.sampled_from(MODES),
)
def test_ratio_schedule_keeps_the_rounded_share(
    n: int, protected: int, layers: int, ratio: float, mode: str
) -> None:
    protected = min(protected, n - 1)
    target = protected + max(1, round(ratio * (n - protected)))
    if target < reachable_floor(n, layers, protected):
        with pytest.raises(ValueError, match="reachable"):
            schedule_for_ratio(n, ratio, layers, protected, mode)  # type: ignore[arg-type]
        return
    schedule = schedule_for_ratio(n, ratio, layers, protected, mode)  # type: ignore[arg-type]
    assert schedule == schedule_for_tokens(n, target, layers, protected, mode)  # type: ignore[arg-type]
    assert output_tokens(n, schedule, protected) == target
