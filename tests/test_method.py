"""The method options of issue 32: hub guard, geometric schedule, standardised importance,
training-free text guidance — each against a naive float64 reference, with exact counts."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_merge import NEG_INF, _cosine, random_case, ref_cgsm
from tiny_models import prompts_with_image, random_images, single_thread, tiny_llava, tiny_processor

import mllm_crossget as crossget
from mllm_crossget import CrossGETConfig
from mllm_crossget.guidance import standardized_importance, text_relevance
from mllm_crossget.merge import complete_graph_matching, max_merge_count
from mllm_crossget.schedule import output_tokens, schedule_for_tokens


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


# ------------------------------------------------------------------ hub guard: naive reference


def ref_capped(
    metric: torch.Tensor,
    r: int,
    importance: torch.Tensor | None,
    protected: torch.Tensor | None,
    cap: int,
    rounds: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """Same sources as CGSM; destinations by proposal rounds, written as plain loops."""
    base = ref_cgsm(metric, r, importance, protected)
    n = metric.shape[1]
    prots = protected.tolist() if protected is not None else [[False] * n] * metric.shape[0]
    all_dst = []
    for row, src, prot in zip(metric.double().tolist(), base.src, prots, strict=True):
        sim = _cosine(row, prot)
        dests = [j for j in range(n) if j not in src and not prot[j]]
        load = dict.fromkeys(dests, 0)
        dst: list[int | None] = [None] * len(src)
        for _ in range(rounds):
            pending = [k for k in range(len(src)) if dst[k] is None]
            if not pending:
                break
            proposals: dict[int, list[int]] = {}
            for k in pending:
                options = [j for j in dests if load[j] < cap and sim[src[k]][j] > NEG_INF]
                if not options:
                    continue
                best = options[0]
                for j in options[1:]:
                    if sim[src[k]][j] > sim[src[k]][best]:
                        best = j
                proposals.setdefault(best, []).append(k)
            for j, ks in proposals.items():
                ks.sort(key=lambda k, j=j: (-sim[src[k]][j], k))
                room = cap - load[j]
                for k in ks[:room]:
                    dst[k] = j
                    load[j] += 1
        open_dests = [j for j in dests if load[j] < cap]
        for k in range(len(src)):
            if dst[k] is None:
                pool = open_dests or dests
                best = pool[0]
                for j in pool[1:]:
                    if sim[src[k]][j] > sim[src[k]][best]:
                        best = j
                dst[k] = best
        all_dst.append([int(d) for d in dst])  # type: ignore[arg-type]
    return base.src, all_dst


@pytest.mark.parametrize("lattice", [False, True], ids=["gaussian", "lattice_ties"])
@pytest.mark.parametrize("cap", [1, 2])
def test_hub_guard_matches_naive_reference(lattice: bool, cap: int) -> None:
    checked = 0
    for seed in range(150):
        case = random_case(seed, lattice=lattice)
        for rounds in (1, 3, 64):
            got = complete_graph_matching(
                case.metric,
                case.r,
                case.importance,
                case.protected,
                max_sources_per_destination=cap,
                max_rounds=rounds,
                hub_guard="rematch",
            )
            src, dst = ref_capped(case.metric, case.r, case.importance, case.protected, cap, rounds)
            assert got.src_idx.tolist() == src, case.describe()
            assert got.dst_idx.tolist() == dst, (case.describe(), rounds)
            checked += 1
    assert checked == 450


def test_hub_guard_caps_every_destination_and_keeps_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    # Realistic keys: a shared direction plus a few tight clusters, so hubs form.
    centres = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    pick = torch.randint(0, 4, (3, 97), generator=gen)
    metric = centres[pick] + 0.05 * torch.randn(3, 97, 16, generator=gen, dtype=torch.float64)
    protected = torch.zeros(3, 97, dtype=torch.bool)
    protected[:, 0] = True
    for r in (10, 30, 48):
        plain = complete_graph_matching(metric, r, None, protected)
        assert _largest_load(plain.dst_idx, 97) > 2  # the unguarded rule makes hubs
        for cap in (1, 2, 3):
            capped = complete_graph_matching(
                metric,
                r,
                None,
                protected,
                max_sources_per_destination=cap,
                max_rounds=r,
                hub_guard="rematch",
            )
            assert torch.equal(capped.src_idx, plain.src_idx)  # same sources: same r
            assert _largest_load(capped.dst_idx, 97) <= cap
            assert not bool(protected.gather(1, capped.dst_idx).any())
            is_src = torch.zeros(3, 97, dtype=torch.bool).scatter_(1, capped.src_idx, True)
            assert not bool(is_src.gather(1, capped.dst_idx).any())
            merged, size = capped.merge(metric, None)
            assert merged.shape == (3, 97 - r, 16)
            assert torch.equal(size.sum(dim=1), torch.full((3,), 97.0))


def ref_deferred(
    metric: torch.Tensor,
    r: int,
    importance: torch.Tensor | None,
    protected: torch.Tensor | None,
    cap: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """The deferral rule in plain loops: candidates, per-destination acceptance, fill."""
    batch, n = metric.shape[:2]
    prots = protected.tolist() if protected is not None else [[False] * n] * batch
    r = min([r] + [sum(not p for p in prot) // 2 for prot in prots])
    unprotected = min(sum(not p for p in prot) for prot in prots)
    pool_size = min(2 * r, unprotected - r)
    all_src, all_dst = [], []
    for b, (row, prot) in enumerate(zip(metric.double().tolist(), prots, strict=True)):
        by_score = _scores_order(metric[b : b + 1], importance, protected, b)
        pool = by_score[:pool_size]
        sim = _cosine(row, prot)
        dests = [j for j in range(n) if j not in pool and not prot[j]]
        choice, taken, accepted = {}, {}, []
        for i in pool:
            best = dests[0]
            for j in dests[1:]:
                if sim[i][j] > sim[i][best]:
                    best = j
            choice[i] = best
            if taken.get(best, 0) < cap:
                taken[best] = taken.get(best, 0) + 1
                accepted.append(i)
        rejected = [i for i in pool if i not in accepted]
        src = (accepted + rejected)[:r]
        all_src.append(src)
        all_dst.append([choice[i] for i in src])
    return all_src, all_dst


def _scores_order(
    row_metric: torch.Tensor,
    importance: torch.Tensor | None,
    protected: torch.Tensor | None,
    b: int,
) -> list[int]:
    """All tokens of row ``b`` in CGSM's score order, computed as ``ref_cgsm`` does."""
    n = row_metric.shape[1]
    imp = None if importance is None else importance[b : b + 1]
    prot = None if protected is None else protected[b : b + 1]
    tokens = row_metric.double().tolist()[0]
    p = prot.tolist()[0] if prot is not None else [False] * n
    values = imp.double().tolist()[0] if imp is not None else [0.0] * n
    sim = _cosine(tokens, p)
    best = [max(s) for s in sim]
    ranked = sorted(range(n), key=lambda i: (-best[i], i))
    rank = {tok: pos for pos, tok in enumerate(ranked)}
    score = []
    for i in range(n):
        if p[i]:
            score.append(math.inf)
            continue
        visible = [sim[i][j] for j in range(n) if rank[j] > rank[i]]
        score.append(values[i] - max(visible, default=NEG_INF))
    return sorted(range(n), key=lambda i: (score[i], i))


