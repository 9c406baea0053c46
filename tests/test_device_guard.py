"""Triton launches happen on the tensors' CUDA device, not the current one (Triton launches on the
current device and stream, so the ops make the tensors' device current)."""
import contextlib

import pytest
import torch
from torch import nn

from lens_fast import ops
from lens_fast._backend import device_guard

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def test_device_guard_is_a_no_op_off_cuda():
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.cuda
@two_gpus
def test_mask_ops_on_the_second_gpu_while_the_first_is_current(rng):
    torch.manual_seed(rng.integers(1 << 31))
    pred = torch.randn(2, 3, 37, 61)
    gt = torch.rand(2, 37, 61) > 0.5
    pred_boxes, gt_boxes = torch.rand(2, 3, 4) * 30, torch.rand(2, 4) * 30
    on_1 = torch.device("cuda:1")
    with torch.cuda.device(0):
        got = ops.mask_stats(pred.to(on_1), gt.to(on_1))
        got_iou = ops.reward_iou(pred.to(on_1), gt.to(on_1), pred_boxes.to(on_1), gt_boxes.to(on_1))
        torch.cuda.synchronize(on_1)
    want = ops.mask_stats(pred, gt, backend="torch")
    for got_field, want_field in zip(got, want):
        assert got_field.device == on_1
        torch.testing.assert_close(got_field.cpu(), want_field)
    want_iou = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, backend="torch")
    for got_field, want_field in zip(got_iou, want_iou):
        torch.testing.assert_close(got_field.cpu(), want_field)


@pytest.mark.cuda
@two_gpus
def test_postprocess_on_the_second_gpu_while_the_first_is_current(rng):
    torch.manual_seed(rng.integers(1 << 31))
    low_res = torch.randn(2, 3, 32, 32)
    gt = torch.rand(2, 37, 61) > 0.5
    on_1 = torch.device("cuda:1")
    with torch.cuda.device(0):
        masks = ops.postprocess_masks(low_res.to(on_1), (64, 64), (37, 61), image_size=64)
        stats = ops.postprocess_mask_stats(low_res.to(on_1), gt.to(on_1), (64, 64), (37, 61), image_size=64)
        torch.cuda.synchronize(on_1)
    want = ops.postprocess_masks(low_res, (64, 64), (37, 61), image_size=64, backend="torch")
    torch.testing.assert_close(masks.cpu(), want, atol=1e-5, rtol=1e-5)
    want_stats = ops.postprocess_mask_stats(low_res, gt, (64, 64), (37, 61), image_size=64, backend="torch")
    for got_field, want_field in zip(stats, want_stats):
        assert got_field.device == on_1
        torch.testing.assert_close(got_field.cpu(), want_field, atol=1, rtol=0)


@pytest.mark.cuda
@two_gpus
def test_fused_mask_decoder_upscaling_on_the_second_gpu_while_the_first_is_current(rng):
    LayerNorm2d = pytest.importorskip("segment_anything.modeling.common").LayerNorm2d
    from lens_fast.nn import mask_decoder_upscaling  # builds on segment_anything
    torch.manual_seed(rng.integers(1 << 31))
    dim, (h, w), tokens = 32, (8, 8), 4
    upscaling = nn.Sequential(
        nn.ConvTranspose2d(dim, dim // 4, 2, 2),
        LayerNorm2d(dim // 4),
        nn.GELU(),
        nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2),
        nn.GELU(),
    )
    src, hyper_in = torch.randn(2, h * w, dim), torch.randn(2, tokens, dim // 8)
    want = mask_decoder_upscaling(src, hyper_in, (h, w), upscaling, backend="torch")
    on_1 = torch.device("cuda:1")
    upscaling_1 = upscaling.to(on_1)
    src_1 = src.to(on_1).requires_grad_()
    with torch.cuda.device(0):
        got = mask_decoder_upscaling(src_1, hyper_in.to(on_1), (h, w), upscaling_1)
        got.sum().backward()
        torch.cuda.synchronize(on_1)
    torch.testing.assert_close(got.detach().cpu(), want, atol=1e-2, rtol=1e-2)  # TF32 products when cudnn allows them
    assert src_1.grad is not None and bool(torch.isfinite(src_1.grad).all())
