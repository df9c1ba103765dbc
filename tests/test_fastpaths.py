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


def test_model_benchmark_times_fp32_and_auto_and_says_what_it_skips(capsys, monkeypatch):
    """--models: a row per model in fp32 and in what auto runs it in here (bf16 on a CPU with
    native bf16: GFPGAN has no fp16); CodeFormer, its package missing, named as skipped and why."""
    from gpen import restorers

    monkeypatch.setattr(restorers, "has_codeformer", lambda: False)
    rows = bench_main(["--models", "GFPGAN", "CodeFormer", "--repeats", "1"])
    auto = "bf16" if execution.cpu_has_native_bf16() else "fp32"
    expected = [("GFPGAN", "fp32", auto == "fp32")] + ([("GFPGAN", "bf16", True)] if auto == "bf16" else [])
    assert [(r["model"], r["precision"], r["auto"]) for r in rows] == expected
    assert all(r["ms_per_face"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "CodeFormer: skipped, not installed here. CodeFormer needs the optional package spandrel_extra_arches" in out


def test_model_benchmark_covers_every_face_model():
    """--models with no names: GPEN-512, GFPGAN, RestoreFormer and CodeFormer (installed for the
    tests), each loaded as a user's file would be, in the precision asked (lowered as the nodes do)."""
    from gpen.bench import FACE_MODELS, face_models

    models = face_models(torch.device("cpu"), torch.float16)
    assert list(models) == list(FACE_MODELS) == ["GPEN-512", "GFPGAN", "RestoreFormer", "CodeFormer"]
    assert {name: next(m.parameters()).dtype for name, m in models.items()} == {
        "GPEN-512": torch.float16, "GFPGAN": torch.bfloat16, "RestoreFormer": torch.bfloat16,
        "CodeFormer": torch.bfloat16}


def test_stage_benchmark_times_every_stage(capsys):
    rows = bench_main(["--stages", "--sizes", "32", "64", "--repeats", "1"])
    assert [r["size"] for r in rows] == [32, 64]
    for row in rows:
        for stage in ("detect_ms", "align_ms", "restore_ms", "paste_ms"):
            assert row[stage] > 0
        assert row["overhead_ms"] == row["detect_ms"] + row["align_ms"] + row["paste_ms"]
    assert "1 face(s)" in capsys.readouterr().out
