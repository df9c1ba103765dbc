"""The host's memory allocator and CPU threads, as the pack uses them: large freed blocks kept
for the next forward while restoring (and handed back after), and the frame engine's stages on
one core each."""

import resource
import threading

import psutil
import torch

from gpen import heap, threads

BLOCK = 64 << 20  # a 512 face's largest bf16 activation; above glibc's largest mmap threshold


def faults_of_a_large_tensor(smaller_by: int = 0) -> int:
    """Page faults of allocating, writing and freeing one tensor of BLOCK less ``smaller_by`` MiB
    on this thread. (A freed block serves a request of its own size only once merged with a
    neighbour: torch asks for 64 bytes more than it uses, to align.)"""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(BLOCK - (smaller_by << 20), dtype=torch.uint8)
    block.fill_(1)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_large_blocks_are_reused_inside_and_handed_back_when_released():
    pages = BLOCK // resource.getpagesize()
    outside = [faults_of_a_large_tensor() for _ in range(3)]
    assert min(outside) > pages // 2  # each one mapped afresh and faulted in page by page
    with heap.reuse_freed_memory():
        inside = [faults_of_a_large_tensor(smaller_by) for smaller_by in range(3)]
    held = psutil.Process().memory_info().rss
    print(f"faults per {BLOCK >> 20} MiB tensor: outside {outside}, inside {inside}")
    assert max(inside[1:]) < pages // 20  # the freed block served the next one
    heap.release_freed_memory()
    assert psutil.Process().memory_info().rss < held - BLOCK // 2  # and went back when released


def test_nested_holds_end_when_the_last_one_leaves():
    pages = BLOCK // resource.getpagesize()
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            faults_of_a_large_tensor()
        assert faults_of_a_large_tensor(smaller_by=1) < pages // 20  # the inner exit kept the hold
    assert heap._users == 0  # the outer exit ended it


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
