"""LISA-protocol metrics: values against hand computation, empty unions, failures, boxes."""
import numpy as np
import pytest
import torch

from lens_fast import ops
from lens_fast.metrics import ReferringMetrics, sample_iou
from lens_fast.ops.postprocess_masks import postprocess_mask_stats, postprocess_masks


def _stats(intersection, union):
    i = torch.tensor(intersection, dtype=torch.int64)
    u = torch.tensor(union, dtype=torch.int64)
    zeros = torch.zeros_like(i)
    return ops.MaskStats(i, u, zeros, zeros, torch.zeros(*i.shape, 4))


def test_hand_computed_values_and_empty_union_policies():
    lisa, segzero = ReferringMetrics(), ReferringMetrics(empty_union_iou=0.0)
    for m in (lisa, segzero):
        m.update(_stats([3, 0, 2], [4, 0, 8]))
    a, b = lisa.compute(), segzero.compute()
    assert a["cIoU"] == b["cIoU"] == pytest.approx(5 / 12)
    assert a["gIoU"] == pytest.approx((0.75 + 1.0 + 0.25) / 3)
    assert b["gIoU"] == pytest.approx((0.75 + 0.0 + 0.25) / 3)
    assert a["samples"] == 3 and a["empty_unions"] == 1 and a["failed"] == 0
    assert (a["intersection"], a["union"]) == (5, 12)
    assert a["empty_union_iou"] == 1.0 and b["empty_union_iou"] == 0.0
    assert "box_IoU" not in a


def test_all_empty_unions_follow_the_policy():
    for policy in (1.0, 0.0):
        m = ReferringMetrics(policy)
        m.update(_stats([0, 0], [0, 0]))
        assert m.compute()["cIoU"] == m.compute()["gIoU"] == policy


def test_failed_samples_count_zero_with_their_gt_in_the_union():
    m = ReferringMetrics()
    m.update(_stats([6], [8]))
    m.add_failed(4)
    m.add_failed(torch.tensor([0, 2]))
    r = m.compute()
    assert r["samples"] == 4 and r["failed"] == 3
    assert r["cIoU"] == pytest.approx(6 / 14)
    assert r["gIoU"] == pytest.approx(0.75 / 4)  # a failed empty-GT sample is 0, not 1


def test_matches_numpy_on_random_masks_through_mask_stats(rng):
    b, g, h, w = 5, 3, 13, 17
    pred = rng.random((b, g, h, w)) < 0.4
    gt = rng.random((b, h, w)) < 0.3
    gt[0] = False
    pred[0, 0] = False  # one empty union
    m = ReferringMetrics()
    m.update(ops.mask_stats(torch.from_numpy(pred[:2]), torch.from_numpy(gt[:2])))  # two batches
    per_sample = m.update(ops.mask_stats(torch.from_numpy(pred[2:]), torch.from_numpy(gt[2:])))
    assert per_sample.shape == (b - 2, g) and per_sample.dtype == torch.float64
    inter = (pred & gt[:, None]).sum(axis=(2, 3)).ravel()
    union = (pred | gt[:, None]).sum(axis=(2, 3)).ravel()
    ious = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    r = m.compute()
    assert r["samples"] == b * g
    assert r["cIoU"] == pytest.approx(inter.sum() / union.sum(), rel=1e-12)
    assert r["gIoU"] == pytest.approx(ious.mean(), rel=1e-12)
    assert np.allclose(per_sample.numpy().ravel(), ious[2 * g :])


def test_box_metrics():
    m = ReferringMetrics()
    m.update(_stats([1, 1, 1], [1, 1, 1]))
    pred = torch.tensor([[0.0, 0, 10, 10], [0, 0, 2, 2], [0, 0, 2, 2]])
    gt = torch.tensor([[5.0, 5, 15, 15], [0, 0, 2, 2], [0, 0, 2, 2]])
    iou = m.update_boxes(pred, gt, present=torch.tensor([True, True, False]))
    assert iou.tolist() == pytest.approx([25 / 175, 1.0, 0.0])
    r = m.compute()
    assert r["box_IoU"] == pytest.approx((25 / 175 + 1.0) / 3)
    assert r["box_Acc@0.5"] == pytest.approx(1 / 3)
    assert r["box_samples"] == 3


def test_reset_and_sample_iou():
    m = ReferringMetrics()
    m.update(_stats([1], [2]))
    m.reset()
    with pytest.raises(ValueError, match="no samples"):
        m.compute()
    iou = sample_iou(torch.tensor([1, 0]), torch.tensor([4, 0]), empty_union_iou=0.0)
    assert iou.tolist() == [0.25, 0.0]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="empty_union_iou must be 1.0 .LISA. or 0.0 .Seg-Zero., got 0.5"):
        ReferringMetrics(0.5)
    with pytest.raises(TypeError, match="empty_union_iou"):
        ReferringMetrics(True)
    with pytest.raises(TypeError, match="stats must be a lens_fast.ops.MaskStats, got tuple"):
        ReferringMetrics().update((1, 2))
    with pytest.raises(TypeError, match="intersection must hold integer pixel counts, got torch.float32"):
        sample_iou(torch.ones(2), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="one shape"):
        sample_iou(torch.ones(2, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="gt_area must be >= 0"):
        ReferringMetrics().add_failed(-1)
    with pytest.raises(ValueError, match="present must be bool"):
        ReferringMetrics().update_boxes(torch.zeros(2, 4), torch.zeros(2, 4), present=torch.ones(3, dtype=torch.bool))


def test_fed_by_postprocess_mask_stats_on_sam_logits(rng):
    """The model path: SAM low-res logits -> fused upsample + stats -> metrics, masks never written."""
    b, g, (h, w), original = 3, 2, (16, 16), (21, 15)
    low_res = torch.from_numpy(rng.normal(size=(b, g, h, w)).astype(np.float32))
    gt = torch.from_numpy(rng.random((b, *original)) < 0.4)
    m = ReferringMetrics()
    m.update(postprocess_mask_stats(low_res, gt, input_size=(32, 23), original_size=original, image_size=32))
    pred = postprocess_masks(low_res, (32, 23), original, threshold=0.0, image_size=32).numpy()
    inter = (pred & gt.numpy()[:, None]).sum(axis=(2, 3)).ravel()
    union = (pred | gt.numpy()[:, None]).sum(axis=(2, 3)).ravel()
    r = m.compute()
    assert r["cIoU"] == pytest.approx(inter.sum() / union.sum(), rel=1e-12)
    assert r["gIoU"] == pytest.approx(np.mean(inter / union), rel=1e-12)
