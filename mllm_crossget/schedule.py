"""Budgets -> per-layer merge counts, and the exact token count a schedule produces.

Users think in budgets ("64 visual tokens", "keep 50%"); the encoder needs one ``r`` per
layer.  The processor must emit exactly as many image placeholders as tokens come out, so the
output length is computed by the same clamping rule the merge applies
(:func:`mllm_crossget.merge.max_merge_count`), never estimated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from .merge import max_merge_count

__all__ = [
    "Schedule",
    "ScheduleMode",
    "constant_schedule",
    "max_removable",
    "output_tokens",
    "schedule_for_ratio",
    "schedule_for_tokens",
]

Schedule = tuple[int, ...]
ScheduleMode = Literal["front", "even", "decreasing", "geometric"]
SCHEDULE_MODES: tuple[str, ...] = ("front", "even", "decreasing", "geometric")


def _check_counts(num_tokens: int, num_protected: int) -> None:
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if not 0 <= num_protected <= num_tokens:
        raise ValueError(
            f"num_protected must be in [0, num_tokens={num_tokens}], got {num_protected}"
        )


def constant_schedule(r: int, num_layers: int) -> Schedule:
    """The authors' setting: the same ``r`` in each merging layer (LLaVA-1.5: r=13 x 23)."""
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    return (r,) * num_layers


def output_tokens(num_tokens: int, schedule: Sequence[int], num_protected: int = 0) -> int:
    """Tokens left after running ``schedule`` on ``num_tokens`` tokens (protected included).

    Each layer removes ``min(r, half of the unprotected tokens)``, exactly as the matchers
    clamp, so this is the number the processor must plan for.
    """
    _check_counts(num_tokens, num_protected)
    n = num_tokens
    for layer, r in enumerate(schedule):
        if r < 0:
            raise ValueError(f"schedule[{layer}] = {r}: merge counts must be >= 0")
        n -= min(r, max_merge_count(n, num_protected))
    return n


def max_removable(num_tokens: int, num_layers: int, num_protected: int = 0) -> int:
    """Most tokens ``num_layers`` merging layers can remove (each halves the unprotected set)."""
    _check_counts(num_tokens, num_protected)
    n = num_tokens
    for _ in range(num_layers):
        n -= max_merge_count(n, num_protected)
    return num_tokens - n


def schedule_for_tokens(
    num_tokens: int,
    target_tokens: int,
    num_layers: int,
    num_protected: int = 0,
    mode: ScheduleMode = "even",
) -> Schedule:
    """Per-layer ``r`` that turns ``num_tokens`` into exactly ``target_tokens``.

    ``front`` merges as much as allowed as early as possible (fastest encoder, coarsest early
    features); ``even`` spreads the removals as equally as the per-layer caps allow;
    ``decreasing`` removes linearly less in later layers (ToMe's decreasing schedule);
    ``geometric`` removes the same *fraction* of the unprotected tokens in every layer, so that
    no layer merges a large share of its tokens (``even`` removes equal counts, so the last
    layers merge the largest share: 42 % of the tokens in the last of 4 layers for 256 -> 64,
    against 29 % in every layer with ``geometric``).  All counts include the protected
    tokens, which never merge.
    """
    _check_counts(num_tokens, num_protected)
    if mode not in SCHEDULE_MODES:
        raise ValueError(f"schedule mode must be one of {SCHEDULE_MODES}, got {mode!r}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if target_tokens > num_tokens:
        raise ValueError(
            f"target of {target_tokens} tokens exceeds the {num_tokens} input tokens; "
            f"choose a target <= {num_tokens}"
        )
    floor = num_tokens - max_removable(num_tokens, num_layers, num_protected)
    if target_tokens < floor:
        raise ValueError(
            f"target of {target_tokens} tokens is impossible with {num_layers} merging layers "
            f"(each may remove at most half of the unmerged tokens): the smallest reachable "
            f"count from {num_tokens} tokens ({num_protected} protected) is {floor}; choose a "
            f"target in [{floor}, {num_tokens}] or merge in more layers"
        )
    if num_layers == 0:
        return ()
    weights = _mode_weights(mode, num_layers)
    schedule: list[int] = []
    n, remaining = num_tokens, num_tokens - target_tokens
    for layer in range(num_layers):
        layers_left = num_layers - layer
        cap = min(max_merge_count(n, num_protected), remaining)
        later_weight = sum(weights[layer:])
        if mode == "geometric":
            want = min(cap, _geometric_share(n - num_protected, remaining, layers_left))
        elif later_weight == 0:
            want = cap
        else:
            want = min(cap, -(-remaining * weights[layer] // later_weight))
        # Take more than the share when the later layers could not absorb the rest; taking
        # one more now never lowers what can be removed in total, so this stays feasible.
        while want < cap and remaining - want > max_removable(
            n - want, layers_left - 1, num_protected
        ):
            want += 1
        schedule.append(want)
        n -= want
        remaining -= want
    if remaining:
        raise RuntimeError(f"schedule planning left {remaining} tokens unmerged (a bug)")
    return tuple(schedule)


def _geometric_share(unprotected: int, remaining: int, layers_left: int) -> int:
    """Tokens to remove now so that each of the ``layers_left`` layers keeps the same fraction."""
    if unprotected <= 0 or remaining <= 0:
        return 0
    target = unprotected - remaining
    keep = unprotected * (target / unprotected) ** (1.0 / layers_left)
    return unprotected - round(keep)


def _mode_weights(mode: str, num_layers: int) -> list[int]:
    if mode == "front":
        return [0] * num_layers  # zero weight everywhere -> take the cap at every layer
    if mode == "decreasing":
        return list(range(num_layers, 0, -1))
    return [1] * num_layers


def schedule_for_ratio(
    num_tokens: int,
    keep_ratio: float,
    num_layers: int,
    num_protected: int = 0,
    mode: ScheduleMode = "even",
) -> Schedule:
    """Keep ``round(keep_ratio * unprotected)`` of the mergeable tokens (protected always kept)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    _check_counts(num_tokens, num_protected)
    mergeable = num_tokens - num_protected
    target = num_protected + (max(1, round(keep_ratio * mergeable)) if mergeable else 0)
    return schedule_for_tokens(num_tokens, target, num_layers, num_protected, mode)
