"""Triton kernels of ``lens_fast.ops.postprocess_masks`` and ``postprocess_mask_stats``.

SAM's ``Sam.postprocess_masks`` resizes low-res logits [h, w] bilinearly (align_corners=False) to
``image_size`` x ``image_size``, crops [:input_h, :input_w] and resizes to [out_h, out_w]. Both resizes
are linear, so an output pixel is the bilinear blend of 4 intermediate pixels, each the bilinear blend
of 4 low-res logits: these kernels read only the low-res logits (16 cached gathers per output pixel)
and never write the intermediate image. Coordinates and weights follow torch's arithmetic
(``src = max(scale * (dst + 0.5) - 0.5, 0)``, ``scale = in / out`` in float32, clamped taps, the
identity case ``in == out`` copied) and blends are ``fma(t0, w0, t1 * w1)`` as torch's FMA builds
compute them; everything is float32.

The kernels assume validated inputs (``lens_fast.ops`` checks them): ``low_res`` [M, h, w] float32,
float16 or bfloat16 with any strides (offsets inside one mask below 2**31), ``gt`` [B, out_h, out_w]
uint8 with unit column stride, contiguous outputs, ``out_h * out_w < 2**31``. One program computes
BLOCK_Y output rows of one mask, BLOCK_X columns at a time.
"""
from __future__ import annotations

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
def _blend(low_ptr, r0, r1, wr0, wr1, c0, c1, wc0, wc1):
    """Bilinear blend of 4 low-res logits: row offsets/weights [BY, 1], column offsets/weights [1, BX]."""
    t0 = tl.fma(
        tl.load(low_ptr + r0 + c0).to(tl.float32), wc0, tl.load(low_ptr + r0 + c1).to(tl.float32) * wc1
    )
    t1 = tl.fma(
        tl.load(low_ptr + r1 + c0).to(tl.float32), wc0, tl.load(low_ptr + r1 + c1).to(tl.float32) * wc1
    )
    return tl.fma(t0, wr0, t1 * wr1)


@jit
def _full_res_tile(
    low_ptr, stride_h, stride_w, rows, cols,
    h, w, image_size, input_h, input_w, out_h, out_w,
    scale_h1, scale_w1, scale_h2, scale_w2,
):
    """Full-resolution logits [BY, BX] at output ``rows`` x ``cols`` (indices past the end are clamped)."""
    y0, y1, wy0, wy1 = _linear_taps(rows, input_h, out_h, scale_h2)  # intermediate rows
    x0, x1, wx0, wx1 = _linear_taps(cols, input_w, out_w, scale_w2)  # intermediate columns
    a0, a1, va0, va1 = _linear_taps(y0, h, image_size, scale_h1)  # low-res rows of y0
    b0, b1, vb0, vb1 = _linear_taps(y1, h, image_size, scale_h1)  # ... of y1
    c0, c1, uc0, uc1 = _linear_taps(x0, w, image_size, scale_w1)  # low-res columns of x0
    d0, d1, ud0, ud1 = _linear_taps(x1, w, image_size, scale_w1)  # ... of x1
    a0 = (a0 * stride_h)[:, None]
    a1 = (a1 * stride_h)[:, None]
    b0 = (b0 * stride_h)[:, None]
    b1 = (b1 * stride_h)[:, None]
    c0 = (c0 * stride_w)[None, :]
    c1 = (c1 * stride_w)[None, :]
    d0 = (d0 * stride_w)[None, :]
    d1 = (d1 * stride_w)[None, :]
    va0, va1, vb0, vb1 = va0[:, None], va1[:, None], vb0[:, None], vb1[:, None]
    uc0, uc1, ud0, ud1 = uc0[None, :], uc1[None, :], ud0[None, :], ud1[None, :]
    i00 = _blend(low_ptr, a0, a1, va0, va1, c0, c1, uc0, uc1)  # intermediate (y0, x0)
    i01 = _blend(low_ptr, a0, a1, va0, va1, d0, d1, ud0, ud1)  # (y0, x1)
    i10 = _blend(low_ptr, b0, b1, vb0, vb1, c0, c1, uc0, uc1)  # (y1, x0)
    i11 = _blend(low_ptr, b0, b1, vb0, vb1, d0, d1, ud0, ud1)  # (y1, x1)
    u0 = tl.fma(i00, wx0[None, :], i01 * wx1[None, :])
    u1 = tl.fma(i10, wx0[None, :], i11 * wx1[None, :])
    return tl.fma(u0, wy0[:, None], u1 * wy1[:, None])


