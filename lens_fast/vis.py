"""Overlay pictures of referring-segmentation results (PIL only): people look at masks, not numbers."""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

GT_COLOUR = (40, 200, 60)
PRED_COLOUR = (230, 40, 40)
BOTH_COLOUR = (250, 220, 40)
MIN_SIDE = 320  # small images are enlarged by an integer factor towards this shorter side
MAX_SIDE = 1024  # ... as long as the longer side stays within this


def render_overlay(
    image: np.ndarray,
    gt_mask: np.ndarray,
    pred_mask: Optional[np.ndarray],
    expression: str,
    gt_box: Optional[Sequence[float]] = None,
    pred_box: Optional[Sequence[float]] = None,
    caption: Sequence[str] = (),
    alpha: float = 0.3,
) -> Image.Image:
    """An RGB picture: ``image`` [H, W, 3] uint8 with the GT mask outlined and lightly tinted green,
    the prediction red (yellow tint where they overlap), boxes (xyxy pixels) in the same colours, and
    below it the quoted expression, a legend and ``caption`` lines (IoU, the model's text...)."""
    height, width = gt_mask.shape
    if image.shape != (height, width, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 {(height, width, 3)} to match gt_mask, got {image.dtype} {image.shape}")
    if pred_mask is not None and pred_mask.shape != (height, width):
        raise ValueError(f"pred_mask must be {(height, width)} like gt_mask, got {pred_mask.shape}")
    pred = np.zeros((height, width), dtype=bool) if pred_mask is None else pred_mask.astype(bool)
    gt = gt_mask.astype(bool)
    scale = max(1, min(MIN_SIDE // min(height, width), MAX_SIDE // max(height, width)))
    enlarge = lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)  # noqa: E731
    picture = enlarge(image).astype(np.float32)
    gt, pred = enlarge(gt), enlarge(pred)
    for region, colour in ((gt & ~pred, GT_COLOUR), (pred & ~gt, PRED_COLOUR), (gt & pred, BOTH_COLOUR)):
        picture[region] = (1 - alpha) * picture[region] + alpha * np.asarray(colour, dtype=np.float32)
    for mask, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
        picture[mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)] = colour
    canvas = Image.fromarray(picture.round().astype(np.uint8))
    size = canvas.size
    draw = ImageDraw.Draw(canvas)
    for box, colour in ((gt_box, GT_COLOUR), (pred_box, PRED_COLOUR)):
        if box is not None:
            x1, y1, x2, y2 = (float(v) * scale for v in box)
            draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=1)

    font = ImageFont.load_default(size=14)
    line_height = 18
    chars = max(20, size[0] // 8)
    lines = textwrap.wrap(f'"{expression}"', chars) + textwrap.wrap(
        "green: ground truth   red: prediction   yellow tint: both", chars
    )
    for text in caption:
        lines += textwrap.wrap(text, chars) or [""]
    out = Image.new("RGB", (size[0], size[1] + 6 + line_height * len(lines)), (255, 255, 255))
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, text in enumerate(lines):
        draw.text((4, size[1] + 3 + k * line_height), text, fill=(0, 0, 0), font=font)
    return out
