"""IoU of xyxy boxes: pairwise (torchvision ``box_iou``) and elementwise with broadcasting.

Boxes are ``(x1, y1, x2, y2)``; a degenerate box (``x2 < x1`` or ``y2 < y1``) has zero area instead
of torchvision's negative one, and a pair whose union is 0 scores 0. Computed in float32 (float64
when an input is float64), whatever the input dtype, so fp16 pixel boxes cannot overflow.
"""
from __future__ import annotations

import torch

from lens_fast._backend import as_tensor, check_same_device


def check_boxes(name: str, boxes: object) -> torch.Tensor:
    """``boxes`` as a tensor of real coordinates, shape [..., 4]; TypeError/ValueError naming ``name``."""
    boxes = as_tensor(name, boxes)
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"{name} must hold real (integer or float) coordinates, got {boxes.dtype}")
    if boxes.dim() < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be [..., 4] xyxy boxes, got shape {tuple(boxes.shape)}")
    return boxes


def _check_finite(**named_boxes: torch.Tensor) -> None:
    for name, boxes in named_boxes.items():
        if boxes.is_floating_point() and not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"{name} contains NaN or infinite coordinates")


def _compute_dtype(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (boxes1.dtype, boxes2.dtype) else torch.float32


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def aligned_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of broadcast-compatible ``boxes1`` [..., 4] and ``boxes2`` [..., 4] (float tensors)."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(boxes1) + _area(boxes2) - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, 1), 0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``boxes1`` [N, 4] and ``boxes2`` [M, 4] (xyxy): [N, M] float32/float64."""
    boxes1 = check_boxes("boxes1", boxes1)
    boxes2 = check_boxes("boxes2", boxes2)
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2:
            raise ValueError(f"{name} must be [N, 4], got shape {tuple(boxes.shape)}")
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    _check_finite(boxes1=boxes1, boxes2=boxes2)
    dtype = _compute_dtype(boxes1, boxes2)
    return aligned_iou(boxes1.to(dtype)[:, None, :], boxes2.to(dtype)[None, :, :])


def box_iou_aligned(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of ``boxes1`` [..., 4] and ``boxes2`` [..., 4] (xyxy, broadcast): [...]."""
    boxes1 = check_boxes("boxes1", boxes1)
    boxes2 = check_boxes("boxes2", boxes2)
    try:
        torch.broadcast_shapes(boxes1.shape, boxes2.shape)
    except RuntimeError:
        raise ValueError(
            f"boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} do not broadcast"
        ) from None
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    _check_finite(boxes1=boxes1, boxes2=boxes2)
    dtype = _compute_dtype(boxes1, boxes2)
    return aligned_iou(boxes1.to(dtype), boxes2.to(dtype))
