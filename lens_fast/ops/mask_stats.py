"""``mask_stats``: intersection, union, areas and boxes of a group of predicted masks against one GT.

``pred`` is [..., G, H, W]: bool/uint8 masks (nonzero = foreground) or float logits (fp32, fp16,
bf16; foreground = ``logit > threshold``, compared in float32, so NaN logits are background).
``gt`` is [..., H, W] bool/uint8 and is broadcast over the group dim G (a GRPO group of rollouts
scored against one ground truth). One pass: each ``pred`` element is read once.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from lens_fast._backend import as_tensor, check_same_device, device_guard, native, resolve_backend

PRED_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16)
GT_DTYPES = (torch.bool, torch.uint8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NATIVE_DTYPE = {
    torch.bool: "uint8",
    torch.uint8: "uint8",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


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


def foreground(pred: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean foreground of ``pred``: nonzero for bool and integer dtypes, ``value > threshold`` for
    floats, compared in float32 (float64 values in float64)."""
    if pred.is_floating_point():
        return pred.to(torch.promote_types(pred.dtype, torch.float32)) > threshold
    return pred != 0


def real_number(name: str, value: object) -> float:
    """``value`` as a Python float (ints beyond the float range become +-inf); TypeError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_threshold(threshold: object, pred_dtype: torch.dtype = torch.float32) -> float:
    """``threshold`` rounded to float32 (the precision every backend compares in); TypeError for a
    non-real, ValueError for NaN or for a nonzero threshold on a bool or integer ``pred_dtype``."""
    threshold = real_number("threshold", threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    if not pred_dtype.is_floating_point and threshold != 0:
        raise ValueError(
            f"threshold={threshold} applies to float logits only; pred is {pred_dtype} "
            "(nonzero = foreground): threshold the masks first or pass logits"
        )
    return torch.tensor(threshold, dtype=torch.float64).to(torch.float32).item()


def check_mask_inputs(pred: object, gt: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred`` [..., G, H, W] and ``gt`` [..., H, W] as tensors of supported dtypes, shapes and one device."""
    pred = as_tensor("pred", pred)
    gt = as_tensor("gt", gt)
    if pred.dtype not in PRED_DTYPES:
        raise TypeError(
            f"pred must be bool, uint8 or float32/float16/bfloat16 logits, got {pred.dtype}"
        )
    if gt.dtype not in GT_DTYPES:
        raise TypeError(f"gt must be a bool or uint8 mask, got {gt.dtype}")
    if pred.dim() < 3:
        raise ValueError(f"pred must be [..., G, H, W] (at least 3 dims), got shape {tuple(pred.shape)}")
    if gt.dim() < 2:
        raise ValueError(f"gt must be [..., H, W] (at least 2 dims), got shape {tuple(gt.shape)}")
    if gt.shape[:-2] != pred.shape[:-3] or gt.shape[-2:] != pred.shape[-2:]:
        want = (*pred.shape[:-3], *pred.shape[-2:])
        raise ValueError(
            f"gt must be [..., H, W] = {want} for pred of shape {tuple(pred.shape)} "
            f"([..., G, H, W]), got gt of shape {tuple(gt.shape)}"
        )
    check_same_device(pred=pred, gt=gt)
    return pred, gt


def _empty_stats(pred: torch.Tensor, gt: torch.Tensor) -> MaskStats:
    """Stats when ``pred`` has no elements (some of batch, G, H, W is 0)."""
    lead = pred.shape[:-2]
    zeros = torch.zeros(lead, dtype=torch.int64, device=pred.device)
    gt_area = (gt != 0).sum(dim=(-2, -1), dtype=torch.int64)
    union = zeros + gt_area.unsqueeze(-1)
    box = torch.zeros((*lead, 4), dtype=torch.float32, device=pred.device)
    return MaskStats(zeros, union, zeros.clone(), gt_area, box)