@pytest.mark.parametrize("cap", [1, 2])
def test_deferral_matches_naive_reference_and_keeps_r(cap: int) -> None:
    for seed in range(200):
        case = random_case(seed)
        got = complete_graph_matching(
            case.metric, case.r, case.importance, case.protected, max_sources_per_destination=cap
        )
        src, dst = ref_deferred(case.metric, case.r, case.importance, case.protected, cap)
        assert got.src_idx.tolist() == src, case.describe()
        assert got.dst_idx.tolist() == dst, case.describe()
        plain = complete_graph_matching(case.metric, case.r, case.importance, case.protected)
        assert got.r == plain.r  # exactly as many tokens go as without the guard
        assert got.kept_idx.shape == plain.kept_idx.shape


def _largest_load(dst_idx: torch.Tensor, n: int) -> int:
    load = torch.zeros(dst_idx.shape[0], n, dtype=torch.long)
    return int(load.scatter_add(1, dst_idx, torch.ones_like(dst_idx)).max())


def test_hub_guard_rejects_bad_caps() -> None:
    metric = torch.randn(1, 9, 4)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_sources_per_destination"):
            complete_graph_matching(metric, 2, max_sources_per_destination=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_rounds"):
        complete_graph_matching(metric, 2, max_sources_per_destination=1, max_rounds=0)


# ------------------------------------------------------------------------- geometric schedule


@pytest.mark.parametrize("mode", ["geometric", "even"])
def test_schedules_hit_every_reachable_target_exactly(mode: str) -> None:
    rng = random.Random(0)
    for _ in range(300):
        n, layers, protected = rng.randint(2, 300), rng.randint(0, 6), rng.randint(0, 2)
        protected = min(protected, n)
        floor = output_tokens(n, [n] * layers, protected)
        target = rng.randint(floor, n)
        schedule = schedule_for_tokens(n, target, layers, protected, mode)  # type: ignore[arg-type]
        assert len(schedule) == layers
        assert output_tokens(n, schedule, protected) == target
        left = n
        for r in schedule:
            assert 0 <= r <= max_merge_count(left, protected)
            left -= r


def test_geometric_schedule_lowers_the_largest_share_per_layer() -> None:
    # The reference model: 256 patches + CLS, 4 merging layers, 64 and 128 visual tokens.
    for target in (65, 129):
        even = schedule_for_tokens(257, target, 4, 1, "even")
        geometric = schedule_for_tokens(257, target, 4, 1, "geometric")
        assert max(_shares(257, even)) > max(_shares(257, geometric))
        shares = _shares(257, geometric)
        assert max(shares) - min(shares) < 0.02  # nearly the same fraction in every layer
    assert schedule_for_tokens(257, 65, 4, 1, "geometric") == (75, 53, 37, 27)


def _shares(n: int, schedule: tuple[int, ...]) -> list[float]:
    shares = []
    for r in schedule:
        shares.append(r / (n - 1))
        n -= r
    return shares


# ---------------------------------------------------------------- importance normalisation


def test_standardized_importance_matches_naive_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(3, 11, generator=gen, dtype=torch.float64) / 11
    protected = torch.zeros(3, 11, dtype=torch.bool)
    protected[:, 0] = True
    protected[2, 5] = True
    got = standardized_importance(values, protected, weight=0.3)
    for b in range(3):
        free = [v for v, p in zip(values[b].tolist(), protected[b].tolist(), strict=True) if not p]
        mean = math.fsum(free) / len(free)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in free) / len(free))
        for i in range(11):
            want = 0.0 if protected[b, i] else 0.3 * (values[b, i].item() - mean) / std
            assert got[b, i].item() == pytest.approx(want, abs=1e-12)
    flat = standardized_importance(torch.full((1, 5), 0.2), None, 2.0)
    assert torch.equal(flat, torch.zeros(1, 5))  # no spread: no information


