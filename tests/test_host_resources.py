"""The host's memory allocator and CPU threads, as the pack uses them: large freed blocks kept
for the next forward while restoring (and handed back when released), and the frame engine's
stages on one core each."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

from conftest import REPO
from gpen import heap, threads

# Run in a fresh process: where glibc places a block depends on everything the process
# allocated before, and a test suite's heap is anyone's guess.
HEAP_PROBE = """
import resource, sys
import psutil, torch
from gpen import heap

BLOCK = 64 << 20  # a 512 face's largest bf16 activation; above glibc's largest mmap threshold
PAGES = BLOCK // resource.getpagesize()


def faults(smaller_by=0):
    # Page faults of allocating, writing and freeing a tensor of BLOCK less smaller_by MiB. A
    # freed block serves a request of its own size only once merged with a neighbour (torch
    # asks for 64 bytes more than it uses, to align), so each request is a little smaller.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(BLOCK - (smaller_by << 20), dtype=torch.uint8)
    block.fill_(1)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


outside = [faults(n) for n in range(3)]
with heap.reuse_freed_memory():
    inside = [faults(n) for n in range(3, 6)]
    with heap.reuse_freed_memory():
        faults(6)
    nested = faults(7)  # the inner exit kept the hold
held = psutil.Process().memory_info().rss
heap.release_freed_memory()
released = psutil.Process().memory_info().rss
print(f"faults per ~{BLOCK >> 20} MiB tensor: outside {outside}, inside {inside}, after a nested hold {nested}; "
      f"released {(held - released) >> 20} MiB")
assert min(outside) > PAGES // 2, "each one mapped afresh and faulted in page by page"
assert max(inside[1:]) < PAGES // 20 and nested < PAGES // 20, "the freed block served the next one"
assert heap._users == 0, "the outer exit ended the hold"
assert held - released > BLOCK // 2, "what was kept went back to the system when released"
"""


def test_large_blocks_are_reused_while_held_and_handed_back_when_released():
    done = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def test_a_users_own_malloc_settings_are_left_alone():
    """MALLOC_MMAP_THRESHOLD_ set (here: every block over 1 MiB mapped): the hold changes nothing."""
    probe = HEAP_PROBE.split("outside = ")[0] + """
with heap.reuse_freed_memory():
    inside = [faults(n) for n in range(3)]
print("faults inside the hold with the user's threshold:", inside)
assert min(inside) > PAGES // 2, "still mapped afresh: the user's threshold holds"
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


class RefusingLibc:
    """A glibc that takes mmap thresholds up to 32 MiB only, as some releases do."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter: int, value: int) -> int:
        accepted = not (parameter == heap.M_MMAP_THRESHOLD and value > 32 << 20)
        self.calls.append((parameter, value, accepted))
        return int(accepted)


def test_a_refused_mmap_threshold_falls_back_and_the_trim_threshold_is_still_set(monkeypatch):
    libc = RefusingLibc()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    for name in (*heap.USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    with heap.reuse_freed_memory():
        assert libc.calls == [(heap.M_MMAP_THRESHOLD, heap.HELD, False),
                              (heap.M_MMAP_THRESHOLD, heap.STEADY_MMAP_THRESHOLD, True),
                              (heap.M_TRIM_THRESHOLD, heap.HELD, True)]


def test_the_narrowing_acts_on_the_openmp_runtime_torch_ships():
    runtime = threads._openmp()
    assert runtime is not None and Path(runtime._name).is_relative_to(Path(torch.__file__).parent), runtime


def test_one_thread_is_narrowed_to_one_core_and_the_others_keep_theirs():
    assert threads._openmp() is not None, "torch here runs on OpenMP: the narrowing must be active"
    cores = torch.get_num_threads()
    assert cores > 1, "needs a machine with two cores or more"
    seen = {}
    inside, checked = threading.Event(), threading.Event()

    def stage() -> None:
        seen["before"] = torch.get_num_threads()
        with threads.on_this_thread_only():
            seen["inside"] = torch.get_num_threads()
            other = threading.Thread(target=lambda: seen.setdefault("other", torch.get_num_threads()))
            other.start()
            other.join()
            inside.set()
            checked.wait(timeout=30)
        seen["after"] = torch.get_num_threads()

    worker = threading.Thread(target=stage)
    worker.start()
    inside.wait(timeout=30)
    seen["main"] = torch.get_num_threads()  # while the worker is narrowed
    checked.set()
    worker.join()
    assert seen == {"before": cores, "inside": 1, "other": cores, "main": cores, "after": cores}
