"""ops.box_convert against the three producers of boxes: MaskStats.pred_box (inclusive), lens_fast.data
(edges) and rle.toBbox (xywh), on the same masks."""
import numpy as np
import pytest
import torch

from lens_fast import ops, rle
from lens_fast.data.sample import mask_to_box
from lens_fast.ops.box_convert import BOX_FORMATS


def producers(mask: np.ndarray) -> dict:
    pred = torch.from_numpy(mask)[None, None]
    return {
        "inclusive": ops.mask_stats(pred, torch.zeros_like(pred[0])).pred_box[0, 0],
        "edges": torch.from_numpy(mask_to_box(mask)),
        "xywh": torch.from_numpy(rle.toBbox(rle.encode(np.asfortranarray(mask.astype(np.uint8))))),
    }


def test_one_pixel_mask():
    mask = np.zeros((9, 8), dtype=bool)
    mask[5, 3] = True
    boxes = producers(mask)
    assert boxes["inclusive"].tolist() == [3, 5, 3, 5]
    assert boxes["edges"].tolist() == [3, 5, 4, 6]
    assert boxes["xywh"].tolist() == [3, 5, 1, 1]


def test_every_pair_of_formats_on_random_masks(rng):
    for _ in range(20):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.001, 0.3)
        if not mask.any():
            mask[rng.integers(h), rng.integers(w)] = True
        boxes = producers(mask)
        for src in BOX_FORMATS:
            for dst, want in boxes.items():
                got = ops.box_convert(boxes[src], src, dst)
                assert got.dtype == (torch.float64 if boxes[src].dtype == torch.float64 else torch.float32)
                np.testing.assert_array_equal(got.numpy(), want.double().numpy(), err_msg=f"{src} -> {dst}")


def test_batch_shapes_dtypes_and_numpy():
    inclusive = torch.tensor([[[0, 0, 9, 4], [2, 3, 2, 3]]], dtype=torch.int64)
    edges = ops.box_convert(inclusive, "inclusive", "edges")
    assert edges.shape == (1, 2, 4) and edges.dtype == torch.float32
    assert edges.tolist() == [[[0, 0, 10, 5], [2, 3, 3, 4]]]
    assert ops.box_convert(edges.numpy().astype(np.float64), "edges", "xywh").tolist() == [[[0, 0, 10, 5], [2, 3, 1, 1]]]
    assert ops.box_convert(torch.zeros(0, 4), "xywh", "inclusive").shape == (0, 4)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((torch.zeros(2, 3), "edges", "xywh"), ValueError, r"boxes must be \[\.\.\., 4\] xyxy boxes, got shape \(2, 3\)"),
        ((torch.zeros(2, 4), "xyxy", "xywh"), ValueError, "in_fmt must be one of .*'inclusive'.*got 'xyxy'"),
        ((torch.zeros(2, 4), "edges", "cxcywh"), ValueError, "out_fmt must be one of"),
        ((torch.zeros(2, 4, dtype=torch.bool), "edges", "xywh"), TypeError, "boxes must hold real"),
        (([[0, 0, 1, 1]], "edges", "xywh"), TypeError, "boxes must be a torch.Tensor or numpy.ndarray, got list"),
    ],
)
def test_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        ops.box_convert(*args)
