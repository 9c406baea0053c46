"""mask_stats speed: the C++ / Triton kernels beside plain PyTorch and torchmetrics, same run.

CPU: 8 groups x 8 masks of 480 x 640, one thread (plus a multi-threaded C++ run), uint8 masks and
fp32 logits. GPU (skipped without CUDA): Triton vs the torch backend, 480 x 640 and 1024 x 1024.
Bytes = pred read once + gt read once. Run: ``python -m pytest bench/test_mask_stats.py --benchmark-only``.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from lens_fast import ops

from bench_utils import native_threads, synced

binary_stat_scores = pytest.importorskip("torchmetrics.functional.classification").binary_stat_scores

BATCH, GROUPS = 8, 8


def ellipse_logits(batch: int, groups: int, height: int, width: int, device: str = "cpu") -> torch.Tensor:
    """Smooth random blobs as logits [batch, groups, H, W] (positive inside), like SAM outputs."""
    gen = torch.Generator().manual_seed(0)
    centre = torch.rand(batch, groups, 2, 1, 1, generator=gen) * torch.tensor([height, width]).view(2, 1, 1)
    radius = (0.1 + 0.3 * torch.rand(batch, groups, 2, 1, 1, generator=gen)) * torch.tensor([height, width]).view(2, 1, 1)
    ys = torch.arange(height, dtype=torch.float32).view(height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, width)
    dist = ((ys - centre[:, :, 0]) / radius[:, :, 0]) ** 2 + ((xs - centre[:, :, 1]) / radius[:, :, 1]) ** 2
    noise = 0.1 * torch.randn(batch, groups, height, width, generator=gen)
    return (4.0 * (1.0 - dist) + noise).to(device)


@functools.lru_cache(maxsize=2)
def make_inputs(dtype: torch.dtype, height: int = 480, width: int = 640, device: str = "cpu"):
    logits = ellipse_logits(BATCH, GROUPS, height, width, device)
    gt = ellipse_logits(BATCH, 1, height, width, device)[:, 0] > 0
    pred = (logits > 0).to(torch.uint8) if dtype == torch.uint8 else logits.to(dtype)
    return pred, gt


def plain_torch(pred: torch.Tensor, gt: torch.Tensor):
    """What one writes without lens_fast: boolean ops, sums, and boxes from any + argmax."""
    p = pred > 0 if pred.is_floating_point() else pred.bool()
    g = gt.bool().unsqueeze(1)
    intersection = (p & g).sum(dim=(-2, -1))
    union = (p | g).sum(dim=(-2, -1))
    area = p.sum(dim=(-2, -1))
    rows, cols = p.any(dim=-1).to(torch.uint8), p.any(dim=-2).to(torch.uint8)
    height, width = p.shape[-2:]
    y1, y2 = rows.argmax(-1), height - 1 - rows.flip(-1).argmax(-1)
    x1, x2 = cols.argmax(-1), width - 1 - cols.flip(-1).argmax(-1)
    boxes = torch.stack([x1, y1, x2, y2], -1) * (area > 0).unsqueeze(-1)
    return intersection, union, area, boxes


def torchmetrics_stats(pred: torch.Tensor, gt: torch.Tensor):
    """torchmetrics' samplewise binary_stat_scores (tp, fp, tn, fn, support per mask; no boxes)."""
    target = gt.unsqueeze(1).expand_as(pred).reshape(-1, *pred.shape[-2:])
    preds = pred.reshape(target.shape)
    threshold = 0.5  # float preds outside [0, 1] go through a sigmoid: logit > 0
    return binary_stat_scores(preds, target.to(torch.uint8), threshold, multidim_average="samplewise", validate_args=False)


CPU_DTYPES = [torch.uint8, torch.float32]
CPU_IMPLS = ["lens_fast_cpu_1thread", "lens_fast_cpu_threads", "torch_plain", "torch_backend", "torchmetrics"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_mask_stats_cpu(benchmark, record_traffic, one_torch_thread, dtype, impl):
    pred, gt = make_inputs(dtype)
    benchmark.group = f"mask_stats cpu {dtype} {BATCH}x{GROUPS}x480x640"
    record_traffic(benchmark, pred, gt)
    threads = (os.cpu_count() or 1) if impl == "lens_fast_cpu_threads" else 1
    benchmark.extra_info["threads"] = threads
    with native_threads(threads):
        if impl.startswith("lens_fast_cpu"):
            stats = benchmark(ops.mask_stats, pred, gt, backend="cpu")
            intersection, union, area, boxes = plain_torch(pred, gt)
            assert torch.equal(stats.intersection, intersection) and torch.equal(stats.union, union)
            assert torch.equal(stats.pred_area, area) and torch.equal(stats.pred_box, boxes.float())
        elif impl == "torch_plain":
            benchmark.extra_info["reference"] = True
            benchmark(plain_torch, pred, gt)
        elif impl == "torch_backend":
            benchmark(ops.mask_stats, pred, gt, backend="torch")
        else:
            scores = benchmark(torchmetrics_stats, pred, gt)
            assert torch.equal(scores[:, 0].view(BATCH, GROUPS), plain_torch(pred, gt)[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["lens_fast_triton", "torch_backend", "torch_plain"])
@pytest.mark.parametrize("size", [(480, 640), (1024, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16], ids=str)
def test_mask_stats_cuda(benchmark, record_traffic, dtype, size, impl):
    pred, gt = make_inputs(dtype, *size, device="cuda")
    benchmark.group = f"mask_stats cuda {dtype} {BATCH}x{GROUPS}x{size[0]}x{size[1]}"
    record_traffic(benchmark, pred, gt, device="cuda")
    run = synced({
        "lens_fast_triton": lambda: ops.mask_stats(pred, gt, backend="triton"),
        "torch_backend": lambda: ops.mask_stats(pred, gt, backend="torch"),
        "torch_plain": lambda: plain_torch(pred, gt),
    }[impl], "cuda")
    benchmark.extra_info["reference"] = impl == "torch_backend"
    run()  # compile / warm up
    benchmark(run)
    if impl == "lens_fast_triton":
        reference = ops.mask_stats(pred, gt, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(run(), reference))
