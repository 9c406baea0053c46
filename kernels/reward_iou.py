"""Triton ``reward_iou``: mask IoU and box IoU of a whole batch of rollouts in one kernel launch.

A program per (batch item, row band, column block), the tile layout of ``kernels/mask_stats.py``
(:func:`~lens_fast.kernels.mask_stats.tiling`, :func:`~lens_fast.kernels.mask_stats.tile_foreground`):
it counts intersection and predicted area of each of the G masks, and the GT area, over its tile and
adds them into an int32 workspace with atomics (per-mask counts fit: a mask has < 2**31 pixels). Then
it increments the batch item's arrival counter (acq_rel); the program that arrives last for a batch
item reads the totals back through atomics, so it sees every other program's additions, and writes
the G mask IoUs and box IoUs. Programs never wait for one another, so any launch order is correct.

Inputs are valid and non-empty (checked by ``lens_fast.ops.reward_iou``): ``pred`` [B, G, H, W] and
``gt`` [B, H, W] with contiguous rows (bool passed as uint8), float32 boxes ``pred_boxes`` [B, G, 4]
and ``gt_boxes`` [B, 4] (any strides).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lens_fast.kernels.jit import jit
from lens_fast.kernels.mask_stats import Tiling, pred_operand, tile_foreground, tiling

_INF = tl.constexpr(float("inf"))


@jit
def _finite(x):
    """x is neither NaN nor infinite (comparisons with NaN are false)."""
    return (x > -_INF) & (x < _INF)


@jit
def _box_iou_or_zero(px1, py1, px2, py2, gx1, gy1, gx2, gy2):
    """IoU of xyxy boxes (fp32 vectors) as ``ops.box_iou_aligned`` computes it: degenerate boxes have
    zero area, a zero union scores 0; a pair with a NaN or infinite coordinate scores 0."""
    inter_w = tl.maximum(tl.minimum(px2, gx2) - tl.maximum(px1, gx1), 0.0)
    inter_h = tl.maximum(tl.minimum(py2, gy2) - tl.maximum(py1, gy1), 0.0)
    inter = inter_w * inter_h
    pred_area = tl.maximum(px2 - px1, 0.0) * tl.maximum(py2 - py1, 0.0)
    gt_area = tl.maximum(gx2 - gx1, 0.0) * tl.maximum(gy2 - gy1, 0.0)
    union = pred_area + gt_area - inter
    finite = _finite(px1) & _finite(py1) & _finite(px2) & _finite(py2)
    finite = finite & _finite(gx1) & _finite(gy1) & _finite(gx2) & _finite(gy2)
    ok = finite & (union > 0)
    return tl.where(ok, tl.div_rn(inter, tl.where(ok, union, 1.0)), 0.0)  # IEEE division, as torch


@jit
def _reward_iou_kernel(
    pred_ptr, gt_ptr, pred_box_ptr, gt_box_ptr, mask_iou_ptr, box_iou_ptr, counts_ptr, gt_area_ptr, arrivals_ptr,
    groups, height, width,
    pred_stride_batch, pred_stride_group, pred_stride_row, gt_stride_batch, gt_stride_row,
    pred_box_stride_batch, pred_box_stride_group, pred_box_stride_coord, gt_box_stride_batch, gt_box_stride_coord,
    threshold, empty, n_masks, n_tiles,
    PRED_KIND: tl.constexpr, GROUP_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ROW_STEPS: tl.constexpr,
):  # fmt: skip
    """Workspace (zeroed): counts [2, n_masks] int32 (intersection, pred area), gt_area [B], arrivals [B].
    Outputs mask_iou, box_iou: float32 [B, G], contiguous."""
    batch = tl.program_id(0).to(tl.int64)
    row_band = tl.program_id(1)
    col_block = tl.program_id(2)
    xs = col_block * BLOCK_W + tl.arange(0, BLOCK_W)
    x_ok = xs < width
    band_start = row_band * (BLOCK_H * ROW_STEPS)
    gt_base = gt_ptr + batch * gt_stride_batch
    pred_base = pred_ptr + batch * pred_stride_batch
    gt_count = 0
    for g0 in range(0, groups, GROUP_BLOCK):
        gs = g0 + tl.arange(0, GROUP_BLOCK)
        g_ok = gs < groups
        group_base = pred_base + gs.to(tl.int64) * pred_stride_group
        intersection = tl.zeros((GROUP_BLOCK,), dtype=tl.int32)
        area = tl.zeros((GROUP_BLOCK,), dtype=tl.int32)
        gt_count = 0
        for step in range(ROW_STEPS):
            ys = band_start + step * BLOCK_H + tl.arange(0, BLOCK_H)
            fg, gt_tile = tile_foreground(
                group_base, g_ok, gt_base, ys, xs, x_ok, height, pred_stride_row, gt_stride_row, threshold, PRED_KIND
            )
            gt_count += tl.sum(tl.sum(gt_tile.to(tl.int32), axis=1), axis=0)
            area += tl.sum(tl.sum(fg.to(tl.int32), axis=2), axis=1)
            intersection += tl.sum(tl.sum((fg & gt_tile[None, :, :]).to(tl.int32), axis=2), axis=1)
        masks = batch * groups + gs
        tl.atomic_add(counts_ptr + masks, intersection, mask=g_ok, sem="relaxed")
        tl.atomic_add(counts_ptr + n_masks + masks, area, mask=g_ok, sem="relaxed")
    tl.atomic_add(gt_area_ptr + batch, gt_count, sem="relaxed")
    tl.debug_barrier()  # every thread's additions come before this program's arrival (release below)
    arrived = tl.atomic_add(arrivals_ptr + batch, 1, sem="acq_rel")
    if arrived == n_tiles - 1:  # the last program of this batch item: all tiles are counted
        gt_area = tl.atomic_add(gt_area_ptr + batch, 0, sem="acquire").to(tl.int64)
        gt_box = gt_box_ptr + batch * gt_box_stride_batch + tl.zeros((GROUP_BLOCK,), dtype=tl.int32)  # broadcast
        gx1 = tl.load(gt_box)
        gy1 = tl.load(gt_box + gt_box_stride_coord)
        gx2 = tl.load(gt_box + 2 * gt_box_stride_coord)
        gy2 = tl.load(gt_box + 3 * gt_box_stride_coord)
        for g0 in range(0, groups, GROUP_BLOCK):
            gs = g0 + tl.arange(0, GROUP_BLOCK)
            g_ok = gs < groups
            masks = batch * groups + gs
            nothing = tl.zeros((GROUP_BLOCK,), dtype=tl.int32)
            intersection = tl.atomic_add(counts_ptr + masks, nothing, mask=g_ok, sem="acquire").to(tl.int64)
            area = tl.atomic_add(counts_ptr + n_masks + masks, nothing, mask=g_ok, sem="acquire").to(tl.int64)
            union = area + gt_area - intersection
            ratio = intersection.to(tl.float64) / tl.maximum(union, 1).to(tl.float64)
            tl.store(mask_iou_ptr + masks, tl.where(union > 0, ratio.to(tl.float32), empty), mask=g_ok)
            box = pred_box_ptr + batch * pred_box_stride_batch + gs * pred_box_stride_group
            px1 = tl.load(box, mask=g_ok, other=0.0)
            py1 = tl.load(box + pred_box_stride_coord, mask=g_ok, other=0.0)
            px2 = tl.load(box + 2 * pred_box_stride_coord, mask=g_ok, other=0.0)
            py2 = tl.load(box + 3 * pred_box_stride_coord, mask=g_ok, other=0.0)
            iou = _box_iou_or_zero(px1, py1, px2, py2, gx1, gy1, gx2, gy2)
            tl.store(box_iou_ptr + masks, iou, mask=g_ok)


def reward_iou(
    pred: torch.Tensor,
    gt: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    threshold: float,
    empty: float,
    mask_iou: torch.Tensor,
    box_iou: torch.Tensor,
    launch: Optional[Tiling] = None,
) -> None:
    """Fill ``mask_iou`` and ``box_iou`` (float32 [B, G], contiguous) for ``pred`` [B, G, H, W] (uint8 or
    fp32/fp16/bf16 logits) against ``gt`` [B, H, W] uint8 (rows contiguous) and float32 ``pred_boxes``
    [B, G, 4] against ``gt_boxes`` [B, 4]. One kernel launch after zeroing a small int32 workspace.
    ``launch`` overrides the tiling (tests run small tiles under the interpreter); its mask_block and
    tile_block are unused."""
    batch, groups, height, width = pred.shape
    launch = launch or tiling(pred.shape, pred.element_size(), pred.is_cuda)
    pred, pred_kind = pred_operand(pred, gt)
    grid = (batch, triton.cdiv(height, launch.block_h * launch.row_steps), triton.cdiv(width, launch.block_w))
    n_masks = batch * groups
    workspace = torch.zeros(2 * n_masks + 2 * batch, dtype=torch.int32, device=pred.device)
    counts, gt_area, arrivals = workspace.split([2 * n_masks, batch, batch])
    _reward_iou_kernel[grid](
        pred, gt, pred_boxes, gt_boxes, mask_iou, box_iou, counts, gt_area, arrivals,
        groups, height, width, *pred.stride()[:3], *gt.stride()[:2], *pred_boxes.stride(), *gt_boxes.stride(),
        threshold, empty, n_masks, grid[1] * grid[2],
        PRED_KIND=pred_kind, GROUP_BLOCK=launch.group_block, BLOCK_H=launch.block_h, BLOCK_W=launch.block_w,
        ROW_STEPS=launch.row_steps, enable_fp_fusion=False,  # box IoU rounded as torch's separate ops round it
    )  # fmt: skip
