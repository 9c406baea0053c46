"""The TRL and verl adapters, called exactly as those libraries call reward functions.

- TRL (read from trl 1.16.0, ``GRPOTrainer._calculate_rewards``): every dataset column but
  prompt/completion/completion_ids becomes a keyword list, plus ``trainer_state``, ``log_extra`` and
  ``log_metric``; the call is ``f(prompts=, completions=, completion_ids=, **kwargs)``; None results
  become NaN; conversational completions are ``[{"role": "assistant", "content": text}]``. trl 0.17
  (LENS's fork) made the same call without ``completion_ids``. When trl's trainer imports, one test
  runs TRL's own ``_calculate_rewards``.
- verl (read from volcengine/verl, ``NaiveRewardManager`` / ``BatchRewardManager`` /
  ``get_custom_reward_fn``): ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)``
  or ``compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=)``, with
  ``reward_kwargs`` merged in as keywords; a dict result must carry ``"score"``.
"""
import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lens_fast.rewards import lens_reward, seg_zero_reward, vision_reasoner_reward
from lens_fast.rewards.adapters import (
    TRLReward,
    completion_text,
    compute_score,
    compute_score_batch,
    ground_truth_objects,
)


# ---------------------------------------------------------------- TRL
def trl_call(reward_func, inputs, prompts, completions, completion_ids, with_ids=True, logs=None):
    """trl 1.16.0's synchronous reward call, step by step (trl 0.17 without completion_ids)."""
    keys = [key for key in inputs[0] if key not in ["prompt", "completion", "completion_ids"]]
    reward_kwargs = {key: [example[key] for example in inputs] for key in keys}
    logs = logs if logs is not None else {"extra": defaultdict(list), "metric": defaultdict(list)}
    reward_kwargs["trainer_state"] = SimpleNamespace(global_step=0)
    reward_kwargs["log_extra"] = lambda column, values: logs["extra"][column].extend(values)
    reward_kwargs["log_metric"] = lambda name, value: logs["metric"][name].append(value)
    if with_ids:
        output = reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs)
    else:
        output = reward_func(prompts=prompts, completions=completions, **reward_kwargs)
    output = [r if r is not None else torch.nan for r in output]
    assert len(output) == len(prompts)
    return torch.tensor(output, dtype=torch.float32), logs


def lens_batch(rng, groups=4, conversational=True):
    """A TRL batch: 2 prompts x ``groups`` completions, each row repeating its prompt's columns."""
    gts = [[10, 10, 40, 30], [5, 0, 25, 20]]
    masks = [rng.random((9, 13)) < 0.5, rng.random((11, 7)) < 0.5]
    texts = ["<think>a</think><answer>{\"bbox\": [10, 10, 40, 30]}</answer>", "[5, 0, 25, 20]", "nothing", "(10,10),(30,30)"]
    inputs, prompts, completions, expected_text = [], [], [], []
    for b in range(2):
        prompt = [{"role": "user", "content": f"Output the bounding box of thing {b}."}]
        for g in range(groups):
            text = texts[(b + g) % len(texts)]
            pred = rng.standard_normal(masks[b].shape).astype(np.float32)
            inputs.append({"prompt": prompt, "solution": str(gts[b]), "gt_mask": masks[b], "pred_mask": pred, "image": None})
            prompts.append(prompt if conversational else prompt[0]["content"])
            completions.append([{"role": "assistant", "content": text}] if conversational else text)
            expected_text.append(text)
    return inputs, prompts, completions, expected_text, gts


def expected_lens(inputs, texts, gts, groups, cot=True):
    """The same rows through lens_reward directly, prompt by prompt (masks of one prompt share a size)."""
    values = []
    for b in range(len(gts)):
        rows = inputs[b * groups : (b + 1) * groups]
        pred = torch.from_numpy(np.stack([r["pred_mask"] for r in rows]))[None]
        gt = torch.from_numpy(rows[0]["gt_mask"])[None]
        values.append(lens_reward(texts[b * groups : (b + 1) * groups], [gts[b]], pred_masks=pred, gt_masks=gt, cot=cot))
    return torch.cat([v.reward for v in values]), {k: torch.cat([v.components[k] for v in values]) for k in values[0].components}


