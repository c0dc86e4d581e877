#!/usr/bin/env bash
# The test command: the whole suite against the real host built by scripts/setup.sh.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST=${LIKENESS_HOST:-$REPO/.host}
cd "$REPO"
exec "$HOST/venv/bin/python" -m pytest -q "$@" tests
