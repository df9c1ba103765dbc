"""GPEN under ComfyUI's memory manager on GPU hosts, and its memory estimate.

The placement scenarios run the real ComfyUI 0.3.75 modules and the pack's real nodes in a fresh
process each (ComfyUI keeps its loaded-model list in module state), with the ``meta`` device
standing in for the GPU and its free memory set per scenario (tests/comfy_memory.py). The
generator really runs on ``meta``, so a weight left on the CPU would fail there as on a GPU.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import COMFY_DIR, REFERENCE, REPO
from gpen import FullGenerator, GPENConfig, load_generator
from gpen.arch import peak_activation_bytes
from gpen.bench import PeakLiveBytes, measured_peak_bytes, memory as bench_memory

GIB = 2**30


def scenario(**spec) -> dict:
    spec["comfy_dir"] = str(COMFY_DIR)
    done = subprocess.run([sys.executable, str(REPO / "tests" / "comfy_memory.py"), json.dumps(spec)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_ran_fully_loaded(restore: dict, faces: int) -> None:
    assert restore["forwards"], "the generator never ran"
    assert all(f["misplaced"] == 0 and f["input"] == "meta" for f in restore["forwards"]), restore
    assert sum(f["batch"] for f in restore["forwards"]) == faces


# The three failing cases (fp16 unless said), then ComfyUI's low-VRAM modes.
PLACEMENTS = {
    "2048 batch 4, 4 GB card with 3.3 GiB free": dict(size=2048, gpu_gib=4, others_gib=0.7, faces=4,
                                                       batch_size=4),
    "2048 batch 16, 12 GB card": dict(size=2048, gpu_gib=12, others_gib=0.5, faces=16, batch_size=16),
    "512 batch 4, 1.3 GiB left by other processes": dict(size=512, gpu_gib=8, others_gib=6.7, faces=4,
                                                          batch_size=4),
    "--lowvram, 2048 batch 4, 4 GB card": dict(size=2048, gpu_gib=4, others_gib=0.7, faces=4, batch_size=4,
                                                flags=["--lowvram"]),
    "--novram, 512 batch 4": dict(size=512, gpu_gib=8, others_gib=6.7, faces=4, batch_size=4,
                                  flags=["--novram"]),
    "--novram, 2048 fp32 batch 2": dict(size=2048, dtype="fp32", gpu_gib=6, others_gib=0.5, faces=2,
                                        batch_size=2, flags=["--novram"]),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_every_weight_is_on_the_device_at_the_forward(name):
    spec = PLACEMENTS[name]
    result = scenario(**spec)
    expected_state = {"--lowvram": "LOW_VRAM", "--novram": "NO_VRAM"}.get(
        (spec.get("flags") or [""])[0], "NORMAL_VRAM")
    assert result["vram_state"] == expected_state
    assert_ran_fully_loaded(result["restore"], spec["faces"])
    # The batch the node chose fits in what was free once the model was loaded.
    largest = max(f["batch"] for f in result["restore"]["forwards"])
    assert largest * result["per_face_mib"] / 1024 <= result["free_after_gib"]
    # "Unload Models" gives the memory back.
    assert result["gpen_after_unload"][0] == 0


def test_diffusion_model_and_gpen_take_turns():
    """A 2 GiB diffusion model is loaded first on a 6 GB card (txt2img -> GPEN); GPEN must still
    run fully loaded; the next sampling run offloads GPEN; GPEN then runs fully loaded again."""
    result = scenario(size=2048, gpu_gib=6, others_gib=0.6, faces=4, batch_size=4, sd_gib=2.0)
    assert result["sd_on_gpu_before"][0] == result["sd_on_gpu_before"][1]
    assert_ran_fully_loaded(result["restore"], 4)
    on_gpu, total = result["gpen_after_sd_reload"]
    assert on_gpu < total  # ComfyUI made room for the diffusion model
    assert_ran_fully_loaded(result["restore_again"], 4)


def test_detector_is_under_the_memory_manager():
    result = scenario(size=512, gpu_gib=8, faces=1, batch_size=1, detector="mtcnn")
    loaded, total = result["detector_loaded"]
    assert loaded == total > 0 and result["detector_device_attr"] == "meta"
    assert result["detector_after_unload"][0] == 0


@pytest.mark.parametrize("config", [GPENConfig(64, 128, 8, 1, 1 / 16), GPENConfig(128, 64, 4, 2, 1 / 32),
                                    GPENConfig(256, narrow=0.25)], ids=["golden_a", "golden_b", "256w"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_memory_estimate_matches_the_measured_peak(config, dtype):
    """Live tensors of a real forward, tracked op by op, against the per-face estimate the batch
    cap uses (``python -m gpen.bench --memory`` does the same at 512/1024/2048)."""
    torch.manual_seed(0)
    model = FullGenerator(config).eval().requires_grad_(False).to(dtype).to_channels_last()
    for batch in (1, 2):
        x = (torch.rand(batch, 3, config.size, config.size) * 2 - 1).to(dtype)
        measured = measured_peak_bytes(model, x.contiguous(memory_format=torch.channels_last))
        ratio = peak_activation_bytes(config, dtype, batch) / measured
        assert 1.0 <= ratio <= 1.3, f"batch {batch}: estimate / measured = {ratio:.3f}"


def test_memory_estimate_matches_the_released_sizes_on_meta():
    """The released sizes (512/1024/2048) in every dtype, as ``python -m gpen.bench --memory
    --device meta`` measures them: allocations only, so 2048 in fp32 takes seconds."""
    rows = bench_memory([512, 1024, 2048], torch.device("meta"), ["fp32", "fp16", "bf16"])
    assert len(rows) == 9
    for row in rows:
        assert 1.0 <= row["ratio"] <= 1.3, row


def test_in_place_inference_cuts_the_peak_with_identical_output():
    """Inference (in place) against the same forward with gradient mode on, where every step is
    out of place as before: bit-identical output, at most 60% of the memory."""
    tensors = load_file(REFERENCE / "golden_a.safetensors")
    model = load_generator({k[3:]: v for k, v in tensors.items() if k.startswith("sd.")})
    x = tensors["input"]
    with torch.inference_mode():
        in_place = model(x)
    out_of_place = model(x)
    assert not out_of_place.requires_grad and torch.equal(in_place, out_of_place)
    tracker = PeakLiveBytes().ignore(*model.parameters(), *model.buffers())
    with tracker:
        model(x.clone())
    assert measured_peak_bytes(model, x) < 0.6 * tracker.peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_meta_device_measures_the_same_peak_as_the_cpu(dtype):
    """``python -m gpen.bench --memory --device meta`` (allocations without compute, for 2048 in
    every dtype) measures what a real forward allocates."""
    config = GPENConfig(128, narrow=1 / 8)
    peaks = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            model = FullGenerator(config)
        model = model.eval().requires_grad_(False).to(dtype).to_channels_last()
        x = torch.rand(2, 3, 128, 128, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        peaks.append(measured_peak_bytes(model, x))
    assert peaks[0] == peaks[1]