@pytest.mark.parametrize("conversational", [True, False])
@pytest.mark.parametrize("with_ids", [True, False])
def test_trl_signature_lens(rng, conversational, with_ids):
    inputs, prompts, completions, texts, gts = lens_batch(rng, conversational=conversational)
    reward = TRLReward("lens", cot=True)
    ids = [[1, 2, 3]] * len(completions)
    got, logs = trl_call(reward, inputs, prompts, completions, ids, with_ids=with_ids)
    want, components = expected_lens(inputs, texts, gts, groups=4)
    torch.testing.assert_close(got, want)
    assert reward.__name__ == "lens_reward"
    for name, values in components.items():
        assert logs["metric"][f"lens_reward/{name}"] == [pytest.approx(values.mean().item())]
        np.testing.assert_allclose(logs["extra"][f"lens_reward/{name}"], values.numpy(), atol=1e-6)


def test_trl_rows_without_ground_truth_get_none(rng):
    inputs, prompts, completions, texts, gts = lens_batch(rng)
    for row in inputs[:4]:
        row["solution"] = None
    got, logs = trl_call(TRLReward("lens"), inputs, prompts, completions, None)
    assert torch.isnan(got[:4]).all()
    want, _ = expected_lens(inputs, texts, gts, groups=4, cot=False)
    torch.testing.assert_close(got[4:], want[4:])
    assert logs["extra"]["lens_reward/box"][:4] == [None] * 4
    nothing, _ = trl_call(TRLReward("lens"), [dict(r, solution=None) for r in inputs], prompts, completions, None)
    assert torch.isnan(nothing).all()


def test_trl_seg_zero_and_vision_reasoner_columns():
    seg_text = '<think>x</think><answer>{"bbox": [0, 0, 10, 10], "points_1": [2, 2], "points_2": [8, 8]}</answer>'
    rows = [{"prompt": "p", "solution": "<box>(0,0),(10,10)</box><points>(2,2),(8,8)</points>"}] * 2
    got, _ = trl_call(TRLReward("seg_zero"), rows, ["p", "p"], [seg_text, "no"], None)
    assert got.tolist() == [5.0, 0.0]
    vr_text = '<think>x</think><answer>[{"bbox_2d": [0, 0, 10, 10], "point_2d": [5, 5]}]</answer>'
    gt = [{"bbox_2d": [0, 0, 10, 10], "point_2d": [5, 5]}, {"bbox_2d": [50, 50, 60, 60], "point_2d": [55, 55]}]
    rows = [{"prompt": "p", "objects": gt, "policy_size": (100, 100), "gt_size": (100, 100)}]
    got, _ = trl_call(TRLReward("vision_reasoner", solution_key="objects"), rows, ["p"], [vr_text], None)
    want = vision_reasoner_reward([vr_text], [[o["bbox_2d"] for o in gt]], [[o["point_2d"] for o in gt]])
    assert got.tolist() == want.reward.tolist()


def test_trl_missing_column_and_bad_recipe():
    with pytest.raises(ValueError, match="'solution'"):
        TRLReward("lens")(prompts=["p"], completions=["x"], completion_ids=None, answer=["[0,0,1,1]"])
    with pytest.raises(ValueError, match="recipe"):
        TRLReward("lisa")


def test_trl_reward_pickles():
    import pickle

    reward = pickle.loads(pickle.dumps(TRLReward("seg_zero", iou_threshold=0.7)))
    assert reward.__name__ == "seg_zero_reward" and reward.options == {"iou_threshold": 0.7}


