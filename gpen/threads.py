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
from collections.abc import Iterator

import torch


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on: loaded process-wide with torch, so its symbols resolve
    from the process itself."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        runtime = ctypes.CDLL(None)
        runtime.omp_get_max_threads.restype = ctypes.c_int
        runtime.omp_set_num_threads.argtypes = (ctypes.c_int,)
        return runtime
    except (OSError, TypeError, AttributeError):  # no such symbols, or no process handle (Windows)
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
