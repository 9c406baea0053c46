"""Edge-case masks shared by the mask-op tests."""
from __future__ import annotations

import torch

EDGE_CASES = ["empty_pred", "empty_gt", "both_empty", "full", "one_pixel"]


def edge_case_masks(case: str, h: int = 5, w: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred bool [2, 3, h, w], gt bool [2, h, w]) for one of EDGE_CASES."""
    pred = torch.zeros(2, 3, h, w, dtype=torch.bool)
    gt = torch.zeros(2, h, w, dtype=torch.bool)
    if case == "empty_pred":
        gt[:, 1:3, 2:6] = True
    elif case == "empty_gt":
        pred[:, :, 1:4, 2:3] = True
    elif case == "full":
        pred[:] = True
        gt[:] = True
    elif case == "one_pixel":
        pred[:, :, h - 1, w - 1] = True
        gt[:, 0, 0] = True
    elif case != "both_empty":
        raise ValueError(f"unknown case {case!r}")
    return pred, gt
