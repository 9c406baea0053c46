"""Shared benchmark reporting.

Each benchmark sets ``benchmark.group`` and ``benchmark.extra_info``:
- ``"bytes"``: bytes the op must touch (read once + written once): GB/s is reported from it;
- ``"memcpy_gbps"``: copy bandwidth of the same bytes, for comparison;
  the ``record_traffic(benchmark, *data, device="cpu")`` fixture sets both;
- ``"reference": True`` on the baseline of its group: every other entry gets a speed-up ratio.
Fixture ``one_torch_thread`` pins torch to one thread; ``bench_utils`` has ``synced`` and ``cuda_peak_mib``.
A table of GB/s and ratios is printed at the end of ``pytest bench/ --benchmark-only``.
"""
from __future__ import annotations

import time
from collections import defaultdict

import pytest
import torch
from bench_utils import synced


def _best_seconds(fn, repeat: int = 7) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_memcpy_cache: dict = {}


def _memcpy_gbps(nbytes: int, device: str) -> float:
    """GB/s of copying nbytes on ``device`` (read + write counted once each).

    Best of 25 copies, one thread on the CPU (like the single-thread benchmarks beside it). Sizes
    whose source + destination fit in the last-level cache measure cache, not DRAM, bandwidth.
    """
    key = (nbytes, device)
    if key not in _memcpy_cache:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        copy = synced(lambda: dst.copy_(src), device)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            copy()
            _memcpy_cache[key] = 2 * nbytes / _best_seconds(copy, repeat=25) / 1e9
        finally:
            torch.set_num_threads(threads)
    return _memcpy_cache[key]


@pytest.fixture(scope="session")
def record_traffic():
    """record_traffic(benchmark, *data, device="cpu"): the op touches ``data`` (tensors, arrays or byte
    counts) once; sets ``extra_info["bytes"]`` and the ``"memcpy_gbps"`` of as many bytes."""

    def record(benchmark, *data, device: str = "cpu") -> None:
        nbytes = sum(x if isinstance(x, int) else x.nbytes for x in data)
        benchmark.extra_info["bytes"] = nbytes
        benchmark.extra_info["memcpy_gbps"] = _memcpy_gbps(nbytes, str(device))

    return record

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None)]
    if not benches:
        return
    groups = defaultdict(list)
    for b in benches:
        groups[b.group or ""].append(b)
    write = terminalreporter.write_line
    terminalreporter.section("lens_fast: ratios and bandwidth (min times)")
    for group, items in sorted(groups.items()):
        ref = next((b for b in items if b.extra_info.get("reference")), None)
        write(f"[{group}]")
        for b in sorted(items, key=lambda b: b.stats.min):
            t = b.stats.min
            cols = [f"{b.name:<60}", f"{t * 1e3:10.3f} ms"]
            if ref is not None:
                cols.append(f"{ref.stats.min / t:8.2f}x vs ref")
            if "bytes" in b.extra_info:
                cols.append(f"{b.extra_info['bytes'] / t / 1e9:7.2f} GB/s")
            if "memcpy_gbps" in b.extra_info:
                cols.append(f"(memcpy {b.extra_info['memcpy_gbps']:.2f} GB/s)")
            write("  " + "  ".join(cols))
