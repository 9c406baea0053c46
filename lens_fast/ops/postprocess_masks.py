"""``postprocess_masks`` and ``postprocess_mask_stats``: SAM's mask upsampling fused, straight from low-res logits.

``segment_anything.modeling.Sam.postprocess_masks`` resizes the decoder's low-res logits [..., h, w]
bilinearly (align_corners=False) to ``image_size`` x ``image_size`` (the encoder input, 1024 for the
real models), crops the valid ``input_size`` = (input_h, input_w) corner and resizes that bilinearly
to ``original_size`` = (H, W). Here both resizes run in one pass that reads only the low-res logits:
no ``image_size`` x ``image_size`` intermediate is written, and ``postprocess_mask_stats`` does not
even write the H x W masks. ``input_size`` is ResizeLongestSide's aspect-preserving size
(:func:`resize_longest_side`: ``int(x * image_size / max(H, W) + 0.5)``), or the whole square for an
input squashed to it.

This is segment_anything's (SAM v1) post-processing: resize to ``image_size``, crop, resize. It is not
LENS's: LENS decodes with SAM2, whose post-processing is one bilinear resize of the low-res logits
straight to (H, W) (``F.interpolate(low_res, original_size, mode="bilinear", align_corners=False)``);
the two interpolate differently, so their masks can differ at object edges: use SAM2's single resize
to reproduce LENS's masks exactly.

Logits may be float32, float16 or bfloat16; every backend computes in float32 (the "torch" reference
upcasts first), with torch's coordinate arithmetic, so backends agree to float32 rounding. The C++
kernel ("cpu") also sums in torch's order, and equals torch's CPU kernel bit for bit where that runs
its generic path with FMAs (AVX2/AVX-512 builds, out_h + out_w > 128). The Triton kernel sums in
another order; it also multiplies a zero weight into one extra low-res row and column at some pixels,
so NaN/inf logits can spread one low-res pixel further than in torch.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lens_fast._backend import as_tensor, check_same_device, device_guard, native, resolve_backend
from lens_fast.ops.mask_stats import MaskStats, check_threshold, mask_stats_torch

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GT_DTYPES = (torch.bool, torch.uint8)
_INT32_LIMIT = 2**31


def _check_size(name: str, size: object) -> tuple[int, int]:
    """``size`` as a pair of positive ints (tuple, list or torch.Size)."""
    try:
        pair = tuple(size)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a pair of ints (H, W), got {type(size).__name__}") from None
    if len(pair) != 2 or any(isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be a pair of ints (H, W), got {size!r}")
    try:
        pair = tuple(operator.index(v) for v in pair)
    except TypeError:
        raise TypeError(f"{name} must be a pair of ints (H, W), got {size!r}") from None
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {pair}")
    return pair  # type: ignore[return-value]


def _check_image_size(image_size: object) -> int:
    """``image_size`` (SAM's square input side) as a positive int (numpy ints too; not bool)."""
    try:
        size = 0 if isinstance(image_size, bool) else operator.index(image_size)  # type: ignore[arg-type]
    except TypeError:
        size = 0
    if size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return size


def _check_geometry(
    low_res: object, input_size: object, original_size: object, image_size: object, min_dims: int,
    name: str = "low_res",
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], int]:
    low_res = as_tensor(name, low_res)
    if low_res.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16 logits, got {low_res.dtype}")
    if low_res.dim() < min_dims:
        want = "[..., G, h, w]" if min_dims == 3 else "[..., h, w]"
        raise ValueError(f"{name} must be {want} (at least {min_dims} dims), got shape {tuple(low_res.shape)}")
    if min(low_res.shape[-2:]) < 1:
        raise ValueError(f"{name} must have h, w >= 1, got shape {tuple(low_res.shape)}")
    image_size = _check_image_size(image_size)
    input_size = _check_size("input_size", input_size)
    original_size = _check_size("original_size", original_size)
    if max(input_size) > image_size:
        raise ValueError(f"input_size {input_size} must fit in image_size x image_size = {image_size}")
    if original_size[0] * original_size[1] >= _INT32_LIMIT:
        raise ValueError(f"original_size {original_size} has 2**31 pixels or more")
    return low_res, input_size, original_size, image_size


