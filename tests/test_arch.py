"""The generator computes what the authors' FullGenerator computes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE
from gpen import FullGenerator, GPENConfig, load_generator
from gpen.arch import upfirdn2d


@pytest.mark.parametrize("name", ["golden_a", "golden_b"])
def test_matches_official_output(name):
    tensors = load_file(REFERENCE / f"{name}.safetensors")
    meta = json.loads((REFERENCE / f"{name}.json").read_text())
    state_dict = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    model = load_generator(state_dict)
    assert model.config == GPENConfig(**meta["constructor"])
    assert sum(p.numel() for p in model.parameters()) == meta["n_params"]
    with torch.no_grad():
        out = model(tensors["input"])
    assert out.shape == tensors["output"].shape
    error = (out - tensors["output"]).abs().max().item()
    assert error <= 1e-4, f"max abs error {error}"


def test_forward_returns_tensor_of_input_size():
    model = FullGenerator(GPENConfig(size=32, style_dim=16, n_mlp=2, narrow=1 / 32)).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 3, 32, 32)


def test_batch_items_are_independent():
    """Activation modulation must not mix styles between faces of one batch."""
    torch.manual_seed(0)
    model = FullGenerator(GPENConfig(size=64, style_dim=32, n_mlp=2, narrow=1 / 16)).eval()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert (together - alone).abs().max().item() < 1e-4


def test_upfirdn2d_against_direct_definition():
    """Zero-insertion upsampling then FIR filtering, written out with explicit loops."""
    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 5)
    kernel = torch.rand(4, 4)
    out = upfirdn2d(x, kernel, up=2, pad=(2, 1))
    up = torch.zeros(1, 2, 10, 10)
    up[..., ::2, ::2] = x
    padded = torch.nn.functional.pad(up, (2, 1, 2, 1))
    flipped = kernel.flip((0, 1))
    expected = torch.zeros_like(out)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            expected[..., i, j] = (padded[..., i:i + 4, j:j + 4] * flipped).sum((-1, -2))
    assert torch.allclose(out, expected, atol=1e-5)
