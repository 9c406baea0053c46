"""Rewards of a rollout: parsed answers against the ground truth, and the policy's own masks scored
straight from SAM's low-res logits (``ops.postprocess_mask_stats``: no full-resolution reward mask)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from lens_fast.metrics import sample_iou
from lens_fast.model.segmenter import Segmenter
from lens_fast.rewards import RewardOutput, lens_reward, seg_zero_reward, vision_reasoner_reward
from lens_fast.rewards.batch import total

REWARDS = ("lens", "seg_zero", "vision_reasoner")


def mask_iou_from_low_res(segmenter: Segmenter, low_res: torch.Tensor, gt_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """IoU [N] of each of N = B * G masks (``low_res`` [N, 4e, 4e] logits; foreground: logit > 0 at the
    ground truth's size) with its prompt's ground truth (B bool masks [H_b, W_b])."""
    group = low_res.shape[0] // len(gt_masks)
    ious = []
    for b, gt in enumerate(gt_masks):
        stats = segmenter.mask_stats(low_res[b * group : (b + 1) * group].detach(), gt.to(low_res.device))
        ious.append(sample_iou(stats.intersection, stats.union).float())
    return torch.cat(ious)


def interior_points(mask: np.ndarray, count: int) -> np.ndarray:
    """``count`` [x, y] points inside a bool mask, the deepest first (distance transform maxima, the
    second at least a quarter of the mask's extent from the first); zeros for an empty mask."""
    if not mask.any():
        return np.zeros((count, 2), dtype=np.float32)
    depth = ndimage.distance_transform_edt(mask)
    rows, cols = np.nonzero(mask)
    radius = max(2.0, 0.25 * max(np.ptp(rows), np.ptp(cols)))
    ys, xs = np.ogrid[: mask.shape[0], : mask.shape[1]]
    points = []
    for _ in range(count):
        y, x = np.unravel_index(int(depth.argmax()), depth.shape)
        points.append((x + 0.5, y + 0.5))
        depth = np.where((ys - y) ** 2 + (xs - x) ** 2 < radius**2, 0, depth)
        if depth.max() <= 0:
            depth = ndimage.distance_transform_edt(mask)
    return np.asarray(points, dtype=np.float32)


def rollout_rewards(
    name: str,
    texts: Sequence[str],
    mask_iou: torch.Tensor,
    gt_masks: Sequence[torch.Tensor],
    gt_boxes: torch.Tensor,
    policy_sizes: torch.Tensor,
    original_sizes: torch.Tensor,
    *,
    cot: bool = False,
) -> RewardOutput:
    """The ``name`` reward of N = B * G completions, components float32 [N].

    ``lens``: box IoU^2 + mask IoU^2 (+ format with ``cot``); ``seg_zero`` / ``vision_reasoner``: their
    recipes (ground-truth points: the deepest interior points of each mask). ``mask_iou`` [N] is the
    policy's own mask's IoU (see :func:`mask_iou_from_low_res`).
    """
    frames = dict(policy_size=policy_sizes, gt_size=original_sizes)
    if name == "lens":
        out = lens_reward(list(texts), gt_boxes, cot=cot, **frames)
        return total({**out.components, "mask": mask_iou.float().cpu() ** 2})
    if name == "seg_zero":
        points = np.stack([interior_points(m.cpu().numpy(), 2) for m in gt_masks])
        return seg_zero_reward(list(texts), gt_boxes, points, **frames)
    if name == "vision_reasoner":
        points = [interior_points(m.cpu().numpy(), 1) for m in gt_masks]
        return vision_reasoner_reward(list(texts), [b[None] for b in gt_boxes], points, **frames)
    raise ValueError(f"reward must be one of {REWARDS}, got {name!r}")