def test_text_relevance_matches_naive_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    words = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [False, True, False, False]])
    got = text_relevance(tokens, words, mask)
    for b in range(2):
        cos = [
            [
                float(
                    torch.dot(tokens[b, i], words[b, t]) / tokens[b, i].norm() / words[b, t].norm()
                )
                for t in range(4)
            ]
            for i in range(7)
        ]
        columns = []
        for t in range(4):
            if not mask[b, t]:
                continue
            col = [cos[i][t] for i in range(7)]
            mean = math.fsum(col) / 7
            std = math.sqrt(math.fsum((c - mean) ** 2 for c in col) / 7)
            columns.append([(c - mean) / std for c in col])
        for i in range(7):
            assert got[b, i].item() == pytest.approx(max(c[i] for c in columns), abs=1e-10)


# -------------------------------------------------------------------------------- config


def test_config_options_round_trip_and_validate() -> None:
    config = CrossGETConfig(
        visual_tokens=16,
        guidance="text",
        importance_norm="standard",
        importance_weight=0.05,
        max_sources_per_destination=2,
        schedule="geometric",
    )
    again = CrossGETConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config
    bad = [
        ({"importance_norm": "zscore"}, "importance_norm"),
        ({"importance_weight": -1.0}, "importance_weight"),
        ({"importance_weight": float("nan")}, "importance_weight"),
        ({"max_sources_per_destination": 0}, "max_sources_per_destination"),
        ({"max_sources_per_destination": True}, "max_sources_per_destination"),
        ({"schedule": "log"}, "schedule"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            CrossGETConfig(visual_tokens=16, **kwargs)


# ---------------------------------------------------------------- LLaVA: text guidance wiring

PROMPTS = prompts_with_image([1, 3, 6])


def _build(config: CrossGETConfig) -> tuple[object, object]:
    model = tiny_llava()
    return crossget.apply(model, config, tiny_processor())


def _features(model: object, processor: object, images: list, prompts: list[str]) -> torch.Tensor:
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).image_hidden_states  # type: ignore[operator]


TEXT = {"guidance": "text", "importance_norm": "standard", "importance_weight": 1.0}


def test_text_guidance_depends_on_each_rows_own_prompt() -> None:
    images = random_images(3)
    model, processor = _build(CrossGETConfig(visual_tokens=16, **TEXT))
    same = [images[0], images[0]]
    prompts = ["w1 w2 w3 <image> w4", "w50 w60 w70 <image> w4"]
    features = _features(model, processor, same, prompts)
    assert features.shape[0] == 32
    assert not torch.allclose(features[:16], features[16:])
    # A padded mixed batch: every row's features are those its prompt gets alone.
    batch = _features(model, processor, images, PROMPTS)
    for row in range(3):
        alone = _features(model, processor, images[row : row + 1], PROMPTS[row : row + 1])
        torch.testing.assert_close(batch[16 * row : 16 * (row + 1)], alone)
    # Weight 0: the matching is plain similarity, the same as guidance='none'.
    zero, _ = _build(CrossGETConfig(visual_tokens=16, **{**TEXT, "importance_weight": 0.0}))
    none, _ = _build(CrossGETConfig(visual_tokens=16, guidance="none"))
    torch.testing.assert_close(
        _features(zero, processor, images, PROMPTS), _features(none, processor, images, PROMPTS)
    )


def test_text_guidance_generate_beams_cache_and_mixed_budgets() -> None:
    images = random_images(3)
    config = CrossGETConfig(visual_tokens=16, max_sources_per_destination=1, **TEXT)
    model, processor = _build(config)
    budgets = [16, 30, 8]
    with crossget.budget(budgets):
        inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
        image_id = model.config.image_token_id  # type: ignore[attr-defined]
        assert (inputs["input_ids"] == image_id).sum(dim=1).tolist() == budgets
        greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)  # type: ignore[operator]
        beams = model.generate(  # type: ignore[operator]
            **inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False
        )
        for row in range(3):
            with crossget.budget([budgets[row]]):
                single = processor(
                    images=images[row : row + 1], text=PROMPTS[row : row + 1], return_tensors="pt"
                )
                alone = model.generate(**single, max_new_tokens=3, do_sample=False)  # type: ignore[operator]
            width = alone.shape[1]
            assert torch.equal(greedy[row, -width:], alone[0])
    counts = (beams == image_id).sum(dim=1).tolist()
    assert counts == [b for b in budgets for _ in range(2)]


