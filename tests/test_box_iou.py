"""ops.box_iou / ops.box_iou_aligned against torchvision and numpy; boxes from masks_to_boxes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from lens_fast import ops


def random_boxes(rng, n: int, size: float = 100.0) -> torch.Tensor:
    """Valid xyxy boxes (x2 >= x1, y2 >= y1), some of zero width or height, some identical."""
    xy = rng.uniform(0, size, size=(n, 2))
    wh = rng.uniform(0, size / 2, size=(n, 2)) * (rng.random((n, 2)) > 0.1)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if n > 2:
        boxes[1] = boxes[0]
    return torch.from_numpy(boxes.astype(np.float32))


def numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of broadcast [..., 4] arrays in float64; degenerate = zero area, 0/0 = 0."""
    def area(x):
        return np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)

    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@pytest.mark.parametrize("n, m", [(1, 1), (7, 13), (0, 5), (5, 0)])
def test_box_iou_matches_torchvision(rng, n, m):
    b1, b2 = random_boxes(rng, n), random_boxes(rng, m)
    iou = ops.box_iou(b1, b2)
    assert iou.shape == (n, m) and iou.dtype == torch.float32
    valid = (b1[:, None, 2:] > b1[:, None, :2]).all(-1) & (b2[None, :, 2:] > b2[None, :, :2]).all(-1)
    expected = torchvision.ops.box_iou(b1, b2)
    torch.testing.assert_close(iou[valid], expected[valid], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(iou.numpy(), numpy_iou(b1.numpy()[:, None], b2.numpy()[None]), rtol=1e-6, atol=1e-7)


def test_box_iou_degenerate_and_empty_union():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 2, 8], [3, 3, 3, 3], [0, 0, 10, 10]])
    iou = ops.box_iou(boxes, boxes)
    expected = torch.tensor(
        [[1.0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]]
    )  # inverted and zero-size boxes: zero area, IoU 0 even with themselves
    assert torch.equal(iou, expected)
    assert torch.equal(ops.box_iou(torch.tensor([[0, 0, 4, 2]]), torch.tensor([[2, 0, 6, 2]])), torch.tensor([[1 / 3]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64, torch.float64])
def test_box_iou_dtypes(rng, dtype):
    b1 = (random_boxes(rng, 6, size=2000.0)).round().to(dtype)  # fp16 areas of 2000-px boxes overflow fp16
    b2 = (random_boxes(rng, 4, size=2000.0)).round().to(dtype)
    iou = ops.box_iou(b1, b2)
    assert iou.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = numpy_iou(b1.double().numpy()[:, None], b2.double().numpy()[None])
    np.testing.assert_allclose(iou.double().numpy(), want, rtol=1e-6, atol=1e-7)


def test_box_iou_aligned_broadcasts(rng):
    b1 = random_boxes(rng, 24).reshape(2, 3, 4, 4)
    b2 = random_boxes(rng, 4).reshape(4, 4)
    iou = ops.box_iou_aligned(b1, b2)
    assert iou.shape == (2, 3, 4) and iou.dtype == torch.float32
    np.testing.assert_allclose(iou.numpy(), numpy_iou(b1.numpy(), b2.numpy()), rtol=1e-6, atol=1e-7)
    pairwise = ops.box_iou(b1.reshape(-1, 4), b2)
    diag = pairwise.reshape(2, 3, 4, 4).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(iou, diag, rtol=0, atol=0)
    assert ops.box_iou_aligned(b1[0, 0, 0], b2[1]).shape == ()
    non_contiguous = b1.transpose(0, 2)
    np.testing.assert_allclose(
        ops.box_iou_aligned(non_contiguous, b2[:1]).numpy(), numpy_iou(non_contiguous.numpy(), b2[:1].numpy()), rtol=1e-6, atol=1e-7
    )


def test_boxes_of_mask_stats_match_masks_to_boxes(rng):
    masks = torch.from_numpy(rng.random((9, 23, 31)) < 0.02)
    masks[0] = False
    masks[1, 4, 7] = True
    nonempty = masks.flatten(1).any(1)
    stats = ops.mask_stats(masks[None], torch.zeros(1, 23, 31, dtype=torch.bool), backend="torch")
    expected = torchvision.ops.masks_to_boxes(masks[nonempty])
    assert torch.equal(stats.pred_box[0][nonempty], expected)
    assert torch.equal(stats.pred_box[0][~nonempty], torch.zeros(int((~nonempty).sum()), 4))
    # the boxes feed box_iou unchanged
    torch.testing.assert_close(
        ops.box_iou(stats.pred_box[0][nonempty], expected), torchvision.ops.box_iou(expected, expected)
    )


def test_bad_boxes():
    good = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"boxes1 must be \[..., 4\] xyxy boxes, got shape \(3, 5\)"):
        ops.box_iou(torch.zeros(3, 5), good)
    with pytest.raises(ValueError, match=r"boxes2 must be \[N, 4\], got shape \(2, 3, 4\)"):
        ops.box_iou(good, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="boxes1 contains NaN or infinite"):
        ops.box_iou(torch.tensor([[0, 0, float("nan"), 1]]), good)
    with pytest.raises(ValueError, match="boxes2 contains NaN or infinite"):
        ops.box_iou_aligned(good, torch.tensor([[0, 0, float("inf"), 1]]))
    with pytest.raises(TypeError, match="boxes1 must hold real"):
        ops.box_iou(good.bool(), good)
    with pytest.raises(TypeError, match="boxes2 must be a torch.Tensor"):
        ops.box_iou(good, [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"boxes1 \(3, 4\) and boxes2 \(2, 4\) do not broadcast"):
        ops.box_iou_aligned(good, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one device"):
        ops.box_iou(good, good.to("meta"))
    with pytest.raises(ValueError, match=r"must be \[..., 4\]"):
        ops.box_iou_aligned(torch.tensor(1.0), good)
