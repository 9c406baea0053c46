"""mask_loss: time and memory of the lean paths beside the plain path (F.interpolate chain + BCE + Dice).

2 prompts x 8 rollouts of 256 x 256 low-res logits (smooth blobs, bench/test_postprocess_masks's
``blobs``), SAM's 1024 input with a ResizeLongestSide crop, one gt per group at 480 x 640. Each
benchmark times forward + backward (gradient w.r.t. the low-res logits), fp32, torch on one thread,
and records ``peak_mib`` (process peak resident memory during one step beyond what was resident
before: Linux VmHWM reset through /proc/self/clear_refs) and ``saved_mib`` (tensors autograd keeps
for backward). CPU: the plain path and the banded torch path (what ``mask_loss`` runs on CPU). GPU
(skipped without CUDA): 8 x 8 masks, fp32 and bf16 logits, ``torch.cuda`` peak memory: the plain path,
the banded path (``mask_loss_parts_banded``) and the Triton kernels (what ``mask_loss`` runs on CUDA).
Run: ``python -m pytest bench/test_mask_loss.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lens_fast import ops
from lens_fast.ops.mask_loss import mask_loss_parts_banded
from lens_fast.ops.postprocess_masks import postprocess_masks_torch

from bench_utils import cpu_peak_mib, cuda_peak_mib, synced
from test_postprocess_masks import blobs, input_size

SIZE = (480, 640)


def plain_loss(low, gt):
    """What one writes without lens_fast: SAM's upsampling (float32), BCE-with-logits, Dice."""
    x = postprocess_masks_torch(low, input_size(SIZE), SIZE)
    g = gt.unsqueeze(1).float().expand_as(x)
    bce = F.binary_cross_entropy_with_logits(x, g, reduction="none").mean(dim=(-2, -1))
    p = torch.sigmoid(x)
    dice = 1 - (2 * (p * g).sum(dim=(-2, -1)) + 1) / (p.sum(dim=(-2, -1)) + g.sum(dim=(-2, -1)) + 1)
    return (bce + dice).mean()


def make(groups, device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    low = blobs(groups * 8, 256, 256, generator).view(groups, 8, 256, 256).to(device, dtype).requires_grad_()
    gt = (blobs(groups, *SIZE, generator) > 0).to(device)
    return low, gt


def step_fn(impl, low, gt):
    def step():
        low.grad = None
        if impl == "plain":
            loss = plain_loss(low, gt)
        elif impl == "lens_fast_banded" and low.is_cuda:  # mask_loss runs Triton on CUDA tensors
            bce, dice = mask_loss_parts_banded(low, gt.view(torch.uint8), input_size(SIZE), SIZE)
            loss = (bce + dice).mean()
        else:  # CPU: the banded path; CUDA: the Triton kernels
            loss = ops.mask_loss(low, gt, input_size(SIZE), SIZE)
        loss.backward()
    return step


def saved_mib(step) -> float:
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
        step()
    return sum(total) / 2**20


@pytest.mark.parametrize("impl", ["plain", "lens_fast_banded"])
def test_mask_loss_cpu(benchmark, one_torch_thread, impl):
    low, gt = make(2, "cpu")
    step = step_fn(impl, low, gt)
    benchmark.group = f"mask_loss cpu fwd+bwd 2x8 low 256 -> {SIZE[0]}x{SIZE[1]}"
    benchmark.extra_info["reference"] = impl == "plain"
    step()
    benchmark.extra_info["peak_mib"] = cpu_peak_mib(step)
    benchmark.extra_info["saved_mib"] = saved_mib(step)
    benchmark.pedantic(step, rounds=3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["plain", "lens_fast_banded", "lens_fast_triton"])
def test_mask_loss_cuda(benchmark, impl, dtype):
    low, gt = make(8, "cuda", dtype)
    step = synced(step_fn(impl, low, gt), "cuda")
    benchmark.group = f"mask_loss cuda fwd+bwd 8x8 {str(dtype)[6:]} low 256 -> {SIZE[0]}x{SIZE[1]}"
    benchmark.extra_info["reference"] = impl == "plain"
    step()
    benchmark.extra_info["peak_mib"] = cuda_peak_mib(step)
    benchmark(step)
