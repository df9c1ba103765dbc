"""How many cores torch's CPU operations use on the calling thread.

The frame engine runs detection, alignment and paste-back on three threads at once. Each torch
CPU operation would also split itself over every core (OpenMP), so on two cores six threads
compete for two, and every small operation waits out a scheduler time slice for whichever of
its helpers is not running: measured here, one face's alignment and paste-back at 1080p took
89-890 ms that way against 50-54 ms on one core each. Inside ``on_this_thread_only`` the calling
thread's operations run on that thread alone, and the stages run side by side instead. Other
threads keep their settings: OpenMP keeps the thread count per thread.

Where torch does not run on OpenMP (or its runtime cannot be found), nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def _torch_runtimes() -> list[ctypes.CDLL]:
    """The OpenMP libraries torch ships (``torch/lib``, ``torch.libs``) that this process has
    loaded: torch's own runtime, even where another package loaded a second one globally."""
    package = Path(torch.__file__).parent
    candidates = [path for folder in (package / "lib", package.parent / "torch.libs") if folder.is_dir()
                  for path in sorted(folder.iterdir()) if "omp" in path.name.lower()]
    loaded = []
    for path in candidates:
        try:
            loaded.append(ctypes.CDLL(str(path), mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL))
        except OSError:  # shipped but not loaded (or not loadable here)
            continue
    return loaded


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on: the one it ships where loaded, else whichever the
    process resolves ``omp_*`` to."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for runtime in [*_torch_runtimes(), None]:
        try:
            runtime = runtime if runtime is not None else ctypes.CDLL(None)
            runtime.omp_get_max_threads.restype = ctypes.c_int
            runtime.omp_set_num_threads.argtypes = (ctypes.c_int,)
            return runtime
        except (OSError, TypeError, AttributeError):  # no such symbols, or no process handle (Windows)
            continue
    return None


@contextlib.contextmanager
def on_this_thread_only() -> Iterator[None]:
    """Torch CPU operations called from this thread run on it alone within the block."""
    runtime = _openmp()
    if runtime is None:
        yield
        return
    torch.get_num_threads()  # torch sets this thread's count lazily, once: before ours, not after
    before = runtime.omp_get_max_threads()
    runtime.omp_set_num_threads(1)
    try:
        yield
    finally:
        runtime.omp_set_num_threads(before)
