"""Fast paths (channels_last, fp16, bf16) against fp32, and the benchmark script itself."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE
from gpen import execution, load_generator
from gpen.bench import main as bench_main
from gpen.bench import psnr


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(REFERENCE / "golden_a.safetensors")
    state_dict = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    return state_dict, tensors["input"], tensors["output"]


def test_channels_last_matches(golden):
    state_dict, x, expected = golden
    model = load_generator(state_dict).to_channels_last()
    with torch.inference_mode():
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert (out - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 45.0), (torch.bfloat16, 35.0)])
def test_half_precision_is_close_to_the_official_fp32_output(golden, dtype, bound):
    """No overflow in demodulation or the mapping network: the output stays finite and close."""
    state_dict, x, expected = golden
    model = load_generator(state_dict, dtype=dtype)
    with torch.inference_mode():
        out = model(x.to(dtype)).float()
    assert torch.isfinite(out).all()
    value = psnr(out, expected)
    print(f"{dtype}: PSNR {value:.1f} dB, max abs {(out - expected).abs().max().item():.3g}")
    assert value >= bound


def test_benchmark_script_reports_every_path(capsys):
    rows = bench_main(["--sizes", "16", "--batches", "1", "2", "--repeats", "1", "--dtypes", "fp32",
                       "--authors", "--node"])
    auto = "bf16" if execution.cpu_has_native_bf16() else "fp32"
    assert [(r["batch"], r["path"]) for r in rows] == [
        (b, p) for b in (1, 2) for p in ("authors' formulation fp32", "fp32 eager", f"node path auto={auto}")]
    for row in rows:
        assert row["ms_per_face"] > 0 and row["first_s"] > 0
        if row["path"] != "node path auto=bf16":
            assert row["max_abs"] < 1e-4  # the authors' formulation computes what ours computes
    assert rows[0]["speedup"] == 1.0 and "vs base" in capsys.readouterr().out


def test_stage_benchmark_times_every_stage(capsys):
    rows = bench_main(["--stages", "--sizes", "32", "64", "--repeats", "1"])
    assert [r["size"] for r in rows] == [32, 64]
    for row in rows:
        for stage in ("detect_ms", "align_ms", "restore_ms", "paste_ms"):
            assert row[stage] > 0
        assert row["overhead_ms"] == row["detect_ms"] + row["align_ms"] + row["paste_ms"]
    assert "1 face(s)" in capsys.readouterr().out
