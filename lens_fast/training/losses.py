"""The answer's token cross-entropy: the tiny default's stage-1 SFT (a random policy cannot write boxes).
The mask loss is :meth:`lens_fast.model.segmenter.Segmenter.mask_loss` (``ops.mask_loss``)."""
from __future__ import annotations

import torch


def answer_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of teacher-forced answers, token-mean per answer then mean over answers
    (so that a batch split over processes averages back to the same value): ``logp`` float [N, L],
    ``mask`` bool [N, L]."""
    mask = mask.to(logp.dtype)
    return (-(logp * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
