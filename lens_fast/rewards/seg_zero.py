"""Seg-Zero's reward: five 0/1 terms (think format, JSON format, box IoU, box L1, points)."""
from __future__ import annotations

from typing import Sequence

import torch

from lens_fast import ops
from lens_fast.rewards.batch import (
    RewardOutput,
    as_float,
    check_completions,
    float_tensor,
    frame_scale,
    group_size,
    pack_boxes,
    pack_points,
    parse_all,
    points_in_boxes,
    scale_boxes,
    scale_points,
    total,
)
from lens_fast.rewards.parsing import ParsedAnswer, think_answer_format

PIXEL_WIDTHS = torch.tensor([0.0, 0.0, 1.0, 1.0])
"""Added to xyxy boxes so that IoU counts pixels inclusively (width x2 - x1 + 1), as Seg-Zero does."""


def seg_zero_json_format(answer: ParsedAnswer) -> bool:
    """Seg-Zero's JSON format: a JSON answer whose (first) object has a valid 4-number box and two valid
    points (``points_1`` and ``points_2``)."""
    return answer.form == "json" and answer.box is not None and len(answer.objects[0].points) >= 2


def seg_zero_reward(
    completions: Sequence[str],
    gt_boxes: object,
    gt_points: object,
    *,
    policy_size: object = None,
    gt_size: object = None,
    iou_threshold: float = 0.5,
    l1_threshold: float = 10.0,
    point_threshold: float = 100.0,
) -> RewardOutput:
    """Seg-Zero reward of ``N = B * G`` completions (``completions[b * G + g]`` answers prompt b).

    ``gt_boxes`` [B, 4] xyxy and ``gt_points`` [B, 2, 2] in the ground truth's pixel frame; predicted
    coordinates are scaled by ``gt_size / policy_size`` ([B, 2] (height, width)) when given. Each
    component is 0/1:

    - ``think_format``: the whole text is ``<think>…</think>\\s*<answer>…</answer>``;
    - ``json_format``: :func:`seg_zero_json_format`;
    - ``box_iou``: IoU(box, gt box) > ``iou_threshold``, widths counted as x2 - x1 + 1 (one fused
      ``ops.box_iou_aligned`` call for the batch; degenerate boxes have zero area where Seg-Zero let
      areas go negative, and boxes meeting at one pixel column share it where Seg-Zero counted 0);
    - ``box_l1``: mean |coordinate difference| < ``l1_threshold`` pixels;
    - ``points``: both predicted points inside the predicted box (inclusive) and, over the two
      pairings with the ground-truth points, the smaller mean distance < ``point_threshold``.

    Box terms take the parsed answer's first box in any form (Seg-Zero itself read JSON only: the JSON
    format term is what rewards the form). Returns :class:`RewardOutput` (float32 [N] on ``gt_boxes``'
    device, CPU for non-tensors).
    """
    texts = check_completions(completions)
    device = gt_boxes.device if isinstance(gt_boxes, torch.Tensor) else torch.device("cpu")
    gt_box = float_tensor("gt_boxes", gt_boxes, (-1, 4), device)
    num_prompts = gt_box.shape[0]
    gt_point = float_tensor("gt_points", gt_points, (num_prompts, 2, 2), device)
    groups = group_size(len(texts), num_prompts)
    answers = parse_all(texts)

    boxes, box_valid = pack_boxes([a.box for a in answers], device)
    points, points_valid = pack_points([a.objects[0].points if a.objects else () for a in answers], 2, device)
    scale = frame_scale(policy_size, gt_size, num_prompts, device)
    scale = None if scale is None else scale.repeat_interleave(groups, dim=0)
    boxes = scale_boxes(boxes, scale)
    points = scale_points(points, scale)
    gt_box = gt_box.repeat_interleave(groups, dim=0)
    gt_point = gt_point.repeat_interleave(groups, dim=0)

    widths = PIXEL_WIDTHS.to(device)
    iou = ops.box_iou_aligned(boxes + widths, gt_box + widths)
    l1 = (boxes - gt_box).abs().mean(dim=-1)
    inside = points_in_boxes(points, boxes[:, None]).all(dim=-1)
    straight = (points - gt_point).norm(dim=-1).mean(dim=-1)
    crossed = (points - gt_point.flip(-2)).norm(dim=-1).mean(dim=-1)
    points_ok = points_valid & box_valid & inside & (torch.minimum(straight, crossed) < point_threshold)

    return total(
        {
            "think_format": as_float([think_answer_format(t) for t in texts], device),
            "json_format": as_float([seg_zero_json_format(a) for a in answers], device),
            "box_iou": (box_valid & (iou > iou_threshold)).float(),
            "box_l1": (box_valid & (l1 < l1_threshold)).float(),
            "points": points_ok.float(),
        }
    )
