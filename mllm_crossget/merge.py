"""Token matching and merging: the pure tensor core of CrossGET (no transformers import).

A matching decides, per batch row, which ``r`` tokens disappear (*sources*) and which
surviving token each of them is folded into (*destination*).  It is computed once per layer
from a similarity metric and then applied to every per-token tensor that must stay aligned
(hidden states, token sizes, source maps), the way ToMe's ``merge`` closures are.

Two matchers share one :class:`Matching` result type so that every consumer (adapters,
visualisation, peers) treats them alike:

* :func:`complete_graph_matching` — CrossGET's complete-graph soft matching (CGSM), guided by
  per-token importance;
* :func:`bipartite_matching` — ToMe's alternate A/B bipartite soft matching, the peer baseline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "HUB_GUARDS",
    "HUB_GUARD_ROUNDS",
    "Matching",
    "bipartite_matching",
    "complete_graph_matching",
    "exact_dtypes",
    "max_merge_count",
    "proportional_attention_bias",
]


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def exact_dtypes(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast off on the device of its first tensor argument.

    Token choosing asks for its dtypes (similarities and attention rows in float32, float64
    kept): under ``torch.autocast`` a matrix product would silently run in bf16/fp16, where
    similarities near 1 collapse into ties and the matching changes with the context the
    model happens to be called in. The model's own layers stay under the caller's autocast.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if tensor is None or not torch.is_autocast_enabled(tensor.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=tensor.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# Proposal rounds of the hub guard before its fallback (a bound on rounds, not on tokens).
HUB_GUARD_ROUNDS = 8
HUB_GUARDS: tuple[str, ...] = ("defer", "rematch")


@dataclass(frozen=True)
class Matching:
    """Which tokens merge into which, for a batch; applies itself to per-token tensors.

    ``src_idx[b, i]`` merges into ``dst_idx[b, i]`` (both indices into the *input* sequence);
    ``kept_idx[b]`` lists the surviving tokens in their original order, so relative order —
    CLS first, cross token last — is preserved through every layer.
    """

    src_idx: Tensor  # [B, r] sources, ascending score
    dst_idx: Tensor  # [B, r] destination (input index) of each source
    kept_idx: Tensor  # [B, N - r] survivors, ascending index

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    @property
    def num_input_tokens(self) -> int:
        return self.kept_idx.shape[1] + self.r

    def _scatter_into_destinations(self, values: Tensor) -> Tensor:
        """Add each source's row of ``values`` [B, N, D] onto its destination row, then keep."""
        d = values.shape[-1]
        src_rows = self._rows(values, self.src_idx)
        summed = values.scatter_add(1, self.dst_idx[..., None].expand(-1, -1, d), src_rows)
        return self.keep(summed)

    def merge(
        self, x: Tensor, size: Tensor | None = None, importance: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Fold sources into destinations as a weighted ensemble.

        Each survivor becomes the convex combination of itself and its sources with weights
        ``size * exp(importance)``: with equal importance this is ToMe's size-weighted mean,
        and an important token dominates the ensemble it belongs to.  Only the ``r`` source
        rows and their destinations are touched (one gather of the survivors, then row-sized
        work), survivors that absorbed nothing keep their exact values, half-precision rows
        are combined in float32, and sizes stay float32 so counts above 256 remain exact.
        """
        batch, n, _ = x.shape
        if n != self.num_input_tokens:
            raise ValueError(
                f"merge() got {n} tokens but the matching was computed for "
                f"{self.num_input_tokens}; apply a matching to the sequence it was built from."
            )
        if size is None:
            size = torch.ones(batch, n, device=x.device, dtype=torch.float32)
        elif size.dtype not in (torch.float32, torch.float64):
            size = size.float()
        if self.r == 0:
            return x, size
        work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight = size.to(work_dtype)
        if importance is not None:
            importance = importance.to(work_dtype)
            # The convex weights are invariant to a per-row shift; subtracting the max keeps
            # exp() finite.  Only finite entries take part in the shift.
            finite = torch.where(torch.isfinite(importance), importance, -torch.inf)
            shift = finite.amax(dim=1, keepdim=True).clamp_min(-1e4)
            weight = weight * torch.exp(torch.nan_to_num(importance - shift, nan=0.0, neginf=-1e4))
        dst_kept = self._kept_position().gather(1, self.dst_idx)  # [B, r] rows in the output
        src_weight = weight.gather(1, self.src_idx)
        total = self.keep(weight).scatter_add(1, dst_kept, src_weight).gather(1, dst_kept)
        dst_share = (weight.gather(1, self.dst_idx) / total)[..., None]
        src_share = (src_weight / total)[..., None]
        rows = dst_kept[..., None].expand(-1, -1, x.shape[-1])
        batch_rows = self._batch_index(batch, x.device)
        dst_part = self._rows(x, self.dst_idx).to(work_dtype) * dst_share
        src_part = self._rows(x, self.src_idx).to(work_dtype) * src_share
        merged_size = self.keep(size).scatter_add(1, dst_kept, size.gather(1, self.src_idx))
        if x.dtype == work_dtype:
            merged = self.keep(x)
            merged.index_put_((batch_rows, dst_kept), dst_part)
            return merged.scatter_add_(1, rows, src_part), merged_size
        # Half precision: only the destination rows are combined in float32 (in a zeroed
        # buffer, the same sums in the same order), then rounded once into the survivors;
        # every other row is copied as is instead of going to float32 and back.
        combined = x.new_zeros((batch, self.kept_idx.shape[1], x.shape[-1]), dtype=work_dtype)
        combined.index_put_((batch_rows, dst_kept), dst_part)
        combined.scatter_add_(1, rows, src_part)
        merged = self.keep(x)
        merged.index_put_((batch_rows, dst_kept), combined[batch_rows, dst_kept].to(x.dtype))
        return merged, merged_size

    @staticmethod
    def _batch_index(batch: int, device: torch.device) -> Tensor:
        return torch.arange(batch, device=device)[:, None]

    @classmethod
    def _rows(cls, x: Tensor, index: Tensor) -> Tensor:
        """``x[b, index[b, i]]`` for [B, N, ...] ``x``: whole rows copied by advanced indexing
        (a gather through an index expanded over the channels reads one index per element,
        several times slower on CPU)."""
        return x[cls._batch_index(x.shape[0], x.device), index]

    def _kept_position(self) -> Tensor:
        """[B, N]: each input token's row in the merged output (-1 for sources)."""
        batch, kept = self.kept_idx.shape
        position = torch.full(
            (batch, self.num_input_tokens), -1, dtype=torch.long, device=self.kept_idx.device
        )
        arange = torch.arange(kept, device=self.kept_idx.device).expand(batch, kept)
        return position.scatter_(1, self.kept_idx, arange)

    def received_mask(self) -> Tensor:
        """[B, N - r] bool: which survivors absorbed at least one source."""
        batch = self.kept_idx.shape[0]
        hit = torch.zeros(
            batch, self.num_input_tokens, dtype=torch.bool, device=self.dst_idx.device
        )
        hit.scatter_(1, self.dst_idx, True)
        return hit.gather(1, self.kept_idx)

    def merge_first_patch(self, first_patch: Tensor) -> Tensor:
        """[B, N] -> [B, N - r]: the lowest original patch index each survivor now holds.

        A merged token stands for several patches; the LLM gives it the position of the
        first of them, so that positions depend only on which patches a token holds (the
        same rule as a peer's assignment, ``peers.reduction.first_patch_of_tokens``).
        """
        if self.r == 0:
            return first_patch
        dst_kept = self._kept_position().gather(1, self.dst_idx)
        return self.keep(first_patch).scatter_reduce(
            1, dst_kept, first_patch.gather(1, self.src_idx), reduce="amin"
        )

    def merge_source(self, source: Tensor) -> Tensor:
        """Track which original patches each token holds: rows of a [B, N, N0] map add."""
        if self.r == 0:
            return source
        return self._scatter_into_destinations(source)

    def keep(self, x: Tensor) -> Tensor:
        """Select the survivors' rows of any per-token tensor [B, N, ...] without merging."""
        return self._rows(x, self.kept_idx)

    def unmerge(self, merged: Tensor) -> Tensor:
        """Expand [B, N - r, D] back to [B, N, D]: every source takes its destination's value."""
        batch, kept, d = merged.shape
        if kept != self.kept_idx.shape[1]:
            raise ValueError(f"unmerge() got {kept} tokens, expected {self.kept_idx.shape[1]}")
        n = self.num_input_tokens
        out = merged.new_empty(batch, n, d)
        out.scatter_(1, self.kept_idx[..., None].expand(-1, -1, d), merged)
        dst_rows = out.gather(1, self.dst_idx[..., None].expand(-1, -1, d))
        out.scatter_(1, self.src_idx[..., None].expand(-1, -1, d), dst_rows)
        return out


def proportional_attention_bias(size: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``log(size)`` as an additive attention mask [B, 1, 1, N] (ToMe's proportional attention).

    Adding ``log s_j`` to every logit of key ``j`` makes a token that stands for ``s_j`` patches
    receive the attention mass those patches would have received together.
    """
    bias = size.log()[:, None, None, :]
    return bias if dtype is None else bias.to(dtype)


def max_merge_count(num_tokens: int, num_protected: int = 0) -> int:
    """The largest ``r`` one layer may remove: half of the unprotected tokens, rounded down."""
    return max(num_tokens - num_protected, 0) // 2


NOT_FINITE_METRIC = (
    "metric contains NaN or inf; the layer's keys are not finite (check the input pixels "
    "and the model dtype — fp16 overflow is a common cause)."
)


def _check_inputs(
    metric: Tensor, r: int, importance: Tensor | None, protected: Tensor | None
) -> None:
    """Shapes and types (host checks only; finiteness is read from the similarities)."""
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0 (tokens removed by one layer), got {r}")
    batch, n, _ = metric.shape
    if importance is not None and tuple(importance.shape) != (batch, n):
        raise ValueError(
            f"importance must be [B, N] = {(batch, n)} to match metric, got "
            f"{tuple(importance.shape)}"
        )
    if protected is not None:
        if tuple(protected.shape) != (batch, n):
            raise ValueError(
                f"protected must be [B, N] = {(batch, n)} to match metric, got "
                f"{tuple(protected.shape)}"
            )
        if protected.dtype != torch.bool:
            raise TypeError(f"protected must be a bool tensor, got {protected.dtype}")


def _check_finite(row_best: Tensor) -> None:
    """Raise when a metric row was not finite, read from one similarity per row.

    A NaN or inf in a row of the metric makes its unit vector NaN, and with it every
    similarity in its row and its column; ``amax`` propagates NaN, so the row maxima (taken
    before any row is masked) hold a NaN exactly when some row of the metric was not finite.
    Reading [B, N] values instead of the [B, N, C] metric saves four passes per layer. A
    data-dependent check: one host sync per layer, skipped under torch.compile (compiled
    code cannot raise on tensor values anyway).
    """
    if not torch.compiler.is_compiling() and bool(torch.isnan(row_best).any()):
        raise ValueError(NOT_FINITE_METRIC)


def _unit(metric: Tensor) -> Tensor:
    """Rows scaled to unit length, in float32 (float64 stays float64)."""
    work_dtype = torch.float64 if metric.dtype == torch.float64 else torch.float32
    unit = metric.to(work_dtype)
    return unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _doubled_similarity(metric: Tensor) -> Tensor:
    """Twice the cosine similarity, bit-exactly symmetric: ``S + S^T``.

    ``a + b`` is commutative in floating point, so the sum is symmetric whatever order the
    matrix product accumulated in.  The factor 2 is exact and changes no ranking or argmax,
    so it is left in (halving [B, N, N] would cost one more pass; the few values read as
    similarities are halved instead).
    """
    unit = _unit(metric)
    sim = unit @ unit.transpose(1, 2)
    return torch.add(sim, sim.transpose(1, 2))


def _check_prefix(protected_prefix: int | None, protected: Tensor | None, n: int) -> None:
    if protected_prefix is None:
        return
    if protected is None:
        raise ValueError("protected_prefix needs the protected mask it describes")
    if not isinstance(protected_prefix, int) or not 0 <= protected_prefix <= n:
        raise ValueError(f"protected_prefix must be an int in [0, {n}], got {protected_prefix!r}")


def _unprotected(protected: Tensor | None, n: int, protected_prefix: int | None) -> int:
    """The fewest unprotected tokens of any row: from the caller's ``protected_prefix`` (a
    host int, no device sync and no graph break) or else read from the mask."""
    if protected is None:
        return n
    if protected_prefix is not None:
        return n - protected_prefix
    return int((~protected).sum(dim=1).min().item())


def _clamped_r(r: int, protected: Tensor | None, n: int, protected_prefix: int | None) -> int:
    return min(r, _unprotected(protected, n, protected_prefix) // 2)


def _empty_matching(batch: int, n: int, device: torch.device) -> Matching:
    empty = torch.empty(batch, 0, dtype=torch.long, device=device)
    kept = torch.arange(n, device=device).expand(batch, n)
    return Matching(empty, empty.clone(), kept)


def _kept_indices(src_idx: Tensor, n: int) -> Tensor:
    batch = src_idx.shape[0]
    is_source = torch.zeros(batch, n, dtype=torch.bool, device=src_idx.device)
    is_source.scatter_(1, src_idx, True)
    # A stable sort of the flag puts survivors first, each group in ascending index order.
    order = torch.sort(is_source.to(torch.uint8), dim=1, stable=True).indices
    return order[:, : n - src_idx.shape[1]]


@exact_dtypes
def complete_graph_matching(
    metric: Tensor,
    r: int,
    importance: Tensor | None = None,
    protected: Tensor | None = None,
    *,
    max_sources_per_destination: int | None = None,
    max_rounds: int = HUB_GUARD_ROUNDS,
    hub_guard: str = "defer",
    protected_prefix: int | None = None,
) -> Matching:
    """CrossGET's complete-graph soft matching (CGSM) over all token pairs.

    Unlike ToMe's fixed A/B split, every token may be a source or a destination.  Ranking the
    tokens by their best similarity and letting each one "see" only tokens ranked after it
    breaks mutual pairs and chains in one parallel step, so a token is rarely both merged away
    and merged into.  ``score = importance - best visible similarity``: the ``r`` lowest
    scores (redundant and unimportant) become sources; every other unprotected token is a
    destination.  Ties everywhere go to the lower token index so that results do not depend
    on the sort kernel.  ``r`` is clamped to half of the unprotected tokens.

    ``max_sources_per_destination`` (the hub guard, ``None`` = the authors' rule) caps how many
    sources one destination absorbs in this layer: sources stay the same ``r`` tokens, and
    those beyond a destination's cap move to their next most similar destination with room
    (``hub_guard="rematch"``, :func:`_capped_destinations`, parallel rounds; ``max_rounds``
    bounds them), or (``hub_guard="defer"``, :func:`_deferred_matching`) are not merged in
    this layer and the next candidates by score take their place.

    ``protected_prefix`` (optional) tells that the protected tokens of every row are exactly
    its first ``protected_prefix`` tokens (a ViT's CLS: merges keep it first), so ``r`` is
    clamped from that host int instead of reading the mask (one device sync and one
    ``torch.compile`` graph break less per layer). The mask is still what blocks them.
    """
    _check_inputs(metric, r, importance, protected)
    _check_prefix(protected_prefix, protected, metric.shape[1])
    if max_sources_per_destination is not None and (
        not isinstance(max_sources_per_destination, int) or max_sources_per_destination < 1
    ):
        raise ValueError(
            "max_sources_per_destination must be an int >= 1 or None (no cap), got "
            f"{max_sources_per_destination!r}"
        )
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    if hub_guard not in HUB_GUARDS:
        raise ValueError(f"hub_guard must be one of {HUB_GUARDS}, got {hub_guard!r}")
    batch, n, _ = metric.shape
    device = metric.device
    r = _clamped_r(r, protected, n, protected_prefix)
    if r == 0:
        return _empty_matching(batch, n, device)

    # Every pass below touches all B x N x N similarities, so each is done once and in place:
    # a token never pairs with itself, and nothing pairs with a protected token (its column:
    # with a known prefix only those columns are written, not the whole matrix). ``sim`` is
    # twice the cosine similarity (:func:`_doubled_similarity`): rankings and argmax do not
    # change, and the one value that meets ``importance`` is halved.
    sim = _doubled_similarity(metric)
    neg_inf = torch.tensor(-torch.inf, dtype=sim.dtype, device=device)
    sim.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
    if protected is not None and protected_prefix is not None:
        sim[:, :, :protected_prefix] = -torch.inf
    elif protected is not None:
        sim.masked_fill_(protected[:, None, :], -torch.inf)

    best_sim = sim.amax(dim=-1)
    _check_finite(best_sim)
    if protected is not None:
        # A protected token's own row counts as fully blocked (it ranks last); its row in
        # ``sim`` is never read again (its score is +inf and it is nobody's source).
        best_sim = best_sim.masked_fill(protected, -torch.inf)
    # rank 0 = highest best-similarity; stable sort on the negation keeps lower index first.
    order = torch.sort(-best_sim, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=device).expand(batch, n))
    # Row i sees the tokens ranked after it. masked_fill with the complement is the same
    # values as where(visible, sim, -inf) at half the cost on CPU (N x N, every layer).
    hidden = rank[:, None, :] <= rank[:, :, None]
    best_visible = sim.masked_fill(hidden, -torch.inf).amax(dim=-1)

    score = best_visible.mul_(-0.5)  # minus the best visible cosine similarity
    if importance is not None:
        score = score + importance.to(sim.dtype)
    if protected is not None:
        score = score.masked_fill(protected, torch.inf)
    by_score = torch.sort(score, dim=1, stable=True).indices
    if max_sources_per_destination is not None and hub_guard == "defer":
        unprotected = _unprotected(protected, n, protected_prefix)
        return _deferred_matching(sim, by_score, r, unprotected, max_sources_per_destination)
    src_idx = by_score[:, :r]

    is_source = torch.zeros(batch, n, dtype=torch.bool, device=device)
    is_source.scatter_(1, src_idx, True)
    if max_sources_per_destination is not None:
        dst_idx = _capped_destinations(
            sim, src_idx, is_source, max_sources_per_destination, max_rounds
        )
        return Matching(src_idx, dst_idx, _kept_indices(src_idx, n))
    src_sim = Matching._rows(sim, src_idx)  # [B, r, N]
    # Sources and protected columns are already excluded by the masks; argmax returns the
    # first (lowest-index) maximum, which is the tie rule.
    src_sim = src_sim.masked_fill(is_source[:, None, :], neg_inf)
    dst_idx = src_sim.argmax(dim=-1)
    return Matching(src_idx, dst_idx, _kept_indices(src_idx, n))


def _capped_destinations(
    sim: Tensor, src_idx: Tensor, is_source: Tensor, max_sources: int, max_rounds: int
) -> Tensor:
    """Assign each source to a destination that takes at most ``max_sources`` per layer.

    Parallel proposal rounds (a loop over rounds, never over tokens): every unassigned
    source proposes to its most similar destination that still has room; a destination
    accepts, among its proposers, the most similar ones up to its remaining room (ties: the
    source listed first in ``src_idx``, i.e. the lower score); rejected sources propose again
    in the next round.  Every round places at least one source and the destinations' room
    (``max_sources`` times at least ``r`` destinations) always suffices, so all sources are
    placed within ``r`` rounds; after ``max_rounds`` any source still unplaced takes its most
    similar destination with room, even if several choose the same one (rare: the cap may be
    exceeded there).  The set of sources never changes, so ``r`` is met exactly.
    """
    batch, r = src_idx.shape
    n = sim.shape[-1]
    device = sim.device
    neg_inf = torch.tensor(-torch.inf, dtype=sim.dtype, device=device)
    src_sim = Matching._rows(sim, src_idx)  # [B, r, N]
    src_sim = src_sim.masked_fill(is_source[:, None, :], neg_inf)
    load = torch.zeros(batch, n, dtype=torch.long, device=device)
    dst_idx = torch.full((batch, r), -1, dtype=torch.long, device=device)
    for _ in range(max_rounds):
        pending = dst_idx < 0
        if not bool(pending.any()):
            return dst_idx
        full = load >= max_sources  # [B, N]
        options = src_sim.masked_fill(full[:, None, :], neg_inf)
        choice = options.argmax(dim=-1)  # [B, r]; first maximum = lower index on ties
        choice_sim = options.gather(2, choice[..., None])[..., 0]
        proposing = pending & torch.isfinite(choice_sim)
        # Rank the proposers of each destination by similarity, best first: sort by
        # similarity (descending, stable so earlier sources win ties), then stably by
        # destination; a proposer's rank is its place inside its destination's group.
        key_dst = torch.where(proposing, choice, n)  # non-proposers sort last
        by_sim = torch.sort(-choice_sim.masked_fill(~proposing, 0.0), dim=1, stable=True).indices
        dst_sorted = key_dst.gather(1, by_sim)
        by_dst = torch.sort(dst_sorted, dim=1, stable=True).indices
        perm = by_sim.gather(1, by_dst)  # proposals grouped by destination, best first
        grouped_dst = key_dst.gather(1, perm)
        position = torch.arange(r, device=device).expand(batch, r)
        new_group = torch.ones_like(grouped_dst, dtype=torch.bool)
        new_group[:, 1:] = grouped_dst[:, 1:] != grouped_dst[:, :-1]
        group_start = torch.where(new_group, position, 0).cummax(dim=1).values
        rank_grouped = position - group_start
        rank = torch.empty_like(rank_grouped).scatter_(1, perm, rank_grouped)
        room = (max_sources - load).gather(1, choice.clamp_max(n - 1))
        accept = proposing & (rank < room)
        dst_idx = torch.where(accept, choice, dst_idx)
        load = load.scatter_add(1, choice, accept.long())
    pending = dst_idx < 0
    if bool(pending.any()):
        full = load >= max_sources
        options = src_sim.masked_fill(full[:, None, :], neg_inf)
        # A row with no room anywhere (impossible while r <= destinations) falls back to
        # the plain argmax.
        no_room = ~torch.isfinite(options.amax(dim=-1))
        fallback = torch.where(no_room, src_sim.argmax(dim=-1), options.argmax(dim=-1))
        dst_idx = torch.where(pending, fallback, dst_idx)
    return dst_idx


def _deferred_matching(
    sim: Tensor, by_score: Tensor, r: int, unprotected: int, max_sources: int
) -> Matching:
    """Hub guard by deferral: a candidate whose destination is full is not merged this layer.

    The ``M = min(2r, unprotected - r)`` lowest-score tokens are the candidates; every other
    unprotected token is a destination.  Each candidate picks its most similar destination;
    per destination the candidates with the lowest scores, up to ``max_sources``, are
    accepted.  The ``r`` sources are the accepted candidates in score order; if fewer than
    ``r`` are accepted, the lowest-score rejected ones fill up (merging into their choice
    beyond the cap), so exactly ``r`` tokens go.  Candidates not taken stay as they are.
    One parallel pass: sorts and gathers only.
    """
    batch, n = by_score.shape
    device = sim.device
    pool_size = min(2 * r, unprotected - r)
    pool = by_score[:, :pool_size]  # [B, M] candidates, ascending score (never protected)
    is_pool = torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, pool, True)
    pool_sim = Matching._rows(sim, pool)  # protected already -inf
    pool_sim = pool_sim.masked_fill(is_pool[:, None, :], -torch.inf)
    choice = pool_sim.argmax(dim=-1)  # [B, M], first maximum on ties
    # Rank of each candidate among those choosing the same destination, in score order:
    # a stable sort by destination keeps the score order inside each group.
    grouped = torch.sort(choice, dim=1, stable=True)
    position = torch.arange(pool_size, device=device).expand(batch, pool_size)
    new_group = torch.ones_like(grouped.values, dtype=torch.bool)
    new_group[:, 1:] = grouped.values[:, 1:] != grouped.values[:, :-1]
    group_start = torch.where(new_group, position, 0).cummax(dim=1).values
    rank = torch.empty_like(position).scatter_(1, grouped.indices, position - group_start)
    rejected = (rank >= max_sources).long()
    # Accepted first (in score order), then the rejected (in score order) as fill.
    picked = torch.sort(rejected * pool_size + position, dim=1).indices[:, :r]
    src_idx = pool.gather(1, picked)
    dst_idx = choice.gather(1, picked)
    return Matching(src_idx, dst_idx, _kept_indices(src_idx, n))


@exact_dtypes
def bipartite_matching(
    metric: Tensor,
    r: int,
    protected: Tensor | None = None,
    *,
    protected_prefix: int | None = None,
) -> Matching:
    """ToMe's bipartite soft matching: even tokens (A) may merge into odd tokens (B) only.

    Kept as the peer baseline behind the same :class:`Matching` interface.  Each A token's
    best B partner is found; the ``r`` A tokens with the highest such similarity merge.
    Protected tokens are neither sources nor destinations.  ``r`` is clamped to the number of
    unprotected A tokens and to half of all unprotected tokens. ``protected_prefix``: as in
    :func:`complete_graph_matching` (the first k tokens hold ``ceil(k/2)`` A and ``floor(k/2)``
    B tokens, so every count is known on the host).
    """
    _check_inputs(metric, r, None, protected)
    batch, n, _ = metric.shape
    _check_prefix(protected_prefix, protected, n)
    device = metric.device
    a_idx = torch.arange(0, n, 2, device=device)
    b_idx = torch.arange(1, n, 2, device=device)
    r = _clamped_r(r, protected, n, protected_prefix)
    if protected is not None:
        # Neither side may be exhausted by protected tokens: a source needs an unprotected
        # partner, or argmax over an all -inf row would pick a protected destination.
        if protected_prefix is not None:
            a_free = a_idx.numel() - (protected_prefix + 1) // 2
            b_free = b_idx.numel() - protected_prefix // 2
        else:
            a_free = int((~protected[:, a_idx]).sum(dim=1).min().item())
            b_free = int((~protected[:, b_idx]).sum(dim=1).min().item())
        r = min(r, a_free, b_free)
    r = min(r, b_idx.numel())
    if r == 0:
        return _empty_matching(batch, n, device)

    # ToMe's own form: only the |A| x |B| block, a @ b^T (A and B are disjoint, so no
    # symmetry is needed; a quarter of the complete graph's similarities).
    unit = _unit(metric)
    sim = unit[:, a_idx] @ unit[:, b_idx].transpose(1, 2)  # [B, |A|, |B|]
    best_sim = sim.amax(dim=-1)
    _check_finite(best_sim)  # a NaN row of B is a NaN column: every row's max
    if protected is not None:  # the maxima again, once protected pairs are blocked
        neg_inf = torch.tensor(-torch.inf, dtype=sim.dtype, device=device)
        sim = sim.masked_fill(protected[:, a_idx][:, :, None], neg_inf)
        sim = sim.masked_fill(protected[:, b_idx][:, None, :], neg_inf)
        best_sim = sim.amax(dim=-1)
    best_b = sim.argmax(dim=-1)  # first maximum: lower index wins ties
    a_order = torch.sort(-best_sim, dim=1, stable=True).indices[:, :r]
    src_idx = a_idx[a_order]
    dst_idx = b_idx[best_b.gather(1, a_order)]
    return Matching(src_idx, dst_idx, _kept_indices(src_idx, n))
