#!/usr/bin/env bash
# The test command: the whole suite against the real host built by scripts/setup.sh.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST=${LIKENESS_HOST:-$REPO/.host}
cd "$REPO"
# One torch thread: the suite is many small operations, which two threads slow down badly on a shared machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# With no test paths given, the whole suite (tests/); otherwise only the paths given, e.g. tests/fusion.
for arg in "$@"; do [ -e "${arg%%::*}" ] && exec "$HOST/venv/bin/python" -m pytest -q "$@"; done
exec "$HOST/venv/bin/python" -m pytest -q "$@" tests
