"""How the generator runs on a device: the precision ``auto`` picks, torch.compile, and the
checks around a forward (every weight on the device, a finite half-precision result).

No ComfyUI here: the nodes ask ComfyUI for its GPU precision decisions and use
``cpu_has_native_bf16`` for CPUs, where ComfyUI always says fp32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import weakref
from collections.abc import Callable, Iterator

import torch

from .arch import FullGenerator

logger = logging.getLogger(__name__)

Forward = Callable[..., torch.Tensor]  # (x, *fidelity) -> restored


class DevicePlacementError(ValueError):
    """Weights not on the device the forward runs on; the message names the first one."""


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices in hardware (x86 AMX-BF16 or AVX512-BF16,
    Arm BF16), as PyTorch's cpuinfo reports it: there oneDNN runs bf16 convolutions natively.
    Elsewhere bf16 is emulated, several times slower than fp32 (``python -m gpen.bench``)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # public API of recent torch
    if capabilities is not None:
        found = capabilities()
        return any(bool(found.get(flag)) for flag in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))
    # Older torch: its own (private) x86 queries, as torch._inductor uses them.
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def bf16_supported(device: torch.device | str) -> bool:
    """Whether a model without fp16 falls back to bf16 on ``device`` rather than to fp32. On CUDA
    the card must compute bf16 itself (compute capability 8 on: what ComfyUI's
    ``should_use_bf16`` tells the nodes); older cards only emulate it, slower than fp32. A CPU
    computes bf16 (where it is not native, ``auto`` picks fp32 in the first place)."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def cpu_auto_dtype() -> torch.dtype:
    """``auto`` precision on a CPU: bf16 where it is native, else fp32."""
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def default_dtype(device: torch.device | str) -> torch.dtype:
    """``auto`` precision without ComfyUI (command line, benchmark): fp16 on CUDA, the CPU rule on
    a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    return cpu_auto_dtype() if device.type == "cpu" else torch.float32


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def misplaced_tensors(model: torch.nn.Module, device: torch.device | str) -> list[tuple[str, torch.device]]:
    """(name, device) of every weight or buffer of ``model`` that is not on ``device``."""
    device = torch.device(device)
    return [(name, t.device) for name, t in (*model.named_parameters(), *model.named_buffers())
            if not _same_device(t.device, device)]


def check_on_device(model: torch.nn.Module, device: torch.device | str) -> None:
    """Raise a clear error if any weight or buffer is not on ``device`` (a partial load by a
    memory manager would otherwise fail deep inside the forward)."""
    misplaced = misplaced_tensors(model, device)
    if misplaced:
        name, where = misplaced[0]
        total = len(list(model.parameters())) + len(list(model.buffers()))
        raise DevicePlacementError(
            f"GPEN cannot run on {device}: {len(misplaced)} of its {total} weights are elsewhere "
            f"(first: '{name}' on {where}), i.e. the model was only partly loaded onto the device. "
            f"Free memory (Unload Models, a smaller batch_size) and run again; if it persists, "
            f"report it with ComfyUI's log.")


def _forward(model: torch.nn.Module, x: torch.Tensor, *fidelity: float) -> torch.Tensor:
    return model(x, *fidelity)


# One compiled function per kind of device, shared by every model: the model is an argument and
# its weights graph inputs, so a graph (per input shape, dtype and device) serves any model of
# the same architecture, and weights moved or replaced, as ComfyUI's offload/reload does, need
# no recompilation. Dynamo keeps the graphs for the life of the process (and Inductor caches
# their code on disk, so a restarted process compiles much faster). CUDA replays them as CUDA
# graphs ("reduce-overhead"), which is why batches are padded to one shape.
_COMPILED_FORWARD: dict[str, Forward] = {}

# Graphs the shared compiled forward may hold. Dynamo's own limit (8 per function) is reached by
# an ordinary session (three model sizes, each at a few batch shapes and dtypes), after which it
# would silently run eager; past this higher one the call fails and the model runs eager, logged.
GRAPH_LIMIT = 64


def _graph_limit() -> dict[str, object]:
    """Dynamo settings for ``GRAPH_LIMIT``, under the names this torch knows (torch 2.7 renamed
    cache_size_limit / fail_on_cache_limit_hit and keeps the old names as aliases)."""
    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):
        return {"recompile_limit": GRAPH_LIMIT, "fail_on_recompile_limit_hit": True}
    return {"cache_size_limit": GRAPH_LIMIT, "fail_on_cache_limit_hit": True}


def _compiled_forward(device_type: str) -> Callable[..., torch.Tensor]:
    if device_type not in _COMPILED_FORWARD:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED_FORWARD[device_type] = torch.compile(_forward, mode=mode, dynamic=False)
    return _COMPILED_FORWARD[device_type]


class CompiledGenerator:
    """A restorer's forward through torch.compile; falls back to eager, with a log line, if
    compiling or the compiled call fails for any reason but memory. Holds the model weakly."""

    def __init__(self, model: torch.nn.Module):
        self._model = weakref.ref(model)
        self.failed: str | None = None
        self.first_call_seconds: dict[tuple, float] = {}

    def __call__(self, x: torch.Tensor, *fidelity: float) -> torch.Tensor:
        model = self._model()
        if model is None:
            raise ReferenceError("the compiled GPEN model has been freed")
        if self.failed:
            return model(x, *fidelity)
        key = (tuple(x.shape), x.dtype, x.device.type)
        start = time.perf_counter()
        try:
            if x.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # outputs are copied out before the next call
            forward = _compiled_forward(x.device.type)  # torch.compile imports torch._dynamo
            with torch._dynamo.config.patch(**_graph_limit()):
                out = forward(model, x, *fidelity)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # compiler/toolchain failures come in many types; all mean "use eager"
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning("GPEN: torch.compile failed (%s); running the model eager instead.", self.failed)
            return model(x, *fidelity)
        if key not in self.first_call_seconds:
            self.first_call_seconds[key] = time.perf_counter() - start
            logger.info("GPEN: first compiled call for %s %s on %s took %.1f s (compiling)",
                        list(key[0]), key[1], key[2], self.first_call_seconds[key])
        return out


# Per-model compile state; the values hold their model only weakly, so a model no longer used
# (another checkpoint loaded) is freed with its weights.
_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, CompiledGenerator] = weakref.WeakKeyDictionary()


def enable_compile(model: torch.nn.Module) -> CompiledGenerator:
    """Mark ``model`` to run through torch.compile from now on (idempotent)."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledGenerator(model)
    return _COMPILED[model]


