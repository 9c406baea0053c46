"""Triton kernels of ``lens_fast.ops.postprocess_masks`` and ``postprocess_mask_stats``.

SAM's ``Sam.postprocess_masks`` resizes low-res logits [h, w] bilinearly (align_corners=False) to
``image_size`` x ``image_size``, crops [:input_h, :input_w] and resizes to [out_h, out_w]. Both resizes
are linear and separable: along each axis an output index is a weighted sum of 4 low-res taps (2
intermediate taps of 2 low-res taps each) on SPAN consecutive low-res indices (3 when the low-res size
is at most ``image_size``, SAM's case). Coordinates and weights follow torch's arithmetic
(``src = max(scale * (dst + 0.5) - 0.5, 0)``, ``scale = in / out`` in float32, clamped taps, the
identity case ``in == out`` copied); the sums run in float32 in another order than torch's, so values
agree to float32 rounding. Nothing but the low-res logits is read and no intermediate is written.

A program owns BLOCK_X output columns of one mask and walks down ROWS output rows. It keeps a window
of 3 low-res rows already resized along x (each costs SPAN cached loads per column); moving to the
next output row shifts the window only when its base low-res row moves (every 2.5 rows for SAM's
256 -> 1024 -> 640 chain), so an output pixel costs about 3 FMAs plus its store or its statistics.

The kernels assume validated inputs (``lens_fast.ops`` checks them): ``low_res`` [M, h, w] float32,
float16 or bfloat16 with any strides (offsets inside one mask below 2**31), ``gt`` [B, out_h, out_w]
uint8 with unit column stride, contiguous outputs, ``out_h * out_w < 2**31``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from lens_fast.kernels.jit import jit

STATS_FIELDS = tl.constexpr(6)  # per mask: intersection, area, out_w - x1, out_h - y1, x2 + 1, y2 + 1 (0 = none)


@jit
def _linear_taps(dst, in_size, out_size, scale):
    """torch's align_corners=False taps for output indices ``dst``: (i0, i1, w0, w1)."""
    src = tl.maximum(tl.fma(scale, dst.to(tl.float32) + 0.5, -0.5), 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = i0 + (i0 < in_size - 1).to(tl.int32)
    same = in_size == out_size  # torch copies: both taps at dst, weights (1, 0)
    i0 = tl.where(same, dst, i0)
    i1 = tl.where(same, dst, i1)
    lam = tl.where(same, 0.0, lam)
    return i0, i1, 1.0 - lam, lam


@jit
def _composite_taps(dst, low_size, image_size, crop_size, out_size, scale_1, scale_2):
    """Both resizes along one axis for output indices ``dst``: low-res taps ``base + (0, o1, o2, o3)``
    with weights ``(p0, p1, p2, p3)`` (resize 1: low_size -> image_size, cropped to crop_size;
    resize 2: crop_size -> out_size)."""
    i0, i1, v0, v1 = _linear_taps(dst, crop_size, out_size, scale_2)  # intermediate taps
    a0, a1, wa0, wa1 = _linear_taps(i0, low_size, image_size, scale_1)
    b0, b1, wb0, wb1 = _linear_taps(i1, low_size, image_size, scale_1)
    return a0, a1 - a0, b0 - a0, b1 - a0, v0 * wa0, v0 * wa1, v1 * wb0, v1 * wb1


@jit
def _weight_at(k: tl.constexpr, o1, o2, o3, p0, p1, p2, p3):
    """The composite weight of the tap at offset ``k`` from the base."""
    weight = tl.where(o1 == k, p1, 0.0) + tl.where(o2 == k, p2, 0.0) + tl.where(o3 == k, p3, 0.0)
    if k == 0:
        weight += p0
    return weight


@jit
def composite_taps_kernel(
    taps_i_ptr, taps_f_ptr, n_rows, n_total,
    h, w, image_size, input_h, input_w, out_h, out_w, scale_h1, scale_w1, scale_h2, scale_w2,
    BLOCK: tl.constexpr,
):
    """Tap tables of the output rows (entries [0, out_h)) then columns (entries [out_h, out_h + out_w)).

    taps_i [n, 4] int32: base, o1, o2, o3; taps_f [n, 8] float32: the weights at offsets 0, 1, 2
    from the base, then p0..p3 (see _composite_taps).
    """
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_total
    is_row = i < n_rows
    dst = tl.where(is_row, i, i - n_rows)
    rb, r1, r2, r3, rp0, rp1, rp2, rp3 = _composite_taps(dst, h, image_size, input_h, out_h, scale_h1, scale_h2)
    cb, c1, c2, c3, cp0, cp1, cp2, cp3 = _composite_taps(dst, w, image_size, input_w, out_w, scale_w1, scale_w2)
    o1, o2, o3 = tl.where(is_row, r1, c1), tl.where(is_row, r2, c2), tl.where(is_row, r3, c3)
    p0, p1, p2, p3 = tl.where(is_row, rp0, cp0), tl.where(is_row, rp1, cp1), tl.where(is_row, rp2, cp2), tl.where(is_row, rp3, cp3)
    tl.store(taps_i_ptr + i * 4 + 0, tl.where(is_row, rb, cb), mask=ok)
    tl.store(taps_i_ptr + i * 4 + 1, o1, mask=ok)
    tl.store(taps_i_ptr + i * 4 + 2, o2, mask=ok)
    tl.store(taps_i_ptr + i * 4 + 3, o3, mask=ok)
    tl.store(taps_f_ptr + i * 8 + 0, _weight_at(0, o1, o2, o3, p0, p1, p2, p3), mask=ok)
    tl.store(taps_f_ptr + i * 8 + 1, _weight_at(1, o1, o2, o3, p0, p1, p2, p3), mask=ok)
    tl.store(taps_f_ptr + i * 8 + 2, _weight_at(2, o1, o2, o3, p0, p1, p2, p3), mask=ok)
    tl.store(taps_f_ptr + i * 8 + 4, p0, mask=ok)
    tl.store(taps_f_ptr + i * 8 + 5, p1, mask=ok)
    tl.store(taps_f_ptr + i * 8 + 6, p2, mask=ok)
    tl.store(taps_f_ptr + i * 8 + 7, p3, mask=ok)


@jit
def _load_taps(taps_i_ptr, taps_f_ptr, index, ok):
    """One entry (or a vector of entries) of the tap tables: base, o1..o3, weights at 0..2, p0..p3."""
    ti = taps_i_ptr + index * 4
    tf = taps_f_ptr + index * 8
    return (
        tl.load(ti + 0, mask=ok, other=0), tl.load(ti + 1, mask=ok, other=0),
        tl.load(ti + 2, mask=ok, other=0), tl.load(ti + 3, mask=ok, other=0),
        tl.load(tf + 0, mask=ok, other=0.0), tl.load(tf + 1, mask=ok, other=0.0),
        tl.load(tf + 2, mask=ok, other=0.0), tl.load(tf + 4, mask=ok, other=0.0),
        tl.load(tf + 5, mask=ok, other=0.0), tl.load(tf + 6, mask=ok, other=0.0),
        tl.load(tf + 7, mask=ok, other=0.0),
    )


@jit
def _resized_row(low_ptrs, row, h, stride_h, stride_w, w, x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3,
                 SPAN_X: tl.constexpr):
    """Low-res row ``row`` (clamped to h - 1) of each mask (``low_ptrs`` [MASKS, 1]) resized along x to
    the program's columns (tap vectors [BLOCK_X]): [MASKS, BLOCK_X] float32."""
    ptrs = low_ptrs + tl.minimum(row, h - 1) * stride_h
    acc = tl.load(ptrs + (x_base * stride_w)[None, :]).to(tl.float32) * b0[None, :]
    value = tl.load(ptrs + (tl.minimum(x_base + 1, w - 1) * stride_w)[None, :]).to(tl.float32)
    acc = tl.fma(value, b1[None, :], acc)
    value = tl.load(ptrs + (tl.minimum(x_base + 2, w - 1) * stride_w)[None, :]).to(tl.float32)
    acc = tl.fma(value, b2[None, :], acc)
    for j in tl.static_range(3, SPAN_X):  # low-res wider than image_size
        value = tl.load(ptrs + (tl.minimum(x_base + j, w - 1) * stride_w)[None, :]).to(tl.float32)
        acc = tl.fma(value, _weight_at(j, x_o1, x_o2, x_o3, xp0, xp1, xp2, xp3)[None, :], acc)
    return acc


@jit
def _row_logits(
    low_ptrs, taps_i_ptr, taps_f_ptr, y, window_base, win0, win1, win2, h, w, stride_h, stride_w,
    x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_Y: tl.constexpr, SPAN_X: tl.constexpr,
):
    """Output row ``y`` of the program's masks and columns, and the window (low-res rows
    window_base + 0..2 resized along x, [MASKS, BLOCK_X] each) moved to it."""
    base, o1, o2, o3, a0, a1, a2, p0, p1, p2, p3 = _load_taps(taps_i_ptr, taps_f_ptr, y, True)
    if base != window_base:
        if base == window_base + 1:
            win0 = win1
            win1 = win2
        else:
            if base == window_base + 2:
                win0 = win2
            else:
                win0 = _resized_row(low_ptrs, base, h, stride_h, stride_w, w, x_base, x_o1, x_o2, x_o3,
                                    b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_X)
            win1 = _resized_row(low_ptrs, base + 1, h, stride_h, stride_w, w, x_base, x_o1, x_o2, x_o3,
                                b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_X)
        win2 = _resized_row(low_ptrs, base + 2, h, stride_h, stride_w, w, x_base, x_o1, x_o2, x_o3,
                            b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_X)
    if SPAN_Y == 3:  # every tap is in the window
        logits = tl.fma(win0, a0, tl.fma(win1, a1, win2 * a2))
    else:  # low-res taller than image_size: the second pair of taps may lie past the window
        far2 = _resized_row(low_ptrs, base + o2, h, stride_h, stride_w, w, x_base, x_o1, x_o2, x_o3,
                            b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_X)
        far3 = _resized_row(low_ptrs, base + o3, h, stride_h, stride_w, w, x_base, x_o1, x_o2, x_o3,
                            b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_X)
        logits = tl.fma(win0, p0, tl.fma(tl.where(o1 == 0, win0, win1), p1, tl.fma(far2, p2, far3 * p3)))
    return logits, base, win0, win1, win2


@jit
def _program_tile(taps_i_ptr, taps_f_ptr, n_masks, n_col_tiles, n_row_tiles, out_h, out_w,
                  MASKS: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's row tile, masks [MASKS] (ids past n_masks in the last block), low-res mask index
    clamped into range, columns [BLOCK_X] with their validity and tap vectors."""
    pid = tl.program_id(0)
    col_tile = pid % n_col_tiles
    row_tile = (pid // n_col_tiles) % n_row_tiles
    masks = (pid // (n_col_tiles * n_row_tiles)) * MASKS + tl.arange(0, MASKS)
    cols = col_tile * BLOCK_X + tl.arange(0, BLOCK_X)
    col_ok = cols < out_w
    x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3 = _load_taps(taps_i_ptr, taps_f_ptr, out_h + cols, col_ok)
    return (
        row_tile, masks, tl.minimum(masks, n_masks - 1), cols, col_ok,
        x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3,
    )


@jit
def _empty_window(MASKS: tl.constexpr, BLOCK_X: tl.constexpr):
    """A window holding no rows: its base and three [MASKS, BLOCK_X] rows."""
    empty = tl.zeros((MASKS, BLOCK_X), dtype=tl.float32)
    return tl.zeros((), dtype=tl.int32) - 4, empty, empty, empty


@jit
def postprocess_masks_kernel(
    low_ptr, taps_i_ptr, taps_f_ptr, out_ptr, threshold, n_masks, n_col_tiles, n_row_tiles,
    stride_m, stride_h, stride_w, h, w, out_h, out_w,
    APPLY_THRESHOLD: tl.constexpr, MASKS: tl.constexpr, ROWS: tl.constexpr, BLOCK_X: tl.constexpr,
    SPAN_Y: tl.constexpr, SPAN_X: tl.constexpr,
):
    """out [M, out_h, out_w]: logits in out's dtype, or uint8 ``logit > threshold`` with APPLY_THRESHOLD.

    A program: MASKS masks x BLOCK_X columns, walking down ROWS rows.
    """
    (row_tile, masks, safe_masks, cols, col_ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3) = (
        _program_tile(taps_i_ptr, taps_f_ptr, n_masks, n_col_tiles, n_row_tiles, out_h, out_w, MASKS, BLOCK_X)
    )
    ok = (masks < n_masks)[:, None] & col_ok[None, :]
    low_ptrs = low_ptr + (safe_masks.to(tl.int64) * stride_m)[:, None]
    out_ptrs = out_ptr + (masks.to(tl.int64) * out_h * out_w)[:, None]
    window_base, win0, win1, win2 = _empty_window(MASKS, BLOCK_X)
    for row in range(row_tile * ROWS, tl.minimum(row_tile * ROWS + ROWS, out_h)):
        y = row + tl.zeros((), dtype=tl.int32)  # a tensor under the interpreter too
        logits, window_base, win0, win1, win2 = _row_logits(
            low_ptrs, taps_i_ptr, taps_f_ptr, y, window_base, win0, win1, win2, h, w, stride_h, stride_w,
            x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_Y, SPAN_X,
        )
        ptrs = out_ptrs + (y * out_w + cols)[None, :]
        if APPLY_THRESHOLD:
            tl.store(ptrs, (logits > threshold).to(tl.uint8), mask=ok)
        else:
            tl.store(ptrs, logits.to(out_ptr.dtype.element_ty), mask=ok)


@jit
def postprocess_mask_stats_kernel(
    low_ptr, taps_i_ptr, taps_f_ptr, gt_ptr, acc_ptr, gt_acc_ptr, threshold,
    n_masks, n_col_tiles, n_row_tiles, group,
    stride_m, stride_h, stride_w, gt_stride_b, gt_stride_h, h, w, out_h, out_w,
    MASKS: tl.constexpr, ROWS: tl.constexpr, BLOCK_X: tl.constexpr, SPAN_Y: tl.constexpr,
    SPAN_X: tl.constexpr,
):
    """Accumulate per-mask stats of ``logit > threshold`` against gt into acc [M, 6] and gt_acc [B].

    A program: MASKS consecutive masks (mostly of one group, so one gt) x BLOCK_X columns, walking
    down ROWS rows. acc must start at 0 (see STATS_FIELDS for its encoding); the first mask of each
    group adds its gt's area.
    """
    (row_tile, masks, safe_masks, cols, col_ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3) = (
        _program_tile(taps_i_ptr, taps_f_ptr, n_masks, n_col_tiles, n_row_tiles, out_h, out_w, MASKS, BLOCK_X)
    )
    masks_ok = masks < n_masks
    ok = masks_ok[:, None] & col_ok[None, :]
    low_ptrs = low_ptr + (safe_masks.to(tl.int64) * stride_m)[:, None]
    images = safe_masks // group
    gt_ptrs = gt_ptr + (images.to(tl.int64) * gt_stride_b)[:, None]
    window_base, win0, win1, win2 = _empty_window(MASKS, BLOCK_X)
    inter = tl.zeros((MASKS, BLOCK_X), dtype=tl.int32)  # per mask and column
    area = tl.zeros((MASKS, BLOCK_X), dtype=tl.int32)
    gt_area = tl.zeros((MASKS, BLOCK_X), dtype=tl.int32)
    y_lo = tl.zeros((MASKS, BLOCK_X), dtype=tl.int32) + out_h  # first / last foreground row
    y_hi = tl.zeros((MASKS, BLOCK_X), dtype=tl.int32) - 1
    for row in range(row_tile * ROWS, tl.minimum(row_tile * ROWS + ROWS, out_h)):
        y = row + tl.zeros((), dtype=tl.int32)  # a tensor under the interpreter too
        logits, window_base, win0, win1, win2 = _row_logits(
            low_ptrs, taps_i_ptr, taps_f_ptr, y, window_base, win0, win1, win2, h, w, stride_h, stride_w,
            x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_Y, SPAN_X,
        )
        truth = tl.load(gt_ptrs + (y * gt_stride_h + cols)[None, :], mask=ok, other=0) != 0
        fg = (logits > threshold) & ok
        inter += (fg & truth).to(tl.int32)
        area += fg.to(tl.int32)
        gt_area += truth.to(tl.int32)
        y_lo = tl.minimum(y_lo, tl.where(fg, y, out_h))
        y_hi = tl.maximum(y_hi, tl.where(fg, y, -1))
    hit = area > 0
    acc = acc_ptr + masks * STATS_FIELDS
    tl.atomic_add(acc + 0, tl.sum(inter, axis=1), mask=masks_ok)
    tl.atomic_add(acc + 1, tl.sum(area, axis=1), mask=masks_ok)
    tl.atomic_max(acc + 2, out_w - tl.min(tl.where(hit, cols[None, :], out_w), axis=1), mask=masks_ok)
    tl.atomic_max(acc + 3, out_h - tl.min(y_lo, axis=1), mask=masks_ok)
    tl.atomic_max(acc + 4, tl.max(tl.where(hit, cols[None, :], -1), axis=1) + 1, mask=masks_ok)
    tl.atomic_max(acc + 5, tl.max(y_hi, axis=1) + 1, mask=masks_ok)
    tl.atomic_add(gt_acc_ptr + images, tl.sum(gt_area, axis=1), mask=masks_ok & (masks % group == 0))


@jit
def finalize_mask_stats_kernel(
    acc_ptr, gt_acc_ptr, inter_ptr, union_ptr, area_ptr, gt_area_ptr, box_ptr,
    n_masks, n_images, group, out_h, out_w, BLOCK: tl.constexpr,
):
    """MaskStats tensors (int64 counts, float32 xyxy boxes, zeros when empty) from the accumulators."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_masks
    acc = acc_ptr + i * STATS_FIELDS
    inter = tl.load(acc + 0, mask=ok, other=0).to(tl.int64)
    area = tl.load(acc + 1, mask=ok, other=0).to(tl.int64)
    truth = tl.load(gt_acc_ptr + i // group, mask=ok, other=0).to(tl.int64)
    has = area > 0
    x1 = tl.where(has, out_w - tl.load(acc + 2, mask=ok, other=0), 0).to(tl.float32)
    y1 = tl.where(has, out_h - tl.load(acc + 3, mask=ok, other=0), 0).to(tl.float32)
    x2 = tl.where(has, tl.load(acc + 4, mask=ok, other=0) - 1, 0).to(tl.float32)
    y2 = tl.where(has, tl.load(acc + 5, mask=ok, other=0) - 1, 0).to(tl.float32)
    tl.store(inter_ptr + i, inter, mask=ok)
    tl.store(area_ptr + i, area, mask=ok)
    tl.store(union_ptr + i, area + truth - inter, mask=ok)
    tl.store(box_ptr + i * 4 + 0, x1, mask=ok)
    tl.store(box_ptr + i * 4 + 1, y1, mask=ok)
    tl.store(box_ptr + i * 4 + 2, x2, mask=ok)
    tl.store(box_ptr + i * 4 + 3, y2, mask=ok)
    images_ok = i < n_images
    tl.store(gt_area_ptr + i, tl.load(gt_acc_ptr + i, mask=images_ok, other=0).to(tl.int64), mask=images_ok)


def _span(low_size: int, image_size: int) -> int:
    """How many consecutive low-res indices one output index can touch along an axis.

    The two taps of the first resize are adjacent, and its sources for adjacent intermediate indices
    lie ``scale = low_size / image_size`` apart: 3 when scale <= 1 (SAM's case), else a safe bound.
    """
    return 3 if low_size <= image_size else math.ceil(low_size / image_size) + 3


def _tiles(low_res: torch.Tensor, image_size: int, original_size) -> dict:
    """MASKS x BLOCK_X (a program's masks and columns), ROWS (the rows it walks), SPAN_Y, SPAN_X.

    All masks share the geometry, so the per-row work (taps, window moves) is shared by a program's
    masks. GPU: 4 masks x 128 columns (4 warps, 4 elements per thread) walking 32 rows, so filling
    the window is a small part of a program and 8 x 8 masks of 480 x 640 make 1200 programs.
    Interpreter (cost per program and per row): up to 64 masks, whole rows, all rows.
    """
    h, w = low_res.shape[-2:]
    out_h, out_w = original_size
    spans = dict(SPAN_Y=_span(h, image_size), SPAN_X=_span(w, image_size))
    if low_res.is_cuda:
        return dict(MASKS=4, ROWS=32, BLOCK_X=128, **spans)
    masks = min(triton.next_power_of_2(low_res.shape[0]), 64)
    return dict(MASKS=masks, ROWS=out_h, BLOCK_X=min(triton.next_power_of_2(out_w), 1024), **spans)


def _scale(in_size: int, out_size: int) -> float:
    """torch's align_corners=False scale ``in / out``, rounded to float32 as torch computes it."""
    return float(np.float32(in_size) / np.float32(out_size))


def _tap_tables(low_res: torch.Tensor, image_size: int, input_size, original_size) -> tuple:
    """The row and column tap tables (composite_taps_kernel) of this geometry."""
    h, w = low_res.shape[-2:]
    (input_h, input_w), (out_h, out_w) = input_size, original_size
    n_total = out_h + out_w
    taps_i = torch.empty(n_total, 4, dtype=torch.int32, device=low_res.device)
    taps_f = torch.empty(n_total, 8, dtype=torch.float32, device=low_res.device)
    block = 1024 if low_res.is_cuda else triton.next_power_of_2(n_total)
    composite_taps_kernel[(triton.cdiv(n_total, block),)](
        taps_i, taps_f, out_h, n_total, h, w, image_size, input_h, input_w, out_h, out_w,
        _scale(h, image_size), _scale(w, image_size), _scale(input_h, out_h), _scale(input_w, out_w),
        BLOCK=block,
    )
    return taps_i, taps_f


def postprocess_masks_triton(
    low_res: torch.Tensor, out: torch.Tensor, image_size: int, input_size, original_size,
    threshold: float | None,
) -> None:
    """Fill ``out`` [M, H, W] (low_res's dtype, or uint8 when thresholding) from ``low_res`` [M, h, w]."""
    taps_i, taps_f = _tap_tables(low_res, image_size, input_size, original_size)
    tiles = _tiles(low_res, image_size, original_size)
    n_masks = low_res.shape[0]
    n_col_tiles = triton.cdiv(original_size[1], tiles["BLOCK_X"])
    n_row_tiles = triton.cdiv(original_size[0], tiles["ROWS"])
    grid = (triton.cdiv(n_masks, tiles["MASKS"]) * n_row_tiles * n_col_tiles,)
    postprocess_masks_kernel[grid](
        low_res, taps_i, taps_f, out, 0.0 if threshold is None else threshold, n_masks, n_col_tiles, n_row_tiles,
        *low_res.stride(), *low_res.shape[-2:], *original_size,
        APPLY_THRESHOLD=threshold is not None, **tiles,
    )


def postprocess_mask_stats_triton(
    low_res: torch.Tensor, gt: torch.Tensor, image_size: int, input_size, original_size,
    threshold: float,
) -> tuple[torch.Tensor, ...]:
    """(intersection, union, pred_area [M] int64, gt_area [B] int64, pred_box [M, 4] float32).

    ``low_res`` [M, h, w] with M = B * G masks (image-major), ``gt`` [B, H, W] uint8, unit column stride.
    """
    n_masks, n_images = low_res.shape[0], gt.shape[0]
    group = n_masks // n_images
    out_h, out_w = original_size
    device = low_res.device
    fields = STATS_FIELDS.value
    acc = torch.zeros(n_masks * fields + n_images, dtype=torch.int32, device=device)
    gt_acc = acc[n_masks * fields:]
    taps_i, taps_f = _tap_tables(low_res, image_size, input_size, original_size)
    tiles = _tiles(low_res, image_size, original_size)
    n_col_tiles = triton.cdiv(out_w, tiles["BLOCK_X"])
    n_row_tiles = triton.cdiv(out_h, tiles["ROWS"])
    grid = (triton.cdiv(n_masks, tiles["MASKS"]) * n_row_tiles * n_col_tiles,)
    postprocess_mask_stats_kernel[grid](
        low_res, taps_i, taps_f, gt, acc, gt_acc, threshold, n_masks, n_col_tiles, n_row_tiles, group,
        *low_res.stride(), gt.stride(0), gt.stride(1), *low_res.shape[-2:], out_h, out_w, **tiles,
    )
    counts = torch.empty(3, n_masks, dtype=torch.int64, device=device)
    gt_area = torch.empty(n_images, dtype=torch.int64, device=device)
    box = torch.empty(n_masks, 4, dtype=torch.float32, device=device)
    block = 1024 if low_res.is_cuda else triton.next_power_of_2(max(n_masks, n_images))
    finalize_mask_stats_kernel[(triton.cdiv(max(n_masks, n_images), block),)](
        acc, gt_acc, counts[0], counts[1], counts[2], gt_area, box,
        n_masks, n_images, group, out_h, out_w, BLOCK=block,
    )
    return counts[0], counts[1], counts[2], gt_area, box
