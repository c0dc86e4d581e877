#!/usr/bin/env bash
# The full SDXL UNet at 1024 x 1024 on a CPU: Fusion Sampling, PhotoVerse and Taming (bench_full.py sdxl), then
# Inv-Adapter (bench_inv_adapter.py sdxl). bf16 (the CPU needs bfloat16 instructions to be quick: avx512_bf16 or
# AMX) halves the 10 GB of fp32 weights (one SDXL row at 1024 px is then about 40 s of one core). With one step a
# round takes about 10 minutes (bench_full) and 20 (bench_inv_adapter): 47 and 63 minutes for the two runs the
# docs quote, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.host/venv/bin/python}
export LIKENESS_BENCH_DEVICE=cpu LIKENESS_BENCH_DTYPE=${LIKENESS_BENCH_DTYPE:-bf16} LIKENESS_BENCH_STEPS=${LIKENESS_BENCH_STEPS:-1}
LIKENESS_BENCH_ROUNDS=${LIKENESS_BENCH_ROUNDS:-3} "$PY" bench/bench_full.py sdxl
LIKENESS_BENCH_ROUNDS=${LIKENESS_BENCH_ROUNDS:-2} "$PY" bench/bench_inv_adapter.py sdxl
