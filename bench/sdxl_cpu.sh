#!/usr/bin/env bash
# The full SDXL UNet at 1024 x 1024 on a CPU: Fusion Sampling, PhotoVerse and Taming (bench_full.py sdxl), then
# Inv-Adapter (bench_inv_adapter.py sdxl). bf16 where the CPU has bfloat16 instructions (avx512_bf16 or AMX)
# halves the 10 GB of fp32 weights (one SDXL row at 1024 px is then about 40 s of one core); a CPU that only
# emulates bf16 (AVX2) gets fp32, since emulated bf16 takes many times as long (bench/full_models.py,
# BF16_TOO_SLOW). With one step in bf16 a round took about 10 minutes (bench_full) and 20 (bench_inv_adapter):
# 47 and 63 minutes for the two runs the docs quote, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.host/venv/bin/python}
if [ -z "${LIKENESS_BENCH_DTYPE:-}" ]; then
  LIKENESS_BENCH_DTYPE=$("$PY" bench/full_models.py)
  [ "$LIKENESS_BENCH_DTYPE" = bf16 ] || echo "bench/sdxl_cpu.sh: this CPU emulates bf16, so the UNet runs in fp32" \
    "(10 GB of weights; bench_full.py sdxl took 26 minutes for one round on two threads)" >&2
fi
export LIKENESS_BENCH_DEVICE=cpu LIKENESS_BENCH_DTYPE LIKENESS_BENCH_STEPS=${LIKENESS_BENCH_STEPS:-1}
LIKENESS_BENCH_ROUNDS=${LIKENESS_BENCH_ROUNDS:-3} "$PY" bench/bench_full.py sdxl
LIKENESS_BENCH_ROUNDS=${LIKENESS_BENCH_ROUNDS:-2} "$PY" bench/bench_inv_adapter.py sdxl
