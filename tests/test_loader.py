"""Loading: architecture detection from weights alone, containers, and refusal of bad files."""

import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_state_dict
from gpen import GPENConfig, ModelLoadError, load_generator
from gpen.loader import canonicalize, detect_config


@pytest.mark.parametrize("size", [512, 1024, 2048])
def test_released_layouts_load_strictly(size, manifests, tmp_path):
    manifest = manifests[size]
    state_dict = random_state_dict(manifest, seed=size)
    config = detect_config(state_dict)
    assert config == GPENConfig(**manifest["constructor"])
    path = tmp_path / f"GPEN-BFR-{size}.pth"
    torch.save(state_dict, path)
    model = load_generator(path)
    assert model.size == size and not model.training
    assert sum(p.numel() for p in model.parameters()) == manifest["n_params"]
    loaded = model.state_dict()
    assert set(loaded) == set(manifest["keys"])
    assert torch.equal(loaded["final_linear.0.weight"], state_dict["final_linear.0.weight"])


def test_safetensors_and_dtype(manifests, tmp_path):
    state_dict = random_state_dict(manifests[512])
    path = tmp_path / "gpen.safetensors"
    save_file(state_dict, str(path))
    model = load_generator(path, dtype=torch.bfloat16)
    assert model.config.size == 512
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("wrap", [
    lambda sd: {"params_ema": sd},
    lambda sd: {"g_ema": sd, "g": {}, "d": {"x": torch.zeros(1)}},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"anything": sd},
])
def test_containers_are_unwrapped(wrap):
    from gpen import FullGenerator

    state_dict = FullGenerator(GPENConfig(size=64, style_dim=32, n_mlp=3, narrow=1 / 16)).state_dict()
    flat = canonicalize(wrap(state_dict))
    assert set(flat) == set(state_dict)
    assert load_generator(wrap(state_dict)).config.n_mlp == 3


def _error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_generator(path)
    return str(info.value)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _Exploit(marker)}, path)
    message = _error(path)
    assert "evil.pth" in message and "refused" in message
    assert not marker.exists()


def test_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pt"
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    assert "evil_legacy.pt" in _error(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, expected", [
    (b"", "empty"),
    (os.urandom(4096), "could not be read"),
    (b"\x08\x07\x12\x07pytorch\x1a\x032.0", "ONNX"),
])
def test_bad_bytes(tmp_path, content, expected):
    path = tmp_path / "GPEN-BFR-512.pth"
    path.write_bytes(content)
    message = _error(path)
    assert expected in message and "GPEN-BFR-512.pth" in message


def test_truncated_checkpoint(tmp_path, gpen512_file):
    path = tmp_path / "cut.pth"
    path.write_bytes(gpen512_file.read_bytes()[:100_000])
    assert "could not be read" in _error(path)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    assert "could not be read" in _error(path)


def test_onnx_suffix(tmp_path):
    path = tmp_path / "GPEN-BFR-512.onnx"
    path.write_bytes(b"\x08\x07")
    assert "ONNX" in _error(path)


def test_missing_file(tmp_path):
    assert "not found" in _error(tmp_path / "gone.pth")


@pytest.mark.parametrize("keys, expected", [
    (["conv_body_first.weight", "stylegan_decoder.style_mlp.1.weight"], "GFPGAN"),
    (["quantize.embedding.weight", "ft_layers.0.self_attn.in_proj_weight"], "CodeFormer"),
    (["ClassHead.0.conv1x1.weight", "body.conv1.weight"], "RetinaFace"),
])
def test_other_architectures_are_named(tmp_path, keys, expected):
    path = tmp_path / "model.pth"
    torch.save({k: torch.zeros(2, 2) for k in keys}, path)
    message = _error(path)
    assert expected in message and "model.pth" in message


def test_missing_and_misshaped_keys_are_named(tmp_path, manifests):
    state_dict = random_state_dict(manifests[512])
    del state_dict["generator.convs.3.noise.weight"]
    path = tmp_path / "damaged.pth"
    torch.save(state_dict, path)
    assert "generator.convs.3.noise.weight" in _error(path)

    state_dict = random_state_dict(manifests[512])
    state_dict["generator.to_rgbs.2.bias"] = torch.zeros(1, 4, 1, 1)
    torch.save(state_dict, path)
    message = _error(path)
    assert "generator.to_rgbs.2.bias" in message and "[1, 4, 1, 1]" in message


def test_model_file_is_not_modified(gpen512_file):
    before = (gpen512_file.stat().st_mtime_ns, gpen512_file.stat().st_size)
    load_generator(gpen512_file)
    assert (gpen512_file.stat().st_mtime_ns, gpen512_file.stat().st_size) == before
