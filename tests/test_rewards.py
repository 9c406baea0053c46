"""LENS, Seg-Zero and VisionReasoner rewards against plain-Python/numpy computations of the peers' rules
(the predicted boxes are known from how each completion was written, not re-parsed), on random batches
(G = 1 and 8) and edge cases: no answer, degenerate boxes, empty masks, rescaling, CPU backends."""
import itertools
import json
import re

import numpy as np
import pytest
import torch

from lens_fast import ops
from lens_fast.rewards import lens_reward, seg_zero_reward, vision_reasoner_reward
from lens_fast.rewards.vision_reasoner import non_repeat

THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


# ---------------------------------------------------------------- plain references of the peers' rules
def ref_iou(a, b, plus_one=False):
    """IoU of xyxy boxes; widths x2 - x1 (+ 1 with plus_one), degenerate = zero area, empty union = 0."""
    e = 1.0 if plus_one else 0.0
    iw = max(0.0, min(a[2], b[2]) + e - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) + e - max(a[1], b[1]))
    inter = iw * ih

    def area(r):
        return max(0.0, r[2] - r[0] + e) * max(0.0, r[3] - r[1] + e)

    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def ref_mask_iou(pred, gt, threshold=0.0, empty=1.0):
    p = pred.astype(np.float64) > threshold if pred.dtype.kind == "f" else pred != 0
    g = gt != 0
    union = np.logical_or(p, g).sum()
    return np.logical_and(p, g).sum() / union if union else empty


def ref_l1(a, b):
    return float(np.mean(np.abs(np.subtract(a, b, dtype=np.float64))))


def inside(p, box):
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def dist(p, q):
    return float(np.hypot(p[0] - q[0], p[1] - q[1]))


# ---------------------------------------------------------------- random batches
def random_box(rng, around=None, spread=15):
    if around is None:
        x1, y1 = rng.integers(0, 200, size=2)
        return [int(x1), int(y1), int(x1 + rng.integers(1, 120)), int(y1 + rng.integers(1, 120))]
    return [int(v) for v in np.asarray(around) + rng.integers(-spread, spread + 1, size=4)]


def lens_completion(rng, box):
    """A completion stating ``box`` in a random LENS form, or (None) one with no box."""
    style = rng.integers(0, 6)
    x1, y1, x2, y2 = box
    if style == 0:
        return f"The box is [{x1}, {y1}, {x2}, {y2}].", box
    if style == 1:
        return f"<|object_ref_start|>it<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>", box
    if style == 2:
        return f'<think>it is there</think>\n<answer>{{"bbox": [{x1}, {y1}, {x2}, {y2}]}}</answer>', box
    if style == 3:
        return f"<think>[1, 2, 3, 4]?</think><answer>({x1}, {y1}, {x2}, {y2})</answer>", box
    if style == 4:
        return "I cannot find it.", None
    return f"<think>hmm</think><answer>[{x1}, {y1}, {x2}, NaN]</answer>", None


@pytest.mark.parametrize("groups", [1, 8])
def test_lens_reward_random(rng, groups):
    prompts, h, w = 3, 13, 17
    gt_boxes = [random_box(rng) for _ in range(prompts)]
    texts, boxes = zip(*(lens_completion(rng, random_box(rng, gt_boxes[b])) for b in range(prompts) for _ in range(groups)))
    pred = rng.standard_normal((prompts, groups, h, w)).astype(np.float32)
    gt = rng.random((prompts, h, w)) < 0.4
    gt[0] = False  # empty gt: its empty predictions score empty_mask_iou
    pred[0, 0] = -1.0
    out = lens_reward(list(texts), gt_boxes, pred_masks=torch.from_numpy(pred), gt_masks=torch.from_numpy(gt), cot=True)

    for i, text in enumerate(texts):
        b, g = divmod(i, groups)
        box = 0.0 if boxes[i] is None else ref_iou(boxes[i], gt_boxes[b]) ** 2
        mask = ref_mask_iou(pred[b, g], gt[b]) ** 2
        fmt = float(bool(re.match(THINK_ANSWER, text, re.DOTALL)))
        assert out.components["box"][i].item() == pytest.approx(box, abs=1e-6)
        assert out.components["mask"][i].item() == pytest.approx(mask, abs=1e-6)
        assert out.components["format"][i].item() == fmt
        assert out.reward[i].item() == pytest.approx(box + mask + fmt, abs=1e-5)
    assert out.reward.dtype == torch.float32 and out.reward.shape == (prompts * groups,)
    assert out.components["mask"][0].item() == 1.0


