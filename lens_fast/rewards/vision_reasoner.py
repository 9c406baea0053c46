"""VisionReasoner's multi-object reward: format, Hungarian-matched accuracy, non-repetition."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

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
from lens_fast.rewards.seg_zero import PIXEL_WIDTHS

MAX_OBJECTS = 120
"""VisionReasoner matches at most this many predicted and this many ground-truth objects."""


def vision_reasoner_json_format(answer: ParsedAnswer) -> float:
    """0..2: over the objects of a JSON answer, the mean of (valid box) + (valid point); 0 otherwise."""
    if answer.form != "json" or not answer.objects:
        return 0.0
    return sum((o.box is not None) + bool(o.points) for o in answer.objects) / len(answer.objects)


def non_repeat(text: str) -> bool:
    """False when two or more of the text's '.'-separated sentences (stripped, non-empty) repeat an
    earlier one (VisionReasoner's non-repeat rule)."""
    seen: set[str] = set()
    repeats = 0
    for sentence in text.split("."):
        sentence = sentence.strip()
        if not sentence:
            continue
        if sentence in seen:
            repeats += 1
            if repeats >= 2:
                return False
        seen.add(sentence)
    return True


def _objects(name: str, value: object, width: int) -> torch.Tensor:
    """One prompt's ground-truth objects as float32 [K, width] on CPU (K may be 0)."""
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return torch.zeros(0, width)
    return float_tensor(name, value, (-1, width), torch.device("cpu"))


def vision_reasoner_reward(
    completions: Sequence[str],
    gt_boxes: Sequence[object],
    gt_points: Sequence[object],
    *,
    policy_size: object = None,
    gt_size: object = None,
    iou_threshold: float = 0.5,
    l1_threshold: float = 10.0,
    point_threshold: float = 30.0,
    max_objects: int = MAX_OBJECTS,
    no_object_score: float = 0.0,
) -> RewardOutput:
    """VisionReasoner reward of ``N = B * G`` completions (``completions[b * G + g]`` answers prompt b).

    ``gt_boxes[b]`` [K_b, 4] xyxy and ``gt_points[b]`` [K_b, 2] are prompt b's objects in the ground
    truth's pixel frame (K_b may be 0); predicted coordinates are scaled by ``gt_size / policy_size``
    ([B, 2] (height, width)) when given. Components:

    - ``think_format`` (0/1): the whole text is ``<think>…</think>\\s*<answer>…</answer>``;
    - ``json_format`` (0..2): :func:`vision_reasoner_json_format`;
    - ``accuracy`` (0..3): the first ``max_objects`` predicted objects are matched one-to-one to the first
      ``max_objects`` ground-truth objects (Hungarian, ``scipy.optimize.linear_sum_assignment``) to
      maximise the summed pair score 1[IoU > ``iou_threshold``] + 1[mean |coordinate difference| <
      ``l1_threshold``] + 1[point within ``point_threshold`` pixels and inside its predicted box]
      (IoU with x2 - x1 + 1 widths; every pair of the batch in one ``ops.box_iou_aligned`` call);
      the matched sum is divided by max(#predicted, #ground truth). An object without a valid box (or
      point) scores 0 on those terms but still counts. No predicted and no ground-truth object gives
      ``no_object_score`` (VisionReasoner: 0);
    - ``non_repeat`` (0/1): :func:`non_repeat`.

    Returns :class:`RewardOutput` (float32 [N] on CPU, where the matching runs).
    """
    texts = check_completions(completions)
    cpu = torch.device("cpu")
    if len(gt_boxes) != len(gt_points):
        raise ValueError(f"gt_boxes and gt_points must list the same prompts, got {len(gt_boxes)} and {len(gt_points)}")
    num_prompts = len(gt_boxes)
    groups = group_size(len(texts), num_prompts)
    gt_box_list, gt_point_list = [], []
    for b in range(num_prompts):
        boxes = _objects(f"gt_boxes[{b}]", gt_boxes[b], 4)
        points = _objects(f"gt_points[{b}]", gt_points[b], 2)
        if len(boxes) != len(points):
            raise ValueError(f"gt_boxes[{b}] has {len(boxes)} objects but gt_points[{b}] has {len(points)}")
        gt_box_list.append(boxes[:max_objects])
        gt_point_list.append(points[:max_objects])
    answers = parse_all(texts)
    predicted = [a.objects[:max_objects] for a in answers]

    pred_counts = np.array([len(objs) for objs in predicted], dtype=np.int64)
    gt_counts = np.array([len(gt_box_list[c // groups]) for c in range(len(texts))], dtype=np.int64)
    flat = [o for objs in predicted for o in objs]
    pred_box, box_valid = pack_boxes([o.box for o in flat], cpu)
    pred_point, point_valid = pack_points([o.points for o in flat], 1, cpu)
    scale = frame_scale(policy_size, gt_size, num_prompts, cpu)
    if scale is not None:
        scale = scale.repeat_interleave(groups, dim=0).repeat_interleave(torch.from_numpy(pred_counts), dim=0)
    pred_box = scale_boxes(pred_box, scale)
    pred_point = scale_points(pred_point, scale)[:, 0]
    point_usable = point_valid & box_valid & points_in_boxes(pred_point, pred_box)
    gt_box = torch.cat(gt_box_list)
    gt_point = torch.cat(gt_point_list)

    # Every (predicted, ground-truth) pair of every completion, flattened.
    pred_offsets = np.concatenate([[0], np.cumsum(pred_counts)])
    gt_offsets_per_prompt = np.concatenate([[0], np.cumsum([len(b) for b in gt_box_list])])
    pair_pred, pair_gt = [], []
    for c in range(len(texts)):
        m, k = pred_counts[c], gt_counts[c]
        pair_pred.append(np.repeat(np.arange(m) + pred_offsets[c], k))
        pair_gt.append(np.tile(np.arange(k) + gt_offsets_per_prompt[c // groups], m))
    pi = torch.from_numpy(np.concatenate(pair_pred).astype(np.int64))
    gj = torch.from_numpy(np.concatenate(pair_gt).astype(np.int64))
    if len(pi):
        pb, gb = pred_box[pi], gt_box[gj]
        iou = ops.box_iou_aligned(pb + PIXEL_WIDTHS, gb + PIXEL_WIDTHS)
        l1 = (pb - gb).abs().mean(dim=-1)
        near = (pred_point[pi] - gt_point[gj]).norm(dim=-1) < point_threshold
        valid = box_valid[pi]
        score = (
            (valid & (iou > iou_threshold)).to(torch.int64)
            + (valid & (l1 < l1_threshold)).to(torch.int64)
            + (point_usable[pi] & near).to(torch.int64)
        ).numpy()
    else:
        score = np.zeros(0, dtype=np.int64)

    accuracy = []
    start = 0
    for c in range(len(texts)):
        m, k = int(pred_counts[c]), int(gt_counts[c])
        if m == 0 and k == 0:
            accuracy.append(no_object_score)
            continue
        matrix = score[start : start + m * k].reshape(m, k)
        start += m * k
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        accuracy.append(float(matrix[rows, cols].sum()) / max(m, k))

    return total(
        {
            "think_format": as_float([think_answer_format(t) for t in texts], cpu),
            "json_format": as_float([vision_reasoner_json_format(a) for a in answers], cpu),
            "accuracy": as_float(accuracy, cpu),
            "non_repeat": as_float([non_repeat(t) for t in texts], cpu),
        }
    )