def is_compiled(model: torch.nn.Module) -> bool:
    return model in _COMPILED


@contextlib.contextmanager
def layer_steps(model: torch.nn.Module, on_step: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``on_step(done, total)`` after each encoder and decoder convolution block of every
    eager forward of ``model``: progress within a batch of faces, and a point to stop it (an
    exception raised by ``on_step``, e.g. ComfyUI's cancel, ends the forward there). A compiled
    model is left alone (hooks would break its graph), and so is any other architecture: its
    progress moves per batch (``restore_crops`` reports after each)."""
    if is_compiled(model) or not isinstance(model, FullGenerator):
        yield
        return
    blocks = [*model.encoders(), model.generator.conv1, *model.generator.convs]
    handles = [block.register_forward_hook(lambda *_, done=done: on_step(done, len(blocks)))
               for done, block in enumerate(blocks, start=1)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_of(model: torch.nn.Module) -> Forward:
    """What to call for a forward of ``model``: its compiled form if enabled, else the model."""
    return _COMPILED.get(model, model)


def fp32_rerun(model: torch.nn.Module, x: torch.Tensor, *fidelity: float) -> torch.Tensor:
    """The forward in fp32 (eager) on a temporary fp32 copy of the weights, beside the model:
    for a half-precision batch whose output was not finite."""
    if isinstance(model, FullGenerator):
        with torch.device("meta"):
            fp32 = FullGenerator(model.config)
        fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, assign=True)
    else:  # spandrel's modules are built by their loaders: copy this one instead
        fp32 = copy.deepcopy(model).float()
    fp32.eval().requires_grad_(False)
    with torch.inference_mode():
        return fp32(x.float(), *fidelity)
