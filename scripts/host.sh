#!/usr/bin/env bash
# Make a ComfyUI source tree a test host: `bash scripts/host.sh /path/to/ComfyUI` copies it to
# .host/NAME (ComfyUI writes beside itself, and the tree may be read-only), gives it a venv
# layered on the pack's (.venv: torch and the pack's requirements are shared, the host's own
# pins installed on top, where they win), and prints that venv's Python on the last line.
# scripts/test.sh runs the host and UI tests against every tree in GPEN_TEST_HOSTS this way.
set -euo pipefail
pack="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="$(cd "${1:?usage: scripts/host.sh /path/to/ComfyUI}" && pwd)"
[ -f "$tree/main.py" ] || { echo "$tree has no main.py: point it at a ComfyUI source tree." >&2; exit 1; }
base_py="${GPEN_VENV:-$pack/.venv}/bin/python"
[ -x "$base_py" ] || { echo "No pack venv at ${GPEN_VENV:-$pack/.venv}: run scripts/setup.sh first." >&2; exit 1; }
name="$(basename "$tree")"
host="$pack/.host/$name"
venv="$pack/.host/$name-venv"
if [ ! -f "$host/main.py" ]; then
  rm -rf "$host"
  cp -r "$tree" "$host"
  chmod -R u+w "$host"
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  site="$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  "$base_py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/_gpen_pack_venv.pth"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$base_py" -c "from importlib.metadata import version; print('torch==' + version('torch'))" > "$work/keep-torch.txt"
grep -v -E '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$host/requirements.txt" > "$work/requirements.txt"
"$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$work/keep-torch.txt" -r "$work/requirements.txt" 2>&1 |
  { grep -v -E "is ignored: it is neither a file|Not uninstalling|outside environment|Can.t uninstall|dependency resolver does not|requires .*, but you have" || true; }
echo "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$host/comfyui_version.py") at $host, Python at:"
echo "$venv/bin/python"
