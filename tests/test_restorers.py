"""GFPGAN, RestoreFormer and CodeFormer load through our loader and restore through our path.

Each architecture is spandrel's own class with the release hyperparameters and random weights,
so its state dict has the released key layout; the reference is that class's own forward.
"""

import contextlib
import inspect
import re
import sys

import numpy as np
import pytest
import torch
from facexlib.utils import face_restoration_helper
from safetensors.torch import save_file

from conftest import FACE_ARCHES, _evil_pickle
from gpen import FullGenerator, GPENConfig, ModelLoadError, pipeline
from gpen.align import alignment
from gpen.bench import measured_peak_bytes
from gpen.options import RestoreOptions
from gpen.restorers import (FFHQ_TEMPLATE_512, SpandrelFace, activation_bytes, check_face_model,
                            load_face_model)


def own_forward(name: str, net: torch.nn.Module, x: torch.Tensor, fidelity: float) -> torch.Tensor:
    """The architecture's forward as its authors call it, -1..1 in and out (GFPGAN on its fixed
    noise buffers, which is what makes it deterministic)."""
    if name == "CodeFormer":
        return net(x, weight=fidelity)[0]
    if name == "GFPGAN":
        return net(x, return_rgb=False, randomize_noise=False)[0]
    return net(x)[0]


@pytest.fixture(params=list(FACE_ARCHES))
def released(request, face_weights):
    return face_weights(request.param)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_restore_path_equals_own_forward(released, suffix):
    name, net, pth, safetensors = released
    model = load_face_model(pth if suffix == ".pth" else safetensors).to_channels_last()
    assert isinstance(model, SpandrelFace) and model.name == name and model.size == 512
    assert model.has_fidelity == (name == "CodeFormer")
    assert np.array_equal(model.template, FFHQ_TEMPLATE_512)
    torch.manual_seed(1)
    crops = torch.rand(1, 3, 512, 512)
    out = pipeline.restore_crops(model, crops, RestoreOptions(fidelity=0.7))
    with torch.inference_mode():
        expected = ((own_forward(name, net, crops * 2 - 1, 0.7) + 1) / 2).clamp(0, 1)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()
    assert out.std() > 0.01  # a real picture, not a constant


def test_codeformer_fidelity_changes_the_face(face_weights):
    model = load_face_model(face_weights("CodeFormer")[2])
    crops = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    low, high = (pipeline.restore_crops(model, crops, RestoreOptions(fidelity=w)) for w in (0.0, 1.0))
    assert (low - high).abs().max() > 1e-3


@pytest.mark.parametrize("requested, bf16_ok, expected", [
    (torch.float16, True, torch.bfloat16),
    (torch.float16, False, torch.float32),
    (torch.bfloat16, True, torch.bfloat16),
])
def test_precision_follows_the_architecture(released, requested, bf16_ok, expected):
    _, _, _, safetensors = released
    model = load_face_model(safetensors, dtype=requested, bf16_ok=bf16_ok)
    assert {p.dtype for p in model.parameters()} == {expected}


# Reduced precision against fp32 through restore_crops, the astronaut as the crop (output 0..1):
# the (mean, 99th percentile) of |difference| allowed, about twice what was measured here (in
# brackets). bf16 keeps 8 significant bits (a rounding is 0.2%), fp16 11. GPEN and GFPGAN are
# continuous, so their error stays at a few roundings. RestoreFormer and CodeFormer pick one
# codebook entry per 32x32 patch, and a rounding flips a near tie: RestoreFormer's random
# codebook is tiny and almost equidistant from every feature (245 of 256 picks flip, the picture
# hardly moves); CodeFormer flips 9 of 256 picks among large entries, the rest of its error
# being that of a continuous net (test_codeformer_bf16_differs_from_fp32_by_its_code_picks).
PRECISION_TOLERANCE = {
    ("GPEN", torch.bfloat16): (0.006, 0.025),  # [0.0033, 0.0122]
    ("GPEN", torch.float16): (0.001, 0.003),  # [0.0004, 0.0013]
    ("GFPGAN", torch.bfloat16): (0.004, 0.015),  # [0.0018, 0.0073]
    ("RestoreFormer", torch.bfloat16): (0.025, 0.15),  # [0.011, 0.073]
    ("CodeFormer", torch.bfloat16): (0.1, 0.5),  # [0.055, 0.28]
}


