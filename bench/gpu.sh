#!/usr/bin/env bash
# The benches that measure the full architectures, on CUDA in fp16, in one command for a GPU session:
#   bash bench/gpu.sh            (after `bash scripts/setup.sh` with LIKENESS_GPU=1, so torch has CUDA)
# Writes bench/results/full_<family>.json (sd2: ProFusion end to end) and inv_adapter_<family>.json with
# "device": "cuda". The steps and rounds below are meant to keep the whole run to a few minutes on one
# data-centre GPU (not yet run on one); the CPU defaults are smaller (docs say which
# result came from which device). Absolute times in the docs come only from a run of this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.host/venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: torch sees no CUDA device')"
export LIKENESS_BENCH_DEVICE=cuda LIKENESS_BENCH_DTYPE=${LIKENESS_BENCH_DTYPE:-fp16}
export LIKENESS_BENCH_STEPS=${LIKENESS_BENCH_STEPS:-20} LIKENESS_BENCH_ROUNDS=${LIKENESS_BENCH_ROUNDS:-3}
"$PY" bench/bench_full.py sd15 sd2 sdxl
"$PY" bench/bench_inv_adapter.py sd15 sdxl