def test_through_trl_grpo_trainer(rng):
    """TRL's own GRPOTrainer._calculate_rewards (needs trl and its dependencies datasets/pandas)."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from transformers import TrainerState

    inputs, prompts, completions, texts, gts = lens_batch(rng)
    reward = TRLReward("lens", cot=True)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=SimpleNamespace(report_to=[]),
        state=TrainerState(),
        reward_funcs=[reward],
        reward_processing_classes=[None],
        reward_func_names=[reward.__name__],
        environments=None,
        _pending_extra_logs=defaultdict(list),
        _pending_metrics=defaultdict(list),
    )
    trainer._log_completion_extra = functools.partial(grpo.GRPOTrainer._log_completion_extra, trainer)
    trainer._log_metric = functools.partial(grpo.GRPOTrainer._log_metric, trainer)
    ids = [[1, 2]] * len(completions)
    rewards_per_func = grpo.GRPOTrainer._calculate_rewards(trainer, inputs, prompts, completions, ids)
    want, components = expected_lens(inputs, texts, gts, groups=4)
    torch.testing.assert_close(rewards_per_func[:, 0], want)
    assert trainer._pending_metrics["lens_reward/box"] == [pytest.approx(components["box"].mean().item())]


def test_public_names():
    import lens_fast.rewards as rewards
    from lens_fast.rewards import adapters

    assert rewards.TRLReward is adapters.TRLReward
    assert rewards.compute_score is adapters.compute_score
    assert rewards.compute_score_batch is adapters.compute_score_batch


@pytest.mark.parametrize("bool_first", [True, False])
def test_rows_of_mixed_mask_dtypes(bool_first):
    """A stored bool mask next to logits: each row by its own rule, in either order (a logits row of
    -5.0 is all background, not all foreground as a cast to bool would make it)."""
    gt = np.zeros((4, 4), dtype=bool)
    gt[:2, :2] = True
    stored = gt.copy()  # IoU 1
    logits = np.full((4, 4), -5.0, dtype=np.float32)  # empty: IoU 0
    rows = [("stored", stored), ("logits", logits)]
    if not bool_first:
        rows.reverse()
    inputs = [{"prompt": "p", "solution": "[0, 0, 2, 2]", "pred_mask": m, "gt_mask": gt} for _, m in rows]
    got, logs = trl_call(TRLReward("lens"), inputs, ["p", "p"], ["[0, 0, 2, 2]"] * 2, None)
    want = {"stored": 1.0, "logits": 0.0}
    assert logs["extra"]["lens_reward/mask"] == [want[name] for name, _ in rows]
    assert got.tolist() == [1.0 + want[name] for name, _ in rows]


def test_mask_threshold_applies_to_float_rows_only():
    gt = [[1, 1], [0, 0]]
    rows = [[[0.5, 2.0], [-1.0, 3.0]], np.array([[1, 0], [0, 0]], dtype=np.uint8), [[True, True], [False, False]]]
    inputs = [{"prompt": "p", "solution": "[0, 0, 9, 9]", "pred_mask": m, "gt_mask": gt} for m in rows]
    _, logs = trl_call(TRLReward("lens", mask_threshold=1.0), inputs, ["p"] * 3, ["x"] * 3, None)
    assert logs["extra"]["lens_reward/mask"] == pytest.approx([(1 / 3) ** 2, (1 / 2) ** 2, 1.0])


@pytest.mark.parametrize("kind", ["bool", "int64 lists", "float64 lists", "object array of rows"])
def test_nested_list_masks_from_columns_and_extra_info(rng, kind):
    """Masks that reach a reward through a dataset column (TRL) or verl's extra_info are nested lists:
    float64 / int64 once read; parquet rows read through pandas give object arrays of row arrays."""
    gts = [rng.random((6, 9)) < 0.5, rng.random((4, 5)) < 0.5]
    logits = [rng.standard_normal((6, 9)), rng.standard_normal((4, 5))]

    def form(mask, is_pred):
        if kind == "bool":
            return mask > 0 if is_pred else mask
        if kind == "int64 lists":
            return (mask > 0).astype(np.int64).tolist() if is_pred else mask.astype(np.int64).tolist()
        if kind == "float64 lists":
            return mask.tolist() if is_pred else mask.astype(np.float64).tolist()
        rows = np.empty(len(mask), dtype=object)
        rows[:] = list(mask.astype(np.float64))
        return rows

    texts = ["[1, 1, 5, 5]", "[0, 0, 2, 3]"]
    want = [lens_reward([t], [[0, 0, 5, 5]], pred_masks=torch.from_numpy(p > 0)[None, None], gt_masks=torch.from_numpy(g)[None])
            for t, p, g in zip(texts, logits, gts)]
    inputs = [{"prompt": "p", "solution": "[0, 0, 5, 5]", "pred_mask": form(p, True), "gt_mask": form(g, False)}
              for p, g in zip(logits, gts)]
    got, _ = trl_call(TRLReward("lens"), inputs, ["p", "p"], texts, None)
    assert got.tolist() == [w.reward.item() for w in want]
    rows = [{"data_source": "refcoco", "response": t, "reward_model": {"ground_truth": [0, 0, 5, 5]}, "extra_info": r}
            for t, r in zip(texts, ({"pred_mask": i["pred_mask"], "gt_mask": i["gt_mask"]} for i in inputs))]
    scores, extra = verl_naive(verl_custom_fn(compute_score, {"recipe": "lens"}), rows)
    assert scores == [w.reward.item() for w in want]
    assert extra["mask"] == [w.components["mask"].item() for w in want]


@pytest.mark.parametrize(
    "pred, message, error",
    [
        ([[1, 0], [1]], r"pred_mask\[1\] must be a rectangular array", ValueError),
        ([["a", "b"]], r"pred_mask\[1\] must hold bools, integers or real numbers", TypeError),
        ([1, 0], r"pred_mask\[1\] must be an \[H, W\] mask, got shape \(2,\)", ValueError),
    ],
)
def test_bad_mask_rows_name_the_row(pred, message, error):
    rows = [{"pred_mask": [[1, 0]], "gt_mask": [[1, 0]]}, {"pred_mask": pred, "gt_mask": [[1, 0]]}]
    with pytest.raises(error, match=message):
        compute_score_batch(["d", "d"], ["x", "x"], ["[0, 0, 1, 1]"] * 2, rows)


# ---------------------------------------------------------------- verl
def verl_custom_fn(fn, reward_kwargs):
    """verl's get_custom_reward_fn: partial(_call_with_kwargs, raw_fn, reward_kwargs)."""

    def call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):
        return raw_fn(*args, **{**kwargs, **extra_kwargs})

    return functools.partial(call_with_kwargs, fn, dict(reward_kwargs))


