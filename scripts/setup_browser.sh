#!/usr/bin/env bash
# Install what the browser tests (tests/workflows/test_browser.py) need: Debian's chromium with the Arial-metric
# Liberation fonts, and playwright from PyPI in the host's venv (requirements-test.txt). No browser download:
# playwright drives /usr/bin/chromium. Needs root (or sudo) for apt; CI (.ci/run) runs it after setup.sh.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST=${LIKENESS_HOST:-$REPO/.host}
log() { printf '[setup-browser] %s\n' "$*" >&2; }

if ! command -v chromium >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi "Liberation Sans"; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  log "installing chromium and fonts-liberation (apt)"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium fonts-liberation >/dev/null
fi
"$HOST/venv/bin/python" -c "import playwright" 2>/dev/null || \
  "$HOST/venv/bin/python" -m pip install --disable-pip-version-check -q "$(grep -i '^playwright' "$REPO/requirements-test.txt")"
log "chromium $(chromium --version 2>/dev/null | awk '{print $2}'), playwright $("$HOST/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