def resize_longest_side(original_size: Sequence[int], image_size: int = 1024) -> tuple[int, int]:
    """SAM v1's input geometry: the (h, w) an image of ``original_size`` (H, W) takes inside SAM's
    ``image_size`` x ``image_size`` input, its longest side scaled to ``image_size``, aspect kept, each
    side rounded half up (at least 1: an aspect beyond 2 * ``image_size`` would round a side to 0); the
    rest of the square is zero padding at the bottom and right.

    segment_anything's ``ResizeLongestSide.get_preprocess_shape`` (same arithmetic, same rounding): the
    ``input_size`` of :func:`postprocess_masks`, :func:`postprocess_mask_stats` and ``ops.mask_loss``
    for an image preprocessed as ``SamPredictor`` does. TypeError / ValueError naming the argument.
    """
    height, width = _check_size("original_size", original_size)
    scale = _check_image_size(image_size) * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _masks_3d(low_res: torch.Tensor) -> torch.Tensor:
    """``low_res`` as [M, h, w], a view where possible, with offsets inside one mask below 2**31."""
    flat = low_res.reshape(-1, *low_res.shape[-2:])
    h, w = flat.shape[-2:]
    if (h - 1) * flat.stride(1) + (w - 1) * flat.stride(2) >= _INT32_LIMIT:
        flat = flat.contiguous()
    return flat


