"""``mask_loss``: BCE + Dice at the ground truth's resolution, straight from SAM's low-res logits.

The training twin of ``ops.postprocess_mask_stats``. The plain path upsamples every mask's low-res
logits [h, w] through ``Sam.postprocess_masks`` (bilinear to ``image_size`` squared, crop to
``input_size``, bilinear to ``original_size`` = (H, W)), keeps the 1024 x 1024 and H x W float
intermediates for backward, then takes BCE-with-logits and Dice. Here the chain is the linear map
``x = R_h @ L @ R_w.T`` (``postprocess_masks.resize_matrix``: torch's own interpolation weights,
computed once per geometry by ``F.interpolate`` on unit vectors) and the loss runs over bands of
output rows: a band needs only the few low-res rows its rows touch, so a band costs two small
matmuls, and nothing larger than one band of [masks, rows, W] float32 ever exists. Backward
recomputes each band and multiplies d loss / d x back through the transposed map into the low-res
gradient. Saved for backward: the low-res logits, the gt and three float32 sums per mask.

Per mask (x = full-resolution logits, g = gt in {0, 1}, p = sigmoid(x)):
``bce = mean(BCEWithLogits(x, g))``, ``dice = 1 - (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth)``,
``loss = bce_weight * bce + dice_weight * dice``. Computed in float32 whatever the logits' dtype
(the reference upcasts too); the gradient is returned in the logits' dtype.

Backends: CUDA tensors run two Triton kernels (``kernels/mask_loss.py``): the forward sums and the
backward's gradient computed pixel by pixel from the low-res logits as ``postprocess_mask_stats``
does, nothing but the float32 gradient [..., h, w] written (the gradient's last bits depend on the
order of float32 atomics). CPU tensors run the banded torch path (BLAS matmuls; ``"cpu"``);
``mask_loss_parts_banded`` runs it on CUDA tensors too. ``backend="triton"`` on CPU tensors runs the
kernels under Triton's interpreter; ``"torch"`` runs the plain reference (``F.interpolate`` chain,
full intermediates).
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from lens_fast._backend import as_tensor, check_same_device, device_guard, resolve_backend
from lens_fast.ops.postprocess_masks import (
    _INT32_LIMIT,
    GT_DTYPES,
    _check_geometry,
    _check_size,
    _masks_3d,
    postprocess_masks_torch,
    resize_matrix,
)

REDUCTIONS = ("mean", "sum", "none")
BAND_ELEMENTS = 2**22  # default band: about this many full-resolution logits (16 MiB in fp32)


class MaskLoss(NamedTuple):
    """``mask_loss(..., return_parts=True)``: the weighted loss and its two unweighted parts, each reduced."""

    loss: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor


def _dice(inter, pred_sum, gt_sum, smooth):
    return 1.0 - (2.0 * inter + smooth) / (pred_sum + gt_sum + smooth)


def _grad_coefficients(sums, grad_bce, grad_dice, smooth, pixels):
    """(c_bce, c_g, c_1) float32, shaped like ``sums[0]``: d loss / d x = (p - g) c_bce + (c_g g + c_1) p (1 - p).

    ``sums`` [4, ...]: sum BCE, sum p g, sum p, sum g per mask; ``grad_bce`` / ``grad_dice``: the
    upstream gradients of the mean BCE and the Dice (None = 0). d dice / d p = -(2 g D - N) / D**2 with
    N = 2 sum(p g) + smooth, D = sum(p) + sum(g) + smooth.
    """
    zeros = torch.zeros_like(sums[0])
    grad_bce = zeros if grad_bce is None else grad_bce.float()
    grad_dice = zeros if grad_dice is None else grad_dice.float()
    denominator = sums[2] + sums[3] + smooth
    numerator = 2.0 * sums[1] + smooth
    return grad_bce / pixels, -2.0 * grad_dice / denominator, grad_dice * numerator / denominator**2


def mask_loss_parts_torch(
    low_res: torch.Tensor, gt: torch.Tensor, input_size, original_size, image_size: int = 1024,
    smooth: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (bce, dice) float32 [...] of ``low_res`` [..., h, w] against ``gt`` [..., H, W] (same leading dims)."""
    x = postprocess_masks_torch(low_res, input_size, original_size, image_size)
    g = gt.to(torch.float32)
    bce = F.binary_cross_entropy_with_logits(x, g, reduction="none").mean(dim=(-2, -1))
    p = torch.sigmoid(x)
    return bce, _dice((p * g).sum(dim=(-2, -1)), p.sum(dim=(-2, -1)), g.sum(dim=(-2, -1)), smooth)


