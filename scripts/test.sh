#!/usr/bin/env bash
# Run the whole test suite: unit tests, a real ComfyUI server, and its web UI in headless
# Chromium. Installs what is missing first (ComfyUI + pack via setup.sh; Chromium from Debian's
# packages and Playwright from PyPI for the UI tests).
set -euo pipefail
pack="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$pack/scripts/setup.sh"
py="${GPEN_VENV:-$pack/.venv}/bin/python"
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq chromium >/dev/null
fi
"$py" -c "import playwright" 2>/dev/null || \
  "$py" -m pip install --disable-pip-version-check -q playwright 2>&1 | { grep -v "is ignored: it is neither a file" || true; }
cd "$pack"
exec "$py" -m pytest tests "$@"