def test_text_guidance_is_refused_outside_llava() -> None:
    from tiny_models import tiny_clip_vision

    with pytest.raises(ValueError, match="guidance='text'"):
        crossget.apply(tiny_clip_vision(), CrossGETConfig(visual_tokens=16, guidance="text"))


# ------------------------------------------------------------------- eval helpers


def test_compare_runs_counts_families_and_discordant_questions(tmp_path: Path) -> None:
    from eval.compare_runs import compare

    rows = [
        {"id": f"q{i}", "conversations": [{}, {"value": "yes"}], "family": fam}
        for i, fam in enumerate(["small", "small", "text", "text"])
    ]
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "test.json").write_text(json.dumps(rows))
    answers = {"a": ["yes", "yes", "no", "no"], "b": ["no", "yes", "yes", "yes"]}
    for name, predictions in answers.items():
        lines = [json.dumps({"id": f"q{i}", "prediction": p}) for i, p in enumerate(predictions)]
        (tmp_path / f"{name}.rank0.jsonl").write_text("\n".join(lines) + "\n")
    report = compare(tmp_path, "test", [("a", tmp_path / "a"), ("b", tmp_path / "b")], "a")
    assert "| a | 50.0 | 100.0 | 0.0 |" in report
    assert "| b | 75.0 | 50.0 | 100.0 |" in report
    assert "| b | +25.0 | 2 | 1 | 1 |" in report  # 2 right only with b, 1 only with a
    assert "| b | 0 / 1, 1 | 2 / 0, 0.5 |" in report  # per family: small, then text
    assert "| a | 100.0 |" in compare(tmp_path, "test", [("a", tmp_path / "a")], "a", limit=2)


def test_eval_crossget_options_parse_and_refuse_with_the_fix() -> None:
    from eval.run import parse_crossget_options

    options = parse_crossget_options(
        ["max_sources_per_destination=1", "importance_norm=standard", "importance_weight=0.01"]
    )
    assert options == {
        "max_sources_per_destination": 1,
        "importance_norm": "standard",
        "importance_weight": 0.01,
    }
    for bad, message in [
        ("nonsense=1", "not a CrossGETConfig field"),
        ("guidance=text", "set by its own flag"),
        ("max_sources_per_destination", "KEY=VALUE"),
    ]:
        with pytest.raises(SystemExit, match=message):
            parse_crossget_options([bad])


def test_hub_stats_measures_the_tower_as_llava_runs_it(model_dir: Path, testbed: Path) -> None:
    """eval.hub_stats on a tiny testbed model: 64 patches into 32 tokens, so the largest token
    holds at least 2 patches and the five largest at least 5/32 of them (pigeonhole)."""
    from eval.hub_stats import hub_stats

    for options in ({}, {"max_sources_per_destination": 1}):
        largest, top5 = hub_stats(str(model_dir), testbed, "test", 3, 32, options)
        assert 2.0 <= largest <= 64.0
        assert 5 / 32 <= top5 <= 1.0