def face_crop(astronaut, size: int = 512) -> torch.Tensor:
    crop = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(crop, size=size, mode="area") if size != 512 else crop


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean, 99th percentile) of |a - b|."""
    error = (a - b).abs().flatten()
    return error.mean().item(), error.quantile(0.99).item()


@pytest.mark.parametrize("name", ["GPEN", *FACE_ARCHES])
def test_reduced_precision_restores_as_fp32_does(name, face_weights, astronaut):
    """bf16, and fp16 where asked (GPEN runs it; the others run bf16 instead), through the
    pipeline's restore step, against fp32: within PRECISION_TOLERANCE, finite, and not fp32's
    own result (the reduced precision really ran). GPEN is a small random generator (fp16
    convolutions are emulated on a CPU: 512 would take minutes)."""
    if name == "GPEN":
        torch.manual_seed(0)
        source, crops = FullGenerator(GPENConfig(128, narrow=1 / 8)).state_dict(), face_crop(astronaut, 128)
    else:
        source, crops = face_weights(name)[3], face_crop(astronaut)
    options = RestoreOptions(fidelity=0.5)
    reference = pipeline.restore_crops(load_face_model(source), crops, options)
    outputs = {}
    for requested in (torch.bfloat16, torch.float16):
        model = load_face_model(source, dtype=requested)
        dtype = next(model.parameters()).dtype
        outputs[requested] = out = pipeline.restore_crops(model, crops, options, dtype=dtype)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert not torch.equal(out, reference)
        mean, p99 = difference(out, reference)
        print(f"{name} {requested} (runs {dtype}): mean {mean:.4f}, p99 {p99:.4f}")
        if dtype == requested:
            allowed_mean, allowed_p99 = PRECISION_TOLERANCE[name, dtype]
            assert mean <= allowed_mean and p99 <= allowed_p99, (name, dtype, mean, p99)
        else:  # fp16 asked of a model without it: the bf16 run, exactly
            assert dtype == torch.bfloat16 and torch.equal(out, outputs[torch.bfloat16])


def test_codeformer_bf16_differs_from_fp32_by_its_code_picks(face_weights, astronaut):
    """With fp32's codebook picks handed to the bf16 forward, CodeFormer in bf16 is as close to
    fp32 as a continuous net: its larger free-running error is the few flipped picks."""
    _, _, _, safetensors = face_weights("CodeFormer")
    crops = face_crop(astronaut)
    fp32, bf16 = load_face_model(safetensors), load_face_model(safetensors, dtype=torch.bfloat16)
    picks = []
    lookup_fp32, lookup_bf16 = fp32.net.quantize.get_codebook_feat, bf16.net.quantize.get_codebook_feat
    fp32.net.quantize.get_codebook_feat = lambda indices, shape: lookup_fp32(picks.append(indices) or indices, shape)
    reference = pipeline.restore_crops(fp32, crops)
    free = pipeline.restore_crops(bf16, crops, dtype=torch.bfloat16)
    bf16.net.quantize.get_codebook_feat = lambda indices, shape: lookup_bf16(picks[0].view_as(indices), shape)
    pinned = pipeline.restore_crops(bf16, crops, dtype=torch.bfloat16)
    free_mean, _ = difference(free, reference)
    mean, p99 = difference(pinned, reference)
    print(f"CodeFormer bf16 with fp32's picks: mean {mean:.4f}, p99 {p99:.4f} (free: mean {free_mean:.4f})")
    assert mean <= 0.025 and p99 <= 0.1 and mean < free_mean / 3


def test_cli_and_cluster_lower_fp16_as_the_node_does(face_weights, monkeypatch):
    """load_restorer (the command line and every cluster worker) takes fp16 for a model without
    it to bf16 only where the device computes bf16, as Load GPEN Model does: on a CPU here, and
    to fp32 where ``bf16_supported`` says no (a pre-Ampere GPU)."""
    from gpen import execution
    from gpen.engine import load_restorer

    _, _, _, safetensors = face_weights("GFPGAN")
    restorer = load_restorer(safetensors, "cpu", torch.float16)
    assert restorer.dtype == torch.bfloat16
    monkeypatch.setattr(execution, "bf16_supported", lambda device: False)
    restorer = load_restorer(safetensors, "cpu", torch.float16)
    assert restorer.dtype == torch.float32 and {p.dtype for p in restorer.model.parameters()} == {torch.float32}


def test_bf16_counts_on_cuda_only_where_the_card_computes_it(monkeypatch):
    """ComfyUI's should_use_bf16 says yes from compute capability 8 on; torch's check counts
    emulated bf16 too unless asked not to."""
    from gpen import execution

    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or False)
    assert not execution.bf16_supported("cuda:0") and asked == [False]
    assert execution.bf16_supported("cpu")


def test_the_cluster_check_reads_the_file_but_builds_nothing(released, monkeypatch):
    """check_face_model names the architecture of each released layout, with the network's
    constructor made to fail (so nothing was built), and refuses what loading refuses."""
    name, net, pth, safetensors = released

    def never(*args, **kwargs):
        raise AssertionError("the network was built")
    monkeypatch.setattr(type(net), "__init__", never)
    assert check_face_model(pth) == check_face_model(safetensors) == name
    with pytest.raises(ModelLoadError, match="the network was built"):  # loading does build it
        load_face_model(safetensors)


def test_the_cluster_check_refuses_what_loading_refuses(tmp_path, gpen512_file):
    from spandrel.architectures.Compact import Compact

    assert check_face_model(gpen512_file) == "GPEN"
    save_file(Compact().state_dict(), str(tmp_path / "4x-compact.safetensors"))
    torch.save({"some.weight": torch.zeros(3)}, tmp_path / "mystery.pth")
    (tmp_path / "evil.pth").write_bytes(_evil_pickle(tmp_path / "pwned"))
    for bad, message in (("4x-compact.safetensors", "not a face restorer"), ("mystery.pth", "Supported: GPEN"),
                         ("evil.pth", "refused")):
        with pytest.raises(ModelLoadError, match=message):
            check_face_model(tmp_path / bad)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_activation_estimate_matches_the_measured_peak(released, dtype):
    """The per-face estimate the batch cap uses against the live tensors of real forwards,
    tracked op by op on ``meta`` (allocations only: seconds), for batches of 1 and 2."""
    name, _, _, safetensors = released
    model = load_face_model(safetensors).to(device="meta", dtype=dtype)
    for batch in (1, 2):
        x = torch.zeros(batch, 3, 512, 512, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
        ratio = batch * activation_bytes(model, dtype) / measured_peak_bytes(model, x)
        assert 1.0 <= ratio <= 1.3, f"{name} batch {batch}: estimate / measured = {ratio:.3f}"


def test_meta_measures_the_peak_a_cpu_forward_has(released):
    """What the estimate test measures on ``meta`` is what a real forward allocates (bf16: the
    quickest real forward here)."""
    _, _, _, safetensors = released
    peaks = []
    for device in ("cpu", "meta"):
        model = load_face_model(safetensors).to(device=device, dtype=torch.bfloat16)
        x = torch.rand(1, 3, 512, 512).to(device=device, dtype=torch.bfloat16)
        peaks.append(measured_peak_bytes(model, x.contiguous(memory_format=torch.channels_last)))
    assert peaks[0] == peaks[1]


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".bin"])
def test_code_running_pickle_is_refused(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"CodeFormer{suffix}"
    path.write_bytes(_evil_pickle(marker))
    with pytest.raises(ModelLoadError, match="refused"):
        load_face_model(path)
    assert not marker.exists()


def test_other_files_say_what_they_are_and_what_is_supported(tmp_path, face_weights):
    torch.save({"conv_body_first.weight": torch.zeros(1)}, tmp_path / "GFPGANv1.4.pth")
    with pytest.raises(ModelLoadError, match="GFPGAN") as partial:
        load_face_model(tmp_path / "GFPGANv1.4.pth")
    assert "Supported" in str(partial.value)
    _, _, gfpgan, _ = face_weights("GFPGAN")
    state_dict = torch.load(gfpgan, weights_only=True)["params_ema"]
    state_dict["final_linear.weight"] = state_dict["final_linear.weight"][:, :7]  # one tensor cut short
    torch.save(state_dict, tmp_path / "GFPGANv1.3.pth")
    with pytest.raises(ModelLoadError, match=r"GFPGANv1.3.pth looks like GFPGAN but its tensors do not fit it \(.*\)"
                                             r"\. Supported: GPEN-BFR.*download it again\.") as mismatch:
        load_face_model(tmp_path / "GFPGANv1.3.pth")
    assert len(str(mismatch.value)) < 500, "one line of the cause, not torch's list of every key"
    torch.save({"some.weight": torch.zeros(3)}, tmp_path / "mystery.pth")
    with pytest.raises(ModelLoadError, match="mystery.pth.*Supported: GPEN-BFR.*CodeFormer"):
        load_face_model(tmp_path / "mystery.pth")
    torch.save({"ClassHead.0.conv1x1.weight": torch.zeros(4, 64, 1, 1)}, tmp_path / "detection_Resnet50_Final.pth")
    with pytest.raises(ModelLoadError, match="not a face restorer this pack runs: it looks like a RetinaFace face "
                                             "detector: it belongs in models/facedetection"):
        load_face_model(tmp_path / "detection_Resnet50_Final.pth")


def test_codeformer_without_its_package_says_how_to_get_it(face_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel_extra_arches", None)  # as if not installed
    with pytest.raises(ModelLoadError, match="CodeFormer.pth is CodeFormer: CodeFormer needs the optional package "
                                             r"spandrel_extra_arches \(pip install spandrel_extra_arches; "
                                             r"CodeFormer's licence is non-commercial\)"):
        load_face_model(face_weights("CodeFormer")[2])


def test_an_upscaler_is_sent_to_load_upscale_model(tmp_path):
    from spandrel.architectures.Compact import Compact

    save_file(Compact().state_dict(), str(tmp_path / "4x-compact.safetensors"))
    with pytest.raises(ModelLoadError, match="not a face restorer.*Load Upscale Model"):
        load_face_model(tmp_path / "4x-compact.safetensors")


def test_template_is_facexlibs():
    source = inspect.getsource(face_restoration_helper.FaceRestoreHelper.__init__)
    pairs = re.findall(r"\[(\d+\.\d+), (\d+\.\d+)\]", source)[:5]  # the first array: 5 points
    assert np.allclose(np.array(pairs, dtype=float), FFHQ_TEMPLATE_512)


def test_alignment_targets_the_models_template(released):
    _, _, _, safetensors = released
    model = load_face_model(safetensors)
    landmarks = FFHQ_TEMPLATE_512 * 0.5 + [40.0, 25.0]
    affine = alignment(landmarks, model.size, model.template)
    placed = landmarks @ affine[:, :2].T + affine[:, 2]
    assert np.allclose(placed, FFHQ_TEMPLATE_512, atol=1e-6)
    assert not np.allclose(alignment(landmarks, 512), affine)  # GPEN's template differs
