#!/usr/bin/env bash
# Run the whole test suite (unit + real ComfyUI host); installs what is missing first.
set -euo pipefail
pack="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$pack/scripts/setup.sh"
cd "$pack"
exec "${GPEN_VENV:-$pack/.venv}/bin/python" -m pytest tests "$@"