def test_lens_reward_boxes_only_and_degenerate():
    gt = [[10, 10, 20, 20]]
    texts = ["[10, 10, 20, 20]", "[20, 20, 10, 10]", "[15, 10, 15, 20]", "nothing", "[10,10,20,20]" * 3]
    out = lens_reward(texts, gt)
    assert set(out.components) == {"box"}
    assert out.reward.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    same = lens_reward(["[5, 5, 5, 5]"], [[5, 5, 5, 5]])  # both zero-area: union 0 scores 0
    assert same.reward.item() == 0.0


def test_lens_reward_rescaling():
    # the policy saw a 420 x 630 (h x w) resize of an 840 x 945 image: x scales by 1.5, y by 2
    out = lens_reward(["[10, 20, 110, 70]"], [[15, 40, 165, 140]], policy_size=[[420, 630]], gt_size=[[840, 945]])
    assert out.reward.item() == pytest.approx(1.0)
    unscaled = lens_reward(["[10, 20, 110, 70]"], [[15, 40, 165, 140]])
    assert unscaled.reward.item() == pytest.approx(ref_iou([10, 20, 110, 70], [15, 40, 165, 140]) ** 2)


def _available(backend):
    try:
        ops.mask_iou(torch.zeros(1, 1, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool), backend=backend)
        return True
    except (ValueError, ImportError, RuntimeError) as error:
        return str(error)


@pytest.mark.parametrize("backend", [None, "cpu", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.bfloat16])
def test_lens_mask_reward_backends(rng, backend, dtype):
    available = _available(backend)
    if available is not True:
        pytest.skip(f"backend {backend!r} unavailable for mask_iou here: {available}")
    prompts, groups, h, w = 2, 3, 7, 11
    logits = torch.from_numpy(rng.standard_normal((prompts, groups, h, w)).astype(np.float32))
    pred = (logits > 0).to(dtype) if dtype in (torch.bool, torch.uint8) else logits.to(dtype)
    gt = torch.from_numpy(rng.random((prompts, h, w)) < 0.5)
    gt[1] = False
    pred[1, 2] = 0
    out = lens_reward(["x"] * prompts * groups, [[0, 0, 1, 1]] * prompts, pred_masks=pred, gt_masks=gt, backend=backend)
    p = pred.float().numpy()
    want = [ref_mask_iou(p[b, g], gt[b].numpy()) ** 2 for b in range(prompts) for g in range(groups)]
    np.testing.assert_allclose(out.components["mask"].numpy(), want, atol=1e-6)
    assert out.components["mask"][-1].item() == 1.0  # empty pred vs empty gt


def test_lens_mask_threshold_and_empty_value():
    logits = torch.tensor([[[[0.5, 2.0], [-1.0, 3.0]]]])
    gt = torch.tensor([[[True, True], [False, False]]])
    out = lens_reward(["x"], [[0, 0, 1, 1]], pred_masks=logits, gt_masks=gt, mask_threshold=1.0)
    assert out.components["mask"].item() == pytest.approx((1 / 3) ** 2)
    from_numpy = lens_reward(["x"], [[0, 0, 1, 1]], pred_masks=logits.numpy(), gt_masks=gt.numpy(), mask_threshold=1.0)
    assert torch.equal(from_numpy.components["mask"], out.components["mask"])
    empty = lens_reward(["x"], [[0, 0, 1, 1]], pred_masks=torch.zeros(1, 1, 2, 2), gt_masks=torch.zeros(1, 2, 2, dtype=torch.bool),
                        empty_mask_iou=0.0)
    assert empty.components["mask"].item() == 0.0


