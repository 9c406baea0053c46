"""``reward_iou``: the numeric part of a grounding reward, mask IoU and box IoU of every rollout, fused.

``pred`` [..., G, H, W] and ``gt`` [..., H, W] as in :func:`lens_fast.ops.mask_stats` (bool/uint8
masks or fp32/fp16/bf16 logits with foreground ``logit > threshold``; ``gt`` shared by the G rollouts
of its group); ``pred_boxes`` [..., G, 4] against ``gt_boxes`` [..., 4], xyxy pixels. On CUDA the
whole batch is one Triton kernel launch (``kernels/reward_iou.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from lens_fast._backend import check_same_device, device_guard, resolve_backend
from lens_fast.ops.box_iou import aligned_iou, check_boxes
from lens_fast.ops.mask_stats import (
    check_mask_inputs,
    check_threshold,
    iou_of_stats,
    mask_stats,
    real_number,
    triton_views,
)


def _check_reward_boxes(pred: torch.Tensor, pred_boxes: object, gt_boxes: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes as float32 tensors of shapes [..., G, 4] and [..., 4] matching ``pred`` [..., G, H, W]."""
    pred_boxes = check_boxes("pred_boxes", pred_boxes)
    gt_boxes = check_boxes("gt_boxes", gt_boxes)
    lead = pred.shape[:-2]
    for name, boxes, want in (("pred_boxes", pred_boxes, (*lead, 4)), ("gt_boxes", gt_boxes, (*lead[:-1], 4))):
        if boxes.shape != want:
            raise ValueError(
                f"{name} must be {'[..., G, 4]' if name == 'pred_boxes' else '[..., 4]'} = {want} for pred of "
                f"shape {tuple(pred.shape)} ([..., G, H, W]), got shape {tuple(boxes.shape)}"
            )
    check_same_device(pred=pred, pred_boxes=pred_boxes, gt_boxes=gt_boxes)
    return pred_boxes.to(torch.float32), gt_boxes.to(torch.float32)


def box_iou_or_zero(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """float32 IoU of ``pred_boxes`` [..., G, 4] with ``gt_boxes`` [..., 4] (float32), as
    ``ops.box_iou_aligned``; a pair with a NaN or infinite coordinate scores 0."""
    gt_boxes = gt_boxes.unsqueeze(-2)
    finite = torch.isfinite(pred_boxes).all(-1) & torch.isfinite(gt_boxes).all(-1)
    iou = aligned_iou(pred_boxes.nan_to_num(0.0, 0.0, 0.0), gt_boxes.nan_to_num(0.0, 0.0, 0.0))
    return torch.where(finite, iou, 0.0)


def _reward_iou_triton(
    pred: torch.Tensor, gt: torch.Tensor, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, threshold: float, empty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton kernel on valid, non-empty inputs (CUDA, or CPU under the interpreter)."""
    from lens_fast.kernels import reward_iou as kernel

    groups = pred.shape[-3]
    pred4, gt3 = triton_views(pred, gt)
    mask_iou = torch.empty(pred.shape[:-2], dtype=torch.float32, device=pred.device)
    box_iou = torch.empty_like(mask_iou)
    with device_guard(pred.device):
        kernel.reward_iou(
            pred4, gt3, pred_boxes.reshape(-1, groups, 4), gt_boxes.reshape(-1, 4), threshold, empty,
            mask_iou.view(-1, groups), box_iou.view(-1, groups),
        )  # fmt: skip
    return mask_iou, box_iou


def reward_iou(
    pred: torch.Tensor,
    gt: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    threshold: float = 0.0,
    empty: float = 1.0,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask IoU and box IoU of each of the G rollouts of every group: ``(mask_iou, box_iou)``, float32 [..., G].

    - ``pred`` [..., G, H, W], ``gt`` [..., H, W], ``threshold``: as :func:`~lens_fast.ops.mask_stats`;
      ``mask_iou`` is :func:`~lens_fast.ops.mask_iou` (a pair whose union is empty scores ``empty``).
    - ``pred_boxes`` [..., G, 4], ``gt_boxes`` [..., 4]: xyxy pixels, any real dtype, compared in
      float32; ``box_iou`` is :func:`~lens_fast.ops.box_iou_aligned` (degenerate boxes have zero area,
      a zero union scores 0), except that a pair with a NaN or infinite coordinate scores 0 instead of
      raising: NaN marks a rollout without a valid box.
    - ``backend``: see :mod:`lens_fast._backend`. On CUDA ("triton") everything is one kernel launch;
      "cpu" is the C++ ``mask_stats`` plus torch box math; "torch" the plain PyTorch reference.
    """
    pred, gt = check_mask_inputs(pred, gt)
    threshold = check_threshold(threshold, pred.dtype)
    empty = real_number("empty", empty)
    pred_boxes, gt_boxes = _check_reward_boxes(pred, pred_boxes, gt_boxes)
    backend = resolve_backend(backend, pred.device)
    if backend == "triton" and pred.numel() > 0:
        return _reward_iou_triton(pred, gt, pred_boxes, gt_boxes, threshold, empty)
    mask_iou = iou_of_stats(mask_stats(pred, gt, threshold=threshold, backend=backend), empty)
    return mask_iou, box_iou_or_zero(pred_boxes, gt_boxes)
