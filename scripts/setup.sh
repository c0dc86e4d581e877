#!/usr/bin/env bash
# The newcomer's one command: build the test host (venv + pinned ComfyUI 0.3.75 + this pack) and run the main
# job, a shipped Fusion Sampling workflow, headless over HTTP. Arguments go to scripts/run_workflow.py,
# e.g. `bash scripts/setup.sh --checkpoint ~/models/sd15.safetensors`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/scripts/setup_host.sh" 2> >(grep -v "is ignored: it is neither" >&2)
HOST=${LIKENESS_HOST:-$REPO/.host}
"$HOST/venv/bin/python" "$REPO/scripts/run_workflow.py" "$REPO/example_workflows/api/fusion_ksampler_text_concept.json" "$@"