@pytest.mark.parametrize("form", ["lists", "float64", "int64", "int32 tensor", "float64 tensor"])
def test_lens_reward_masks_of_any_real_or_integer_dtype(rng, form):
    """Masks from plain Python data (nested lists: float64 / int64 once read) and other dtypes the ops do
    not take: integers nonzero, pred floats > mask_threshold, gt floats > 0; the same rewards as bool masks."""
    logits = rng.standard_normal((2, 3, 5, 6)) * 2
    gt_bool = rng.random((2, 5, 6)) < 0.5
    texts = ["[0, 0, 3, 3]"] * 6
    threshold = 0.0 if form in ("int64", "int32 tensor") else 0.75
    if form == "lists":
        pred, gt = logits.tolist(), gt_bool.astype(int).tolist()  # float64 logits, int64 gt
    elif form == "float64":
        pred, gt = logits, gt_bool.astype(np.float64)
    elif form == "int64":
        pred, gt = (logits > 0).astype(np.int64) * 7, gt_bool.astype(np.int64) * -3
    elif form == "int32 tensor":
        pred, gt = torch.from_numpy((logits > 0).astype(np.int32)), torch.from_numpy(gt_bool.astype(np.int32))
    else:
        pred, gt = torch.from_numpy(logits), torch.from_numpy(gt_bool * 0.5)
    out = lens_reward(texts, [[0, 0, 3, 3]] * 2, pred_masks=pred, gt_masks=gt, mask_threshold=threshold)
    want = lens_reward(texts, [[0, 0, 3, 3]] * 2, pred_masks=torch.from_numpy(logits > threshold),
                       gt_masks=torch.from_numpy(gt_bool))
    assert torch.equal(out.components["mask"], want.components["mask"])
    expected = [ref_mask_iou(logits[b, g] > threshold, gt_bool[b]) ** 2 for b in range(2) for g in range(3)]
    np.testing.assert_allclose(out.components["mask"].numpy(), expected, atol=1e-6)


def test_lens_reward_float64_logits_compare_in_float64():
    """1e-50 is > 0 in float64 but 0 in float32: a float64 logit is compared in its own precision."""
    pred = np.array([[[[1e-50, -1e-50]]]])
    gt = np.array([[[True, False]]])
    out = lens_reward(["x"], [[0, 0, 1, 1]], pred_masks=pred, gt_masks=gt)
    assert out.components["mask"].item() == 1.0


@pytest.mark.parametrize(
    "pred, gt, threshold, error, message",
    [
        ([[[[1, 0], [1]]]], [[[1, 0], [1, 0]]], 0.0, ValueError, "pred_masks must be a rectangular array"),
        ([[[["a", "b"]]]], [[[1, 0]]], 0.0, TypeError, "pred_masks must hold bools, integers or real numbers"),
        (np.zeros((1, 1, 1, 2)), np.zeros((1, 1, 2), dtype=np.complex64), 0.0, TypeError, "gt_masks must hold"),
        (torch.zeros(1, 1, 1, 2, dtype=torch.complex64), np.zeros((1, 1, 2)), 0.0, TypeError, "pred_masks must hold"),
        (np.ones((1, 1, 1, 2), dtype=np.int64), np.zeros((1, 1, 2)), 0.5, ValueError, "threshold=0.5 applies to float"),
        (np.ones((1, 1, 1, 2)), np.zeros((1, 1, 2)), float("nan"), ValueError, "threshold must not be NaN"),
    ],
)
def test_lens_reward_bad_mask_values(pred, gt, threshold, error, message):
    with pytest.raises(error, match=message):
        lens_reward(["x"], [[0, 0, 1, 1]], pred_masks=pred, gt_masks=gt, mask_threshold=threshold)


@pytest.mark.cuda
def test_lens_reward_cuda(rng):
    pred = torch.from_numpy(rng.standard_normal((2, 8, 33, 47)).astype(np.float32))
    gt = torch.from_numpy(rng.random((2, 33, 47)) < 0.3)
    texts = ["[1, 2, 30, 40]"] * 16
    cpu = lens_reward(texts, [[0, 0, 30, 40]] * 2, pred_masks=pred, gt_masks=gt, backend="torch")
    gpu = lens_reward(texts, torch.tensor([[0, 0, 30, 40]] * 2).cuda(), pred_masks=pred.cuda(), gt_masks=gt.cuda())
    assert gpu.reward.device.type == "cuda"
    torch.testing.assert_close(gpu.reward.cpu(), cpu.reward)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(completions=["a"] * 3, gt_boxes=[[0, 0, 1, 1]] * 2), "multiple"),
        (dict(completions=["a"], gt_boxes=[[0, 0, 1]]), "gt_boxes"),
        (dict(completions=["a"], gt_boxes=[[0, 0, 1, float("nan")]]), "finite"),
        (dict(completions=["a"], gt_boxes=[[0, 0, 1, 1]], policy_size=[[1, 1]]), "policy_size"),
        (dict(completions=["a"], gt_boxes=[[0, 0, 1, 1]], policy_size=[[0, 1]], gt_size=[[1, 1]]), "positive"),
        (dict(completions=["a"], gt_boxes=[[0, 0, 1, 1]], policy_size=[[1, 1]], gt_size=[[1, -2]]), "gt_size must be positive"),
        (dict(completions=["a"], gt_boxes=[[0, 0, 1, 1]], pred_masks=torch.zeros(1, 1, 2, 2)), "gt_masks"),
        (dict(completions=["a", "b"], gt_boxes=[[0, 0, 1, 1]], pred_masks=torch.zeros(1, 1, 2, 2),
              gt_masks=torch.zeros(1, 2, 2, dtype=torch.bool)), "pred_masks"),
    ],
)
def test_lens_reward_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lens_reward(**kwargs)


