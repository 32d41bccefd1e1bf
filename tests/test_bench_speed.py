"""Speed harness: KV-cache bytes and peak memory measured for real, the GPU script on CPU."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_models import single_thread

from eval import bench, gpu_bench
from eval.bench_memory import measure_in_subprocess
from mllm_crossget.peers import METHOD_NAMES

# A LLaVA-1.5-7B-shaped model shrunk: 1 LLM head of 128, tower of 2 layers at 56 px (16 patches).
TINY = [
    "--model=llava-7b-shape",
    "--llm-width=128",
    "--vision-width=64",
    "--vision-layers=2",
    "--image-size=56",
    "--device=cpu",
    "--threads=1",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def _prepared(argv: list[str], methods: list[str], budgets: list[str]) -> tuple:
    args = bench.build_parser().parse_args([*TINY, *argv])
    bench.finish_args(args)
    model, _, _ = bench.load_model(args)
    text, pixels = bench.make_inputs(args, model.config)
    settings, skipped = bench.build_settings(model, methods, budgets, args.fastv_layer)
    assert all(note.startswith("fastv/") and "@" in note for note in skipped), skipped
    for setting in settings:
        bench.prepare(model, setting, text, model.config.image_token_id, args.prompt_tokens)
    return args, model, pixels, {s.label: s for s in settings}


def test_kv_cache_bytes_read_from_the_cache_equal_the_analytic_size() -> None:
    argv = ["--llm-layers=3", "--prompt-tokens=10", "--batch=2", "--fastv-layer=1"]
    methods, budgets = ["crossget", "fastv"], ["full", "10", "12@0.5"]
    args, model, pixels, settings = _prepared(argv, methods, budgets)
    assert set(settings) == {"full", "crossget/10", "fastv/10", "crossget/12@0.5"}
    new_tokens = 4
    for setting in settings.values():
        with bench.configured(model, setting):
            bench.measure_cache(model, setting, pixels, "cpu", new_tokens, None)
    # Per request: 2 (K, V) x layers x 1 head x 128 x cached tokens x 4 bytes (fp32), the cache
    # holding the prompt (10 text + visual tokens) and every generated token but the last.
    per_token_layer = 2 * 128 * 4
    cached = {"full": 10 + 16 + 3, "crossget/10": 10 + 10 + 3}
    expected = {
        "full": 3 * cached["full"] * per_token_layer,
        "crossget/10": 3 * cached["crossget/10"] * per_token_layer,
        # FastV (K=1): layer 0 holds all 16 visual tokens, layers 1 and 2 the 10 kept.
        "fastv/10": (cached["full"] + 2 * cached["crossget/10"]) * per_token_layer,
        # CrossGET to 12, then the LLM keeps 6 of them from layer 1 on (llm_keep_ratio).
        "crossget/12@0.5": ((10 + 12 + 3) + 2 * (10 + 6 + 3)) * per_token_layer,
    }
    for label, setting in settings.items():
        assert setting.memory["kv_mb"] * 2**20 == expected[label], label
        assert setting.memory["kv_analytic_mb"] * 2**20 == expected[label], label


def test_cache_bytes_counts_every_layer_of_a_legacy_tuple() -> None:
    import torch

    key = torch.zeros(1, 2, 5, 8)
    legacy = ((key, key.clone()), (key[:, :, :3], key[:, :, :3]))
    assert bench.cache_bytes(legacy) == (2 * 80 + 2 * 48) * 4
    assert bench.cache_bytes(None) == 0


def test_peak_memory_of_a_fresh_process_sees_the_request() -> None:
    """The requests' KV caches alone are 4 x 2 x 2 x 128 x 309 x 4 B = 2.4 MiB: the process's
    working memory (peak minus resident before the request) must hold them."""
    argv = [*TINY, "--llm-layers=2", "--batch=4", "--prompt-tokens=300", "--new-tokens=2"]
    result = measure_in_subprocess(argv, "crossget/8", timeout=600)
    assert result["label"] == "crossget/8" and result["reset"] is True
    kv_request = 2 * 2 * 128 * (300 + 8 + 1) * 4 / 2**20
    assert result["kv_mb"] == pytest.approx(kv_request, rel=1e-12)
    assert result["peak_mb"] >= result["base_mb"] > 100  # the interpreter with torch loaded
    assert result["working_mb"] >= 4 * kv_request  # all 4 requests' caches were alive


def test_gpu_bench_script_runs_on_cpu_at_tiny_sizes(tmp_path: Path) -> None:
    argv = ["--device=cpu", "--dtype=fp32", "--llm-layers=2", "--llm-width=128"]
    argv += ["--vision-width=64", "--vision-layers=2", "--image-size=56", "--budgets=full,8"]
    argv += ["--repeats=1", "--warmup=0", "--new-tokens=2", "--prompt-tokens=8"]
    argv += ["--merge-batch=1", "--merge-width=64", "--merge-heads=1", "--merge-tokens=17"]
    argv += ["--merge-r=4", "--merge-repeats=1", f"--out={tmp_path}"]
    assert gpu_bench.main(argv) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = {(r["method"], r["budget"]) for r in report["bench"]["rows"]}
    assert rows == {("full", "full")} | {(m, "8") for m in METHOD_NAMES}
    for row in report["bench"]["rows"]:
        assert row["memory"]["kv_mb"] == row["memory"]["kv_analytic_mb"] > 0
    assert set(report["bench_merge"]["results"]) >= {"cgsm", "bipartite", "layer"}
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "| crossget | 8 | 8 | 8 |" in table and "CGSM / layer" in table
    machine = report["environment"]
    assert machine == report["bench"]["environment"] == report["bench_merge"]["environment"]
    assert table.startswith(f"# GPU benchmark ({machine['cpu']} (")


def test_environment_reads_the_cpu_model_and_its_bf16_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eval import timing

    assert timing.cpu_bf16_kernels({"avx2", "avx512_bf16", "amx_bf16"}) == "amx_bf16"
    assert timing.cpu_bf16_kernels({"avx2", "avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert timing.cpu_bf16_kernels({"avx2", "avx512f"}) is None
    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n"
    assert timing.parse_cpuinfo(cpuinfo) == ("Some CPU 9000", {"fpu", "avx2", "avx512_bf16"})
    monkeypatch.setattr(timing, "_cpu_model_and_flags", lambda: timing.parse_cpuinfo(cpuinfo))
    info = timing.environment("cpu")
    assert (info["cpu"], info["cpu_bf16"]) == ("Some CPU 9000", "avx512_bf16")
    line = timing.describe_environment(info | {"threads": 2, "cpu_count": 4})
    assert line.startswith("Some CPU 9000 (avx512_bf16; 2 of 4 cores), torch ")
    assert "no bf16 kernels" in timing.describe_environment(info | {"cpu_bf16": None})
    assert timing.describe_environment(info | {"gpu": "H100", "cuda": "13.0"}).startswith(
        "H100 (CUDA 13.0)"
    )


def test_llava_shape_rejects_widths_that_do_not_split_into_heads() -> None:
    from eval.bench_llava import llava_7b_config

    with pytest.raises(ValueError, match="llm_width=100 must be a multiple of 128"):
        llava_7b_config(2, "sdpa", llm_width=100)
    with pytest.raises(ValueError, match="image_size=50"):
        llava_7b_config(2, "sdpa", image_size=50)
    config = llava_7b_config(32, "sdpa")
    assert config.text_config.num_attention_heads == 32
    assert config.text_config.intermediate_size == 11008
    assert config.vision_config.num_attention_heads == 16 and config.image_seq_length == 576