def verl_naive(compute, rows):
    """NaiveRewardManager's per-row call and result handling."""
    scores, extra = [], defaultdict(list)
    for row in rows:
        extra_info = dict(row.get("extra_info", {}))
        extra_info["num_turns"] = None
        extra_info["rollout_reward_scores"] = {}
        score = compute(data_source=row["data_source"], solution_str=row["response"],
                        ground_truth=row["reward_model"]["ground_truth"], extra_info=extra_info)
        if isinstance(score, dict):
            for key, value in score.items():
                extra[key].append(value)
            score = score["score"]
        scores.append(score)
    return scores, extra


def verl_batch(compute, rows):
    """BatchRewardManager.verify's call."""
    extras = [dict(row.get("extra_info", {}), rollout_reward_scores={}) for row in rows]
    return compute(data_sources=np.array([r["data_source"] for r in rows], dtype=object),
                   solution_strs=[r["response"] for r in rows],
                   ground_truths=[r["reward_model"].get("ground_truth") for r in rows],
                   extra_infos=extras)


SEG_ROWS = [
    {"data_source": "refcoco", "response": '<think>x</think><answer>{"bbox": [0, 0, 10, 10], "points_1": [2, 2], '
     '"points_2": [8, 8]}</answer>', "reward_model": {"ground_truth": "<box>(0,0),(10,10)</box><points>(2,2),(8,8)</points>"}},
    {"data_source": "refcoco", "response": '{"bbox": [0, 0, 20, 20]}',
     "reward_model": {"ground_truth": {"bbox": np.array([0, 0, 10, 10]), "points": np.array([[2, 2], [8, 8]])}},
     "extra_info": {"policy_size": [200, 200], "gt_size": [100, 100]}},
    {"data_source": "refcoco", "response": "", "reward_model": {"ground_truth": '{"bbox": [0, 0, 10, 10], "points_1": [1, 1], '
     '"points_2": [9, 9]}'}},
]


def test_verl_naive_and_batch_seg_zero():
    raw = verl_custom_fn(compute_score, {"recipe": "seg_zero"})
    scores, extra = verl_naive(raw, SEG_ROWS)
    # row 2: the box [0,0,20,20] in a 200x200 frame is [0,0,10,10] in the 100x100 ground-truth frame
    assert scores == [5.0, 2.0, 0.0]
    assert set(extra) == {"score", "think_format", "json_format", "box_iou", "box_l1", "points"}
    assert all(len(v) == 3 for v in extra.values())
    batched = verl_batch(verl_custom_fn(compute_score_batch, {"recipe": "seg_zero"}), SEG_ROWS)
    assert [r["score"] for r in batched] == scores
    direct = seg_zero_reward([r["response"] for r in SEG_ROWS], [[0, 0, 10, 10]] * 3, [[[2, 2], [8, 8]], [[2, 2], [8, 8]],
                             [[1, 1], [9, 9]]], policy_size=[[100, 100], [200, 200], [100, 100]], gt_size=[[100, 100]] * 3)
    assert [r["box_iou"] for r in batched] == direct.components["box_iou"].tolist()