@jit
def postprocess_masks_kernel(
    low_ptr, out_ptr, threshold, n_row_tiles,
    stride_m, stride_h, stride_w,
    h, w, image_size, input_h, input_w, out_h, out_w,
    scale_h1, scale_w1, scale_h2, scale_w2,
    APPLY_THRESHOLD: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """out [M, out_h, out_w]: logits in out's dtype, or uint8 ``logit > threshold`` with APPLY_THRESHOLD."""
    pid = tl.program_id(0)
    mask_id = pid // n_row_tiles
    rows = (pid % n_row_tiles) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    low_ptr += mask_id.to(tl.int64) * stride_m
    out_ptr += mask_id.to(tl.int64) * out_h * out_w
    row_ok = (rows < out_h)[:, None]
    for x_start in range(0, out_w, BLOCK_X):
        cols = x_start + tl.arange(0, BLOCK_X)
        logits = _full_res_tile(
            low_ptr, stride_h, stride_w, rows, cols,
            h, w, image_size, input_h, input_w, out_h, out_w,
            scale_h1, scale_w1, scale_h2, scale_w2,
        )
        offsets = rows[:, None] * out_w + cols[None, :]
        valid = row_ok & (cols < out_w)[None, :]
        if APPLY_THRESHOLD:
            tl.store(out_ptr + offsets, (logits > threshold).to(tl.uint8), mask=valid)
        else:
            tl.store(out_ptr + offsets, logits.to(out_ptr.dtype.element_ty), mask=valid)


@jit
def postprocess_mask_stats_kernel(
    low_ptr, gt_ptr, acc_ptr, gt_acc_ptr, threshold, n_row_tiles, group,
    stride_m, stride_h, stride_w, gt_stride_b, gt_stride_h,
    h, w, image_size, input_h, input_w, out_h, out_w,
    scale_h1, scale_w1, scale_h2, scale_w2,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Accumulate per-mask stats of ``logit > threshold`` against gt into acc [M, 6] and gt_acc [B].

    Programs run image-major, then row tile, then mask of the group, so the G programs reading one gt
    tile are neighbours. acc must start at 0 (see STATS_FIELDS for its encoding).
    """
    pid = tl.program_id(0)
    g = pid % group
    tile = (pid // group) % n_row_tiles
    image = pid // (group * n_row_tiles)
    mask_id = image * group + g
    rows = tile * BLOCK_Y + tl.arange(0, BLOCK_Y)
    low_ptr += mask_id.to(tl.int64) * stride_m
    gt_ptr += image.to(tl.int64) * gt_stride_b
    row_ok = (rows < out_h)[:, None]
    inter = tl.zeros((), dtype=tl.int32)
    area = tl.zeros((), dtype=tl.int32)
    gt_area = tl.zeros((), dtype=tl.int32)
    row_hit = tl.zeros((BLOCK_Y,), dtype=tl.int32)
    x_lo = tl.zeros((), dtype=tl.int32) + out_w
    x_hi = tl.zeros((), dtype=tl.int32) - 1
    for x_start in range(0, out_w, BLOCK_X):
        cols = x_start + tl.arange(0, BLOCK_X)
        logits = _full_res_tile(
            low_ptr, stride_h, stride_w, rows, cols,
            h, w, image_size, input_h, input_w, out_h, out_w,
            scale_h1, scale_w1, scale_h2, scale_w2,
        )
        valid = row_ok & (cols < out_w)[None, :]
        truth = tl.load(gt_ptr + rows[:, None] * gt_stride_h + cols[None, :], mask=valid, other=0) != 0
        fg = (logits > threshold) & valid
        inter += tl.sum((fg & truth).to(tl.int32))
        area += tl.sum(fg.to(tl.int32))
        gt_area += tl.sum(truth.to(tl.int32))
        row_hit = tl.maximum(row_hit, tl.max(fg.to(tl.int32), axis=1))
        col_hit = tl.max(fg.to(tl.int32), axis=0) > 0
        x_lo = tl.minimum(x_lo, tl.min(tl.where(col_hit, cols, out_w), axis=0))
        x_hi = tl.maximum(x_hi, tl.max(tl.where(col_hit, cols, -1), axis=0))
    y_lo = tl.min(tl.where(row_hit > 0, rows, out_h), axis=0)
    y_hi = tl.max(tl.where(row_hit > 0, rows, -1), axis=0)
    acc_ptr += mask_id * STATS_FIELDS
    tl.atomic_add(acc_ptr + 0, inter)
    tl.atomic_add(acc_ptr + 1, area)
    tl.atomic_max(acc_ptr + 2, out_w - x_lo)
    tl.atomic_max(acc_ptr + 3, out_h - y_lo)
    tl.atomic_max(acc_ptr + 4, x_hi + 1)
    tl.atomic_max(acc_ptr + 5, y_hi + 1)
    tl.atomic_add(gt_acc_ptr + image, gt_area, mask=g == 0)


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


def _blocks(out_h: int, out_w: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_Y, BLOCK_X): big tiles under the interpreter (its cost is per program), 4 x 128 on GPU.

    On GPU (4 warps) 4 x 128 keeps both kernels at <= 96 registers with no spills (sm_90).
    """
    block_x = min(triton.next_power_of_2(out_w), 256 if interpreted else 128)
    if interpreted:
        return max(1, min(triton.next_power_of_2(out_h), 16384 // block_x)), block_x
    return 4, block_x


def _scale(in_size: int, out_size: int) -> float:
    """torch's align_corners=False scale ``in / out``, rounded to float32 as torch computes it."""
    return float(np.float32(in_size) / np.float32(out_size))


def _geometry_args(low_res: torch.Tensor, image_size: int, input_size, original_size) -> tuple:
    h, w = low_res.shape[-2:]
    (input_h, input_w), (out_h, out_w) = input_size, original_size
    return (
        h, w, image_size, input_h, input_w, out_h, out_w,
        _scale(h, image_size), _scale(w, image_size), _scale(input_h, out_h), _scale(input_w, out_w),
    )


def postprocess_masks_triton(
    low_res: torch.Tensor, out: torch.Tensor, image_size: int, input_size, original_size,
    threshold: float | None,
) -> None:
    """Fill ``out`` [M, H, W] (low_res's dtype, or uint8 when thresholding) from ``low_res`` [M, h, w]."""
    n_masks = low_res.shape[0]
    out_h, out_w = original_size
    block_y, block_x = _blocks(out_h, out_w, interpreted=not low_res.is_cuda)
    n_row_tiles = triton.cdiv(out_h, block_y)
    postprocess_masks_kernel[(n_masks * n_row_tiles,)](
        low_res, out, 0.0 if threshold is None else threshold, n_row_tiles,
        *low_res.stride(), *_geometry_args(low_res, image_size, input_size, original_size),
        APPLY_THRESHOLD=threshold is not None, BLOCK_Y=block_y, BLOCK_X=block_x,
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
    block_y, block_x = _blocks(out_h, out_w, interpreted=not low_res.is_cuda)
    n_row_tiles = triton.cdiv(out_h, block_y)
    postprocess_mask_stats_kernel[(n_masks * n_row_tiles,)](
        low_res, gt, acc, gt_acc, threshold, n_row_tiles, group,
        *low_res.stride(), gt.stride(0), gt.stride(1),
        *_geometry_args(low_res, image_size, input_size, original_size),
        BLOCK_Y=block_y, BLOCK_X=block_x,
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
