"""postprocess_mask_stats / postprocess_masks speed: fused vs ``Sam.postprocess_masks`` + threshold + torch IoU.

8 groups x 8 masks of 256 x 256 low-res logits (smooth blobs, like SAM's), SAM's 1024 input with a
ResizeLongestSide crop, original 480 x 640 and 1024 x 1024, one gt per group. CPU: the C++ kernel
(one thread, and all cores) beside SAM's path in plain torch (one thread) and SAM's path followed by
the C++ ``ops.mask_stats``. GPU (skipped without CUDA): Triton beside SAM's path, with peak memory
in ``extra_info["peak_mib"]``. Bytes = low-res logits + gt, read once (the fused kernels read
nothing else). Run: ``python -m pytest bench/test_postprocess_masks.py --benchmark-only``.
"""
from __future__ import annotations

import functools
import os
import types

import pytest
import torch

from lens_fast import ops

from bench_utils import cuda_peak_mib, native_threads, synced

Sam = pytest.importorskip("segment_anything.modeling").Sam  # the reference of every benchmark here

GROUPS, MASKS, LOW_RES, IMAGE_SIZE = 8, 8, 256, 1024
SIZES = [(480, 640), (1024, 1024)]


def input_size(original_size: tuple[int, int]) -> tuple[int, int]:
    """ResizeLongestSide's size of the image inside SAM's square input."""
    return ops.resize_longest_side(original_size, IMAGE_SIZE)


def blobs(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """[n, height, width] smooth random ellipses as logits (positive inside) plus a little noise."""
    size = torch.tensor([height, width], dtype=torch.float32).view(1, 2, 1, 1)
    centre = torch.rand(n, 2, 1, 1, generator=generator) * size
    radius = (0.1 + 0.3 * torch.rand(n, 2, 1, 1, generator=generator)) * size
    ys = torch.arange(height, dtype=torch.float32).view(height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, width)
    dist = ((ys - centre[:, 0]) / radius[:, 0]) ** 2 + ((xs - centre[:, 1]) / radius[:, 1]) ** 2
    return 4.0 * (1.0 - dist) + 0.1 * torch.randn(n, height, width, generator=generator)


@functools.lru_cache(maxsize=4)
def make_inputs(original_size: tuple[int, int], device: str = "cpu"):
    generator = torch.Generator().manual_seed(0)
    low = blobs(GROUPS * MASKS, LOW_RES, LOW_RES, generator).view(GROUPS, MASKS, LOW_RES, LOW_RES)
    gt = blobs(GROUPS, *original_size, generator) > 0
    return low.to(device), gt.to(device)


def sam_masks(low: torch.Tensor, original_size) -> torch.Tensor:
    stub = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=IMAGE_SIZE))
    return Sam.postprocess_masks(stub, low, input_size(original_size), original_size) > 0


def sam_then_torch_iou(low: torch.Tensor, gt: torch.Tensor, original_size):
    """What one writes without lens_fast: SAM's upsampling, threshold, IoU from boolean sums."""
    masks = sam_masks(low, original_size)
    truth = gt.unsqueeze(1)
    return (masks & truth).sum(dim=(-2, -1)), (masks | truth).sum(dim=(-2, -1))


def assert_counts_close(stats, low, gt, size) -> None:
    """Intersections and unions equal SAM's path up to a few near-zero-logit pixels (rounding order)."""
    intersection, union = sam_then_torch_iou(low, gt, size)
    slack = 2 + size[0] * size[1] // 100_000
    assert (stats.intersection - intersection).abs().max() <= slack
    assert (stats.union - union).abs().max() <= slack



CPU_IMPLS = ["lens_fast_cpu_1thread", "lens_fast_cpu_threads", "sam_torch_iou", "sam_then_cpp_mask_stats"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_postprocess_mask_stats_cpu(benchmark, record_traffic, one_torch_thread, size, impl):
    low, gt = make_inputs(size)
    benchmark.group = f"postprocess_mask_stats cpu {GROUPS}x{MASKS} low {LOW_RES} -> {size[0]}x{size[1]}"
    record_traffic(benchmark, low, gt)
    threads = (os.cpu_count() or 1) if impl == "lens_fast_cpu_threads" else 1
    with native_threads(threads):
        if impl.startswith("lens_fast_cpu"):
            stats = benchmark.pedantic(
                ops.postprocess_mask_stats, (low, gt, input_size(size), size), {"backend": "cpu"}, rounds=5
            )
            assert_counts_close(stats, low, gt, size)
        elif impl == "sam_torch_iou":
            benchmark.extra_info["reference"] = True
            benchmark.pedantic(sam_then_torch_iou, (low, gt, size), rounds=2)
        else:
            benchmark.pedantic(lambda: ops.mask_stats(sam_masks(low, size), gt, backend="cpu"), rounds=2)


@pytest.mark.parametrize("impl", ["lens_fast_cpu_1thread", "sam_threshold"])
def test_postprocess_masks_cpu(benchmark, one_torch_thread, impl):
    size = SIZES[0]
    low, _ = make_inputs(size)
    benchmark.group = f"postprocess_masks > 0 cpu {GROUPS}x{MASKS} low {LOW_RES} -> {size[0]}x{size[1]}"
    if impl == "sam_threshold":
        benchmark.extra_info["reference"] = True
        benchmark.pedantic(sam_masks, (low, size), rounds=2)
    else:
        benchmark.pedantic(ops.postprocess_masks, (low, input_size(size), size, 0.0), {"backend": "cpu"}, rounds=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["lens_fast_triton", "sam_torch_iou", "lens_fast_triton_masks"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_postprocess_mask_stats_cuda(benchmark, record_traffic, size, impl):
    low, gt = make_inputs(size, device="cuda")
    benchmark.group = f"postprocess_mask_stats cuda {GROUPS}x{MASKS} low {LOW_RES} -> {size[0]}x{size[1]}"
    record_traffic(benchmark, low, gt, device="cuda")
    run = synced({
        "lens_fast_triton": lambda: ops.postprocess_mask_stats(low, gt, input_size(size), size),
        "sam_torch_iou": lambda: sam_then_torch_iou(low, gt, size),
        "lens_fast_triton_masks": lambda: ops.postprocess_masks(low, input_size(size), size, 0.0),
    }[impl], "cuda")
    benchmark.extra_info["reference"] = impl == "sam_torch_iou"
    run()  # compile / warm up
    benchmark.extra_info["peak_mib"] = cuda_peak_mib(run)
    benchmark(run)
    if impl == "lens_fast_triton":
        assert_counts_close(run(), low, gt, size)
