"""The sample type every referring-segmentation dataset yields, and the batch the trainer consumes.

Conventions: images are RGB uint8 numpy arrays [H, W, 3]; masks are bool [H, W] at the image's
resolution; boxes are float32 xyxy in continuous pixel coordinates (COCO's convention: a mask whose
pixels span columns x0..x1 has a box from x0 to x1 + 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch


class ImageLoadError(OSError):
    """An image file is missing, unreadable, or not the size its annotation says."""


@dataclass
class RefSample:
    """One referring expression and the one object it picks out.

    image: uint8 [H, W, 3] RGB, or None from ``dataset.target(i)`` (annotation only, no image I/O).
    mask: bool [H, W]; box: float32 [4] xyxy (see module docstring).
    sent_id: the sentence's id, the key of a predictions file (synthetic data: the sample index).
    """

    image: Optional[np.ndarray]
    expression: str
    mask: np.ndarray
    box: np.ndarray
    sent_id: int
    ref_id: int
    image_id: int
    file_name: Optional[str] = None

    @property
    def height(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """float32 [4] xyxy box of a bool [H, W] mask in continuous pixel coordinates; zeros if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


@dataclass
class RefBatch:
    """A collated list of samples. Images keep their own sizes, so they stay lists.

    images: uint8 [H_i, W_i, 3] tensors; masks: bool [H_i, W_i] tensors; boxes: float32 [B, 4];
    sent_ids, ref_ids, image_ids: int64 [B].
    """

    images: List[torch.Tensor]
    expressions: List[str]
    masks: List[torch.Tensor]
    boxes: torch.Tensor
    sent_ids: torch.Tensor
    ref_ids: torch.Tensor
    image_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.expressions)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RefBatch":
        """The same batch with every tensor on ``device``."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return RefBatch(
            images=[move(t) for t in self.images],
            expressions=list(self.expressions),
            masks=[move(t) for t in self.masks],
            boxes=move(self.boxes),
            sent_ids=move(self.sent_ids),
            ref_ids=move(self.ref_ids),
            image_ids=move(self.image_ids),
        )


def collate_samples(samples: Sequence[RefSample]) -> RefBatch:
    """``collate_fn`` for ``torch.utils.data.DataLoader`` over any dataset yielding RefSample."""
    if not samples:
        raise ValueError("collate_samples needs at least one sample, got an empty list")
    missing = [s.sent_id for s in samples if s.image is None]
    if missing:
        raise ValueError(f"collate_samples needs images; samples with sent_id {missing} have image=None")
    return RefBatch(
        images=[torch.from_numpy(np.ascontiguousarray(s.image)) for s in samples],
        expressions=[s.expression for s in samples],
        masks=[torch.from_numpy(np.ascontiguousarray(s.mask, dtype=bool)) for s in samples],
        boxes=torch.from_numpy(np.stack([np.asarray(s.box, dtype=np.float32) for s in samples])),
        sent_ids=torch.tensor([s.sent_id for s in samples], dtype=torch.int64),
        ref_ids=torch.tensor([s.ref_id for s in samples], dtype=torch.int64),
        image_ids=torch.tensor([s.image_id for s in samples], dtype=torch.int64),
    )
