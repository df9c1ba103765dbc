"""The command line: restore and convert, never overwriting anything."""

import subprocess
import sys

import cv2
import numpy as np
import torch
from safetensors.torch import load_file

from conftest import REPO
from gpen import FullGenerator, GPENConfig, load_generator


def gpen_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpen", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def tiny_checkpoint(path):
    torch.manual_seed(0)
    model = FullGenerator(GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16))
    torch.save({"params_ema": model.state_dict()}, path)
    return model


def test_convert_to_safetensors(tmp_path):
    model = tiny_checkpoint(tmp_path / "tiny.pth")
    result = gpen_cli("convert", tmp_path / "tiny.pth", tmp_path / "tiny.safetensors")
    assert result.returncode == 0, result.stderr
    tensors = load_file(tmp_path / "tiny.safetensors")
    assert torch.equal(tensors["final_linear.0.weight"], model.state_dict()["final_linear.0.weight"])
    assert load_generator(tmp_path / "tiny.safetensors").config == model.config


def test_outputs_are_never_overwritten(tmp_path):
    tiny_checkpoint(tmp_path / "tiny.pth")
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    result = gpen_cli("convert", tmp_path / "tiny.pth", existing)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert existing.read_bytes() == b"keep me"


def test_restore_an_image_file(tmp_path, astronaut):
    tiny_checkpoint(tmp_path / "tiny.pth")
    cv2.imwrite(str(tmp_path / "in.png"), astronaut[..., ::-1])
    result = gpen_cli("restore", "--model", tmp_path / "tiny.pth", tmp_path / "in.png", tmp_path / "out.png")
    assert result.returncode == 0, result.stderr
    assert "1 face(s) restored with GPEN-64" in result.stdout
    out = cv2.imread(str(tmp_path / "out.png"))
    assert out.shape == astronaut.shape and not np.array_equal(out[..., ::-1], astronaut)


def test_bad_model_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"")
    result = gpen_cli("convert", tmp_path / "bad.pth", tmp_path / "x.safetensors")
    assert result.returncode == 2 and "bad.pth is empty" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.safetensors").exists()
