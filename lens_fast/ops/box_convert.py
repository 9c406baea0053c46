"""``box_convert``: boxes between the three pixel conventions that lens_fast's layers use.

- ``"inclusive"``: xyxy of the first and last foreground pixel indices (``MaskStats.pred_box``,
  torchvision's ``masks_to_boxes``); a one-pixel mask at (3, 5) is ``[3, 5, 3, 5]``.
- ``"edges"``: xyxy of continuous pixel edges (``lens_fast.data`` boxes, the rewards' boxes, COCO's
  geometry); the same mask is ``[3, 5, 4, 6]``, so width = x2 - x1 = pixels spanned.
- ``"xywh"``: COCO ``bbox`` / ``rle.toBbox``, the top-left edge and the width and height in pixels:
  ``[3, 5, 1, 1]``.

An empty mask's box is zeros in all three producers, which no conversion can tell apart from a box:
convert the boxes of non-empty masks.
"""
from __future__ import annotations

import torch

from lens_fast.ops.box_iou import check_boxes

BOX_FORMATS = ("inclusive", "edges", "xywh")


def _check_format(name: str, fmt: object) -> str:
    if fmt not in BOX_FORMATS:
        raise ValueError(f"{name} must be one of {BOX_FORMATS}, got {fmt!r}")
    return fmt


def box_convert(boxes: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """``boxes`` [..., 4] (tensor or numpy array, any real dtype, any device) from ``in_fmt`` to
    ``out_fmt`` (``"inclusive"``, ``"edges"`` or ``"xywh"``, see the module docstring): float32 (float64
    for float64 input) [..., 4] on the same device, exact for pixel-index boxes."""
    boxes = check_boxes("boxes", boxes)
    in_fmt = _check_format("in_fmt", in_fmt)
    out_fmt = _check_format("out_fmt", out_fmt)
    boxes = boxes.to(torch.float64 if boxes.dtype == torch.float64 else torch.float32)
    low, high = boxes[..., :2], boxes[..., 2:]
    if in_fmt == "inclusive":
        high = high + 1
    elif in_fmt == "xywh":
        high = low + high
    if out_fmt == "inclusive":
        high = high - 1
    elif out_fmt == "xywh":
        high = high - low
    return torch.cat([low, high], dim=-1)
