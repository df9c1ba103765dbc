"""Freed memory kept for reuse while faces are restored, and handed back afterwards (glibc).

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it on free, so each large tensor of a forward -- a 512 face's activations are 16-64 MiB
each -- is faulted in again, page by page, on every call: measured here, 160,000 page faults and
0.4 s of kernel time per bf16 GPEN-512 forward (850 ms eager, 505 ms without them). While
``reuse_freed_memory`` is entered, large blocks come from the heap instead and freed ones stay
there for the next forward; on leaving, the thresholds are set to what glibc's own ones settle
at in such a process (glibc keeps no earlier value to go back to). Where a user tuned malloc
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES=glibc.malloc.*``) their
settings are left alone.
Whoever ends a run hands what is free back with ``release_freed_memory`` (the frame engine every
32 frames and at its end, ``pipeline.restore`` after its batch), so a server's memory does not
stay up after a run; not after every batch, whose blocks the next batch would fault in again.

Worker threads allocate from their own arenas, whose heaps hold at most 64 MiB: blocks larger
than that are still mapped on every call there (about 15% of the faults of a 512 bf16 forward).
Elsewhere than glibc (macOS, Windows, musl) all of this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# What glibc's dynamic thresholds settle at in a process that frees large blocks (64-bit): the
# mmap threshold rises to the size of freed mapped blocks, up to 32 MiB, trim at twice that.
STEADY_MMAP_THRESHOLD = 32 << 20
STEADY_TRIM_THRESHOLD = 64 << 20
HELD = 2**31 - 1  # the largest value mallopt takes: blocks up to 2 GiB from the heap, nothing trimmed
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_users = 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def _user_tuned_malloc() -> bool:
    return any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> None:
    """Each threshold on its own; an mmap threshold glibc refuses (some releases take at most
    32 MiB on 64-bit) falls back to that 32 MiB, which still keeps most activations."""
    libc = _libc()
    if libc is None or _user_tuned_malloc():
        return
    if not libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


def release_freed_memory() -> None:
    """Hand every free page of every heap back to the system (``malloc_trim``): a long video's
    frame-sized blocks otherwise stay behind, fragmented, and a server's memory creeps up
    (measured: 1.3 -> 1.6 GB over 1,200 720p frames)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within it, large freed blocks are kept for the next allocation instead of being unmapped
    (see the module docstring); nested and concurrent uses share one hold, ended by the last to
    leave."""
    global _users
    with _lock:
        _users += 1
        if _users == 1:
            _set_thresholds(HELD, HELD)
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _set_thresholds(STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD)