@functools.lru_cache(maxsize=32)
def _geometry(h, w, image_size, input_size, original_size, device_type, device_index):
    """(R_h [H, h], R_w [W, w], first and last low-res row [H] each output row reads)."""
    device = torch.device(device_type, device_index)
    rows = resize_matrix(h, image_size, input_size[0], original_size[0], device)
    cols = resize_matrix(w, image_size, input_size[1], original_size[1], device)
    nonzero = rows != 0
    first = torch.where(nonzero.any(1), nonzero.float().argmax(1), 0)
    last = h - 1 - nonzero.flip(1).float().argmax(1)
    return rows, cols, first.tolist(), last.tolist()


def _bands(first, last, band_rows):
    """(row slice, low-res row slice) of each band of ``band_rows`` output rows."""
    out_h = len(first)
    for start in range(0, out_h, band_rows):
        stop = min(start + band_rows, out_h)
        yield slice(start, stop), slice(min(first[start:stop]), max(last[start:stop]) + 1)


class _MaskLoss(torch.autograd.Function):
    """low [B, G, h, w] logits, gt [B, H, W] uint8/bool -> (bce [B, G], dice [B, G]) float32."""

    @staticmethod
    def forward(ctx, low, gt, input_size, original_size, image_size, smooth, band_rows):
        n_images, group, h, w = low.shape
        rows, cols, first, last = _geometry(
            h, w, image_size, input_size, original_size, low.device.type, low.device.index
        )
        sums = torch.zeros(4, n_images, group, dtype=torch.float32, device=low.device)  # bce, p*g, p, g
        lowf = low.float()
        for out_rows, low_rows in _bands(first, last, band_rows):
            x = rows[out_rows, low_rows] @ (lowf[:, :, low_rows] @ cols.t())  # [B, G, rows, W]
            g = gt[:, None, out_rows].to(torch.float32)
            sums[0] += F.binary_cross_entropy_with_logits(x, g.expand_as(x), reduction="none").sum(dim=(-2, -1))
            p = torch.sigmoid_(x)
            sums[1] += (p * g).sum(dim=(-2, -1))
            sums[2] += p.sum(dim=(-2, -1))
            sums[3] += g.sum(dim=(-2, -1))
        ctx.save_for_backward(low, gt, sums)
        ctx.geometry = (input_size, original_size, image_size, smooth, band_rows)
        pixels = original_size[0] * original_size[1]
        return sums[0] / pixels, _dice(sums[1], sums[2], sums[3], smooth)

    @staticmethod
    def backward(ctx, grad_bce, grad_dice):
        low, gt, sums = ctx.saved_tensors
        input_size, original_size, image_size, smooth, band_rows = ctx.geometry
        h, w = low.shape[-2:]
        rows, cols, first, last = _geometry(
            h, w, image_size, input_size, original_size, low.device.type, low.device.index
        )
        pixels = original_size[0] * original_size[1]
        bce_scale, dice_g, dice_1 = (
            c[..., None, None] for c in _grad_coefficients(sums, grad_bce, grad_dice, smooth, pixels)
        )
        lowf = low.float()
        grad_low = torch.zeros_like(lowf)
        for out_rows, low_rows in _bands(first, last, band_rows):
            band = rows[out_rows, low_rows]
            x = band @ (lowf[:, :, low_rows] @ cols.t())
            g = gt[:, None, out_rows].to(torch.float32)
            p = torch.sigmoid_(x)
            grad_x = (p - g) * bce_scale + (dice_g * g + dice_1) * p * (1.0 - p)
            grad_low[:, :, low_rows] += (band.t() @ grad_x) @ cols
        return grad_low.to(low.dtype), None, None, None, None, None, None


class _MaskLossTriton(torch.autograd.Function):
    """low [B, G, h, w] logits, gt [B, H, W] uint8 -> (bce [B, G], dice [B, G]) float32, Triton kernels."""

    @staticmethod
    def forward(ctx, low, gt, input_size, original_size, image_size, smooth):
        from lens_fast.kernels.mask_loss import mask_loss_sums_triton

        n_images, group = low.shape[:2]
        masks = _masks_3d(low)
        with device_guard(low.device):
            sums = mask_loss_sums_triton(masks, gt, image_size, input_size, original_size).view(4, n_images, group)
        ctx.save_for_backward(low, gt, sums)
        ctx.geometry = (input_size, original_size, image_size, smooth)
        pixels = original_size[0] * original_size[1]
        return sums[0] / pixels, _dice(sums[1], sums[2], sums[3], smooth)

    @staticmethod
    def backward(ctx, grad_bce, grad_dice):
        from lens_fast.kernels.mask_loss import mask_loss_grad_triton

        low, gt, sums = ctx.saved_tensors
        input_size, original_size, image_size, smooth = ctx.geometry
        pixels = original_size[0] * original_size[1]
        coefficients = torch.stack(_grad_coefficients(sums, grad_bce, grad_dice, smooth, pixels), dim=-1)
        with device_guard(low.device):
            grad = mask_loss_grad_triton(
                _masks_3d(low), gt, coefficients.reshape(-1, 3), image_size, input_size, original_size
            )
        return grad.view(low.shape).to(low.dtype), None, None, None, None, None


