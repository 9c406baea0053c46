"""Supervised losses of the LENS recipe: BCE + Dice of masks at the ground truth's resolution, and the
answer's token cross-entropy (the tiny default's stage-1 SFT)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lens_fast.ops.postprocess_masks import postprocess_masks_torch


def bce_dice(low_res: torch.Tensor, gt_masks: Sequence[torch.Tensor], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) means over N = B * G masks.

    ``low_res``: SAM logits [N, h, w] of images squashed to ``image_size``; ``gt_masks``: B bool masks
    [H_b, W_b], shared by the G masks of prompt b. Each mask is resized to its ground truth's size as
    SAM's ``postprocess_masks`` does (differentiably); Dice = 1 - (2 sum(p g) + 1) / (sum p + sum g + 1)
    with p = sigmoid(logit), per mask (LENS).
    """
    group = low_res.shape[0] // len(gt_masks)
    bce, dice = [], []
    for b, gt in enumerate(gt_masks):
        logits = postprocess_masks_torch(low_res[b * group : (b + 1) * group], (image_size, image_size), tuple(gt.shape))
        target = gt.to(logits.dtype).expand_as(logits)
        bce.append(F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2)))
        p = logits.sigmoid()
        dice.append(1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1))
    return torch.cat(bce).mean(), torch.cat(dice).mean()


def answer_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of teacher-forced answers: ``logp`` float [N, L], ``mask`` bool [N, L]."""
    mask = mask.to(logp.dtype)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)
