"""Triton ``mask_stats``: intersection, union, areas and inclusive xyxy boxes in one pass.

Pass 1 (``_mask_stats_tiles``): a program per (batch item, row band, column block) loads its GT tile
once and then the matching tile of each of the G predicted masks, a block of masks at a time, so
every pred element is read once and the GT tile is reused across the group. It writes per-tile
partials: intersection, area, first/last row with foreground (row sums > 0), first/last column
(column-wise any). Pass 2 (``_mask_stats_finish``) reduces the partials of each mask.

Inputs are valid and non-empty (checked by ``lens_fast.ops.mask_stats``): ``pred`` [B, G, H, W]
and ``gt`` [B, H, W] with contiguous rows (stride 1 along W); bool passed as uint8.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from lens_fast.kernels.jit import jit

# PRED_KIND: uint8 != 0; fp32/fp16 > threshold; bf16 passed as its int16 bits, > threshold.
_BYTES, _FLOAT, _BFLOAT16_BITS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_NO_ROW = tl.constexpr(1 << 30)  # min-reduction sentinel, larger than any coordinate
_MAX_PLANE = 1 << 31  # in-plane offsets are int32


@jit
def tile_foreground(
    group_base, g_ok, gt_base, ys, xs, x_ok, height, pred_stride_row, gt_stride_row, threshold,
    PRED_KIND: tl.constexpr,
):  # fmt: skip
    """Foreground of one tile: pred [GROUP_BLOCK, BLOCK_H, BLOCK_W] (masks at ``group_base``, those with
    ``g_ok``) and gt [BLOCK_H, BLOCK_W], at rows ``ys`` and columns ``xs``; False outside the masks."""
    in_plane = (ys < height)[:, None] & x_ok[None, :]
    gt_tile = tl.load(gt_base + ys[:, None] * gt_stride_row + xs[None, :], mask=in_plane, other=0) != 0
    in_masks = g_ok[:, None, None] & in_plane[None, :, :]
    offsets = (ys[:, None] * pred_stride_row + xs[None, :])[None, :, :]
    values = tl.load(group_base[:, None, None] + offsets, mask=in_masks, other=0)
    if PRED_KIND == _BYTES:
        fg = values != 0
    else:
        if PRED_KIND == _BFLOAT16_BITS:  # exact widening, also right for subnormals in the interpreter
            values = (values.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        fg = (values.to(tl.float32) > threshold) & in_masks
    return fg, gt_tile


@jit
def _mask_stats_tiles(
    pred_ptr, gt_ptr, partial_ptr, gt_partial_ptr,
    groups, height, width,
    pred_stride_batch, pred_stride_group, pred_stride_row, gt_stride_batch, gt_stride_row,
    threshold, n_masks, n_tiles,
    PRED_KIND: tl.constexpr, GROUP_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ROW_STEPS: tl.constexpr,
):  # fmt: skip
    """partial [6, n_masks, n_tiles] int32 (intersection, area, y1, y2, x1, x2); gt_partial [B, n_tiles]."""
    batch = tl.program_id(0).to(tl.int64)
    row_band = tl.program_id(1)
    col_block = tl.program_id(2)
    tile = row_band * tl.num_programs(2) + col_block
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
        y1 = tl.full((GROUP_BLOCK,), _NO_ROW, dtype=tl.int32)
        y2 = tl.full((GROUP_BLOCK,), -1, dtype=tl.int32)
        columns = tl.zeros((GROUP_BLOCK, BLOCK_W), dtype=tl.int32)
        gt_count = 0
        for step in range(ROW_STEPS):
            ys = band_start + step * BLOCK_H + tl.arange(0, BLOCK_H)
            fg, gt_tile = tile_foreground(
                group_base, g_ok, gt_base, ys, xs, x_ok, height, pred_stride_row, gt_stride_row, threshold, PRED_KIND
            )
            gt_count += tl.sum(tl.sum(gt_tile.to(tl.int32), axis=1), axis=0)
            fg_int = fg.to(tl.int32)
            row_counts = tl.sum(fg_int, axis=2)  # [GROUP_BLOCK, BLOCK_H]
            area += tl.sum(row_counts, axis=1)
            intersection += tl.sum(tl.sum((fg & gt_tile[None, :, :]).to(tl.int32), axis=2), axis=1)
            y1 = tl.minimum(y1, tl.min(tl.where(row_counts > 0, ys[None, :], _NO_ROW), axis=1))
            y2 = tl.maximum(y2, tl.max(tl.where(row_counts > 0, ys[None, :], -1), axis=1))
            columns = tl.maximum(columns, tl.max(fg_int, axis=1))
        x1 = tl.min(tl.where(columns > 0, xs[None, :], _NO_ROW), axis=1)
        x2 = tl.max(tl.where(columns > 0, xs[None, :], -1), axis=1)
        out = partial_ptr + (batch * groups + gs) * n_tiles + tile
        stride = n_masks * n_tiles
        tl.store(out, intersection, mask=g_ok)
        tl.store(out + stride, area, mask=g_ok)
        tl.store(out + 2 * stride, y1, mask=g_ok)
        tl.store(out + 3 * stride, y2, mask=g_ok)
        tl.store(out + 4 * stride, x1, mask=g_ok)
        tl.store(out + 5 * stride, x2, mask=g_ok)
    tl.store(gt_partial_ptr + batch * n_tiles + tile, gt_count)


@jit
def _mask_stats_finish(
    partial_ptr, gt_partial_ptr, intersection_ptr, union_ptr, pred_area_ptr, gt_area_ptr, pred_box_ptr,
    groups, n_masks, n_tiles,
    MASK_BLOCK: tl.constexpr, TILE_BLOCK: tl.constexpr,
):  # fmt: skip
    """Reduce the tile partials of MASK_BLOCK masks into the final int64 / float32 outputs."""
    masks = tl.program_id(0) * MASK_BLOCK + tl.arange(0, MASK_BLOCK)
    mask_ok = masks < n_masks
    batch = masks // groups
    intersection = tl.zeros((MASK_BLOCK,), dtype=tl.int64)
    area = tl.zeros((MASK_BLOCK,), dtype=tl.int64)
    gt_area = tl.zeros((MASK_BLOCK,), dtype=tl.int64)
    y1 = tl.full((MASK_BLOCK,), _NO_ROW, dtype=tl.int32)
    y2 = tl.full((MASK_BLOCK,), -1, dtype=tl.int32)
    x1 = tl.full((MASK_BLOCK,), _NO_ROW, dtype=tl.int32)
    x2 = tl.full((MASK_BLOCK,), -1, dtype=tl.int32)
    stride = n_masks * n_tiles
    for t0 in range(0, n_tiles, TILE_BLOCK):
        tiles = t0 + tl.arange(0, TILE_BLOCK)
        ok = mask_ok[:, None] & (tiles < n_tiles)[None, :]
        src = partial_ptr + masks.to(tl.int64)[:, None] * n_tiles + tiles[None, :]
        intersection += tl.sum(tl.load(src, mask=ok, other=0).to(tl.int64), axis=1)
        area += tl.sum(tl.load(src + stride, mask=ok, other=0).to(tl.int64), axis=1)
        y1 = tl.minimum(y1, tl.min(tl.load(src + 2 * stride, mask=ok, other=_NO_ROW), axis=1))
        y2 = tl.maximum(y2, tl.max(tl.load(src + 3 * stride, mask=ok, other=-1), axis=1))
        x1 = tl.minimum(x1, tl.min(tl.load(src + 4 * stride, mask=ok, other=_NO_ROW), axis=1))
        x2 = tl.maximum(x2, tl.max(tl.load(src + 5 * stride, mask=ok, other=-1), axis=1))
        gt_src = gt_partial_ptr + batch.to(tl.int64)[:, None] * n_tiles + tiles[None, :]
        gt_area += tl.sum(tl.load(gt_src, mask=ok, other=0).to(tl.int64), axis=1)
    tl.store(intersection_ptr + masks, intersection, mask=mask_ok)
    tl.store(pred_area_ptr + masks, area, mask=mask_ok)
    tl.store(union_ptr + masks, area + gt_area - intersection, mask=mask_ok)
    tl.store(gt_area_ptr + batch, gt_area, mask=mask_ok & (masks % groups == 0))
    nonempty = area > 0
    box = pred_box_ptr + masks * 4
    tl.store(box, tl.where(nonempty, x1, 0).to(tl.float32), mask=mask_ok)
    tl.store(box + 1, tl.where(nonempty, y1, 0).to(tl.float32), mask=mask_ok)
    tl.store(box + 2, tl.where(nonempty, x2, 0).to(tl.float32), mask=mask_ok)
    tl.store(box + 3, tl.where(nonempty, y2, 0).to(tl.float32), mask=mask_ok)


class Tiling(NamedTuple):
    """Launch shape: pass 1 tiles [GROUP_BLOCK, BLOCK_H, BLOCK_W], ROW_STEPS tiles down per program;
    pass 2 reduces [MASK_BLOCK masks, TILE_BLOCK tiles] at a time."""

    group_block: int
    block_h: int
    block_w: int
    row_steps: int
    mask_block: int
    tile_block: int


def tiling(shape: torch.Size, element_size: int, compiled: bool) -> Tiling:
    """The tiling for ``pred`` of ``shape`` [B, G, H, W]: GPU-sized when ``compiled``, else few, large
    tiles (the interpreter's cost is programs x iterations)."""
    batch, groups, height, width = shape
    if compiled:
        group_block = min(triton.next_power_of_2(groups), 8)
        block_w = min(triton.next_power_of_2(width), 128)
        tile_elements = 8192 if element_size == 1 else 4096
        block_h = max(1, min(triton.next_power_of_2(height), tile_elements // (group_block * block_w)))
        row_steps = max(1, min(4, triton.cdiv(height, block_h)))
        tile_budget = 4096
    else:
        group_block = min(triton.next_power_of_2(groups), 16)
        block_w = triton.next_power_of_2(width)
        block_h = min(triton.next_power_of_2(height), max(1, (1 << 18) // (group_block * block_w)))
        row_steps = triton.cdiv(height, block_h)
        tile_budget = 1 << 20
    n_tiles = triton.cdiv(height, block_h * row_steps) * triton.cdiv(width, block_w)
    mask_block = min(triton.next_power_of_2(batch * groups), 64)
    tile_block = min(triton.next_power_of_2(n_tiles), max(1, tile_budget // mask_block))
    return Tiling(group_block, block_h, block_w, row_steps, mask_block, tile_block)


def pred_operand(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``pred`` [B, G, H, W] as the kernels read it (bf16 as its int16 bits) and its PRED_KIND; ValueError
    when a mask plane exceeds the kernels' int32 in-plane offsets."""
    height, width = pred.shape[-2:]
    if max(height * pred.stride(2), height * gt.stride(1)) >= _MAX_PLANE:
        raise ValueError(
            f"pred: masks of {height} x {width} with row stride {pred.stride(2)} exceed the Triton kernel's "
            "2**31 elements per mask; use backend='torch'"
        )
    if pred.dtype == torch.bfloat16:
        return pred.view(torch.int16), _BFLOAT16_BITS.value
    return pred, _BYTES.value if pred.dtype == torch.uint8 else _FLOAT.value


def mask_stats(
    pred: torch.Tensor,
    gt: torch.Tensor,
    threshold: float,
    intersection: torch.Tensor,
    union: torch.Tensor,
    pred_area: torch.Tensor,
    gt_area: torch.Tensor,
    pred_box: torch.Tensor,
    launch: Optional[Tiling] = None,
) -> None:
    """Fill the contiguous outputs ([B, G] int64 x3, [B] int64, [B, G, 4] float32) for ``pred``
    [B, G, H, W] (uint8 or fp32/fp16/bf16 logits) against ``gt`` [B, H, W] uint8, rows contiguous.
    ``launch`` overrides :func:`tiling` (tests run the GPU tiling under the interpreter)."""
    batch, groups, height, width = pred.shape
    launch = launch or tiling(pred.shape, pred.element_size(), pred.is_cuda)
    pred, pred_kind = pred_operand(pred, gt)
    grid = (batch, triton.cdiv(height, launch.block_h * launch.row_steps), triton.cdiv(width, launch.block_w))
    n_tiles = grid[1] * grid[2]
    n_masks = batch * groups
    partial = torch.empty((6, n_masks, n_tiles), dtype=torch.int32, device=pred.device)
    gt_partial = torch.empty((batch, n_tiles), dtype=torch.int32, device=pred.device)
    _mask_stats_tiles[grid](
        pred, gt, partial, gt_partial, groups, height, width, *pred.stride()[:3], *gt.stride()[:2],
        threshold, n_masks, n_tiles,
        PRED_KIND=pred_kind, GROUP_BLOCK=launch.group_block, BLOCK_H=launch.block_h, BLOCK_W=launch.block_w,
        ROW_STEPS=launch.row_steps,
    )  # fmt: skip
    _mask_stats_finish[(triton.cdiv(n_masks, launch.mask_block),)](
        partial, gt_partial, intersection, union, pred_area, gt_area, pred_box, groups, n_masks, n_tiles,
        MASK_BLOCK=launch.mask_block, TILE_BLOCK=launch.tile_block,
    )  # fmt: skip
