"""Images in, model inputs out: RGB loading, Qwen2.5-VL's smart resize and patches, SAM's input.

Qwen2.5-VL (as ``Qwen2VLImageProcessor``): resize (bicubic) so both sides are multiples of
``patch_size * merge_size`` with the pixel count in ``[min_pixels, max_pixels]``, scale to [0, 1],
CLIP mean/std, then flatten into ``grid_h * grid_w`` patches of ``3 * temporal_patch_size *
patch_size^2`` values, ordered by merge window. SAM: as segment_anything's ``SamPredictor.set_image``,
each image resized to its input size inside SAM's square (``Segmenter.input_size``: SAM v1's longest
side to ``image_size``, aspect kept), ImageNet mean/std in 0-255 units, zero-padded bottom/right.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray, str, PathLike]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
MAX_ASPECT = 200


def load_image(image: ImageLike, name: str = "image") -> np.ndarray:
    """RGB uint8 [H, W, 3] from a PIL image (any mode: grey, RGBA, palette...), a uint8 array
    ([H, W] grey, [H, W, 3] RGB or [H, W, 4] RGBA) or a path. ValueError/TypeError naming ``name``."""
    if isinstance(image, (str, PathLike)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"{name}: cannot read an image from {str(image)!r}: {error}") from None
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only arrays)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a PIL image, a uint8 numpy array or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 (0-255), got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = np.asarray(Image.fromarray(image, "RGBA").convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be [H, W], [H, W, 3] or [H, W, 4], got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} has zero size: shape {image.shape}")
    if max(image.shape[:2]) / min(image.shape[:2]) > MAX_ASPECT:
        raise ValueError(f"{name} has aspect ratio above {MAX_ASPECT} (shape {image.shape}): Qwen2.5-VL cannot take it")
    return np.ascontiguousarray(image)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2.5-VL's resize target: sides multiples of ``factor``, area within [min_pixels, max_pixels],
    aspect kept as closely as possible."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenPatchConfig:
    """The vision tower's patching (from ``Qwen2_5_VLVisionConfig``) and the pixel budget."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 1280 * 28 * 28


def qwen_patches(image: np.ndarray, config: QwenPatchConfig) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int]]:
    """One RGB uint8 [H, W, 3] image -> (float32 patches [gh * gw, 3 * T * P * P], grid (1, gh, gw),
    resized (h, w): the frame the policy sees and answers in)."""
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    height, width = smart_resize(image.shape[0], image.shape[1], p * m, config.min_pixels, config.max_pixels)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(resized).permute(2, 0, 1) / 255.0
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    gh, gw = height // p, width // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)
    return x.reshape(gh * gw, 3 * t * p * p).contiguous(), (1, gh, gw), (height, width)


def sam_input(images: Sequence[np.ndarray], input_sizes: Sequence[tuple[int, int]], image_size: int) -> torch.Tensor:
    """RGB uint8 [H_i, W_i, 3] images -> float32 [B, 3, S, S], S = ``image_size``, as ``SamPredictor.set_image``
    prepares an image: each resized on its uint8 pixels with PIL's bilinear filter
    (``ResizeLongestSide.apply_image``) to its (h_i, w_i) in ``input_sizes`` (h_i, w_i <= S; SAM v1:
    ``ops.resize_longest_side``), normalised by SAM's pixel mean/std (``Sam.preprocess``) and placed in
    the top-left corner; the bottom/right padding is 0 (after normalisation, as SAM pads)."""
    if len(input_sizes) != len(images):
        raise ValueError(f"input_sizes must hold one (h, w) per image: {len(images)} images, {len(input_sizes)} sizes")
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    out = torch.zeros(len(images), 3, image_size, image_size)
    for i, (image, (height, width)) in enumerate(zip(images, input_sizes)):
        if not (0 < height <= image_size and 0 < width <= image_size):
            raise ValueError(f"input_sizes[{i}] = {(height, width)} must fit in the {image_size} x {image_size} input")
        resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()
        out[i, :, :height, :width] = (x - mean) / std
    return out