def resize_matrix(
    low_size: int, image_size: int, crop_size: int, out_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Both resizes of ``Sam.postprocess_masks`` along one axis as a float32 matrix [out_size, low_size].

    Column j is the reference chain (bilinear to ``image_size``, crop to ``crop_size``, bilinear to
    ``out_size``) applied to the unit vector e_j, computed by ``F.interpolate`` itself, so the weights
    are torch's own (each row has at most 4 nonzeros, 3 adjacent ones when low_size <= image_size).
    ``postprocess_masks_torch(L)`` equals ``R_h @ L @ R_w.T`` to float32 rounding.
    """
    eye = torch.eye(low_size, dtype=torch.float32, device=device).view(1, 1, low_size, low_size)
    x = F.interpolate(eye, (image_size, low_size), mode="bilinear", align_corners=False)[..., :crop_size, :]
    x = F.interpolate(x, (out_size, low_size), mode="bilinear", align_corners=False)
    return x[0, 0]


def postprocess_masks_torch(
    low_res: torch.Tensor, input_size: Sequence[int], original_size: Sequence[int], image_size: int = 1024
) -> torch.Tensor:
    """Reference: ``Sam.postprocess_masks`` on float32 logits [..., h, w] -> float32 [..., H, W]."""
    if low_res.numel() == 0:
        return torch.zeros((*low_res.shape[:-2], *original_size), dtype=torch.float32, device=low_res.device)
    x = low_res.float().reshape(1, -1, *low_res.shape[-2:])
    x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
    return x.reshape(*low_res.shape[:-2], *x.shape[-2:])


def postprocess_masks(
    low_res: torch.Tensor,
    input_size: Sequence[int],
    original_size: Sequence[int],
    threshold: Optional[float] = None,
    image_size: int = 1024,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """segment_anything's (SAM v1) ``Sam.postprocess_masks`` in one pass: low-res logits [..., h, w] ->
    [..., H, W] (resize to ``image_size``, crop, resize; not SAM2's single resize that LENS uses).

    ``low_res``: float32/float16/bfloat16 logits, any leading dims and strides. ``input_size``: the
    (h, w) of the image inside SAM's ``image_size`` square input; ``original_size``: (H, W). Returns
    logits in ``low_res``'s dtype (computed in float32), or with ``threshold`` the bool masks
    ``logit > threshold``. ``backend``: see :mod:`lens_fast._backend` ("cpu" is the C++ kernel).
    """
    low_res, input_size, original_size, image_size = _check_geometry(
        low_res, input_size, original_size, image_size, min_dims=2
    )
    if threshold is not None:
        threshold = check_threshold(threshold)
    backend = resolve_backend(backend, low_res.device)
    shape = (*low_res.shape[:-2], *original_size)
    if backend == "torch":
        logits = postprocess_masks_torch(low_res, input_size, original_size, image_size)
        return logits > threshold if threshold is not None else logits.to(low_res.dtype)
    masks = _masks_3d(low_res)
    if backend == "triton":
        from lens_fast.kernels.postprocess_masks import postprocess_masks_triton

        out_dtype = low_res.dtype if threshold is None else torch.uint8
        out = torch.empty(shape, dtype=out_dtype, device=low_res.device)
        if masks.shape[0] > 0:
            with device_guard(masks.device):
                postprocess_masks_triton(masks, out, image_size, input_size, original_size, threshold)
        return out.view(torch.bool) if threshold is not None else out
    masks = masks.float()
    out = torch.empty(shape, dtype=torch.float32 if threshold is None else torch.uint8)
    if masks.shape[0] > 0:
        native().postprocess_masks(
            masks.data_ptr(), *masks.shape, *masks.stride(), image_size, *input_size, *original_size,
            out.data_ptr(), threshold is not None, 0.0 if threshold is None else threshold, 0,
        )
    return out.view(torch.bool) if threshold is not None else out.to(low_res.dtype)


def postprocess_mask_stats(
    low_res: torch.Tensor,
    gt: torch.Tensor,
    input_size: Sequence[int],
    original_size: Sequence[int],
    threshold: float = 0.0,
    image_size: int = 1024,
    backend: Optional[str] = None,
) -> MaskStats:
    """:class:`MaskStats` of ``postprocess_masks(low_res, ...) > threshold`` against ``gt``, never writing the masks.

    ``low_res``: [..., G, h, w] float32/float16/bfloat16 logits; ``gt``: [..., H, W] bool/uint8
    (nonzero = foreground) with (H, W) = ``original_size``, shared by the G masks of its group.
    Memory O(low-res + gt). Returns int64 intersection/union/pred_area [..., G], gt_area [...],
    float32 inclusive xyxy pred_box [..., G, 4] (zeros when empty).
    """
    low_res, input_size, original_size, image_size = _check_geometry(
        low_res, input_size, original_size, image_size, min_dims=3
    )
    gt = as_tensor("gt", gt)
    if gt.dtype not in GT_DTYPES:
        raise TypeError(f"gt must be a bool or uint8 mask, got {gt.dtype}")
    want = (*low_res.shape[:-3], *original_size)
    if tuple(gt.shape) != want:
        raise ValueError(
            f"gt must be [..., H, W] = {want} for low_res of shape {tuple(low_res.shape)} and "
            f"original_size {original_size}, got gt of shape {tuple(gt.shape)}"
        )
    check_same_device(low_res=low_res, gt=gt)
    threshold = check_threshold(threshold)
    backend = resolve_backend(backend, low_res.device)
    if backend == "torch" or low_res.numel() == 0:
        logits = postprocess_masks_torch(low_res, input_size, original_size, image_size)
        return mask_stats_torch(logits > threshold, gt != 0)
    lead, group = low_res.shape[:-3], low_res.shape[-3]
    masks = _masks_3d(low_res)
    truth = gt.reshape(-1, *original_size)
    truth = truth.view(torch.uint8) if truth.dtype == torch.bool else truth
    if truth.stride(-1) != 1 or (original_size[0] - 1) * truth.stride(-2) + original_size[1] >= _INT32_LIMIT:
        truth = truth.contiguous()  # the kernels read gt rows with int32 offsets
    if backend == "triton":
        from lens_fast.kernels.postprocess_masks import postprocess_mask_stats_triton

        with device_guard(masks.device):
            inter, union, area, gt_area, box = postprocess_mask_stats_triton(
                masks, truth, image_size, input_size, original_size, threshold
            )
    else:
        masks = masks.float()
        counts = torch.empty(3, masks.shape[0], dtype=torch.int64)
        gt_area = torch.empty(truth.shape[0], dtype=torch.int64)
        box = torch.empty(masks.shape[0], 4, dtype=torch.float32)
        native().postprocess_mask_stats(
            masks.data_ptr(), *masks.shape, *masks.stride(), image_size, *input_size, *original_size,
            truth.data_ptr(), truth.shape[0], truth.stride(0), truth.stride(1), threshold,
            counts[0].data_ptr(), counts[1].data_ptr(), counts[2].data_ptr(), gt_area.data_ptr(),
            box.data_ptr(), 0,
        )
        inter, union, area = counts
    return MaskStats(
        inter.reshape(*lead, group),
        union.reshape(*lead, group),
        area.reshape(*lead, group),
        gt_area.reshape(lead),
        box.reshape(*lead, group, 4),
    )