def rows_view(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` viewed as ``shape`` (same last dims) with contiguous rows; copies only when it must."""
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        x = x.contiguous()
    try:
        return x.view(shape)
    except RuntimeError:  # leading dims that no view can merge
        return x.reshape(shape)


def _new_stats(lead: torch.Size, device: torch.device) -> MaskStats:
    """Uninitialised contiguous outputs for stats of shape ``lead`` = [..., G]."""
    counts = [torch.empty(lead, dtype=torch.int64, device=device) for _ in range(3)]
    gt_area = torch.empty(lead[:-1], dtype=torch.int64, device=device)
    box = torch.empty((*lead, 4), dtype=torch.float32, device=device)
    return MaskStats(counts[0], counts[1], counts[2], gt_area, box)


def mask_stats_cpu(pred: torch.Tensor, gt: torch.Tensor, threshold: float, *, use_avx2: bool = True) -> MaskStats:
    """The C++ kernel on valid, non-empty CPU inputs (``use_avx2=False``: the portable path)."""
    groups, height, width = pred.shape[-3:]
    pred4 = rows_view(pred, (-1, groups, height, width))
    gt3 = rows_view(gt, (-1, height, width))
    out = _new_stats(pred.shape[:-2], pred.device)
    native().mask_stats(
        pred4.data_ptr(), _NATIVE_DTYPE[pred.dtype], pred4.shape[0], groups, height, width,
        *pred4.stride()[:3], gt3.data_ptr(), *gt3.stride()[:2], threshold,
        out.intersection.data_ptr(), out.union.data_ptr(), out.pred_area.data_ptr(),
        out.gt_area.data_ptr(), out.pred_box.data_ptr(), num_threads=0, use_avx2=use_avx2,
    )  # fmt: skip
    return out


def triton_views(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred`` as [B, G, H, W] and ``gt`` as [B, H, W] with contiguous rows, bool viewed as uint8:
    the layout the Triton kernels read."""
    groups, height, width = pred.shape[-3:]
    if pred.dtype == torch.bool:
        pred = pred.view(torch.uint8)
    pred4 = rows_view(pred, (-1, groups, height, width))
    gt3 = rows_view(gt.view(torch.uint8) if gt.dtype == torch.bool else gt, (-1, height, width))
    return pred4, gt3


def _mask_stats_triton(pred: torch.Tensor, gt: torch.Tensor, threshold: float) -> MaskStats:
    """The Triton kernel on valid, non-empty inputs (CUDA, or CPU under the interpreter)."""
    from lens_fast.kernels import mask_stats as kernel

    pred4, gt3 = triton_views(pred, gt)
    out = _new_stats(pred.shape[:-2], pred.device)
    with device_guard(pred.device):
        kernel.mask_stats(pred4, gt3, threshold, *out)
    return out


def mask_stats(
    pred: torch.Tensor, gt: torch.Tensor, threshold: float = 0.0, backend: Optional[str] = None
) -> MaskStats:
    """Intersection, union, areas and boxes of ``pred`` [..., G, H, W] against ``gt`` [..., H, W].

    ``pred``: bool/uint8 (nonzero = foreground) or fp32/fp16/bf16 logits (foreground =
    ``logit > threshold`` in float32; ``threshold`` must stay 0 for bool/uint8). ``gt``: bool/uint8,
    shared by the G masks of its group. Any leading batch shape, any strides. Returns
    :class:`MaskStats` (int64 counts [..., G], gt_area [...], float32 inclusive xyxy boxes
    [..., G, 4], zeros when empty). ``backend``: see :mod:`lens_fast._backend`.
    """
    pred, gt = check_mask_inputs(pred, gt)
    threshold = check_threshold(threshold, pred.dtype)
    backend = resolve_backend(backend, pred.device)
    if pred.numel() == 0:
        return _empty_stats(pred, gt)
    if backend == "cpu":
        return mask_stats_cpu(pred, gt, threshold)
    if backend == "triton":
        return _mask_stats_triton(pred, gt, threshold)
    return mask_stats_torch(foreground(pred, threshold), gt != 0)


def mask_iou(
    pred: torch.Tensor,
    gt: torch.Tensor,
    threshold: float = 0.0,
    empty: float = 1.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """IoU of each mask of ``pred`` [..., G, H, W] with ``gt`` [..., H, W]: float32 [..., G].

    Arguments as :func:`mask_stats`; a pair whose union is empty scores ``empty``.
    """
    empty = real_number("empty", empty)
    return iou_of_stats(mask_stats(pred, gt, threshold=threshold, backend=backend), empty)


def iou_of_stats(stats: MaskStats, empty: float) -> torch.Tensor:
    """float32 intersection / union of ``stats`` (divided in float64), ``empty`` where the union is 0."""
    ratio = stats.intersection.double() / stats.union.clamp(min=1).double()
    return torch.where(stats.union > 0, ratio, empty).float()
