"""The pack outside ComfyUI, as a command-line user or a Ray worker installs it: a fresh venv
with torch (and torchvision, which torch users have beside it) plus the pack's
requirements.txt and install.py, nothing else. Every gpen module but the optional cluster one
imports there, and ``python -m gpen restore`` runs with each --mask choice."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import cv2
import pytest
import torch
from packaging.markers import default_environment
from packaging.requirements import Requirement

from conftest import REPO

OPTIONAL = {"cluster"}  # gpen.cluster needs the [cluster] extra (Ray)


def closure(names: list[str]) -> set[str]:
    """These distributions and everything they need, by their installed metadata."""
    environment = default_environment() | {"extra": ""}
    found, todo = set(), list(names)
    while todo:
        dist = distribution(todo.pop())
        name = dist.metadata["Name"].lower()
        if name in found:
            continue
        found.add(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(requirement.name)
    return found


def link_distributions(names: set[str], target: Path) -> None:
    """Make ``names`` importable from ``target`` (links to this environment's installed files)."""
    for name in names:
        dist = distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            link = target / top
            if not link.exists() and (site / top).exists():
                link.symlink_to(site / top)


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    torch_only = root / "torch-only"
    torch_only.mkdir()
    link_distributions(closure(["torch", "torchvision"]), torch_only)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "torch_only.pth").write_text(f"{torch_only}\n")
    (root / "keep-torch.txt").write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    for command in (["-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", str(root / "keep-torch.txt"),
                     "-r", str(REPO / "requirements.txt")], [str(REPO / "install.py")]):
        result = subprocess.run([python, *command], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
    return python


def run(python: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_every_gpen_module_but_the_optional_one_imports(plain_venv):
    modules = sorted(p.stem for p in (REPO / "gpen").glob("*.py") if p.stem not in OPTIONAL | {"__init__"})
    result = run(plain_venv, "-c", "import importlib, sys\n"
                 f"for name in {modules!r}: importlib.import_module('gpen.' + name)\n"
                 "for absent in ('kornia', 'comfy', 'ray'):\n"
                 "    assert importlib.util.find_spec(absent) is None, absent\n"
                 "print(len(sys.modules))")
    assert result.returncode == 0, result.stderr  # and nothing ComfyUI installs was there to help


@pytest.mark.parametrize("mask", ["face ellipse", "parsing: bisenet", "parsing: parsenet"])
def test_command_line_restores_with_each_mask(plain_venv, mask, tmp_path, astronaut):
    from facexlib.parsing import BiSeNet, ParseNet

    from gpen import FullGenerator, GPENConfig

    torch.manual_seed(0)
    model = tmp_path / "GPEN-tiny-64.pth"
    torch.save(FullGenerator(GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16)).state_dict(), model)
    weights = tmp_path / "facedetection"
    weights.mkdir()
    torch.save(BiSeNet(num_class=19).state_dict(), weights / "parsing_bisenet.pth")
    torch.save(ParseNet(512, 512, parsing_ch=19).state_dict(), weights / "parsing_parsenet.pth")
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), astronaut[..., ::-1])
    out = tmp_path / "restored.png"
    result = run(plain_venv, "-m", "gpen", "restore", "--model", str(model), "--weights-dir", str(weights),
                 "--mask", mask, "--precision", "fp32", str(photo), str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    restored = cv2.imread(str(out))
    assert restored.shape == astronaut.shape
    assert (restored != astronaut[..., ::-1]).any()  # the face was pasted back
