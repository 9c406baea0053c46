"""The rewards as TRL ``GRPOTrainer`` reward functions and as verl custom reward functions.

Both libraries hand over one row per completion, so a batch is scored as B = N prompts of G = 1
rollout: still one fused ``ops`` call for all of it. Ground truth comes in any of the common dataset
forms (see :func:`ground_truth_objects`); optional per-row fields, under the same names in a TRL
dataset column or a verl ``extra_info`` dict: ``pred_mask`` / ``gt_mask`` ([H, W] tensors, arrays or
nested lists of any bool, integer or real dtype, each row converted by its own rule: bool and integers
nonzero, floats ``> mask_threshold`` for ``pred_mask`` and ``> 0`` for ``gt_mask``; sizes may differ
between rows, they are zero-padded), ``policy_size`` / ``gt_size`` ((height, width) of the frame the
policy answered in / of the ground truth, for rescaling).

TRL: ``GRPOTrainer(reward_funcs=[TRLReward("lens", cot=True)], ...)``; the dataset has a ``solution``
column. verl: ``compute_score`` is the per-row hook every verl reward manager calls (the reward loop
of verl >= 0.7 scores row by row); ``compute_score_batch`` is the hook of the legacy ``batch`` reward
manager (verl <= 0.8 with the reward loop off). The README lists the settings.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Sequence

import torch

from lens_fast.rewards.batch import RewardOutput, mask_foreground
from lens_fast.rewards.batch import plain as plain_value
from lens_fast.ops.mask_stats import check_threshold
from lens_fast.rewards.lens import lens_reward
from lens_fast.rewards.parsing import NUMBER, AnswerObject, ParsedAnswer, as_point, objects_from_json, parse_answer
from lens_fast.rewards.seg_zero import seg_zero_reward
from lens_fast.rewards.vision_reasoner import vision_reasoner_reward

RECIPES = ("lens", "seg_zero", "vision_reasoner")
_VERL_INTERNAL_KWARGS = ("reward_router_address", "reward_model_tokenizer")
_TAGS = re.compile(r"<(box|points)>(.*?)</\1>", re.DOTALL)


def _object_with_points_list(item: dict) -> AnswerObject:
    """A ground-truth dict; besides the answer keys it may list its points as ``"points": [[x, y], ...]``."""
    (obj,) = objects_from_json(item)
    extra = item.get("points")
    if isinstance(extra, list) and all(as_point(p) is not None for p in extra):
        obj = AnswerObject(obj.box, obj.points + tuple(as_point(p) for p in extra))
    return obj


def ground_truth_objects(value: Any) -> tuple[AnswerObject, ...]:
    """The ground-truth objects of one row. Accepted: a dict (``bbox``/``bbox_2d``, ``points_1``,
    ``points_2``, ``point_2d`` or ``points``), a list of such dicts, a list of 4 numbers, or a string
    holding one of those as JSON, Seg-Zero's ``<box>(x1,y1),(x2,y2)</box><points>(x,y),(x,y)</points>``,
    or a box in any answer form (LENS's ``"[x1, y1, x2, y2]"`` solutions). ValueError when no valid
    box is found: a broken ground truth is a data bug, not a zero reward."""
    plain = plain_value(value)
    if isinstance(plain, str):
        tags = {name: [float(n) for n in NUMBER.findall(body)] for name, body in _TAGS.findall(plain)}
        if "box" in tags:
            points = tags.get("points", [])
            plain = {"bbox": tags["box"], "points": [points[i : i + 2] for i in range(0, len(points) - 1, 2)]}
        else:
            try:
                plain = json.loads(plain)
            except ValueError:
                box = parse_answer(plain, max_chars=None).box
                if box is None:
                    raise ValueError(f"ground truth {value!r:.200} holds no box in a known form") from None
                plain = list(box)
    if isinstance(plain, dict):
        objects = (_object_with_points_list(plain),)
    elif isinstance(plain, list) and plain and all(isinstance(v, dict) for v in plain):
        objects = tuple(_object_with_points_list(v) for v in plain)
    elif isinstance(plain, list) and len(plain) == 4:
        objects = objects_from_json({"bbox": plain})
    elif isinstance(plain, list) and not plain:
        objects = ()
    else:
        raise ValueError(f"ground truth {value!r:.200} holds no box in a known form")
    if any(obj.box is None for obj in objects):
        raise ValueError(f"ground truth {value!r:.200} has an object without a valid [x1, y1, x2, y2] box")
    return objects


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a str, or a conversation (list of ``{"role", "content"}``
    messages; the last message's content, a str or a list of ``{"type": "text", "text"}`` blocks)."""
    if isinstance(completion, str):
        return completion
    message = completion[-1] if isinstance(completion, (list, tuple)) and completion else completion
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    if content is None and isinstance(message, dict):
        return ""
    raise TypeError(f"a completion must be a str or a list of {{'role', 'content'}} messages, got {completion!r:.200}")


def _stack_padded(name: str, masks: Sequence[Any], threshold: float) -> torch.Tensor:
    """Bool [N, Hmax, Wmax] foregrounds of N [H, W] masks of possibly different sizes and dtypes, each row
    converted by its own rule (bool and integers nonzero, floats ``> threshold``), zero-padded (a padded
    pixel is background for both pred and gt, so intersections and unions do not change)."""
    rows = [mask_foreground(f"{name}[{i}]", m, threshold) for i, m in enumerate(masks)]
    for i, row in enumerate(rows):
        if row.dim() != 2:
            raise ValueError(f"{name}[{i}] must be an [H, W] mask, got shape {tuple(row.shape)}")
    height = max(row.shape[0] for row in rows)
    width = max(row.shape[1] for row in rows)
    out = torch.zeros((len(rows), height, width), dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, : row.shape[0], : row.shape[1]] = row
    return out


def score_rows(
    recipe: str,
    texts: Sequence[str],
    ground_truths: Sequence[Any],
    *,
    pred_masks: Optional[Sequence[Any]] = None,
    gt_masks: Optional[Sequence[Any]] = None,
    policy_sizes: Optional[Sequence[Any]] = None,
    gt_sizes: Optional[Sequence[Any]] = None,
    **options: Any,
) -> RewardOutput:
    """Score rows that each pair one completion with its own ground truth (B = N, G = 1) with
    ``recipe`` ("lens", "seg_zero" or "vision_reasoner"); ``options`` go to the recipe's function."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    objects = [ground_truth_objects(gt) for gt in ground_truths]
    sizes = _frame_sizes(len(texts), policy_sizes, gt_sizes)
    if recipe == "vision_reasoner":
        return vision_reasoner_reward(
            texts,
            [[o.box for o in objs] for objs in objects],
            [[_first_point(o, gt) for o in objs] for objs, gt in zip(objects, ground_truths)],
            **sizes,
            **options,
        )
    for objs, gt in zip(objects, ground_truths):
        if len(objs) != 1:
            raise ValueError(f"recipe {recipe!r} needs one ground-truth object per row, got {len(objs)} in {gt!r:.200}")
    boxes = [objs[0].box for objs in objects]
    if recipe == "seg_zero":
        points = []
        for objs, gt in zip(objects, ground_truths):
            if len(objs[0].points) < 2:
                raise ValueError(f"recipe 'seg_zero' needs two ground-truth points, got {gt!r:.200}")
            points.append(objs[0].points[:2])
        return seg_zero_reward(texts, boxes, points, **sizes, **options)
    masks = {}
    if pred_masks is not None or gt_masks is not None:
        if pred_masks is None or gt_masks is None:
            raise ValueError("pred_mask and gt_mask go together: give both for every row, or neither")
        threshold = check_threshold(options.pop("mask_threshold", 0.0))  # applied here, row by row
        masks = dict(pred_masks=_stack_padded("pred_mask", pred_masks, threshold)[:, None],
                     gt_masks=_stack_padded("gt_mask", gt_masks, 0.0))
    return lens_reward(texts, boxes, **masks, **sizes, **options)


def _frame_sizes(rows: int, policy_sizes: Optional[Sequence[Any]], gt_sizes: Optional[Sequence[Any]]) -> dict:
    """The recipes' policy_size / gt_size arguments; a row with neither size is not rescaled."""
    if policy_sizes is None and gt_sizes is None:
        return {}
    policy = list(policy_sizes) if policy_sizes is not None else [None] * rows
    gt = list(gt_sizes) if gt_sizes is not None else [None] * rows
    for i, (p, g) in enumerate(zip(policy, gt)):
        if (p is None) != (g is None):
            raise ValueError(f"row {i}: policy_size and gt_size go together, got {p!r} and {g!r}")
    return dict(policy_size=[p if p is not None else (1, 1) for p in policy],
                gt_size=[g if g is not None else (1, 1) for g in gt])


def _first_point(obj: AnswerObject, gt: Any) -> tuple[float, float]:
    if not obj.points:
        raise ValueError(f"recipe 'vision_reasoner' needs a point (point_2d) for every ground-truth object: {gt!r:.200}")
    return obj.points[0]


def _column(rows: Sequence[Any], present: Callable[[Any], bool]) -> Optional[list]:
    """``rows`` as a list when any row has the field, else None (the field is optional)."""
    return list(rows) if any(present(r) for r in rows) else None


Segmenter = Callable[[Any, ParsedAnswer], Any]
"""``segmenter(image, parsed_answer) -> [H, W] mask`` (bool, or logits > 0), e.g.
:class:`lens_fast.model.answer_segmenter.AnswerSegmenter`: each completion gets its own mask."""


def segment_rows(segmenter: Segmenter, images: Sequence[Any], texts: Sequence[str], where: str) -> list:
    """One mask per row from ``segmenter`` (the predicted masks of a mask reward)."""
    if not callable(segmenter):
        raise TypeError(f"segmenter must be callable (image, parsed answer) -> mask, got {type(segmenter).__name__}")
    missing = [i for i, image in enumerate(images) if image is None]
    if missing:
        raise ValueError(f"a segmenter needs an image for every row: rows {missing[:10]} have none ({where})")
    return [segmenter(image, parse_answer(text)) for image, text in zip(images, texts)]


class TRLReward:
    """A reward function for TRL's ``GRPOTrainer(reward_funcs=[...])``.

    TRL calls ``f(prompts=..., completions=..., completion_ids=..., **columns)`` with one entry per
    completion in each list, every other dataset column as a keyword (plus ``trainer_state``,
    ``log_metric``, ``log_extra`` in recent versions), and takes back ``list[float | None]``. The
    ground truth is read from column ``solution_key``; a row whose ground truth is None gets None
    (TRL then leaves this function out for that row). Components are logged through ``log_metric``
    (batch means) and ``log_extra`` (per completion) when TRL provides them.

    ``segmenter``: ``(image, parsed answer) -> mask``, called on every completion with its row's image
    (column ``image_key``); its masks are the predicted masks of the mask term (instead of a
    ``pred_mask`` column, which gives every completion of a group the same mask).
    """

    def __init__(
        self,
        recipe: str = "lens",
        *,
        solution_key: str = "solution",
        pred_mask_key: str = "pred_mask",
        gt_mask_key: str = "gt_mask",
        policy_size_key: str = "policy_size",
        gt_size_key: str = "gt_size",
        segmenter: Optional[Segmenter] = None,
        image_key: str = "image",
        **options: Any,
    ) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        if segmenter is not None and not callable(segmenter):
            raise TypeError(f"segmenter must be callable (image, parsed answer) -> mask, got {type(segmenter).__name__}")
        self.recipe = recipe
        self.segmenter = segmenter
        self.keys = dict(solution=solution_key, pred_mask=pred_mask_key, gt_mask=gt_mask_key,
                         policy_size=policy_size_key, gt_size=gt_size_key, image=image_key)
        self.options = options
        self.__name__ = f"{recipe}_reward"  # TRL names the reward (and its logs) after __name__

    def __call__(self, prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None,
                 **kwargs: Any) -> list[Optional[float]]:
        if self.keys["solution"] not in kwargs:
            raise ValueError(
                f"{self.__name__}: the dataset has no ground-truth column {self.keys['solution']!r} "
                f"(columns passed: {sorted(kwargs)})"
            )
        solutions = kwargs[self.keys["solution"]]
        rows = [i for i, gt in enumerate(solutions) if gt is not None]
        results: list[Optional[float]] = [None] * len(completions)
        if not rows:
            return results

        def field(name: str) -> Optional[list]:
            values = kwargs.get(self.keys[name])
            return None if values is None else _column([values[i] for i in rows], lambda v: v is not None)

        texts = [completion_text(completions[i]) for i in rows]
        pred_masks = field("pred_mask")
        if self.segmenter is not None:
            images = kwargs.get(self.keys["image"])
            if images is None:
                raise ValueError(f"{self.__name__}: a segmenter needs the images: no column {self.keys['image']!r}")
            pred_masks = segment_rows(self.segmenter, [images[i] for i in rows], texts, f"column {self.keys['image']!r}")
        out = score_rows(
            self.recipe,
            texts,
            [solutions[i] for i in rows],
            pred_masks=pred_masks,
            gt_masks=field("gt_mask"),
            policy_sizes=field("policy_size"),
            gt_sizes=field("gt_size"),
            **self.options,
        )
        for i, value in zip(rows, out.reward.tolist()):
            results[i] = value
        log_metric, log_extra = kwargs.get("log_metric"), kwargs.get("log_extra")
        for name, values in out.components.items():
            if callable(log_metric):
                log_metric(f"{self.__name__}/{name}", values.mean().item())
            if callable(log_extra):
                column: list[Optional[float]] = [None] * len(completions)
                for i, value in zip(rows, values.tolist()):
                    column[i] = value
                log_extra(f"{self.__name__}/{name}", column)
        return results


def _verl_result(out: RewardOutput, row: int) -> dict[str, float]:
    result = {"score": out.reward[row].item()}
    result.update({name: values[row].item() for name, values in out.components.items()})
    return result


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Optional[Sequence[Optional[dict]]] = None,
    *,
    recipe: str = "lens",
    segmenter: Optional[Segmenter] = None,
    image_key: str = "image",
    **options: Any,
) -> list[dict[str, float]]:
    """verl's legacy batch reward hook (``BatchRewardManager``: verl <= 0.6 with
    ``reward_model.reward_manager=batch``, verl 0.7-0.8 with ``reward_model.use_reward_loop=False
    reward_manager.name=batch``; verl >= 0.9 has no batch manager): one dict per row with
    ``"score"`` and the components; the whole batch in one fused call. ``extra_infos[i]`` may hold
    ``pred_mask``, ``gt_mask``, ``policy_size``, ``gt_size``; ``options`` are the recipe's arguments
    (``custom_reward_function.reward_kwargs``). ``segmenter``: as :class:`TRLReward`'s, on
    ``extra_infos[i][image_key]``; its masks replace ``pred_mask``."""
    for key in _VERL_INTERNAL_KWARGS:
        options.pop(key, None)
    infos = [info or {} for info in (extra_infos if extra_infos is not None else [None] * len(solution_strs))]

    def field(name: str) -> Optional[list]:
        return _column([info.get(name) for info in infos], lambda v: v is not None)

    pred_masks = field("pred_mask")
    if segmenter is not None:
        images = [info.get(image_key) for info in infos]
        pred_masks = segment_rows(segmenter, images, list(solution_strs), f"extra_info[{image_key!r}]")
    out = score_rows(
        recipe,
        list(solution_strs),
        list(ground_truths),
        pred_masks=pred_masks,
        gt_masks=field("gt_mask"),
        policy_sizes=field("policy_size"),
        gt_sizes=field("gt_size"),
        **options,
    )
    return [_verl_result(out, i) for i in range(len(solution_strs))]


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Optional[dict] = None,
    *,
    recipe: str = "lens",
    **options: Any,
) -> dict[str, float]:
    """verl's per-row reward hook, as its reward managers call it (``naive``, ``dapo``, ``limited`` in the
    reward loop; ``naive`` in the legacy workers): ``{"score": ..., <component>: ...}``; arguments as
    :func:`compute_score_batch`. Reached by ``custom_reward_function.path=pkg://lens_fast.rewards``
    and ``custom_reward_function.name=compute_score`` (under ``reward.`` on verl >= 0.9)."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], recipe=recipe, **options)[0]
