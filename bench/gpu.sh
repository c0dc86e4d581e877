#!/usr/bin/env bash
# The benches that measure the full architectures, on CUDA in fp16, in one command for a GPU session:
#   bash bench/gpu.sh
# Python: $PY if set; else this checkout's .host venv (after `LIKENESS_GPU=1 bash scripts/setup.sh`, so torch has
# CUDA); else, on a bare CUDA image with PyTorch but no network, python3 with .gpu_bundle/ (the host and the
# wheels it lacks, packed beforehand by `bash bench/gpu_bundle.sh` on a machine with the host).
# Writes attention_layout_cuda.json, full_<family>_cuda.json (sd2: ProFusion end to end) and
# inv_adapter_<family>_cuda.json in bench/results, beside the CPU results (LIKENESS_BENCH_TAG changes the suffix,
# LIKENESS_BENCH_RESULTS the folder), and says how long each bench took. Steps and rounds are meant to keep the
# whole run to a few minutes on one data-centre GPU.
#   LIKENESS_GPU_DRY_RUN=1   the same benches and plumbing on the CPU at 128 px, 1 step, 1 round (bf16 where the
#                            CPU has it, else fp32), results in a temporary folder: a check that the script runs,
#                            not a measurement
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${LIKENESS_GPU_BUNDLE:-auto}  # 1: use .gpu_bundle with any $PY; auto: unless the Python is the .host venv
if [ -z "${PY:-}" ] && [ -x .host/venv/bin/python ]; then
  PY=.host/venv/bin/python
  [ "$bundle" = auto ] && bundle=0
fi
PY=${PY:-python3}
if [ "$bundle" != 0 ] && [ -d .gpu_bundle/wheels ]; then
  site=${TMPDIR:-/tmp}/likeness_gpu_site
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade --target "$site" \
    .gpu_bundle/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" COMFYUI_PATH=${COMFYUI_PATH:-$PWD/.gpu_bundle/ComfyUI}
elif [ "$bundle" = 1 ]; then
  echo "bench/gpu.sh: LIKENESS_GPU_BUNDLE=1 but there is no .gpu_bundle/ (run bash bench/gpu_bundle.sh)" >&2; exit 1
fi
if [ "${LIKENESS_GPU_DRY_RUN:-0}" = 1 ]; then
  # bf16 where the CPU has bfloat16 instructions, else fp32 (emulated bf16 would take many times as long)
  dry_dtype=$("$PY" bench/full_models.py)
  export LIKENESS_BENCH_DEVICE=cpu LIKENESS_BENCH_DTYPE=$dry_dtype LIKENESS_BENCH_SIZE=128 LIKENESS_BENCH_STEPS=1
  export LIKENESS_BENCH_ROUNDS=1 LIKENESS_BENCH_TAG=dryrun LIKENESS_BENCH_THREADS=${LIKENESS_BENCH_THREADS:-2}
  export LIKENESS_BENCH_RESULTS=${LIKENESS_BENCH_RESULTS:-$(mktemp -d)}
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: torch sees no CUDA device')"
  export LIKENESS_BENCH_DEVICE=cuda LIKENESS_BENCH_DTYPE=${LIKENESS_BENCH_DTYPE:-fp16}
  export LIKENESS_BENCH_STEPS=${LIKENESS_BENCH_STEPS:-20} LIKENESS_BENCH_ROUNDS=${LIKENESS_BENCH_ROUNDS:-3}
  # The clock on CUDA is wall time after a synchronise; more CPU threads only speed up building the random weights.
  export LIKENESS_BENCH_TAG=${LIKENESS_BENCH_TAG:-cuda} LIKENESS_BENCH_THREADS=${LIKENESS_BENCH_THREADS:-8}
fi
timed() {
  local start=$SECONDS
  "$PY" "$@"
  echo "[gpu.sh] $* took $((SECONDS - start)) s (results in ${LIKENESS_BENCH_RESULTS:-bench/results})" >&2
}
# The layout bench times single attention calls (milliseconds on a GPU), so it takes more rounds than the others.
layout_rounds=$LIKENESS_BENCH_ROUNDS
[ "${LIKENESS_GPU_DRY_RUN:-0}" = 1 ] || layout_rounds=${LIKENESS_BENCH_LAYOUT_ROUNDS:-25}
LIKENESS_BENCH_ROUNDS=$layout_rounds timed bench/bench_attention_layout.py
timed bench/bench_full.py sd15 sd2 sdxl
timed bench/bench_inv_adapter.py sd15 sdxl
echo "[gpu.sh] done in $SECONDS s" >&2
