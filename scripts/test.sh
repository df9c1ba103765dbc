#!/usr/bin/env bash
# Run the whole test suite: unit tests, a real ComfyUI server, its web UI in headless Chromium,
# and the install into a second ComfyUI. Installs what is missing first: ComfyUI + pack via
# setup.sh, then what only the tests use (pytest, scikit-image and Playwright from PyPI,
# Chromium from Debian's packages).
#
# GPEN_TEST_HOSTS="/path/to/ComfyUI ..." also runs the host and UI tests (and the Trim Video
# tests) against each of those ComfyUI source trees, set up by scripts/host.sh.
set -euo pipefail
pack="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$pack/scripts/setup.sh"
py="${GPEN_VENV:-$pack/.venv}/bin/python"
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq chromium >/dev/null
fi
"$py" -c "import pytest, skimage, playwright" 2>/dev/null || \
  "$py" -m pip install --disable-pip-version-check -q pytest scikit-image playwright 2>&1 | \
  { grep -v "is ignored: it is neither a file" || true; }
# CodeFormer's optional architecture package, so its tests run.
"$py" -c "import spandrel_extra_arches" 2>/dev/null || "$py" -m pip install --disable-pip-version-check -q \
  -c <("$py" -c "from importlib.metadata import version; print('torch==' + version('torch'))") \
  spandrel_extra_arches 2>&1 | { grep -v "is ignored: it is neither a file" || true; }
"$py" -c "import ray.data" 2>/dev/null || "$py" -m pip install --disable-pip-version-check -q "ray[data]==2.60.*" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }
cd "$pack"
HOST_TESTS=(tests/test_host.py tests/test_video_node.py tests/test_trim.py tests/test_ux.py tests/test_ui.py
            tests/test_memory.py tests/test_restorers_host.py)
status=0
echo "== ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "${GPEN_COMFY_DIR:-$pack/.host/ComfyUI}/comfyui_version.py"): the whole suite"
"$py" -m pytest tests -m "not trim" "$@" || status=$?
for tree in ${GPEN_TEST_HOSTS:-}; do
  host_py="$(bash "$pack/scripts/host.sh" "$tree" | tail -n 1)"
  echo "== ComfyUI at $tree: the host and UI tests"
  GPEN_COMFY_DIR="$pack/.host/$(basename "$tree")" "$host_py" -m pytest "${HOST_TESTS[@]}" || status=$?
done
exit "$status"
