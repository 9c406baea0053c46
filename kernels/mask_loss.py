"""Triton kernels of ``lens_fast.ops.mask_loss``: BCE + Dice sums and their gradient, from SAM's low-res logits.

Both kernels walk the output pixels exactly as ``postprocess_mask_stats_kernel`` does (its helpers:
a program owns MASKS masks x BLOCK_X output columns and walks down ROWS output rows, computing each
row's logits x from a window of 3 low-res rows already resized along x), so no full-resolution or
``image_size`` intermediate is ever written.

- ``mask_loss_sums_kernel``: per mask, float32 sums over the output pixels of BCE-with-logits(x, g),
  p * g, p and g (p = sigmoid(x), g = gt != 0). Each program writes its own partial sums
  (``partial [M, tiles, 4]``); the caller adds them up in torch, so the forward is deterministic.
- ``mask_loss_grad_kernel``: d loss / d low-res logits = R_h^T @ dX @ R_w with the per-pixel
  gradient ``dX = (p - g) * c_bce + (c_g * g + c_1) * p * (1 - p)`` (three float32 coefficients per
  mask from the forward sums and the upstream gradients). The transposed map runs as the forward's
  window backwards: along y, each row's dX is multiplied by its 3 row weights into 3 accumulators
  (low-res rows base + 0..2, still at output columns, registers only); when the window's base
  moves, the rows it leaves are finished for this program and are contracted along x by atomic
  float32 adds of ``acc * column weight`` into ``grad [M, h, w]`` (the program's columns share
  low-res columns, and neighbouring programs share border rows and columns). Counted from the tap
  tables at the GPU tiling: 1.15 atomics per output pixel for SAM's 256 -> 1024 -> 480 x 640 chain,
  0.68 at 1024 x 1024 (5.7 and 4.0 if every pixel added its nonzero 3 x 3 taps); more (6.8) when the
  output is smaller than the crop (37 x 61), where the window jumps several low-res rows per output
  row. Float32 atomics make the gradient's last bits depend on the order of arrival (not
  bit-for-bit reproducible on GPU; the forward is).

Kernels assume validated inputs (``lens_fast.ops.mask_loss`` checks them): ``low_res`` [M, h, w]
float32/float16/bfloat16 with any strides (offsets inside one mask below 2**31), ``gt`` [B, H, W]
uint8 with unit column stride and in-image offsets below 2**31, M = B * group (mask m reads gt
m // group), ``grad`` a zeroed contiguous float32 [M, h, w]. Mask offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lens_fast.kernels.jit import jit
from lens_fast.kernels.postprocess_masks import (
    _empty_window,
    _load_taps,
    _program_tile,
    _row_logits,
    _tap_tables,
    _tiles,
    _weight_at,
)

SUM_FIELDS = tl.constexpr(4)  # per mask: sum BCE, sum p * g, sum p, sum g
GRAD_COEFFICIENTS = tl.constexpr(3)  # per mask: c_bce, c_g, c_1 (see mask_loss_grad_kernel)


@jit
def _probabilities(logits, truth, ok):
    """(BCE-with-logits, sigmoid) of ``logits`` against ``truth`` (float 0/1), both 0 where not ``ok``.

    BCE = max(x, 0) - x g + log1p(exp(-|x|)), with log1p(e) = log(u) e / (u - 1), u = 1 + e (exact
    to a few ulps where 1 + e rounds, e.g. for |x| > 17); p from the same exp.
    """
    e = tl.exp(-tl.abs(logits))
    u = 1.0 + e
    exact = u == 1.0
    softplus = tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))
    bce = tl.maximum(logits, 0.0) - logits * truth + softplus
    p = tl.where(logits >= 0.0, 1.0 / u, e / u)
    return tl.where(ok, bce, 0.0), tl.where(ok, p, 0.0)


@jit
def mask_loss_sums_kernel(
    low_ptr, taps_i_ptr, taps_f_ptr, gt_ptr, partial_ptr, n_masks, n_col_tiles, n_row_tiles, group,
    stride_m, stride_h, stride_w, gt_stride_b, gt_stride_h, h, w, out_h, out_w,
    MASKS: tl.constexpr, ROWS: tl.constexpr, BLOCK_X: tl.constexpr, SPAN_Y: tl.constexpr,
    SPAN_X: tl.constexpr,
):
    """partial [M, n_row_tiles * n_col_tiles, 4] float32: this program's sums (BCE, p g, p, g) per mask."""
    (row_tile, masks, safe_masks, cols, col_ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3) = (
        _program_tile(taps_i_ptr, taps_f_ptr, n_masks, n_col_tiles, n_row_tiles, out_h, out_w, MASKS, BLOCK_X)
    )
    masks_ok = masks < n_masks
    ok = masks_ok[:, None] & col_ok[None, :]
    low_ptrs = low_ptr + (safe_masks.to(tl.int64) * stride_m)[:, None]
    gt_ptrs = gt_ptr + ((safe_masks // group).to(tl.int64) * gt_stride_b)[:, None]
    window_base, win0, win1, win2 = _empty_window(MASKS, BLOCK_X)
    bce_sum = tl.zeros((MASKS, BLOCK_X), dtype=tl.float32)  # per mask and column
    inter_sum = tl.zeros((MASKS, BLOCK_X), dtype=tl.float32)
    pred_sum = tl.zeros((MASKS, BLOCK_X), dtype=tl.float32)
    truth_sum = tl.zeros((MASKS, BLOCK_X), dtype=tl.float32)
    for row in range(row_tile * ROWS, tl.minimum(row_tile * ROWS + ROWS, out_h)):
        y = row + tl.zeros((), dtype=tl.int32)  # a tensor under the interpreter too
        logits, window_base, win0, win1, win2 = _row_logits(
            low_ptrs, taps_i_ptr, taps_f_ptr, y, window_base, win0, win1, win2, h, w, stride_h, stride_w,
            x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_Y, SPAN_X,
        )
        truth = (tl.load(gt_ptrs + (y * gt_stride_h + cols)[None, :], mask=ok, other=0) != 0).to(tl.float32)
        bce, p = _probabilities(logits, truth, ok)
        bce_sum += bce
        inter_sum += p * truth
        pred_sum += p
        truth_sum += truth
    n_tiles = n_col_tiles * n_row_tiles
    out = partial_ptr + (masks.to(tl.int64) * n_tiles + tl.program_id(0) % n_tiles) * SUM_FIELDS
    tl.store(out + 0, tl.sum(bce_sum, axis=1), mask=masks_ok)
    tl.store(out + 1, tl.sum(inter_sum, axis=1), mask=masks_ok)
    tl.store(out + 2, tl.sum(pred_sum, axis=1), mask=masks_ok)
    tl.store(out + 3, tl.sum(truth_sum, axis=1), mask=masks_ok)


@jit
def _scatter_row(grad_ptrs, row, h, w, values, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3,
                 SPAN_X: tl.constexpr):
    """grad[mask, row, :] += ``values`` [MASKS, BLOCK_X] (output columns) times the column weights:
    low-res column x_base + j gets weight j (atomics; nothing for rows outside [0, h), zero weights
    or lanes not ``ok``)."""
    row_ok = ok & (row >= 0) & (row < h)
    ptrs = grad_ptrs + row * w
    for j in tl.static_range(SPAN_X):
        if j == 0:
            weight = b0
        elif j == 1:
            weight = b1
        elif j == 2:
            weight = b2
        else:  # low-res wider than image_size
            weight = _weight_at(j, x_o1, x_o2, x_o3, xp0, xp1, xp2, xp3)
        col = x_base + j
        tl.atomic_add(ptrs + col[None, :], values * weight[None, :],
                      mask=row_ok & ((col < w) & (weight != 0.0))[None, :], sem="relaxed")  # no ordering needed


@jit
def mask_loss_grad_kernel(
    low_ptr, taps_i_ptr, taps_f_ptr, gt_ptr, coef_ptr, grad_ptr, n_masks, n_col_tiles, n_row_tiles, group,
    stride_m, stride_h, stride_w, gt_stride_b, gt_stride_h, h, w, out_h, out_w,
    MASKS: tl.constexpr, ROWS: tl.constexpr, BLOCK_X: tl.constexpr, SPAN_Y: tl.constexpr,
    SPAN_X: tl.constexpr,
):
    """grad [M, h, w] float32 (zeroed) += R_h^T @ dX @ R_w over this program's output tile.

    coef [M, 3] float32: c_bce, c_g, c_1 of ``dX = (p - g) c_bce + (c_g g + c_1) p (1 - p)``.
    """
    (row_tile, masks, safe_masks, cols, col_ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3) = (
        _program_tile(taps_i_ptr, taps_f_ptr, n_masks, n_col_tiles, n_row_tiles, out_h, out_w, MASKS, BLOCK_X)
    )
    masks_ok = masks < n_masks
    ok = masks_ok[:, None] & col_ok[None, :]
    low_ptrs = low_ptr + (safe_masks.to(tl.int64) * stride_m)[:, None]
    gt_ptrs = gt_ptr + ((safe_masks // group).to(tl.int64) * gt_stride_b)[:, None]
    grad_ptrs = grad_ptr + (safe_masks.to(tl.int64) * h * w)[:, None]
    coef = coef_ptr + safe_masks * GRAD_COEFFICIENTS
    c_bce = tl.load(coef + 0)[:, None]
    c_g = tl.load(coef + 1)[:, None]
    c_1 = tl.load(coef + 2)[:, None]
    window_base, win0, win1, win2 = _empty_window(MASKS, BLOCK_X)
    acc_base, acc0, acc1, acc2 = _empty_window(MASKS, BLOCK_X)  # dX summed into low-res rows acc_base + 0..2
    for row in range(row_tile * ROWS, tl.minimum(row_tile * ROWS + ROWS, out_h)):
        y = row + tl.zeros((), dtype=tl.int32)  # a tensor under the interpreter too
        logits, window_base, win0, win1, win2 = _row_logits(
            low_ptrs, taps_i_ptr, taps_f_ptr, y, window_base, win0, win1, win2, h, w, stride_h, stride_w,
            x_base, x_o1, x_o2, x_o3, b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_Y, SPAN_X,
        )
        truth = (tl.load(gt_ptrs + (y * gt_stride_h + cols)[None, :], mask=ok, other=0) != 0).to(tl.float32)
        _, p = _probabilities(logits, truth, ok)
        grad_x = tl.where(ok, (p - truth) * c_bce + (c_g * truth + c_1) * p * (1.0 - p), 0.0)
        base, o1, o2, o3, a0, a1, a2, p0, p1, p2, p3 = _load_taps(taps_i_ptr, taps_f_ptr, y, True)
        if SPAN_Y == 3:  # every row tap is in the window: accumulate, flush the rows the window leaves
            if base != acc_base:
                _scatter_row(grad_ptrs, acc_base, h, w, acc0, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                             xp0, xp1, xp2, xp3, SPAN_X)
                if base == acc_base + 1:
                    acc0 = acc1
                    acc1 = acc2
                else:
                    _scatter_row(grad_ptrs, acc_base + 1, h, w, acc1, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                                 xp0, xp1, xp2, xp3, SPAN_X)
                    if base == acc_base + 2:
                        acc0 = acc2
                    else:
                        _scatter_row(grad_ptrs, acc_base + 2, h, w, acc2, ok, x_base, x_o1, x_o2, x_o3,
                                     b0, b1, b2, xp0, xp1, xp2, xp3, SPAN_X)
                        acc0 = tl.zeros((MASKS, BLOCK_X), dtype=tl.float32)
                    acc1 = tl.zeros((MASKS, BLOCK_X), dtype=tl.float32)
                acc2 = tl.zeros((MASKS, BLOCK_X), dtype=tl.float32)
                acc_base = base
            acc0 = tl.fma(grad_x, a0, acc0)
            acc1 = tl.fma(grad_x, a1, acc1)
            acc2 = tl.fma(grad_x, a2, acc2)
        else:  # low-res taller than image_size (never in SAM): each of the 4 row taps added directly
            _scatter_row(grad_ptrs, base, h, w, grad_x * p0, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                         xp0, xp1, xp2, xp3, SPAN_X)
            _scatter_row(grad_ptrs, base + o1, h, w, grad_x * p1, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                         xp0, xp1, xp2, xp3, SPAN_X)
            _scatter_row(grad_ptrs, base + o2, h, w, grad_x * p2, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                         xp0, xp1, xp2, xp3, SPAN_X)
            _scatter_row(grad_ptrs, base + o3, h, w, grad_x * p3, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                         xp0, xp1, xp2, xp3, SPAN_X)
    if SPAN_Y == 3:
        _scatter_row(grad_ptrs, acc_base, h, w, acc0, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                     xp0, xp1, xp2, xp3, SPAN_X)
        _scatter_row(grad_ptrs, acc_base + 1, h, w, acc1, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                     xp0, xp1, xp2, xp3, SPAN_X)
        _scatter_row(grad_ptrs, acc_base + 2, h, w, acc2, ok, x_base, x_o1, x_o2, x_o3, b0, b1, b2,
                     xp0, xp1, xp2, xp3, SPAN_X)


def _tiling(low_res: torch.Tensor, image_size: int, original_size) -> tuple[dict, int, int]:
    """(tiles as ``postprocess_masks._tiles``, row tiles, column tiles) of this geometry."""
    tiles = _tiles(low_res, image_size, original_size)
    return tiles, triton.cdiv(original_size[0], tiles["ROWS"]), triton.cdiv(original_size[1], tiles["BLOCK_X"])


def _launch(kernel, low_res: torch.Tensor, gt: torch.Tensor, image_size: int, input_size, original_size,
            *outputs: torch.Tensor) -> None:
    """Launch ``kernel`` (either of the two above) over every output tile of every mask."""
    n_masks = low_res.shape[0]
    taps_i, taps_f = _tap_tables(low_res, image_size, input_size, original_size)
    tiles, n_row_tiles, n_col_tiles = _tiling(low_res, image_size, original_size)
    grid = (triton.cdiv(n_masks, tiles["MASKS"]) * n_row_tiles * n_col_tiles,)
    kernel[grid](
        low_res, taps_i, taps_f, gt, *outputs, n_masks, n_col_tiles, n_row_tiles, n_masks // gt.shape[0],
        *low_res.stride(), gt.stride(0), gt.stride(1), *low_res.shape[-2:], *original_size, **tiles,
    )


def mask_loss_sums_triton(
    low_res: torch.Tensor, gt: torch.Tensor, image_size: int, input_size, original_size
) -> torch.Tensor:
    """float32 [4, M]: sums of BCE-with-logits, p * g, p and g over each mask's output pixels.

    ``low_res`` [M, h, w] (M >= 1), ``gt`` [B, H, W] uint8 shared by the M / B consecutive masks of a group.
    """
    _, n_row_tiles, n_col_tiles = _tiling(low_res, image_size, original_size)
    partial = torch.empty(low_res.shape[0], n_row_tiles * n_col_tiles, SUM_FIELDS.value, dtype=torch.float32,
                          device=low_res.device)
    _launch(mask_loss_sums_kernel, low_res, gt, image_size, input_size, original_size, partial)
    return partial.sum(dim=1).t()


def mask_loss_grad_triton(
    low_res: torch.Tensor, gt: torch.Tensor, coefficients: torch.Tensor, image_size: int, input_size,
    original_size,
) -> torch.Tensor:
    """float32 [M, h, w]: d loss / d ``low_res`` for the per-pixel gradient of ``coefficients`` [M, 3]
    float32 (c_bce, c_g, c_1; see mask_loss_grad_kernel). Inputs as in :func:`mask_loss_sums_triton`."""
    grad = torch.zeros(low_res.shape, dtype=torch.float32, device=low_res.device)
    _launch(mask_loss_grad_kernel, low_res, gt, image_size, input_size, original_size,
            coefficients.contiguous(), grad)
    return grad