def test_verl_lens_with_masks_and_router_kwargs(rng):
    masks = [rng.random((6, 9)) < 0.5, rng.random((4, 4)) < 0.5]
    preds = [rng.standard_normal((6, 9)).astype(np.float32), rng.standard_normal((4, 4)).astype(np.float32)]
    rows = [{"data_source": "refcoco", "response": "[1, 1, 5, 5]", "reward_model": {"ground_truth": "[0, 0, 5, 5]"},
             "extra_info": {"pred_mask": p, "gt_mask": m}} for p, m in zip(preds, masks)]
    raw = verl_custom_fn(compute_score, {"recipe": "lens"})
    scores, extra = verl_naive(lambda **kw: raw(**kw, reward_router_address=None, reward_model_tokenizer=None), rows)
    for i in range(2):  # padding to a common size changes nothing
        want = lens_reward(["[1, 1, 5, 5]"], [[0, 0, 5, 5]], pred_masks=torch.from_numpy(preds[i])[None, None],
                           gt_masks=torch.from_numpy(masks[i])[None])
        assert scores[i] == pytest.approx(want.reward.item())
        assert extra["mask"][i] == pytest.approx(want.components["mask"].item())


def test_verl_vision_reasoner_json_ground_truth():
    gt = '[{"bbox_2d": [416, 7, 833, 553], "point_2d": [648, 249]}]'
    response = '<think>x</think>\n<answer>[{"bbox_2d": [10, 100, 398, 423], "point_2d": [283, 169]}]</answer>'
    result = compute_score("vision_reasoner", response, gt, None, recipe="vision_reasoner")
    assert result == {"score": 4.0, "think_format": 1.0, "json_format": 2.0, "accuracy": 0.0, "non_repeat": 1.0}
    # the point lies inside its own box: with no distance limit it matches
    assert math.isclose(compute_score("x", response, gt, recipe="vision_reasoner", point_threshold=1e9)["accuracy"], 1.0)


# ---------------------------------------------------------------- shared pieces
@pytest.mark.parametrize(
    "value, boxes, points",
    [
        ("[1, 2, 3, 4]", [(1, 2, 3, 4)], [()]),
        ([1, 2, 3, 4], [(1, 2, 3, 4)], [()]),
        (np.array([1, 2, 3, 4]), [(1, 2, 3, 4)], [()]),
        (torch.tensor([1.5, 2, 3, 4]), [(1.5, 2, 3, 4)], [()]),
        ("<box>(1,2),(3,4)</box><points>(5,6),(7,8)</points>", [(1, 2, 3, 4)], [((5, 6), (7, 8))]),
        ({"bbox": [1, 2, 3, 4], "points": [[5, 6], [7, 8]]}, [(1, 2, 3, 4)], [((5, 6), (7, 8))]),
        ('{"bbox_2d": [1, 2, 3, 4], "point_2d": [5, 6]}', [(1, 2, 3, 4)], [((5, 6),)]),
        (np.array([{"bbox_2d": np.array([1, 2, 3, 4]), "point_2d": [5, 6]}], dtype=object), [(1, 2, 3, 4)], [((5, 6),)]),
        ("[]", [], []),
        ("(1,2),(3,4)", [(1, 2, 3, 4)], [()]),
    ],
)
def test_ground_truth_forms(value, boxes, points):
    objects = ground_truth_objects(value)
    assert [o.box for o in objects] == [tuple(map(float, b)) for b in boxes]
    assert [o.points for o in objects] == [tuple(tuple(map(float, p)) for p in ps) for ps in points]


@pytest.mark.parametrize("value", ["no box", None, 3, [1, 2, 3], {"bbox": [1, 2, float("nan"), 4]}, [{"point_2d": [1, 2]}]])
def test_bad_ground_truth_raises(value):
    with pytest.raises(ValueError, match="ground truth"):
        ground_truth_objects(value)


def test_recipes_check_ground_truth_shape():
    with pytest.raises(ValueError, match="two ground-truth points"):
        compute_score("d", "x", "[0, 0, 1, 1]", recipe="seg_zero")
    with pytest.raises(ValueError, match="one ground-truth object"):
        compute_score("d", "x", "[]", recipe="lens")
    with pytest.raises(ValueError, match="point"):
        compute_score("d", "x", [{"bbox_2d": [0, 0, 1, 1]}], recipe="vision_reasoner")
    with pytest.raises(TypeError):
        compute_score("d", "x", "[0, 0, 1, 1]", recipe="lens", no_such_option=1)


@pytest.mark.parametrize(
    "completion, text",
    [
        ("plain", "plain"),
        ([{"role": "assistant", "content": "hi"}], "hi"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "a"),
        ([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}], "ab"),
        ([{"role": "assistant", "content": None, "tool_calls": []}], ""),
    ],
)
def test_completion_text(completion, text):
    assert completion_text(completion) == text


def test_completion_text_rejects_other_types():
    with pytest.raises(TypeError, match="completion"):
        completion_text(42)
