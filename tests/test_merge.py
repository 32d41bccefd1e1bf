"""Tests for ``mllm_crossget.merge`` against slow, naive references written from the spec.

The references below loop over tokens in pure Python with float64 arithmetic (``math.fsum``);
they are deliberately independent of the vectorised implementation.  Exactness checks use
random gaussian keys (ties practically impossible) and, separately, "lattice" keys whose
cosine similarities are exact multiples of 1/4 in every dtype, so that the tie rules (lower
index wins) are exercised bit-exactly.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from mllm_crossget.merge import (
    Matching,
    bipartite_matching,
    complete_graph_matching,
    max_merge_count,
    proportional_attention_bias,
)
from mllm_crossget.schedule import output_tokens

INF = math.inf
NEG_INF = -math.inf

PROPERTY_SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The tensors here are tiny: one thread avoids OpenMP hand-off costs (~ms per matmul
    on a busy 2-core machine) and keeps the suite fast; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Naive references (from the spec, not from the implementation)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefMatching:
    src: list[list[int]]
    dst: list[list[int]]
    kept: list[list[int]]
    # Smallest positive gap between two float values whose comparison decided the result;
    # a low-precision implementation may legitimately disagree below it.
    margin: float


def _positive_gap(values: Sequence[float]) -> float:
    """Smallest positive difference between finite values (exact ties are structural)."""
    finite = sorted(v for v in values if math.isfinite(v))
    return min((b - a for a, b in itertools.pairwise(finite) if b > a), default=INF)


def _cosine(tokens: list[list[float]], protected: list[bool]) -> list[list[float]]:
    """S_ij = cos(t_i, t_j); diagonal and protected rows/columns are -inf."""
    n = len(tokens)
    units = []
    for t in tokens:
        norm = math.sqrt(math.fsum(v * v for v in t))
        units.append([v / norm for v in t])
    sim = [[NEG_INF] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if not (protected[i] or protected[j]):
                sim[i][j] = sim[j][i] = math.fsum(
                    a * b for a, b in zip(units[i], units[j], strict=True)
                )
    return sim


def _argmax_lowest(row: list[float], candidates: Sequence[int]) -> int:
    best = candidates[0]
    for j in candidates[1:]:
        if row[j] > row[best]:
            best = j
    return best


def _rows(
    metric: Tensor, importance: Tensor | None, protected: Tensor | None
) -> tuple[list[list[list[float]]], list[list[float]], list[list[bool]]]:
    batch, n, _ = metric.shape
    tokens = metric.double().tolist()
    imp = importance.double().tolist() if importance is not None else [[0.0] * n] * batch
    prot = protected.tolist() if protected is not None else [[False] * n] * batch
    return tokens, imp, prot


def ref_cgsm(
    metric: Tensor, r: int, importance: Tensor | None = None, protected: Tensor | None = None
) -> RefMatching:
    tokens, imps, prots = _rows(metric, importance, protected)
    n = metric.shape[1]
    r = min([r] + [sum(not p for p in prot) // 2 for prot in prots])
    all_src, all_dst, all_kept, margins = [], [], [], [INF]
    for row, imp, prot in zip(tokens, imps, prots, strict=True):
        sim = _cosine(row, prot)
        best = [max(s) for s in sim]
        order = sorted(range(n), key=lambda i: (-best[i], i))
        rank = {tok: pos for pos, tok in enumerate(order)}
        score = []
        for i in range(n):
            if prot[i]:
                score.append(INF)
                continue
            visible = [sim[i][j] for j in range(n) if rank[j] > rank[i]]
            score.append(imp[i] - max(visible, default=NEG_INF))
        by_score = sorted(range(n), key=lambda i: (score[i], i))
        src = by_score[:r]
        dsts = []
        for i in src:
            cands = [j for j in range(n) if j not in src and not prot[j]]
            dsts.append(_argmax_lowest(sim[i], cands))
            margins.append(_positive_gap([sim[i][j] for j in cands]))
        margins.append(_positive_gap([b for b, p in zip(best, prot, strict=True) if not p]))
        margins.append(_positive_gap([score[i] for i in by_score[: r + 1]]))
        all_src.append(src)
        all_dst.append(dsts)
        all_kept.append([i for i in range(n) if i not in src])
    return RefMatching(all_src, all_dst, all_kept, min(margins))


def ref_bipartite(metric: Tensor, r: int, protected: Tensor | None = None) -> RefMatching:
    tokens, _, prots = _rows(metric, None, protected)
    n = metric.shape[1]
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    r = min(
        [r, len(b_idx)]
        + [sum(not prot[a] for a in a_idx) for prot in prots]
        + [sum(not prot[b] for b in b_idx) for prot in prots]
        + [sum(not p for p in prot) // 2 for prot in prots]
    )
    all_src, all_dst, all_kept, margins = [], [], [], [INF]
    for row, prot in zip(tokens, prots, strict=True):
        sim = _cosine(row, prot)
        partner = {a: _argmax_lowest(sim[a], b_idx) for a in a_idx} if b_idx else {}
        best = {a: sim[a][partner[a]] for a in partner}
        src = sorted(a_idx, key=lambda a: (-best[a], a))[:r]
        all_src.append(src)
        all_dst.append([partner[a] for a in src])
        all_kept.append([i for i in range(n) if i not in src])
        margins.append(_positive_gap(sorted(best.values(), reverse=True)[: r + 1]))
        margins += [_positive_gap([sim[a][b] for b in b_idx]) for a in src]
    return RefMatching(all_src, all_dst, all_kept, min(margins))


def ref_merge(
    matching: Matching, x: Tensor, size: Tensor | None, importance: Tensor | None
) -> tuple[list[list[list[float]]], list[list[float]]]:
    """Each survivor = sum_j w_j x_j / sum_j w_j over itself and its sources, w = size*exp(imp)."""
    batch, n, _ = x.shape
    xs = x.double().tolist()
    sizes = size.double().tolist() if size is not None else [[1.0] * n] * batch
    imps = importance.double().tolist() if importance is not None else [[0.0] * n] * batch
    out_x, out_size = [], []
    for b in range(batch):
        src, dst = matching.src_idx[b].tolist(), matching.dst_idx[b].tolist()
        shift = max(imps[b])  # convex weights are shift-invariant; keeps exp() finite
        weight = [s * math.exp(i - shift) for s, i in zip(sizes[b], imps[b], strict=True)]
        rows, row_sizes = [], []
        for k in matching.kept_idx[b].tolist():
            group = [k] + [s for s, d in zip(src, dst, strict=True) if d == k]
            total = math.fsum(weight[j] for j in group)
            cols = zip(*(xs[b][j] for j in group), strict=True)
            rows.append(
                [
                    math.fsum(weight[j] * v for j, v in zip(group, col, strict=True)) / total
                    for col in cols
                ]
            )
            row_sizes.append(math.fsum(sizes[b][j] for j in group))
        out_x.append(rows)
        out_size.append(row_sizes)
    return out_x, out_size


def as_lists(m: Matching) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    return m.src_idx.tolist(), m.dst_idx.tolist(), m.kept_idx.tolist()


def as_lists_of(ref: RefMatching) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    return ref.src, ref.dst, ref.kept


# --------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------

PROTECTION_KINDS = ("none", "cls", "cls_cross", "random")


def make_protected(rng: random.Random, kind: str, batch: int, n: int) -> Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        return torch.tensor([[rng.random() < 0.25 for _ in range(n)] for _ in range(batch)])
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask[:, 0] = True  # CLS first
    if kind == "cls_cross":
        mask[:, -1] = True  # cross/query token last
    return mask


def gaussian_metric(gen: torch.Generator, batch: int, n: int, c: int, clustered: bool) -> Tensor:
    metric = torch.randn(batch, n, c, generator=gen, dtype=torch.float64)
    if clustered:  # realistic keys: a shared direction, so similarities crowd near 1
        metric = 0.4 * metric + torch.randn(batch, 1, c, generator=gen, dtype=torch.float64)
    return metric


def lattice_metric(gen: torch.Generator, batch: int, n: int, prototypes: int) -> Tensor:
    """Keys from a few prototypes with 1 or 4 entries of +-1 (and power-of-two scales).

    Norms are 1 or 2, so unit vectors and all cosine similarities (multiples of 1/4) are exact
    in every float dtype and summation order: duplicates give exact ties.
    """
    c = 8
    protos = torch.zeros(prototypes, c, dtype=torch.float64)
    for p in range(prototypes):
        k = 1 if torch.rand(1, generator=gen).item() < 0.3 else 4
        cols = torch.randperm(c, generator=gen)[:k]
        signs = torch.randint(0, 2, (k,), generator=gen).double() * 2 - 1
        protos[p, cols] = signs
    pick = torch.randint(0, prototypes, (batch, n), generator=gen)
    scale = 2.0 ** torch.randint(-1, 3, (batch, n, 1), generator=gen).double()
    return protos[pick] * scale


@dataclass(frozen=True)
class Case:
    metric: Tensor
    r: int
    importance: Tensor | None
    protected: Tensor | None

    def describe(self) -> str:
        b, n, c = self.metric.shape
        return (
            f"B={b} N={n} C={c} r={self.r} importance={self.importance is not None} "
            f"protected={None if self.protected is None else self.protected.tolist()}"
        )


def random_case(seed: int, lattice: bool = False, max_tokens: int = 40) -> Case:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch, n = rng.randint(1, 4), rng.randint(2, max_tokens)
    if lattice:
        metric = lattice_metric(gen, batch, n, rng.randint(1, 6))
    else:
        metric = gaussian_metric(gen, batch, n, rng.choice([4, 8, 16]), rng.random() < 0.5)
    r = rng.randint(0, n + 2)
    importance = None
    if rng.random() < 0.6:
        if lattice:  # exact quarter steps keep scores exact and tie-prone
            importance = torch.randint(-2, 3, (batch, n), generator=gen).double() * 0.25
        else:
            importance = torch.randn(batch, n, generator=gen, dtype=torch.float64)
            importance *= rng.choice([0.02, 0.3])
    protected = make_protected(rng, rng.choice(PROTECTION_KINDS), batch, n)
    return Case(metric, r, importance, protected)


# --------------------------------------------------------------------------------------------
# CGSM vs the naive reference
# --------------------------------------------------------------------------------------------


def _check_against_reference(
    cases: Sequence[Case],
    dtype: torch.dtype,
    run: Callable[[Case, torch.dtype], Matching],
    ref: Callable[[Case], RefMatching],
    min_margin: float,
) -> int:
    """Compare every case exactly; returns how many were too close to call in ``dtype``."""
    skipped = 0
    for case in cases:
        expected = ref(case)
        if expected.margin < min_margin:
            skipped += 1
            continue
        got = run(case, dtype)
        assert as_lists(got) == (expected.src, expected.dst, expected.kept), case.describe()
    return skipped


def _run_cgsm(case: Case, dtype: torch.dtype) -> Matching:
    imp = None if case.importance is None else case.importance.to(dtype)
    return complete_graph_matching(case.metric.to(dtype), case.r, imp, case.protected)


def _ref_cgsm(case: Case) -> RefMatching:
    return ref_cgsm(case.metric, case.r, case.importance, case.protected)


def _run_bipartite(case: Case, dtype: torch.dtype) -> Matching:
    return bipartite_matching(case.metric.to(dtype), case.r, case.protected)


def _ref_bipartite(case: Case) -> RefMatching:
    return ref_bipartite(case.metric, case.r, case.protected)


def test_cgsm_matches_reference_float64_gaussian() -> None:
    cases = [random_case(seed) for seed in range(300)]
    skipped = _check_against_reference(cases, torch.float64, _run_cgsm, _ref_cgsm, 1e-12)
    assert skipped <= 3


def test_cgsm_matches_reference_float32_gaussian() -> None:
    # The float64 reference is compared wherever its decisions are clear of float32 rounding.
    cases = [random_case(1000 + seed) for seed in range(200)]
    skipped = _check_against_reference(cases, torch.float32, _run_cgsm, _ref_cgsm, 1e-6)
    assert skipped <= 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cgsm_matches_reference_with_exact_ties(dtype: torch.dtype) -> None:
    cases = [random_case(2000 + seed, lattice=True) for seed in range(150)]
    assert _check_against_reference(cases, dtype, _run_cgsm, _ref_cgsm, -1.0) == 0


def test_cgsm_reference_cases_cover_the_interesting_regimes() -> None:
    """Guard the generator: clamping, protection patterns and non-trivial r all occur."""
    cases = [random_case(seed) for seed in range(150)]
    results = [(_run_cgsm(c, torch.float64).r, c) for c in cases]
    assert sum(r > 0 for r, _ in results) > 100
    assert any(c.r > r > 0 for r, c in results)  # clamped
    assert sum(c.protected is not None and bool(c.protected[:, -1].all()) for c in cases) > 15


def test_cgsm_duplicate_tokens_lower_index_wins() -> None:
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # 0 and 1 are duplicates, as are 2 and 3: all best similarities tie at 1, so the ranks
    # follow the index; 0 sees {1, 2, 3} (best 1), 1 sees {2, 3} (best 0), 2 sees 3 (best 1),
    # 3 sees nobody.  Scores -1, 0, -1, +inf: the -1 tie goes to token 0 first.
    metric = torch.tensor([[e1, e1, e2, e2]])
    m = complete_graph_matching(metric, 1)
    assert as_lists(m) == ([[0]], [[1]], [[1, 2, 3]])
    m = complete_graph_matching(metric, 2)
    assert as_lists(m) == ([[0, 2]], [[1, 3]], [[1, 3]])

    # Three copies of e1: scores -1, -1, 0, +inf; the source's destination ties between the
    # remaining copies and goes to the lower index.
    metric = torch.tensor([[e1, e1, e1, e2]])
    assert as_lists(complete_graph_matching(metric, 1)) == ([[0]], [[1]], [[1, 2, 3]])
    assert as_lists(complete_graph_matching(metric, 2)) == ([[0, 1]], [[2, 2]], [[2, 3]])


def test_cgsm_importance_breaks_and_makes_ties() -> None:
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    metric = torch.tensor([[e1, e1, e2, e2]])
    # Raising token 0's importance by exactly 1 makes its score 0, tying with token 1 (0):
    # the source becomes token 2 (-1), the only score below.
    importance = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert as_lists(complete_graph_matching(metric, 1, importance)) == ([[2]], [[3]], [[0, 1, 3]])
    # r=2: scores 0 (token 0) and 0 (token 1) tie for the second slot: token 0 wins.
    assert complete_graph_matching(metric, 2, importance).src_idx.tolist() == [[2, 0]]


def test_cgsm_protected_tokens_never_take_part() -> None:
    # Token 1 duplicates token 0 but is protected: token 0 must merge elsewhere.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])
    protected = torch.tensor([[False, True, False, False]])
    m = complete_graph_matching(metric, 5, protected=protected)
    assert m.r == 1  # 3 unprotected tokens -> r clamped to 1
    assert 1 not in m.src_idx.tolist()[0] + m.dst_idx.tolist()[0]
    assert as_lists(m) == as_lists_of(ref_cgsm(metric, 5, None, protected))


def test_cgsm_protected_tokens_with_minus_inf_importance() -> None:
    """Protected tokens score +inf whatever their importance (a caller may pass -inf there)."""
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 12, 8, generator=gen)
    protected = torch.zeros(2, 12, dtype=torch.bool)
    protected[:, [0, 11]] = True
    importance = torch.randn(2, 12, generator=gen).masked_fill(protected, -math.inf)
    m = complete_graph_matching(metric, 5, importance, protected)
    assert m.r == 5
    assert not protected.gather(1, m.src_idx).any() and not protected.gather(1, m.dst_idx).any()
    expected = ref_cgsm(metric, 5, importance.masked_fill(protected, 0.0), protected)
    assert as_lists(m) == as_lists_of(expected)
    x = torch.randn(2, 12, 4, generator=gen)
    merged, size = m.merge(x, None, importance)
    assert bool(torch.isfinite(merged).all())
    assert torch.equal(merged[:, 0], x[:, 0]) and torch.equal(merged[:, -1], x[:, -1])
    assert size.sum(1).tolist() == [12.0, 12.0]


def test_float64_input_uses_float64_similarity() -> None:
    """Near-duplicate keys: float32 similarities collapse, float64 ones still separate them."""
    checked = float32_disagrees = 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(2, 1, 8, generator=gen, dtype=torch.float64)
        metric = base + 1e-3 * torch.randn(2, 24, 8, generator=gen, dtype=torch.float64)
        expected = ref_cgsm(metric, 8)
        if expected.margin < 1e-14:  # too close to call even in float64
            continue
        checked += 1
        assert as_lists(complete_graph_matching(metric, 8)) == as_lists_of(expected)
        got32 = as_lists(complete_graph_matching(metric.float(), 8))
        float32_disagrees += got32 != as_lists_of(expected)
    assert checked >= 9
    assert float32_disagrees >= checked // 2  # the check above can tell float32 from float64


# --------------------------------------------------------------------------------------------
# Bipartite (ToMe) vs the naive reference
# --------------------------------------------------------------------------------------------


def _has_unprotected_b(case: Case) -> bool:
    if case.protected is None or case.metric.shape[1] < 2:
        return True
    return bool((~case.protected[:, 1::2]).any(dim=1).all())


def test_bipartite_matches_reference_float64_gaussian() -> None:
    cases = [random_case(3000 + seed) for seed in range(250)]
    skipped = _check_against_reference(cases, torch.float64, _run_bipartite, _ref_bipartite, 1e-12)
    assert skipped <= 3


def test_bipartite_matches_reference_float32_gaussian() -> None:
    cases = [random_case(4000 + seed) for seed in range(120)]
    skipped = _check_against_reference(cases, torch.float32, _run_bipartite, _ref_bipartite, 1e-6)
    assert skipped <= 6


def test_bipartite_matches_reference_with_exact_ties() -> None:
    cases = [random_case(5000 + seed, lattice=True) for seed in range(150)]
    assert _check_against_reference(cases, torch.float32, _run_bipartite, _ref_bipartite, -1) == 0


def test_bipartite_tie_rules() -> None:
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # A = {0, 2, 4}, B = {1, 3, 5}; every A token equals e1, B tokens 1 and 3 equal e1.
    metric = torch.tensor([[e1, e1, e1, e1, e1, e2]])
    m = bipartite_matching(metric, 2)
    # All A tokens tie at similarity 1 with partners {1, 3}: lowest B index; lowest A first.
    assert as_lists(m) == ([[0, 2]], [[1, 1]], [[1, 3, 4, 5]])


def test_bipartite_clamps() -> None:
    metric = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(0))
    assert bipartite_matching(metric, 100).r == 3  # |B| = 3 = 7 // 2
    protected = torch.zeros(2, 7, dtype=torch.bool)
    protected[1, [0, 2, 4]] = True  # row 1 keeps a single unprotected A token
    assert bipartite_matching(metric, 100, protected).r == 1
    assert bipartite_matching(metric[:, :1], 3).r == 0  # no B tokens at all


def test_bipartite_never_merges_into_a_protected_token() -> None:
    """Rows whose B tokens are all protected must not send A tokens into them.

    Found in review: with N=3 and token 1 (the only B token) protected, r is clamped to
    min(1 unprotected-pair, 2 unprotected A, |B|=1) = 1, every A->B similarity is -inf and the
    argmax falls on index 0 of B: token 0 is merged INTO the protected token 1.
    """
    metric = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    protected = torch.tensor([[False, True, False]])
    m = bipartite_matching(metric, 1, protected)
    assert not protected.gather(1, m.dst_idx).any(), as_lists(m)
    x = torch.randn(1, 3, 4)
    merged, _ = m.merge(x)
    kept = m.kept_idx[0].tolist()
    assert torch.equal(merged[0, kept.index(1)], x[0, 1])  # the protected token is untouched


# --------------------------------------------------------------------------------------------
# merge() vs the naive reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
)
def test_merge_matches_reference(dtype: torch.dtype, tol: float) -> None:
    for seed in range(40):
        case = random_case(6000 + seed)
        gen = torch.Generator().manual_seed(seed)
        batch, n, _ = case.metric.shape
        m = complete_graph_matching(case.metric, case.r, case.importance, case.protected)
        x = torch.randn(batch, n, 5, generator=gen, dtype=torch.float64).to(dtype)
        size = torch.randint(1, 6, (batch, n), generator=gen).to(dtype)
        importance = case.importance
        if importance is not None and seed % 2:
            importance = importance * 20 + 300  # exp() would overflow without the shift
        got_x, got_size = m.merge(x, size, importance)
        want_x, want_size = ref_merge(m, x, size, importance)
        assert got_x.dtype == dtype
        want = torch.tensor(want_x, dtype=torch.float64)
        torch.testing.assert_close(got_x.double(), want, rtol=tol, atol=tol)
        assert got_size.double().tolist() == want_size
        # Survivors that absorbed nothing are returned bit-exactly.
        untouched = ~m.received_mask()
        assert torch.equal(got_x[untouched], m.keep(x)[untouched])


def test_merge_defaults_size_one_and_no_importance() -> None:
    case = random_case(7)
    m = complete_graph_matching(case.metric, case.r, case.importance, case.protected)
    x = torch.randn(*case.metric.shape[:2], 3, dtype=torch.float64)
    got_x, got_size = m.merge(x)
    want_x, want_size = ref_merge(m, x, None, None)
    torch.testing.assert_close(got_x, torch.tensor(want_x, dtype=torch.float64))
    assert got_size.tolist() == want_size


def test_merge_rejects_a_sequence_of_the_wrong_length() -> None:
    m = complete_graph_matching(torch.randn(1, 6, 4), 2)
    with pytest.raises(ValueError, match="tokens"):
        m.merge(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="tokens"):
        m.unmerge(torch.randn(1, 6, 3))


def test_proportional_attention_bias_and_max_merge_count() -> None:
    size = torch.tensor([[1.0, 2.0, 4.0], [3.0, 1.0, 1.0]])
    bias = proportional_attention_bias(size)
    assert bias.shape == (2, 1, 1, 3)
    torch.testing.assert_close(bias[:, 0, 0], size.log())
    assert proportional_attention_bias(size, torch.float16).dtype == torch.float16
    assert [max_merge_count(n, p) for n, p in [(577, 1), (578, 2), (3, 0), (2, 2), (1, 0)]] == [
        288,
        288,
        1,
        0,
        0,
    ]


def test_bf16_default_sizes_stay_exact_beyond_256() -> None:
    """Sizes must add exactly: 256 sources folded into token 0 give a size of 257.

    Found in review: with ``size=None`` the sizes are created in x's dtype; in bfloat16 the
    integers above 256 are not representable, so the merged size becomes 256 or 258 and the row
    no longer sums to N (and log(size) for proportional attention is off).
    """
    n, k = 600, 256
    src = torch.arange(1, k + 1)[None]
    kept = torch.cat([torch.tensor([0]), torch.arange(k + 1, n)])[None]
    m = Matching(src, torch.zeros(1, k, dtype=torch.long), kept)
    _, size = m.merge(torch.randn(1, n, 4).bfloat16())
    assert size[0, 0].item() == k + 1
    assert size.double().sum().item() == n


# --------------------------------------------------------------------------------------------
# Hypothesis properties
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    x: Tensor  # [B, N, D] float32; also the metric source
    r: int
    importance: Tensor | None
    protected: Tensor | None
    kind: str


@st.composite
def merge_inputs(
    draw: st.DrawFn, kinds: tuple[str, ...] = PROTECTION_KINDS, max_tokens: int = 40
) -> Inputs:
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(2, max_tokens))
    r = draw(st.integers(0, n))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 6, generator=gen)
    importance = torch.randn(batch, n, generator=gen) if draw(st.booleans()) else None
    return Inputs(x, r, importance, make_protected(rng, kind, batch, n), kind)


MATCHERS: dict[str, Callable[[Inputs], Matching]] = {
    "cgsm": lambda i: complete_graph_matching(i.x, i.r, i.importance, i.protected),
    "bipartite": lambda i: bipartite_matching(i.x, i.r, i.protected),
}


def _bipartite_ok(inputs: Inputs) -> bool:
    # Rows without any unprotected B token hit the bug pinned by
    # test_bipartite_never_merges_into_a_protected_token; keep the properties independent.
    return inputs.protected is None or bool((~inputs.protected[:, 1::2]).any(dim=1).all())


def _layer_ok(matcher: str, inputs: Inputs) -> bool:
    return matcher != "bipartite" or _bipartite_ok(inputs)


@pytest.mark.parametrize("matcher", sorted(MATCHERS))
@PROPERTY_SETTINGS
@given(inputs=merge_inputs())
def test_matching_structure(matcher: str, inputs: Inputs) -> None:
    if not _layer_ok(matcher, inputs):
        return
    m = MATCHERS[matcher](inputs)
    batch, n, _ = inputs.x.shape
    prot = (
        inputs.protected
        if inputs.protected is not None
        else torch.zeros(batch, n, dtype=torch.bool)
    )
    assert m.src_idx.shape == m.dst_idx.shape == (batch, m.r)
    assert m.kept_idx.shape == (batch, n - m.r)
    assert m.r <= min(inputs.r, max_merge_count(n, int(prot.sum(1).max())))
    for b in range(batch):
        src, dst, kept = m.src_idx[b].tolist(), m.dst_idx[b].tolist(), m.kept_idx[b].tolist()
        assert len(set(src)) == len(src)  # unique sources
        assert not set(src) & set(dst)  # a token is never both merged away and merged into
        assert set(dst) <= set(kept)
        assert kept == sorted(set(range(n)) - set(src))
        assert not any(prot[b, src].tolist()) and not any(prot[b, dst].tolist())
        assert all(s != d for s, d in zip(src, dst, strict=True))
    # Clamp: as many as asked, unless half of the unprotected tokens is fewer.
    if matcher == "cgsm":
        assert m.r == min(inputs.r, int((~prot).sum(1).min()) // 2)


@pytest.mark.parametrize("matcher", sorted(MATCHERS))
@PROPERTY_SETTINGS
@given(inputs=merge_inputs())
def test_three_chained_layers_conserve_size_and_protected_tokens(
    matcher: str, inputs: Inputs
) -> None:
    batch, n, _ = inputs.x.shape
    x, size = inputs.x, torch.ones(batch, n)
    protected = (
        inputs.protected
        if inputs.protected is not None
        else torch.zeros(batch, n, dtype=torch.bool)
    )
    origin = torch.arange(n).expand(batch, n)
    source = torch.eye(n).expand(batch, n, n)
    gen = torch.Generator().manual_seed(n)
    length = n
    for _ in range(3):
        importance = (
            torch.randn(x.shape[:2], generator=gen) if inputs.importance is not None else None
        )
        step = Inputs(x, inputs.r, importance, protected, inputs.kind)
        if not _layer_ok(matcher, step):  # the merged sequence's A/B split shifts
            break
        m = MATCHERS[matcher](step)
        x, size = m.merge(x, size, importance)
        source = m.merge_source(source)
        protected, origin = m.keep(protected), m.keep(origin)
        length -= m.r
        assert x.shape[1] == size.shape[1] == source.shape[1] == origin.shape[1] == length
    assert torch.equal(size.sum(1), torch.full((batch,), float(n)))
    assert torch.equal(source.sum(-1), size)  # every token holds `size` original patches
    assert torch.equal(source.sum(1), torch.ones(batch, n))  # each patch lives in one token
    # Protected tokens: bit-exact values, still there, in the same relative order.
    for b in range(batch):
        pos = protected[b].nonzero().flatten()
        assert torch.equal(x[b, pos], inputs.x[b, origin[b, pos]])
        assert torch.equal(origin[b, pos], prot_positions(inputs, b))
    if inputs.kind in ("cls", "cls_cross"):
        assert bool(protected[:, 0].all()) and bool((origin[:, 0] == 0).all())
    if inputs.kind == "cls_cross":
        assert bool(protected[:, -1].all()) and bool((origin[:, -1] == n - 1).all())


def prot_positions(inputs: Inputs, b: int) -> Tensor:
    if inputs.protected is None:
        return torch.empty(0, dtype=torch.long)
    return inputs.protected[b].nonzero().flatten()


@PROPERTY_SETTINGS
@given(
    inputs=merge_inputs(kinds=("none", "cls", "cls_cross")),
    schedule=st.lists(st.integers(0, 30), min_size=1, max_size=5),
)
def test_chained_output_length_equals_output_tokens(inputs: Inputs, schedule: list[int]) -> None:
    x, size = inputs.x, None
    protected = inputs.protected
    for r in schedule:
        m = complete_graph_matching(x, r, None, protected)
        x, size = m.merge(x, size)
        protected = None if protected is None else m.keep(protected)
    n_protected = 0 if inputs.protected is None else int(inputs.protected[0].sum())
    assert x.shape[1] == output_tokens(inputs.x.shape[1], schedule, n_protected)


@PROPERTY_SETTINGS
@given(inputs=merge_inputs(), level=st.floats(-50, 50))
def test_equal_importance_is_size_weighted_mean(inputs: Inputs, level: float) -> None:
    m = complete_graph_matching(inputs.x, inputs.r, inputs.importance, inputs.protected)
    batch, n, _ = inputs.x.shape
    x = inputs.x.double()
    size = torch.randint(1, 9, (batch, n), generator=torch.Generator().manual_seed(n)).double()
    flat = torch.full((batch, n), level, dtype=torch.float64)
    got, got_size = m.merge(x, size, flat)
    plain, plain_size = m.merge(x, size)
    want, want_size = ref_merge(m, x, size, None)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(plain, got)
    assert got_size.tolist() == plain_size.tolist() == want_size


@pytest.mark.parametrize("matcher", sorted(MATCHERS))
@PROPERTY_SETTINGS
@given(inputs=merge_inputs())
def test_r_zero_is_identity(matcher: str, inputs: Inputs) -> None:
    step = Inputs(inputs.x, 0, inputs.importance, inputs.protected, inputs.kind)
    m = MATCHERS[matcher](step)
    batch, n, _ = inputs.x.shape
    assert m.r == 0
    assert m.kept_idx.tolist() == [list(range(n))] * batch
    x, size = m.merge(inputs.x, None, inputs.importance)
    assert torch.equal(x, inputs.x)
    assert torch.equal(size, torch.ones(batch, n))
    source = torch.eye(n).expand(batch, n, n)
    assert torch.equal(m.merge_source(source), source)
    assert torch.equal(m.unmerge(inputs.x), inputs.x)
    assert torch.equal(m.keep(inputs.x), inputs.x)


@PROPERTY_SETTINGS
@given(inputs=merge_inputs())
def test_unmerge_after_merge(inputs: Inputs) -> None:
    m = complete_graph_matching(inputs.x, inputs.r, inputs.importance, inputs.protected)
    merged, _ = m.merge(inputs.x, None, inputs.importance)
    restored = m.unmerge(merged)
    assert restored.shape == inputs.x.shape
    assert torch.equal(m.keep(restored), merged)  # survivors carry their merged value
    position = {  # input index -> row in the merged sequence, per batch row
        b: {k: i for i, k in enumerate(m.kept_idx[b].tolist())} for b in range(merged.shape[0])
    }
    for b in range(merged.shape[0]):
        for s, d in zip(m.src_idx[b].tolist(), m.dst_idx[b].tolist(), strict=True):
            assert torch.equal(restored[b, s], merged[b, position[b][d]])
    received = torch.zeros_like(inputs.x[..., 0], dtype=torch.bool).scatter(1, m.dst_idx, True)
    untouched = ~received
    untouched.scatter_(1, m.src_idx, False)
    assert torch.equal(restored[untouched], inputs.x[untouched])  # bit-exact


@PROPERTY_SETTINGS
@given(inputs=merge_inputs())
def test_received_mask_and_keep(inputs: Inputs) -> None:
    m = complete_graph_matching(inputs.x, inputs.r, inputs.importance, inputs.protected)
    for b in range(inputs.x.shape[0]):
        dst = set(m.dst_idx[b].tolist())
        assert m.received_mask()[b].tolist() == [k in dst for k in m.kept_idx[b].tolist()]
    assert torch.equal(
        m.keep(inputs.x), inputs.x[torch.arange(inputs.x.shape[0])[:, None], m.kept_idx]
    )
    if inputs.importance is not None:  # keep() works on [B, N] tensors too
        assert m.keep(inputs.importance).shape == m.kept_idx.shape


# --------------------------------------------------------------------------------------------
# Batching: a batch's result equals the rows computed one at a time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matcher", ["cgsm", "bipartite"])
@pytest.mark.parametrize("lattice", [False, True])
def test_batched_equals_per_row(matcher: str, lattice: bool) -> None:
    for seed in range(40):
        case = random_case(8000 + seed, lattice=lattice)
        metric = case.metric if not lattice else case.metric.float()
        if matcher == "bipartite" and not _has_unprotected_b(case):
            continue
        if matcher == "cgsm":
            whole = complete_graph_matching(metric, case.r, case.importance, case.protected)
        else:
            whole = bipartite_matching(metric, case.r, case.protected)
        x = torch.randn(metric.shape[0], metric.shape[1], 3, dtype=metric.dtype)
        merged, size = whole.merge(x, None, case.importance)
        for b in range(metric.shape[0]):
            row_prot = None if case.protected is None else case.protected[b : b + 1]
            if matcher == "cgsm":
                row_imp = None if case.importance is None else case.importance[b : b + 1]
                row = complete_graph_matching(metric[b : b + 1], whole.r, row_imp, row_prot)
            else:
                row = bipartite_matching(metric[b : b + 1], whole.r, row_prot)
            assert row.r == whole.r
            assert torch.equal(row.src_idx[0], whole.src_idx[b]), case.describe()
            assert torch.equal(row.dst_idx[0], whole.dst_idx[b]), case.describe()
            assert torch.equal(row.kept_idx[0], whole.kept_idx[b]), case.describe()
            imp_row = None if case.importance is None else case.importance[b : b + 1]
            row_merged, row_size = row.merge(x[b : b + 1], None, imp_row)
            torch.testing.assert_close(row_merged[0], merged[b], rtol=1e-6, atol=1e-6)
            assert torch.equal(row_size[0], size[b])


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("matcher", ["cgsm", "bipartite"])
def test_dtypes_run_and_stay_finite(dtype: torch.dtype, matcher: str) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, n = 2, 197
    metric = (torch.randn(batch, n, 64, generator=gen) * 30).to(dtype)  # large keys
    x = (torch.randn(batch, n, 32, generator=gen) * 100).to(dtype)
    importance = torch.randn(batch, n, generator=gen).to(dtype)
    protected = torch.zeros(batch, n, dtype=torch.bool)
    protected[:, 0] = True
    size: Tensor | None = None
    for _ in range(3):
        if matcher == "cgsm":
            m = complete_graph_matching(metric, 40, importance, protected)
        else:
            m = bipartite_matching(metric, 40, protected)
        assert m.r == 40
        x, size = m.merge(x, size, importance if matcher == "cgsm" else None)
        metric, importance, protected = m.keep(metric), m.keep(importance), m.keep(protected)
        assert x.dtype == dtype and size.dtype in (dtype, torch.float32, torch.float64)
        assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(size).all())
    assert size is not None
    assert size.double().sum(1).tolist() == [float(n)] * batch
    assert x.shape == (batch, n - 120, 32)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matcher", ["cgsm", "bipartite"])
def test_bad_inputs_raise(matcher: str) -> None:
    def call(metric: Tensor, r: object, protected: Tensor | None = None) -> Matching:
        if matcher == "cgsm":
            return complete_graph_matching(metric, r, None, protected)  # type: ignore[arg-type]
        return bipartite_matching(metric, r, protected)  # type: ignore[arg-type]

    metric = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match=r"r must be >= 0"):
        call(metric, -1)
    with pytest.raises(TypeError, match=r"r must be an int"):
        call(metric, 2.0)
    with pytest.raises(TypeError, match=r"r must be an int"):
        call(metric, True)
    with pytest.raises(ValueError, match=r"metric must be \[B, N, C\]"):
        call(metric[0], 1)
    with pytest.raises(ValueError, match=r"metric must be \[B, N, C\]"):
        call(metric[None], 1)
    nan = metric.clone()
    nan[1, 3, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        call(nan, 1)
    with pytest.raises(ValueError, match=r"protected must be \[B, N\]"):
        call(metric, 1, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="protected must be a bool tensor"):
        call(metric, 1, torch.zeros(2, 6, dtype=torch.long))


def test_bad_importance_raises() -> None:
    metric = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match=r"importance must be \[B, N\]"):
        complete_graph_matching(metric, 1, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"importance must be \[B, N\]"):
        complete_graph_matching(metric, 1, torch.zeros(6))


def test_first_patch_is_the_lowest_patch_a_token_holds() -> None:
    """Chained over layers, ``merge_first_patch`` equals the first column of the source map."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        batch, n = 2, 17
        first = torch.arange(n).expand(batch, n)
        source = torch.eye(n, dtype=torch.float64).expand(batch, n, n)
        for layer in range(3):
            metric = torch.randn(batch, first.shape[1], 4, generator=gen)
            r = int(torch.randint(0, first.shape[1] // 2 + 1, (1,), generator=gen))
            if (seed + layer) % 2:
                m = bipartite_matching(metric, r)
            else:
                m = complete_graph_matching(metric, r, torch.randn(metric.shape[:2], generator=gen))
            first, source = m.merge_first_patch(first), m.merge_source(source)
        lowest = (source > 0).to(torch.int64).argmax(dim=-1)
        assert torch.equal(first, lowest), seed


# --------------------------------------------------------------------------------------------
# protected_prefix: r clamped from a host int instead of the mask (no sync, no graph break)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matcher", ["cgsm", "bipartite"])
def test_protected_prefix_gives_the_mask_only_matching(matcher: str) -> None:
    """Every r up to past the clamp, every prefix 0-3, odd and even N: the same matching."""
    generator = torch.Generator().manual_seed(3)
    for n, prefix in itertools.product((5, 8, 9, 17), (0, 1, 2, 3)):
        metric = torch.randn(3, n, 6, generator=generator)
        importance = torch.randn(3, n, generator=generator)
        protected = torch.zeros(3, n, dtype=torch.bool)
        protected[:, :prefix] = True
        for r in range(n + 1):
            if matcher == "cgsm":
                by_mask = complete_graph_matching(metric, r, importance, protected)
                by_prefix = complete_graph_matching(
                    metric, r, importance, protected, protected_prefix=prefix
                )
            else:
                by_mask = bipartite_matching(metric, r, protected)
                by_prefix = bipartite_matching(metric, r, protected, protected_prefix=prefix)
            assert as_lists(by_prefix) == as_lists(by_mask), (n, prefix, r)


def test_protected_prefix_rejects_bad_values() -> None:
    metric = torch.randn(1, 6, 4)
    protected = torch.zeros(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs the protected mask"):
        complete_graph_matching(metric, 1, protected_prefix=1)
    with pytest.raises(ValueError, match=r"protected_prefix must be an int in \[0, 6\]"):
        bipartite_matching(metric, 1, protected, protected_prefix=7)
