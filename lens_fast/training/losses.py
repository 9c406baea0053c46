"""Supervised losses of the LENS recipe: BCE + Dice of masks at the ground truth's resolution, and the
answer's token cross-entropy (the tiny default's stage-1 SFT)."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F


@lru_cache(maxsize=256)
def _resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """float32 [size_out, size_in]: 1-D bilinear resize (align_corners=False) as a matrix."""
    eye = torch.eye(size_in).unsqueeze(0)  # [1, channels = size_in, length = size_in]
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T.contiguous()


@lru_cache(maxsize=256)
def sam_resize_matrix(low_res: int, image_size: int, input_size: int, original: int) -> torch.Tensor:
    """float32 [original, low_res]: SAM's ``postprocess_masks`` along one axis (bilinear to
    ``image_size``, crop to ``input_size``, bilinear to ``original``) as one matrix, so that masks
    [..., h, w] map to R_h @ masks @ R_w^T exactly as the two ``F.interpolate`` calls would."""
    return (_resize_matrix(input_size, original) @ _resize_matrix(low_res, image_size)[:input_size]).contiguous()


def bce_dice(low_res: torch.Tensor, gt_masks: Sequence[torch.Tensor], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) means over N = B * G masks.

    ``low_res``: SAM logits [N, h, w] of images squashed to ``image_size``; ``gt_masks``: B bool masks
    [H_b, W_b], shared by the G masks of prompt b. Each mask is resized to its ground truth's size as
    SAM's ``postprocess_masks`` does (as two small matrix products, differentiable); Dice =
    1 - (2 sum(p g) + 1) / (sum p + sum g + 1) with p = sigmoid(logit), per mask (LENS).
    """
    group = low_res.shape[0] // len(gt_masks)
    h, w = low_res.shape[-2:]
    bce, dice = [], []
    for b, gt in enumerate(gt_masks):
        rows = sam_resize_matrix(h, image_size, image_size, gt.shape[0]).to(low_res.device)
        cols = sam_resize_matrix(w, image_size, image_size, gt.shape[1]).to(low_res.device)
        logits = rows @ low_res[b * group : (b + 1) * group].float() @ cols.T
        target = gt.to(logits.dtype).expand_as(logits)
        bce.append(F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2)))
        p = logits.sigmoid()
        dice.append(1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1))
    return torch.cat(bce).mean(), torch.cat(dice).mean()


def answer_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of teacher-forced answers: ``logp`` float [N, L], ``mask`` bool [N, L]."""
    mask = mask.to(logp.dtype)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)
