#!/usr/bin/env bash
# Pack what bench/gpu.sh needs on a GPU machine that has PyTorch but no network and no .host/ venv (a bare CUDA
# image, like the team's lent GPU machines): writes .gpu_bundle/ (git-ignored) with
#   ComfyUI/   the pinned host from .host/ComfyUI, without the tokenizers of families the benches never build
#   wheels/    the host's imports that such an image usually lacks, at the versions this checkout's venv runs
# Run it here after `bash scripts/setup.sh`; then on the GPU machine, with .gpu_bundle beside the checkout's files,
# `bash bench/gpu.sh` finds it. Stops if the bundle outgrows BUNDLE_MAX_MB (default 52), so that the checkout and
# the bundle travel together in 64 MiB. BUNDLE_PYTHON (default 3.12, the lent machines' python3) picks the wheels'
# Python version.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.host/venv/bin/python}
COMFY=$(cat "$REPO/.host/comfyui_path" 2>/dev/null || true)
OUT=$REPO/.gpu_bundle
log() { printf '[gpu_bundle] %s\n' "$*" >&2; }
[ -x "$PY" ] && [ -f "$COMFY/main.py" ] || { log "no host here: run 'bash scripts/setup.sh' first"; exit 1; }

# What ComfyUI imports on the way to nodes.KSampler and the in-process executor that a plain CUDA image with
# torch, transformers, aiohttp, scipy and the like does not hold (found by blocking each one in turn; kornia is
# left out: only comfy_extras nodes that the benches do not use need it, and the host logs their import error).
PACKAGES="av pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection torchsde trampoline spandrel"

rm -rf "$OUT" && mkdir -p "$OUT/wheels"
pins=()
for p in $PACKAGES; do
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p") \
    || { log "$p is not installed in $PY"; exit 1; }
  pins+=("$p==$v")
done
log "downloading ${pins[*]}"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "${BUNDLE_PYTHON:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$OUT/wheels" "${pins[@]}"

log "copying ComfyUI from $COMFY"
mkdir -p "$OUT/ComfyUI"
(cd "$COMFY" && tar --exclude=./custom_nodes --exclude=./user --exclude=./models --exclude=./output \
  --exclude=./input --exclude=./temp --exclude=./tests-unit --exclude=__pycache__ \
  --exclude=./comfy/text_encoders/llama_tokenizer --exclude=./comfy/text_encoders/qwen25_tokenizer \
  --exclude=./comfy/text_encoders/t5_tokenizer -cf - .) | (cd "$OUT/ComfyUI" && tar -xf -)
mkdir -p "$OUT/ComfyUI/custom_nodes" "$OUT/ComfyUI/models"

size=$(du -sm "$OUT" | cut -f1)
max=${BUNDLE_MAX_MB:-52}
log "bundle: ${size} MiB at $OUT"
[ "$size" -le "$max" ] || { log "the bundle is over ${max} MiB: it would not travel with the checkout"; exit 1; }