def test_completions_must_be_strings():
    with pytest.raises(TypeError, match=r"completions\[1\]"):
        lens_reward(["a", None], [[0, 0, 1, 1]] * 2)
    with pytest.raises(TypeError, match="sequence of str"):
        lens_reward("a", [[0, 0, 1, 1]])


# ---------------------------------------------------------------- Seg-Zero
def seg_zero_completion(rng, gt_box, gt_points):
    box = random_box(rng, gt_box, spread=12)
    points = [[int(v) for v in np.asarray(p) + rng.integers(-90, 91, size=2) // (1 + 2 * rng.integers(0, 2))] for p in gt_points]
    style = rng.integers(0, 5)
    answer = json.dumps({"bbox": box, "points_1": points[0], "points_2": points[1]})
    if style == 0:
        return f"<think>look</think>\n<answer>{answer}</answer>", box, points, True
    if style == 1:
        return f"<answer>{answer}</answer>", box, points, True
    if style == 2:
        return f"<think>x</think><answer>{answer}</answer> trailing", box, points, True
    if style == 3:
        return f'<think>x</think><answer>{{"bbox": {box}, "points_1": {points[0]}}}</answer>', box, None, False
    return "<think>no idea</think><answer>none</answer>", None, None, False


def ref_seg_zero(text, box, points, json_ok, gt_box, gt_points):
    points_ok = 0.0
    if box is not None and points is not None and all(inside(p, box) for p in points):
        straight = (dist(points[0], gt_points[0]) + dist(points[1], gt_points[1])) / 2
        crossed = (dist(points[0], gt_points[1]) + dist(points[1], gt_points[0])) / 2
        points_ok = float(min(straight, crossed) < 100)
    return {
        "think_format": float(bool(re.fullmatch(THINK_ANSWER, text, re.DOTALL))),
        "json_format": float(json_ok),
        "box_iou": float(box is not None and ref_iou(box, gt_box, plus_one=True) > 0.5),
        "box_l1": float(box is not None and ref_l1(box, gt_box) < 10),
        "points": points_ok,
    }


@pytest.mark.parametrize("groups", [1, 8])
def test_seg_zero_reward_random(rng, groups):
    prompts = 4
    gt_boxes = [random_box(rng) for _ in range(prompts)]
    gt_points = [[[(2 * b[0] + b[2]) // 3, (2 * b[1] + b[3]) // 3], [(b[0] + 2 * b[2]) // 3, (b[1] + 2 * b[3]) // 3]]
                 for b in gt_boxes]
    samples = [seg_zero_completion(rng, gt_boxes[b], gt_points[b]) for b in range(prompts) for _ in range(groups)]
    out = seg_zero_reward([s[0] for s in samples], gt_boxes, gt_points)
    for i, (text, box, points, json_ok) in enumerate(samples):
        want = ref_seg_zero(text, box, points, json_ok, gt_boxes[i // groups], gt_points[i // groups])
        got = {k: v[i].item() for k, v in out.components.items()}
        assert got == want, text
        assert out.reward[i].item() == sum(want.values())


def test_seg_zero_thresholds_and_pixel_widths():
    text = '<think>.</think><answer>{"bbox": [0, 0, 9, 9], "points_1": [1, 1], "points_2": [8, 8]}</answer>'
    gt_box, gt_points = [[0, 0, 9, 4]], [[[1, 1], [8, 3]]]
    # inclusive widths: 10x5 inside 10x10 -> IoU 0.5 exactly, not > 0.5; mean L1 1.25
    out = seg_zero_reward([text], gt_box, gt_points)
    assert out.components["box_iou"].item() == 0.0
    assert out.components["box_l1"].item() == 1.0
    assert out.components["points"].item() == 1.0
    loose = seg_zero_reward([text], gt_box, gt_points, iou_threshold=0.49, l1_threshold=1.0, point_threshold=3.0)
    assert (loose.components["box_iou"].item(), loose.components["box_l1"].item()) == (1.0, 0.0)
    assert loose.components["points"].item() == 1.0  # mean distance (0 + 5) / 2 over the straight pairing
    tight = seg_zero_reward([text], gt_box, gt_points, point_threshold=2.5)
    assert tight.components["points"].item() == 0.0
    one_pixel = seg_zero_reward(['{"bbox": [5, 5, 5, 5]}'], [[5, 5, 5, 5]], [[[5, 5], [5, 5]]])
    assert one_pixel.components["box_iou"].item() == 1.0  # one inclusive pixel each: the same pixel


def test_seg_zero_points_need_box_and_inside():
    gt_box, gt_points = [[0, 0, 100, 100]], [[[10, 10], [90, 90]]]
    swapped = '{"bbox": [0, 0, 100, 100], "points_1": [90, 90], "points_2": [10, 10]}'
    outside = '{"bbox": [0, 0, 50, 50], "points_1": [10, 10], "points_2": [90, 90]}'
    no_box = '{"bbox": [0, 0, 100], "points_1": [10, 10], "points_2": [90, 90]}'
    out = seg_zero_reward([swapped, outside, no_box], gt_box * 3, gt_points * 3)
    assert out.components["points"].tolist() == [1.0, 0.0, 0.0]
    assert out.components["json_format"].tolist() == [1.0, 1.0, 0.0]


def test_seg_zero_rescaling():
    text = '{"bbox": [10, 10, 50, 50], "points_1": [20, 20], "points_2": [40, 40]}'
    out = seg_zero_reward([text], [[20, 30, 100, 150]], [[[40, 60], [80, 120]]], policy_size=[[100, 100]], gt_size=[[300, 200]])
    assert out.components["box_l1"].item() == 1.0 and out.components["points"].item() == 1.0
    with pytest.raises(ValueError, match="gt_points"):
        seg_zero_reward([text], [[0, 0, 1, 1]], [[0, 0], [1, 1]])


# ---------------------------------------------------------------- VisionReasoner
def ref_pair_score(pred, gt):
    box, point = pred
    gbox, gpoint = gt
    if box is None:
        return 0
    score = int(ref_iou(box, gbox, plus_one=True) > 0.5) + int(ref_l1(box, gbox) < 10)
    if point is not None and inside(point, box) and dist(point, gpoint) < 30:
        score += 1
    return score


def ref_accuracy(preds, gts, no_object=0.0):
    """Best one-to-one matching by brute force over all assignments (independent of Hungarian)."""
    m, k = len(preds), len(gts)
    if m == 0 and k == 0:
        return no_object
    scores = np.array([[ref_pair_score(p, g) for g in gts] for p in preds]).reshape(m, k)
    if m <= k:
        best = max((sum(scores[i, j] for i, j in enumerate(perm)) for perm in itertools.permutations(range(k), m)), default=0)
    else:
        best = max(sum(scores[i, j] for j, i in enumerate(perm)) for perm in itertools.permutations(range(m), k))
    return best / max(m, k)


def vr_completion(rng, gts):
    objects, items = [], []
    for _ in range(rng.integers(0, 4)):
        if gts and rng.random() < 0.7:
            gbox, gpoint = gts[rng.integers(0, len(gts))]
            box = random_box(rng, gbox, spread=8)
            point = [int(v) for v in np.asarray(gpoint) + rng.integers(-25, 26, size=2)]
        else:
            box, point = random_box(rng), [int(v) for v in rng.integers(0, 300, size=2)]
        kind = rng.integers(0, 6)
        if kind == 0:  # malformed box
            items.append({"bbox_2d": box[:3], "point_2d": point})
            objects.append((None, point))
        elif kind == 1:  # no point
            items.append({"bbox_2d": box})
            objects.append((box, None))
        else:
            items.append({"bbox_2d": box, "point_2d": point})
            objects.append((box, point))
    think = "<think>" + rng.choice(["I see it.", "x. A. B. A. B.", "x. A. A."]) + "</think>"
    answer = f"<answer>{json.dumps(items)}</answer>"
    text = think + "\n" + answer if rng.random() < 0.8 else answer
    return text, objects, items


def ref_json_format(items):
    if not items:
        return 0.0
    return sum((isinstance(it.get("bbox_2d"), list) and len(it["bbox_2d"]) == 4)
               + (isinstance(it.get("point_2d"), list) and len(it["point_2d"]) == 2) for it in items) / len(items)


@pytest.mark.parametrize("groups", [1, 8])
def test_vision_reasoner_reward_random(rng, groups):
    prompts = 3
    gt_objects = [[(random_box(rng), None) for _ in range(rng.integers(0, 4))] for _ in range(prompts)]
    gt_objects = [[(b, [(b[0] + b[2]) // 2, (b[1] + b[3]) // 2]) for b, _ in objs] for objs in gt_objects]
    samples = [vr_completion(rng, gt_objects[b]) for b in range(prompts) for _ in range(groups)]
    out = vision_reasoner_reward(
        [s[0] for s in samples],
        [[b for b, _ in objs] for objs in gt_objects],
        [[p for _, p in objs] for objs in gt_objects],
        no_object_score=0.5,
    )
    for i, (text, objects, items) in enumerate(samples):
        want = {
            "think_format": float(bool(re.fullmatch(THINK_ANSWER, text, re.DOTALL))),
            "json_format": ref_json_format(items),
            "accuracy": ref_accuracy(objects, gt_objects[i // groups], no_object=0.5),
            "non_repeat": float(not ("A. B. A. B." in text)),
        }
        got = {k: v[i].item() for k, v in out.components.items()}
        assert got == pytest.approx(want, abs=1e-6), text
        assert out.reward[i].item() == pytest.approx(sum(want.values()), abs=1e-5)


def test_vision_reasoner_matching_is_one_to_one_and_capped():
    gt_boxes = [[[0, 0, 10, 10], [100, 100, 110, 110]]]
    gt_points = [[[5, 5], [105, 105]]]
    twice = '<answer>[{"bbox_2d": [0, 0, 10, 10], "point_2d": [5, 5]}, {"bbox_2d": [0, 0, 10, 10], "point_2d": [5, 5]}]</answer>'
    out = vision_reasoner_reward([twice], gt_boxes, gt_points)
    assert out.components["accuracy"].item() == pytest.approx(3 / 2)  # one match of 3, max(2, 2) = 2
    many = "[" + ", ".join(['{"bbox_2d": [0, 0, 10, 10], "point_2d": [5, 5]}'] * 130) + "]"
    capped = vision_reasoner_reward([many], [[[0, 0, 10, 10]] * 130], [[[5, 5]] * 130])
    assert capped.components["accuracy"].item() == pytest.approx(3.0)
    small = vision_reasoner_reward([many], [[[0, 0, 10, 10]] * 130], [[[5, 5]] * 130], max_objects=4)
    assert small.components["accuracy"].item() == pytest.approx(3.0)
    none = vision_reasoner_reward(["<answer>[]</answer>", "no answer"], [[], [[0, 0, 1, 1]]], [[], [[0, 0]]])
    assert none.components["accuracy"].tolist() == [0.0, 0.0]


def test_vision_reasoner_rescaling():
    text = '<answer>[{"bbox_2d": [10, 10, 20, 20], "point_2d": [15, 15]}]</answer>'
    out = vision_reasoner_reward([text], [[[20, 40, 40, 80]]], [[[30, 60]]], policy_size=[[100, 100]], gt_size=[[400, 200]])
    assert out.components["accuracy"].item() == 3.0
    with pytest.raises(ValueError, match="gt_points"):
        vision_reasoner_reward([text], [[[0, 0, 1, 1]]], [[]])


@pytest.mark.parametrize(
    "text, ok",
    [("A. B. C.", True), ("A. A.", True), ("A. A. A.", False), ("A. B. A. B.", False), ("", True), (". . .", True),
     ("x.  x .x", False)],
)
def test_non_repeat(text, ok):
    assert non_repeat(text) is ok


def test_rewards_survive_junk_completions(rng):
    junk = ["", "<think>", "[1e999, 1, 2, 3]", "{" * 1000, '{"bbox": [NaN, 0, 1, 1]}', "x" * 300_000,
            "<answer>" + "[" * 5000 + "</answer>", "(1,2),(3,"]
    out = lens_reward(junk, [[0, 0, 1, 1]])
    assert out.reward.tolist() == [0.0] * len(junk)
    seg = seg_zero_reward(junk, [[0, 0, 1, 1]], [[[0, 0], [1, 1]]])
    assert seg.reward.tolist() == [0.0] * len(junk)
    vr = vision_reasoner_reward(junk, [[[0, 0, 1, 1]]], [[[0, 0]]])
    assert vr.components["accuracy"].tolist() == [0.0] * len(junk)
