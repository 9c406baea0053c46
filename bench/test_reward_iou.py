"""reward_iou speed: the fused mask IoU + box IoU of a GRPO batch (8 prompts x 8 rollouts of 480 x 640)
beside the two separate ops it replaces (``mask_iou`` + ``box_iou_aligned``) and the torch backend.

GPU (skipped without CUDA): one Triton launch vs mask_iou's two launches + torch division + the box
ops' small launches; these sizes are launch-bound as much as bandwidth-bound. CPU: one thread.
Bytes = pred read once + gt read once. Run: ``python -m pytest bench/test_reward_iou.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch
from test_mask_stats import BATCH, GROUPS, make_inputs

from lens_fast import ops

from bench_utils import synced


def boxes(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted [B, G, 4] (some NaN = no box) and ground-truth [B, 4] xyxy boxes in a 640 x 480 frame."""
    gen = torch.Generator().manual_seed(1)
    gt = torch.rand(BATCH, 4, generator=gen) * torch.tensor([300.0, 200, 300, 200]) + torch.tensor([0.0, 0, 320, 240])
    pred = gt[:, None] + 20 * torch.randn(BATCH, GROUPS, 4, generator=gen)
    pred[:, -1] = float("nan")
    return pred.to(device), gt.to(device)


def separate_ops(pred, gt, pred_boxes, gt_boxes, backend):
    """The unfused path: mask_iou, then box_iou_aligned on the valid rows (NaN rows zeroed, then masked)."""
    valid = ~pred_boxes.isnan().any(-1)
    box_iou = torch.where(valid, ops.box_iou_aligned(pred_boxes.nan_to_num(0.0), gt_boxes[:, None]), 0.0)
    return ops.mask_iou(pred, gt, backend=backend), box_iou


IMPLS = {
    "fused_reward_iou": lambda p, g, pb, gb, backend: ops.reward_iou(p, g, pb, gb, backend=backend),
    "mask_iou+box_iou_aligned": separate_ops,
    "torch_backend": lambda p, g, pb, gb, backend: ops.reward_iou(p, g, pb, gb, backend="torch"),
}
DEVICES = [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    "cpu",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["uint8", "fp32_logits"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_reward_iou(benchmark, record_traffic, one_torch_thread, device, dtype, impl):
    pred, gt = make_inputs(dtype, device=device)
    pred_boxes, gt_boxes = boxes(device)
    backend = "triton" if device == "cuda" else "cpu"
    benchmark.group = f"reward_iou {BATCH}x{GROUPS} 480x640 {dtype} {device}"
    record_traffic(benchmark, pred, gt, device=device)
    benchmark.extra_info["reference"] = impl == "mask_iou+box_iou_aligned"
    run = synced(lambda: IMPLS[impl](pred, gt, pred_boxes, gt_boxes, backend), device)
    mask_iou, box_iou = benchmark(run)
    want_mask, want_box = ops.reward_iou(pred.cpu(), gt.cpu(), pred_boxes.cpu(), gt_boxes.cpu(), backend="torch")
    assert torch.equal(mask_iou.cpu(), want_mask)
    torch.testing.assert_close(box_iou.cpu(), want_box, rtol=1e-6, atol=0)