def mask_loss_parts_banded(
    low: torch.Tensor, gt: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
    image_size: int = 1024, smooth: float = 1.0, band_rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bce, dice) float32 [B, G] of the banded torch path, differentiable, on CPU or CUDA tensors.

    ``low`` [B, G, h, w] float32/float16/bfloat16, ``gt`` [B, H, W] uint8 shared by each group (one
    mask per gt: G = 1), validated as :func:`mask_loss` does. What ``mask_loss`` runs on CPU tensors;
    on CUDA tensors, the fallback (and benchmark peer) of the Triton kernels.
    """
    masks = low.shape[0] * low.shape[1]
    rows = band_rows or max(1, BAND_ELEMENTS // (masks * original_size[1]))
    return _MaskLoss.apply(low, gt, input_size, original_size, image_size, smooth, rows)


def _check_real(name: str, value: object, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)  # type: ignore[arg-type]
    if value != value or value in (float("inf"), float("-inf")) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number >= 0{' and > 0' if positive else ''}, got {value!r}")
    return value


def _check_gt(name: str, gt: object, lead: tuple, original_size: tuple, device) -> tuple[torch.Tensor, bool]:
    """``gt`` checked: (tensor, shared by the group = True / one per mask = False)."""
    gt = as_tensor(name, gt)
    if gt.dtype not in GT_DTYPES:
        raise TypeError(f"{name} must be a bool or uint8 mask, got {gt.dtype}")
    per_mask, shared = (*lead, *original_size), (*lead[:-1], *original_size)
    if tuple(gt.shape) == per_mask:
        return gt, False
    if lead and tuple(gt.shape) == shared:
        return gt, True
    alternatives = f"{per_mask} (one per mask)" + (f" or {shared} (one per group)" if lead else "")
    raise ValueError(f"{name} must be {alternatives}, got shape {tuple(gt.shape)}")


def _parts(low, gt, shared, input_size, original_size, image_size, smooth, band_rows, backend):
    """(bce, dice) [lead] of one geometry; ``backend`` resolved ("triton", "cpu" = banded, "torch")."""
    lead = low.shape[:-2]
    if backend == "torch" or low.numel() == 0:
        truth = gt.unsqueeze(-3).expand(*lead, *original_size) if shared else gt
        return mask_loss_parts_torch(low, truth, input_size, original_size, image_size, smooth)
    h, w = low.shape[-2:]
    if shared:
        low4, gt3 = low.reshape(-1, lead[-1], h, w), gt.reshape(-1, *original_size)
    else:
        low4, gt3 = low.reshape(-1, 1, h, w), gt.reshape(-1, *original_size)
    if gt3.dtype == torch.bool:
        gt3 = gt3.view(torch.uint8)
    if backend == "triton":
        if gt3.stride(-1) != 1 or (original_size[0] - 1) * gt3.stride(-2) + original_size[1] >= _INT32_LIMIT:
            gt3 = gt3.contiguous()  # the kernels read gt rows with int32 offsets
        bce, dice = _MaskLossTriton.apply(low4, gt3, input_size, original_size, image_size, smooth)
    else:
        bce, dice = mask_loss_parts_banded(low4, gt3, input_size, original_size, image_size, smooth, band_rows)
    return bce.reshape(lead), dice.reshape(lead)


def mask_loss(
    low_res_logits: torch.Tensor,
    gt_masks: Union[torch.Tensor, Sequence[torch.Tensor]],
    input_size: Union[Sequence[int], Sequence[Sequence[int]]],
    original_size: Union[Sequence[int], Sequence[Sequence[int]]],
    *,
    image_size: int = 1024,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    smooth: float = 1.0,
    reduction: str = "mean",
    return_parts: bool = False,
    band_rows: Optional[int] = None,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, MaskLoss]:
    """BCE + Dice of SAM's low-res logits, upsampled as ``Sam.postprocess_masks``, against the gt masks.

    ``low_res_logits``: [..., h, w] float32/float16/bfloat16 (e.g. [B, G, 256, 256] for B prompts x
    G rollouts). ``gt_masks``: bool/uint8 [..., H, W] with the same leading dims (one gt per mask) or
    without the last one (one gt shared by the G masks of a group), (H, W) = ``original_size``.
    ``input_size``: the (h, w) of the image inside SAM's ``image_size`` square input.
    Per-sample sizes: ``original_size`` a list of B pairs (``input_size`` one pair or B pairs) and
    ``gt_masks`` a list of B tensors, each with the leading dims of ``low_res_logits[i]``.

    Returns float32 ``bce_weight * bce + dice_weight * dice`` per mask, reduced by ``reduction``
    ("mean" over masks, "sum", or "none": [...], the leading dims); with ``return_parts``, a
    :class:`MaskLoss` (loss, bce, dice), each reduced alike. Differentiable w.r.t. the logits.
    ``backend``: None = "triton" for CUDA tensors (two Triton kernels; memory: the low-res logits, the
    gt and the float32 gradient [..., h, w]), "cpu" for CPU tensors (the banded torch path; memory:
    the low-res logits, the gt, and one band of ``band_rows`` output rows of every mask, None: about
    2**22 float32 values per band; ``band_rows`` is read by this path only); "triton" on CPU tensors
    runs the kernels under Triton's interpreter (slow: tests); "torch" runs the plain reference
    (full-resolution logits and the ``image_size`` intermediate). Other devices run "torch".
    """
    low = as_tensor("low_res_logits", low_res_logits)
    backend = resolve_backend(backend, low.device)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    bce_weight = _check_real("bce_weight", bce_weight)
    dice_weight = _check_real("dice_weight", dice_weight)
    smooth = _check_real("smooth", smooth, positive=True)
    if band_rows is not None:
        if isinstance(band_rows, bool) or not isinstance(band_rows, int) or band_rows < 1:
            raise ValueError(f"band_rows must be a positive int or None, got {band_rows!r}")

    per_sample = isinstance(gt_masks, (list, tuple))
    if not per_sample:
        low, input_size, original_size, image_size = _check_geometry(
            low, input_size, original_size, image_size, min_dims=2, name="low_res_logits"
        )
        gt, shared = _check_gt("gt_masks", gt_masks, tuple(low.shape[:-2]), original_size, low.device)
        check_same_device(low_res_logits=low, gt_masks=gt)
        bce, dice = _parts(low, gt, shared, input_size, original_size, image_size, smooth, band_rows, backend)
    else:
        if low.dim() < 3:
            raise ValueError(
                f"low_res_logits must be [B, ..., h, w] when gt_masks is a list, got shape {tuple(low.shape)}"
            )
        n = low.shape[0]
        if len(gt_masks) != n:
            raise ValueError(f"gt_masks must hold B = {n} masks (low_res_logits.shape[0]), got {len(gt_masks)}")
        sizes = _per_sample_sizes("original_size", original_size, n)
        inputs = _per_sample_sizes("input_size", input_size, n)
        parts = []
        for i in range(n):
            low_i, input_i, original_i, image_size_i = _check_geometry(
                low[i], inputs[i], sizes[i], image_size, min_dims=2, name="low_res_logits"
            )
            gt_i, shared = _check_gt(f"gt_masks[{i}]", gt_masks[i], tuple(low_i.shape[:-2]), original_i, low.device)
            check_same_device(low_res_logits=low_i, **{f"gt_masks[{i}]": gt_i})
            parts.append(_parts(low_i, gt_i, shared, input_i, original_i, image_size_i, smooth, band_rows, backend))
        bce = torch.stack([b for b, _ in parts])
        dice = torch.stack([d for _, d in parts])

    loss = bce_weight * bce + dice_weight * dice
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda t: t}[reduction]
    if return_parts:
        return MaskLoss(reduce(loss), reduce(bce), reduce(dice))
    return reduce(loss)


def _per_sample_sizes(name: str, sizes: object, n: int) -> list:
    """``sizes`` as n pairs: one pair for all, or a sequence of n pairs."""
    try:
        items = list(sizes)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{name} must be a pair (H, W) or a list of B pairs, got {type(sizes).__name__}") from None
    if len(items) == 2 and all(isinstance(v, int) or hasattr(v, "__index__") for v in items):
        return [_check_size(name, items)] * n
    if len(items) != n:
        raise ValueError(f"{name} must be a pair or a list of B = {n} pairs, got {len(items)} entries")
    return [_check_size(f"{name}[{i}]", item) for i, item in enumerate(items)]
