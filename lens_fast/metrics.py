"""Referring-segmentation metrics by the LISA protocol (the one LENS reports).

- cIoU = sum of intersections / sum of unions over all samples (big objects weigh more);
- gIoU = mean of per-sample IoU; a sample whose union is empty (empty prediction, empty ground truth)
  counts 1.0 as in LISA, or 0.0 as in Seg-Zero (``empty_union_iou``);
- with boxes: mean box IoU and Acc@0.5 (fraction of samples with box IoU >= 0.5).

``ReferringMetrics`` accumulates batches of :class:`lens_fast.ops.MaskStats` as the fused ops return
them (``ops.mask_stats`` on masks, ``ops.postprocess_mask_stats`` on logits) and keeps its running sums
as tensors on their device, so feeding it never synchronises with a GPU; ``compute()`` does, once.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from lens_fast._backend import as_tensor
from lens_fast.ops import MaskStats, box_iou_aligned

__all__ = ["ReferringMetrics", "sample_iou"]

EMPTY_UNION_POLICIES = {1.0: "LISA", 0.0: "Seg-Zero"}  # per-sample IoU of an empty union -> convention


def _check_policy(empty_union_iou: object) -> float:
    if isinstance(empty_union_iou, bool) or not isinstance(empty_union_iou, (int, float)):
        raise TypeError(f"empty_union_iou must be 1.0 (LISA) or 0.0 (Seg-Zero), got {empty_union_iou!r}")
    if float(empty_union_iou) not in EMPTY_UNION_POLICIES:
        raise ValueError(f"empty_union_iou must be 1.0 (LISA) or 0.0 (Seg-Zero), got {empty_union_iou!r}")
    return float(empty_union_iou)


def _check_counts(name: str, x: object) -> torch.Tensor:
    x = as_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer pixel counts, got {x.dtype}")
    return x


def sample_iou(intersection: torch.Tensor, union: torch.Tensor, empty_union_iou: float = 1.0) -> torch.Tensor:
    """Per-sample IoU (float64, same shape): intersection / union, ``empty_union_iou`` where union is 0."""
    empty_union_iou = _check_policy(empty_union_iou)
    intersection = _check_counts("intersection", intersection)
    union = _check_counts("union", union)
    if intersection.shape != union.shape:
        raise ValueError(
            f"intersection and union must have one shape, got {tuple(intersection.shape)} and {tuple(union.shape)}"
        )
    ratio = intersection.double() / union.clamp(min=1).double()
    return torch.where(union > 0, ratio, empty_union_iou)


class ReferringMetrics:
    """Accumulates cIoU, gIoU and box metrics over batches; every element of a batch is one sample.

    ``update(stats)`` takes the MaskStats of masks ``[..., G, H, W]``: each of the ``...`` x G masks is
    one sample. ``add_failed(gt_area)`` counts samples that could not be predicted at all (IoU 0, their
    whole ground truth in the union). ``update_boxes`` adds box IoUs; box metrics are reported once any
    box was added, over the samples given to it.
    """

    def __init__(self, empty_union_iou: float = 1.0) -> None:
        self.empty_union_iou = _check_policy(empty_union_iou)
        self.reset()

    def reset(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        if name in self._sums:
            self._sums[name] = self._sums[name] + value.to(self._sums[name].device)
        else:
            self._sums[name] = value

    def update(self, stats: MaskStats) -> torch.Tensor:
        """Add a batch; returns its per-sample IoU (float64, the shape of ``stats.intersection``)."""
        if not isinstance(stats, MaskStats):
            raise TypeError(f"stats must be a lens_fast.ops.MaskStats, got {type(stats).__name__}")
        iou = sample_iou(stats.intersection, stats.union, self.empty_union_iou)
        self._add("samples", torch.tensor(iou.numel(), dtype=torch.int64, device=iou.device))
        self._add("intersection", stats.intersection.sum(dtype=torch.int64))
        self._add("union", stats.union.sum(dtype=torch.int64))
        self._add("iou", iou.sum())
        self._add("empty_unions", (stats.union == 0).sum(dtype=torch.int64))
        return iou

    def add_failed(self, gt_area: Union[torch.Tensor, int]) -> None:
        """Count samples that failed (no prediction possible): IoU 0, union = their GT area."""
        if isinstance(gt_area, int) and not isinstance(gt_area, bool):
            gt_area = torch.tensor([gt_area], dtype=torch.int64)
        gt_area = _check_counts("gt_area", gt_area)
        if bool((gt_area < 0).any()):
            raise ValueError("gt_area must be >= 0")
        count = torch.tensor(gt_area.numel(), dtype=torch.int64, device=gt_area.device)
        self._add("samples", count)
        self._add("failed", count)
        self._add("intersection", torch.zeros((), dtype=torch.int64, device=gt_area.device))
        self._add("union", gt_area.sum(dtype=torch.int64))
        self._add("iou", torch.zeros((), dtype=torch.float64, device=gt_area.device))

    def update_boxes(
        self, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, present: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Add box IoUs of ``pred_boxes`` vs ``gt_boxes`` ([..., 4] xyxy, same units); returns them.

        ``present`` (bool [...]) marks samples that predicted a box; the others count IoU 0.
        """
        iou = box_iou_aligned(pred_boxes, gt_boxes).double()
        if present is not None:
            present = as_tensor("present", present)
            if present.dtype != torch.bool or present.shape != iou.shape:
                raise ValueError(
                    f"present must be bool {tuple(iou.shape)}, got {present.dtype} {tuple(present.shape)}"
                )
            iou = torch.where(present.to(iou.device), iou, 0.0)
        self._add("box_samples", torch.tensor(iou.numel(), dtype=torch.int64, device=iou.device))
        self._add("box_iou", iou.sum())
        self._add("box_hits", (iou >= 0.5).sum(dtype=torch.int64))
        return iou

    def compute(self) -> Dict[str, float]:
        """The metrics so far: cIoU, gIoU (fractions in [0, 1]), counts and sums; box_IoU and
        box_Acc@0.5 when boxes were added. ValueError if nothing was added."""
        sums = {name: value.item() for name, value in self._sums.items()}
        samples = int(sums.get("samples", 0))
        if samples == 0:
            raise ValueError("no samples were added: nothing to compute")
        intersection, union = int(sums["intersection"]), int(sums["union"])
        result: Dict[str, float] = {
            "cIoU": intersection / union if union > 0 else self.empty_union_iou,
            "gIoU": float(sums["iou"]) / samples,
            "samples": samples,
            "failed": int(sums.get("failed", 0)),
            "empty_unions": int(sums.get("empty_unions", 0)),
            "intersection": intersection,
            "union": union,
            "empty_union_iou": self.empty_union_iou,
        }
        box_samples = int(sums.get("box_samples", 0))
        if box_samples:
            result["box_IoU"] = float(sums["box_iou"]) / box_samples
            result["box_Acc@0.5"] = int(sums["box_hits"]) / box_samples
            result["box_samples"] = box_samples
        return result
