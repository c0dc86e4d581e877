#!/usr/bin/env bash
# Build a second test host from a given ComfyUI source tree (a folder or a .tar.gz of one), for the host matrix
# (docs/compatibility.md). The tree is copied into the host folder, so the source is never written to; the host
# gets its own venv with that tree's requirements and the same CPU torch pin as scripts/setup_host.sh, which does
# the installing. Idempotent: a second run only checks and re-links.
#
#   bash scripts/setup_second_host.sh SOURCE HOST_DIR
#   then: COMFYUI_PATH=HOST_DIR/ComfyUI LIKENESS_HOST=HOST_DIR bash scripts/test.sh
#
# LIKENESS_GPU and LIKENESS_FACE work as in scripts/setup_host.sh.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ne 2 ]; then
  echo "usage: $0 COMFYUI_SOURCE(folder or .tar.gz) HOST_DIR" >&2
  exit 2
fi
SOURCE=$1
mkdir -p "$2"
HOST=$(cd "$2" && pwd)
COMFY="$HOST/ComfyUI"
log() { printf '[second-host] %s\n' "$*" >&2; }

if [ ! -f "$COMFY/main.py" ]; then
  rm -rf "$COMFY.partial" && mkdir -p "$COMFY.partial"
  if [ -d "$SOURCE" ]; then
    log "copying ComfyUI from $SOURCE"
    cp -a "$SOURCE/." "$COMFY.partial/"
  elif [ -f "$SOURCE" ]; then
    log "unpacking ComfyUI from $SOURCE"
    tar -xzf "$SOURCE" -C "$COMFY.partial"
  else
    echo "$0: no ComfyUI source at $SOURCE" >&2
    exit 2
  fi
  # An archive holds the tree itself or one top folder with it.
  ROOT=$(dirname "$(find "$COMFY.partial" -maxdepth 2 -name main.py -print -quit)")
  if [ ! -f "$ROOT/main.py" ] || [ ! -f "$ROOT/requirements.txt" ]; then
    echo "$0: $SOURCE holds no ComfyUI tree (main.py and requirements.txt)" >&2
    exit 2
  fi
  mv "$ROOT" "$COMFY"
  rm -rf "$COMFY.partial"
fi
log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null) at $COMFY"
COMFYUI_PATH="$COMFY" LIKENESS_HOST="$HOST" bash "$REPO/scripts/setup_host.sh"
