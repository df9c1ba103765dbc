"""Which precision ``auto`` picks (ComfyUI's decisions on GPUs, the CPU's bf16 support), and that
half precision stays safe: no overflow from large latents or styles, non-finite batches rerun."""

import logging
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE
from gpen import execution, load_generator, pipeline
from gpen.bench import psnr
from gpen.options import RestoreOptions
from test_memory import scenario


def golden(name: str):
    tensors = load_file(REFERENCE / f"{name}.safetensors")
    return {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}, tensors["input"], tensors["output"]


def stressed(state_dict: dict, latent: float, styles: float) -> dict:
    """The same function in fp32 with a ``latent``-times larger latent (PixelNorm is scale-free)
    and ``styles``-times larger styles in every demodulated convolution (demodulation is too)."""
    out = dict(state_dict)
    for key in out:
        if key.startswith("final_linear.0."):
            out[key] = out[key] * latent
        elif ".conv.modulation." in key and "to_rgb" not in key:
            out[key] = out[key] * styles
    return out


@pytest.mark.parametrize("latent, styles", [(1000.0, 1.0), (1.0, 1e4), (1000.0, 1e4)])
def test_fp16_survives_large_latents_and_styles(latent, styles):
    """Before the guards: 11 dB (latent x1000) and NaN (styles x1e4)."""
    state_dict, x, _ = golden("golden_a")
    big = stressed(state_dict, latent, styles)
    with torch.inference_mode():
        plain = load_generator(state_dict)(x)
        fp32 = load_generator(big)(x)
        fp16 = load_generator(big, dtype=torch.float16)(x.half()).float()
    assert (fp32 - plain).abs().max().item() < 1e-4  # the stress leaves the function unchanged
    assert torch.isfinite(fp16).all()
    assert psnr(fp16, fp32) >= 60.0


def test_fp16_guards_leave_fp32_bit_identical():
    """The guards act on fp16 only: fp32 still computes exactly the authors' function."""
    state_dict, x, expected = golden("golden_b")
    with torch.inference_mode():
        out = load_generator(state_dict)(x)
    assert (out - expected).abs().max().item() <= 1e-4


def test_non_finite_half_batch_is_rerun_in_fp32(caplog):
    """A to-RGB bias past fp16's range makes the fp16 output infinite; restore notices, says so,
    and returns the fp32 result for that batch."""
    state_dict, x, _ = golden("golden_a")
    state_dict = dict(state_dict, **{"generator.to_rgb1.bias": torch.full((1, 3, 1, 1), 7e4)})
    crops = ((x + 1) / 2).movedim(1, -1)
    with torch.inference_mode():
        fp32 = pipeline.restore(load_generator(state_dict), crops, RestoreOptions(batch_size=2))
        half = load_generator(state_dict, dtype=torch.float16)
        assert not torch.isfinite(half(x.half())).all()
    with caplog.at_level(logging.WARNING, logger="gpen.pipeline"):
        out = pipeline.restore(half, crops, RestoreOptions(batch_size=2), dtype=torch.float16)
    assert "not finite" in caplog.text and "fp32" in caplog.text
    assert torch.isfinite(out).all() and (out - fp32).abs().max().item() < 1e-3


def _cpu_flags() -> set[str]:
    """Feature flags the kernel reports (Linux), to check PyTorch's report against."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))]
    return set(lines[0].split(":", 1)[1].split()) if lines else set()


def test_cpu_bf16_capability_agrees_with_the_kernel():
    native = execution.cpu_has_native_bf16()
    flags = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and flags:
        assert native == bool({"avx512_bf16", "amx_bf16"} & flags)
    elif platform.machine() in ("aarch64", "arm64") and flags:
        assert native == ("bf16" in flags)
    assert execution.cpu_auto_dtype() == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("name", ["golden_a", "golden_b"])
def test_cpu_auto_precision_is_close_to_fp32(name):
    """``auto`` on this CPU (bf16 exactly where the CPU has native bf16) stays within 45 dB of
    the authors' fp32 output, and so does bf16 on any CPU."""
    state_dict, x, expected = golden(name)
    for dtype in {execution.cpu_auto_dtype(), torch.bfloat16}:
        with torch.inference_mode():
            out = load_generator(state_dict, dtype=dtype)(x.to(dtype)).float()
        assert torch.isfinite(out).all() and psnr(out, expected) >= 45.0, dtype


GPUS = [
    dict(name="gtx1660", device="cuda", gpu="NVIDIA GeForce GTX 1660 SUPER", cc=[7, 5]),
    dict(name="gtx1080", device="cuda", gpu="NVIDIA GeForce GTX 1080", cc=[6, 1]),
    dict(name="t4", device="cuda", gpu="Tesla T4", cc=[7, 5]),
    dict(name="rtx3090", device="cuda", gpu="NVIDIA GeForce RTX 3090", cc=[8, 6]),
    dict(name="cpu", device="cpu"),
]


def test_auto_precision_follows_comfyui():
    """In the real ComfyUI: fp16 broken on GTX 16xx, fp32 faster on Pascal (Linux) -> fp32;
    fp16 on Turing/Ampere; a CPU with native bf16 -> bf16."""
    picked = scenario(precision=GPUS, native_bf16=True)
    assert picked["gtx1660"] == picked["gtx1080"] == "torch.float32"
    assert picked["t4"] == picked["rtx3090"] == "torch.float16"
    assert picked["cpu"] == "torch.bfloat16"


def test_force_fp32_wins_everywhere():
    picked = scenario(precision=GPUS, native_bf16=True, flags=["--force-fp32"])
    assert {picked[g["name"]] for g in GPUS} == {"torch.float32"}
