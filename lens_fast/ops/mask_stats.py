"""``mask_stats``: intersection, union, areas and boxes of a group of predicted masks against one GT."""
from __future__ import annotations

from typing import NamedTuple

import torch


class MaskStats(NamedTuple):
    """Per-mask statistics of ``pred`` [..., G, H, W] against ``gt`` [..., H, W].

    intersection, union, pred_area: int64 [..., G]; gt_area: int64 [...];
    pred_box: float32 [..., G, 4], inclusive xyxy pixel indices (torchvision ``masks_to_boxes``),
    zeros for an empty mask.
    """

    intersection: torch.Tensor
    union: torch.Tensor
    pred_area: torch.Tensor
    gt_area: torch.Tensor
    pred_box: torch.Tensor


def mask_stats_torch(pred_fg: torch.Tensor, gt_fg: torch.Tensor) -> MaskStats:
    """Plain PyTorch reference on boolean foregrounds: ``pred_fg`` [..., G, H, W], ``gt_fg`` [..., H, W]."""
    gt = gt_fg.unsqueeze(-3)
    intersection = (pred_fg & gt).sum(dim=(-2, -1), dtype=torch.int64)
    pred_area = pred_fg.sum(dim=(-2, -1), dtype=torch.int64)
    gt_area = gt_fg.sum(dim=(-2, -1), dtype=torch.int64)
    union = pred_area + gt_area.unsqueeze(-1) - intersection
    h, w = pred_fg.shape[-2:]
    rows = pred_fg.any(dim=-1)  # [..., G, H]
    cols = pred_fg.any(dim=-2)  # [..., G, W]
    ys = torch.arange(h, device=pred_fg.device)
    xs = torch.arange(w, device=pred_fg.device)
    big = max(h, w)
    y1 = torch.where(rows, ys, big).amin(dim=-1)
    y2 = torch.where(rows, ys, -1).amax(dim=-1)
    x1 = torch.where(cols, xs, big).amin(dim=-1)
    x2 = torch.where(cols, xs, -1).amax(dim=-1)
    box = torch.stack([x1, y1, x2, y2], dim=-1).to(torch.float32)
    box = torch.where((pred_area > 0).unsqueeze(-1), box, torch.zeros_like(box))
    return MaskStats(intersection, union, pred_area, gt_area, box)
