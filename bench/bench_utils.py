"""Helpers shared by the benchmark files (fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

import lens_fast


def synced(fn: Callable[[], Any], device: str | torch.device) -> Callable[[], Any]:
    """``fn`` followed by a CUDA synchronize when ``device`` is a GPU, so timings cover the work."""
    if torch.device(device).type != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def cuda_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory allocated while ``fn`` runs, beyond what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / 2**20


@contextlib.contextmanager
def native_threads(n: int) -> Iterator[None]:
    """Run the C++ ops with ``n`` threads inside the block, restoring the previous default after."""
    before = lens_fast.get_num_threads()
    lens_fast.set_num_threads(n)
    try:
        yield
    finally:
        lens_fast.set_num_threads(before)


def vm_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs) while ``fn`` runs, beyond
    the resident memory before it, in MiB. Counts every byte the process touched (tensors, BLAS
    scratch, allocator slack), so it is an upper bound on the op's own need; NaN where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = vm_kib("VmRSS")
    except OSError:
        return float("nan")
    fn()
    return (vm_kib("VmHWM") - before) / 1024
