"""LENS's stage-2 reward: IoU(box, gt_box)^2 + IoU(mask, gt_mask)^2, plus the think/answer format on CoT runs."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lens_fast import ops
from lens_fast.ops.mask_stats import GT_DTYPES, PRED_DTYPES, check_threshold, foreground
from lens_fast.rewards.batch import (
    RewardOutput,
    as_float,
    check_completions,
    float_tensor,
    frame_scale,
    group_size,
    mask_tensor,
    pack_boxes,
    parse_all,
    scale_boxes,
    total,
)
from lens_fast.rewards.parsing import think_answer_format


def lens_reward(
    completions: Sequence[str],
    gt_boxes: object,
    *,
    pred_masks: Optional[torch.Tensor] = None,
    gt_masks: Optional[torch.Tensor] = None,
    cot: bool = False,
    policy_size: object = None,
    gt_size: object = None,
    mask_threshold: float = 0.0,
    empty_mask_iou: float = 1.0,
    backend: Optional[str] = None,
) -> RewardOutput:
    """LENS reward of ``N = B * G`` completions (``completions[b * G + g]`` answers prompt b).

    - ``gt_boxes``: [B, 4] xyxy in the ground truth's pixel frame. The predicted box is the parsed
      answer's first box (:func:`~lens_fast.rewards.parse_answer`), scaled by ``gt_size / policy_size``
      when those [B, 2] (height, width) sizes are given; no box scores 0.
    - ``pred_masks`` [B, G, H, W] against ``gt_masks`` [B, H, W], tensors, numpy arrays or nested lists of
      any bool, integer or real dtype: IoU^2. Foreground: bool and integers nonzero; ``pred_masks`` floats
      (logits) ``> mask_threshold``, ``gt_masks`` floats ``> 0``. With masks, the box and mask IoUs of the
      whole batch come from one ``ops.reward_iou`` call (one kernel launch on CUDA; ``backend`` as there;
      dtypes the op does not take, such as float64 or int64, are thresholded first); a pair whose union is
      empty has mask IoU ``empty_mask_iou``.
    - ``cot=True`` adds ``format``: 1 when the completion starts with ``<think>…</think>`` then
      ``<answer>…</answer>`` (LENS's ``re.match``).

    Returns :class:`RewardOutput`: float32 [N] on the masks' device (else ``gt_boxes``', else CPU),
    with components ``box``, ``mask`` (with masks), ``format`` (with ``cot``).
    """
    texts = check_completions(completions)
    if (pred_masks is None) != (gt_masks is None):
        raise ValueError("pred_masks and gt_masks go together: give both or neither")
    if pred_masks is not None:
        pred_masks = mask_tensor("pred_masks", pred_masks)
        if pred_masks.dtype not in PRED_DTYPES:
            pred_masks = foreground(pred_masks, check_threshold(mask_threshold, pred_masks.dtype))
            mask_threshold = 0.0
        gt_masks = mask_tensor("gt_masks", gt_masks)
        if gt_masks.dtype not in GT_DTYPES:
            gt_masks = foreground(gt_masks, 0.0)
        device = pred_masks.device
    else:
        device = gt_boxes.device if isinstance(gt_boxes, torch.Tensor) else torch.device("cpu")
    gt = float_tensor("gt_boxes", gt_boxes, (-1, 4), device)
    num_prompts = gt.shape[0]
    groups = group_size(len(texts), num_prompts)

    # Predicted boxes are packed and scaled on the CPU and moved once: the device runs only the fused op.
    cpu = torch.device("cpu")
    boxes, valid = pack_boxes([answer.box for answer in parse_all(texts)], cpu)
    scale = frame_scale(policy_size, gt_size, num_prompts, cpu)
    boxes = scale_boxes(boxes.view(num_prompts, groups, 4), None if scale is None else scale[:, None])

    if pred_masks is None:
        box_iou = ops.box_iou_aligned(boxes.to(device), gt[:, None]).reshape(-1)
        components = {"box": torch.where(valid.to(device), box_iou, 0.0).square()}
    else:
        if pred_masks.dim() != 4 or tuple(pred_masks.shape[:2]) != (num_prompts, groups):
            raise ValueError(
                f"pred_masks must be [B, G, H, W] = [{num_prompts}, {groups}, H, W] for {len(texts)} completions "
                f"and {num_prompts} ground-truth boxes, got shape {tuple(pred_masks.shape)}"
            )
        boxes = torch.where(valid.view(num_prompts, groups, 1), boxes, float("nan")).to(device)  # NaN: no box
        mask_iou, box_iou = ops.reward_iou(
            pred_masks, gt_masks, boxes, gt, threshold=mask_threshold, empty=empty_mask_iou, backend=backend
        )
        components = {"box": box_iou.reshape(-1).square(), "mask": mask_iou.reshape(-1).square()}
    if cot:
        components["format"] = as_float([think_answer_format(t, strict=False) for t in texts], device)
    return total(components)
