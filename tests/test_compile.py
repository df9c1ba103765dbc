"""torch.compile as an option: same numbers as eager, one graph per padded batch shape, weights
moved or replaced (ComfyUI's offload/reload) without recompiling, eager when compiling fails."""

import os
import subprocess
import sys

import torch
from torch._dynamo.utils import counters

from conftest import REPO
from gpen import FullGenerator, GPENConfig, execution, pipeline
from gpen.options import RestoreOptions

CONFIG = GPENConfig(size=32, style_dim=16, n_mlp=2, narrow=1 / 32)


def small_model(seed: int = 0) -> FullGenerator:
    torch.manual_seed(seed)
    return FullGenerator(CONFIG).eval().requires_grad_(False).to_channels_last()


def test_compiled_restore_matches_eager_and_survives_weight_moves():
    model = small_model()
    crops = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    options = RestoreOptions(batch_size=2)  # 3 faces: batches of 2 and of 1, padded to 2
    eager = pipeline.restore(model, crops, options)
    state = execution.enable_compile(model)
    graphs = counters["stats"]["unique_graphs"]
    compiled = pipeline.restore(model, crops, options)
    assert state.failed is None
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one shape for both batches
    assert list(state.first_call_seconds) == [((2, 3, 32, 32), torch.float32, "cpu")]
    assert (compiled - eager).abs().max().item() < 1e-5
    # Offload and reload put new tensors under the same parameters (as ModelPatcher's
    # module.to does); here they also hold other values, which the compiled graph must read.
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.data = tensor.data.clone() * 1.25
    moved = pipeline.restore(model, crops, options)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    twin = small_model(seed=1)
    twin.load_state_dict(model.state_dict())
    assert (moved - pipeline.restore(twin, crops, options)).abs().max().item() < 1e-5
    assert (moved - compiled).abs().max().item() > 1e-3


FAILING_COMPILER = """
import logging, sys, torch
import torch._inductor.config as inductor
from gpen import execution
from test_compile import small_model
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
inductor.cpp.cxx = ("/nonexistent/c++",)  # as on a machine without a C++ compiler
inductor.fx_graph_cache = False
model = small_model()
x = torch.rand(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    out = execution.enable_compile(model)(x)
    assert torch.equal(out, model(x)), "eager fallback differs"
print("failed:", execution.forward_of(model).failed)
"""


def test_compile_failure_falls_back_to_eager_with_a_log_line():
    done = subprocess.run([sys.executable, "-c", FAILING_COMPILER], capture_output=True, text=True,
                          timeout=600, cwd=REPO / "tests",
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failed: " in done.stdout and "failed: None" not in done.stdout
    assert "gpen.execution: GPEN: torch.compile failed" in done.stderr
    assert "running the model eager instead" in done.stderr


def test_too_many_graphs_fall_back_to_eager_with_a_log_line(monkeypatch, caplog):
    """Past the graph limit the model runs eager and says so, instead of Dynamo silently
    dropping to eager at its own limit of 8 (reached by three model sizes at a few shapes)."""
    monkeypatch.setattr(execution, "GRAPH_LIMIT", 1)
    model = small_model(seed=2)
    state = execution.enable_compile(model)
    shapes = [torch.rand(n, 3, 32, 32).contiguous(memory_format=torch.channels_last) for n in (1, 3)]
    with torch.inference_mode(), caplog.at_level("WARNING", logger="gpen.execution"):
        outputs = [state(x) for x in shapes]  # the second shape at the latest exceeds the limit
        assert state.failed is not None and "RecompileLimit" in state.failed
        assert "running the model eager instead" in caplog.text
        for x, out in zip(shapes, outputs):
            assert (out - model(x)).abs().max().item() < 1e-5


def test_the_forward_compiles_to_one_graph_without_breaks():
    """A break (a Python-side branch on a tensor, an unsupported call) would split the forward
    into graphs with eager code between them; the bench prints the same count at full size."""
    from gpen.bench import graph_breaks

    assert graph_breaks(32, torch.device("cpu"), torch.float32) == (1, 0)
    assert graph_breaks(32, torch.device("cpu"), torch.bfloat16) == (1, 0)
