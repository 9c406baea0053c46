"""Shared batch plumbing of the rewards: the result type, input checks, packing parsed answers into
tensors for the fused ops, and rescaling from the policy's frame to the ground truth's.

Batch layout: ``N = B * G`` completions in prompt order (completion ``b * G + g`` is the g-th rollout of
prompt b); ground truth has one entry per prompt (leading dim B).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from lens_fast.ops.mask_stats import foreground
from lens_fast.rewards.parsing import Box, ParsedAnswer, Point, parse_answer


class RewardOutput(NamedTuple):
    """``reward``: float32 [N], one per completion, the sum of ``components`` (each float32 [N])."""

    reward: torch.Tensor
    components: dict[str, torch.Tensor]


def total(components: dict[str, torch.Tensor]) -> RewardOutput:
    """The RewardOutput whose reward is the sum of ``components``."""
    return RewardOutput(torch.stack(list(components.values())).sum(0), components)


def check_completions(completions: Sequence[str]) -> list[str]:
    """``completions`` as a list of str; TypeError naming the first item that is not a str."""
    if isinstance(completions, (str, bytes)) or not isinstance(completions, Sequence):
        raise TypeError(f"completions must be a sequence of str, got {type(completions).__name__}")
    for i, text in enumerate(completions):
        if not isinstance(text, str):
            raise TypeError(f"completions[{i}] must be a str, got {type(text).__name__}")
    return list(completions)


def parse_all(completions: Sequence[str]) -> list[ParsedAnswer]:
    """``parse_answer`` of every completion."""
    return [parse_answer(text) for text in completions]


def group_size(num_completions: int, num_prompts: int) -> int:
    """G = N / B; ValueError unless the N completions split evenly over the B prompts."""
    if num_prompts < 1 or num_completions % num_prompts or num_completions == 0:
        raise ValueError(
            f"completions ({num_completions}) must be a non-zero multiple of the prompts in the ground "
            f"truth ({num_prompts}): B prompts x G rollouts each, in prompt order"
        )
    return num_completions // num_prompts


def float_tensor(
    name: str, value: object, shape: tuple[int, ...], device: torch.device, *, positive: bool = False
) -> torch.Tensor:
    """``value`` (tensor, ndarray or nested lists) as a finite (``positive``: and > 0) float32 tensor of
    ``shape`` on ``device`` (-1 in ``shape`` matches any size); ValueError naming ``name`` otherwise.
    Checked where the value lives, before the copy, so host inputs never wait on the GPU."""
    try:
        tensor = torch.as_tensor(np.asarray(value, dtype=np.float64) if not isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers of shape {_shape_text(shape)}: {error}") from None
    if tensor.dim() != len(shape) or any(s != -1 and s != t for s, t in zip(shape, tensor.shape)):
        raise ValueError(f"{name} must have shape {_shape_text(shape)}, got {tuple(tensor.shape)}")
    tensor = tensor.to(dtype=torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf in {name}")
    if positive and not bool((tensor > 0).all()):
        raise ValueError(f"{name} must be positive (height, width) pairs")
    return tensor.to(device)


def plain(value: Any) -> Any:
    """numpy arrays / tensors (as verl's parquet rows hold them) turned into Python lists, recursively."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def mask_tensor(name: str, value: object) -> torch.Tensor:
    """A mask or logits given as a tensor, a numpy array or nested lists (a dataset column, verl's
    ``extra_info``: float64 / int64 / bool once read) as a tensor of its own dtype; numpy arrays are
    shared, not copied. TypeError naming ``name`` unless the values are bools, integers or reals;
    ValueError when nested lists are ragged."""
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        array = value if isinstance(value, np.ndarray) and value.dtype != object else None
        if array is None:
            try:
                array = np.asarray(plain(value))
            except ValueError as error:  # ragged nesting
                raise ValueError(f"{name} must be a rectangular array of numbers, got ragged lists: {error}") from None
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold bools, integers or real numbers, got numpy dtype {array.dtype}")
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    if tensor.dtype.is_complex:
        raise TypeError(f"{name} must hold bools, integers or real numbers, got {tensor.dtype}")
    return tensor


def mask_foreground(name: str, value: object, threshold: float) -> torch.Tensor:
    """The bool foreground of a mask given as :func:`mask_tensor` takes it: bool and integer values
    nonzero, floats ``> threshold`` (a float32-rounded, non-NaN number: ``ops.mask_stats.check_threshold``)."""
    return foreground(mask_tensor(name, value), threshold)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("*" if s == -1 else str(s) for s in shape) + "]"


def frame_scale(
    policy_size: object, gt_size: object, num_prompts: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Per-prompt (sx, sy) [B, 2] taking policy-frame coordinates to the ground truth's frame, from
    ``policy_size`` and ``gt_size`` given as [B, 2] (height, width); None when both are None."""
    if policy_size is None and gt_size is None:
        return None
    if policy_size is None or gt_size is None:
        raise ValueError("policy_size and gt_size go together: give both (height, width) per prompt, or neither")
    src = float_tensor("policy_size", policy_size, (num_prompts, 2), device, positive=True)
    dst = float_tensor("gt_size", gt_size, (num_prompts, 2), device, positive=True)
    return (dst / src).flip(-1)  # (h, w) ratios -> (sx, sy)


def pack_boxes(boxes: Sequence[Optional[Box]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes float32 [N, 4] (zeros where None) and validity bool [N]."""
    valid = [box is not None for box in boxes]
    data = [box if box is not None else (0.0, 0.0, 0.0, 0.0) for box in boxes]
    return (
        torch.tensor(data, dtype=torch.float32).reshape(len(data), 4).to(device),
        torch.tensor(valid, dtype=torch.bool).to(device),
    )


def pack_points(points: Sequence[Sequence[Point]], count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` points of each entry as float32 [N, count, 2] (zeros where an entry has fewer)
    and bool [N]: the entry has at least ``count`` points."""
    valid = [len(p) >= count for p in points]
    data = [list(p[:count]) if ok else [(0.0, 0.0)] * count for p, ok in zip(points, valid)]
    return (
        torch.tensor(data, dtype=torch.float32).reshape(len(data), count, 2).to(device),
        torch.tensor(valid, dtype=torch.bool).to(device),
    )


def scale_boxes(boxes: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """xyxy ``boxes`` [..., 4] times per-row ``scale`` (sx, sy) [..., 2] (broadcast); unchanged if None."""
    return boxes if scale is None else boxes * scale.repeat(*([1] * (scale.dim() - 1)), 2)


def scale_points(points: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``points`` [..., P, 2] times ``scale`` (sx, sy) [..., 2]; unchanged if None."""
    return points if scale is None else points * scale.unsqueeze(-2)


def points_in_boxes(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Whether each point [..., 2] lies inside its xyxy box [..., 4] (edges included; broadcast)."""
    x, y = points[..., 0], points[..., 1]
    return (x >= boxes[..., 0]) & (x <= boxes[..., 2]) & (y >= boxes[..., 1]) & (y <= boxes[..., 3])


def as_float(flags: Sequence[bool] | Sequence[float], device: torch.device) -> torch.Tensor:
    """A list of flags or numbers as float32 [N] on ``device``."""
    return torch.tensor([float(f) for f in flags], dtype=torch.float32).to(device)
