#!/usr/bin/env bash
# The GPU benchmark in one call (see eval/gpu_bench.py): the full LLaVA-1.5-7B shape in bf16
# with SDPA, every method at full/288/144/64 visual tokens, plus bench_merge on cuda; writes
# runs/gpu_bench/gpu_bench.json and gpu_bench.md. Extra flags pass through, e.g. --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m eval.gpu_bench "$@"
