"""lens_fast.rle against pycocotools.mask on freshly drawn masks, plus its own extensions and errors."""
import numpy as np
import pycocotools.mask as coco
import pytest
import torch

from lens_fast import _backend, rle

# pycocotools' decode warns on numpy 2 (its __array__ takes no copy keyword): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SIZES = [(1, 1), (1, 13), (13, 1), (2, 2), (31, 37), (64, 64), (97, 61), (130, 67)]


def noise_masks(rng, n, h, w, density=0.5):
    return (rng.random((n, h, w)) < density).astype(np.uint8)


def smooth_masks(rng, n, h, w):
    """Unions of 1-3 random ellipses and rectangles: long runs, few boundaries."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(-0.2, 1.2) * h, rng.uniform(-0.2, 1.2) * w
            ry, rx = rng.uniform(0.05, 0.7) * h + 0.5, rng.uniform(0.05, 0.7) * w + 0.5
            if rng.random() < 0.5:
                out[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
            else:
                out[i] |= ((abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)).astype(np.uint8)
    return out


def special_masks(h, w):
    """Empty, full, one pixel at each corner, one row and one column."""
    masks = [np.zeros((h, w), np.uint8), np.ones((h, w), np.uint8)]
    for y, x in [(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0)]:
        m = np.zeros((h, w), np.uint8)
        m[y, x] = 1
        masks.append(m)
    row, col = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    row[h // 2] = 1
    col[:, w // 2] = 1
    return np.stack(masks + [row, col])


def all_masks(rng, h, w):
    return np.concatenate(
        [noise_masks(rng, 2, h, w), noise_masks(rng, 1, h, w, 0.05), smooth_masks(rng, 3, h, w), special_masks(h, w)]
    )


def coco_encode(masks_nhw):
    """pycocotools' encode of (N, H, W) masks (nonzero -> 1)."""
    return coco.encode(np.asfortranarray((masks_nhw != 0).astype(np.uint8).transpose(1, 2, 0)))


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize("h,w", SIZES)
def test_encode_matches_pycocotools_any_order_dtype_and_container(rng, h, w):
    masks = all_masks(rng, h, w)
    expected = coco_encode(masks)
    hwn_f = np.asfortranarray(masks.transpose(1, 2, 0))
    hwn_c = np.ascontiguousarray(masks.transpose(1, 2, 0))
    for variant in [hwn_f, hwn_c, hwn_c.astype(bool), torch.from_numpy(hwn_c), torch.from_numpy(hwn_f).bool()]:
        assert rle.encode(variant) == expected
    for i, m in enumerate(masks):
        assert rle.encode(m) == expected[i]
        assert rle.encode(np.asfortranarray(m)) == expected[i]
        assert rle.encode(torch.from_numpy(m).bool()) == expected[i]


@pytest.mark.parametrize("h,w", SIZES)
def test_encode_masks_matches_pycocotools(rng, h, w):
    masks = all_masks(rng, h, w)
    expected = coco_encode(masks)
    assert rle.encode_masks(masks) == expected
    assert rle.encode_masks(masks.astype(bool)) == expected
    assert rle.encode_masks(np.asfortranarray(masks)) == expected
    assert rle.encode_masks(torch.from_numpy(masks)) == expected
    assert rle.encode_masks(torch.from_numpy(masks).permute(2, 1, 0).contiguous().permute(2, 1, 0)) == expected
    assert rle.encode_masks(masks, num_threads=2) == expected


def test_encode_strided_views(rng):
    base = np.concatenate([noise_masks(rng, 2, 90, 70), smooth_masks(rng, 2, 90, 70)])
    views = [
        base[:, ::2, ::3],
        base[:, 1::3, :],
        base[:, :, 5:],
        base[::-1, ::-1, ::-1],
        base.transpose(0, 2, 1),
        base[:, 3:80, 2:61],
    ]
    for v in views:
        assert rle.encode_masks(v) == coco_encode(v)
        assert rle.encode_masks(torch.from_numpy(np.ascontiguousarray(v))[:, :, :]) == coco_encode(v)
        assert rle.encode(v.transpose(1, 2, 0)) == coco_encode(v)
    t = torch.from_numpy(base)
    for v in [t[:, ::2, ::3], t.transpose(1, 2), t[:, 1:, :-1]]:
        assert rle.encode_masks(v) == coco_encode(v.numpy())


def test_encode_nonzero_is_foreground(rng):
    masks = rng.integers(0, 256, size=(3, 40, 70), dtype=np.uint8)
    masks[:, :10] = 0
    assert rle.encode_masks(masks) == coco_encode(masks)
    assert rle.encode(masks[0]) == coco_encode(masks[:1])[0]


def test_encode_empty_shapes():
    assert rle.encode(np.zeros((0, 5), np.uint8)) == coco.encode(np.zeros((0, 5), np.uint8, order="F"))
    assert rle.encode(np.zeros((3, 4, 0), np.uint8)) == []
    assert rle.encode_masks(np.zeros((0, 4, 5), np.uint8)) == []
    assert rle.encode_masks(np.zeros((2, 0, 5), bool)) == [{"size": [0, 5], "counts": b"0"}] * 2


def test_runs_of_2_pow_24_and_more():
    """pycocotools' string buffer is one short for these; the strings are worked out by hand."""
    empty = np.zeros((4096, 4096), np.uint8)
    r = rle.encode(empty)
    assert r == {"size": [4096, 4096], "counts": b"PPPP`0"}  # 2^24: 5 groups + a sign group
    assert rle.area(r) == 0
    assert not rle.decode(r).any()
    full = rle.encode(np.ones((4096, 4096), bool))
    assert full["counts"] == b"0PPPP`0"
    assert rle.area(full) == 4096 * 4096
    assert rle.toBbox(full).tolist() == [0, 0, 4096, 4096]
    assert coco.area(full) == 4096 * 4096  # pycocotools reads our strings
    one = empty.copy()
    one[-1, -1] = 1
    r = rle.encode(one)
    assert rle.decode(r)[-1, -1] == 1 and rle.area(r) == 1


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("h,w", SIZES)
def test_decode_matches_pycocotools(rng, h, w):
    masks = all_masks(rng, h, w)
    rles = coco_encode(masks)
    expected = coco.decode(rles)
    got = rle.decode(rles)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert got.flags.f_contiguous == expected.flags.f_contiguous
    assert got.flags.c_contiguous == expected.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
    single = rle.decode(rles[0])
    np.testing.assert_array_equal(single, coco.decode(rles[0]))
    assert single.flags.f_contiguous == coco.decode(rles[0]).flags.f_contiguous
    for threads in (None, 2):
        out = rle.decode_masks(rles, num_threads=threads)
        assert out.dtype == torch.uint8 and out.device.type == "cpu" and out.is_contiguous()
        np.testing.assert_array_equal(out.numpy(), masks)


def test_decode_accepts_str_and_list_counts(rng):
    masks = smooth_masks(rng, 2, 20, 30)
    rles = coco_encode(masks)
    as_str = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]
    as_list = [{"size": r["size"], "counts": _counts(r)} for r in rles]
    as_array = [{"size": r["size"], "counts": np.array(_counts(r), dtype=np.int64)} for r in rles]
    for variant in (as_str, as_list, as_array):
        np.testing.assert_array_equal(rle.decode(variant), coco.decode(rles))
        np.testing.assert_array_equal(rle.decode_masks(variant).numpy(), masks)
        np.testing.assert_array_equal(rle.area(variant), coco.area(rles))
        np.testing.assert_array_equal(rle.toBbox(variant), coco.toBbox(rles))
        assert rle.merge(variant) == coco.merge(rles)


def _counts(r):
    """Uncompressed counts of a compressed RLE, read independently of lens_fast."""
    counts, s, p = [], r["counts"], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


@pytest.mark.parametrize("h,w", [(1024, 1024), (1000, 1049)])
def test_decode_masks_large(rng, h, w):
    """Masks of a million pixels or more: rows written with non-temporal stores where aligned."""
    masks = np.concatenate([smooth_masks(rng, 2, h, w), special_masks(h, w)[:2]])
    np.testing.assert_array_equal(rle.decode_masks(coco_encode(masks)).numpy(), masks)


@pytest.mark.parametrize("simd", [True, False])
def test_decode_masks_row_sweep_widths(rng, simd):
    """The row sweep at widths around its 32-pixel chunks and 256-column registers, sizes changing
    from call to call (its scratch buffers are reused)."""
    C = _backend.native()
    C.rle_set_simd(simd)
    try:
        for h, w in [(40, 640), (9, 32), (33, 255), (17, 257), (12, 800), (5, 1100), (40, 640), (3, 2100), (50, 31)]:
            masks = np.concatenate([smooth_masks(rng, 3, h, w), special_masks(h, w)])
            np.testing.assert_array_equal(rle.decode_masks(coco_encode(masks)).numpy(), masks, err_msg=f"{h}x{w}")
    finally:
        C.rle_set_simd(True)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (7, 1), (20, 33), (64, 64)])
def test_round_trips(rng, h, w):
    masks = all_masks(rng, h, w)
    rles = rle.encode_masks(masks)
    np.testing.assert_array_equal(rle.decode_masks(rles).numpy(), masks)
    assert rle.encode(rle.decode(rles)) == rles
    assert rle.encode_masks(rle.decode_masks(rles)) == rles


NON_CANONICAL = [  # valid counts with zero-length runs past the first: pycocotools never makes them
    ([5, 0], 5, 1),
    ([0, 0, 5], 1, 5),
    ([2, 0, 3], 5, 1),
    ([0, 2, 0, 3, 1], 3, 2),
    ([3, 0, 0, 2, 1, 0], 3, 2),
    ([1, 0, 0, 0, 5], 2, 3),
    ([1, 0, 0, 2], 3, 1),  # pycocotools' iou walk stops early on this one against itself: 0
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 3], 1, 3),  # pycocotools' merge overruns its buffer on this one
]


def check_exact_on_any_counts(counts, h, w, other_mask):
    """Checks of one valid RLE (any counts summing to h * w) against pycocotools where it is exact on
    every valid input (frPyObjects, decode, area) and against numpy (merge, iou) with other_mask.
    Returns the pycocotools RLE and its mask."""
    r = coco.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    assert rle.frPyObjects({"size": [h, w], "counts": counts}, h, w) == r
    mask = coco.decode(r)
    np.testing.assert_array_equal(rle.decode(r), mask)
    np.testing.assert_array_equal(rle.decode_masks([r]).numpy()[0], mask)
    assert rle.area(r) == coco.area(r)
    for other, m2 in ((rle.encode(other_mask), other_mask), (r, mask)):
        assert rle.merge([r, other]) == rle.encode(mask | m2)
        assert rle.merge([r, other], intersect=1) == rle.encode(mask & m2)
        inter, union = np.logical_and(mask, m2).sum(), np.logical_or(mask, m2).sum()
        for crowd in (0, 1):
            exact = 0.0 if inter == 0 else inter / (mask.sum() if crowd else union)
            np.testing.assert_allclose(rle.iou([r], [other], [crowd]), [[exact]])
    return r, mask


@pytest.mark.parametrize("counts,h,w", NON_CANONICAL)
def test_non_canonical_counts_are_exact(counts, h, w):
    """merge, iou and toBbox give the exact answer (pycocotools' walks assume no zero-length runs:
    they stop early, overrun a buffer or wrap around)."""
    r, mask = check_exact_on_any_counts(counts, h, w, np.asfortranarray(np.eye(h, w, dtype=np.uint8)))
    ys, xs = np.nonzero(mask)
    box = [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1] if len(xs) else [0, 0, 0, 0]
    np.testing.assert_array_equal(rle.toBbox(r), box)
    assert rle.merge([r]) == r  # one RLE: its counts as given, as pycocotools


# ---------------------------------------------------------------- area, toBbox, iou, merge


@pytest.mark.parametrize("h,w", SIZES)
def test_area_and_bbox_match_pycocotools(rng, h, w):
    rles = coco_encode(all_masks(rng, h, w))
    a = rle.area(rles)
    assert a.dtype == np.uint32
    np.testing.assert_array_equal(a, coco.area(rles))
    assert type(rle.area(rles[0])) is type(coco.area(rles[0])) and rle.area(rles[0]) == coco.area(rles[0])
    b = rle.toBbox(rles)
    assert b.dtype == np.float64 and b.shape == (len(rles), 4)
    np.testing.assert_array_equal(b, coco.toBbox(rles))
    np.testing.assert_array_equal(rle.toBbox(rles[3]), coco.toBbox(rles[3]))
    assert rle.area([]).shape == (0,) and rle.toBbox([]).shape == (0, 4)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 9), (9, 1), (37, 41), (80, 120)])
def test_iou_matches_pycocotools(rng, h, w):
    dt = coco_encode(np.concatenate([smooth_masks(rng, 6, h, w), noise_masks(rng, 1, h, w), special_masks(h, w)]))
    gt = coco_encode(np.concatenate([smooth_masks(rng, 4, h, w), special_masks(h, w)[:3]]))
    for crowd in ([0] * len(gt), list(rng.integers(0, 2, len(gt))), [True] * len(gt)):
        expected = coco.iou(dt, gt, crowd)
        got = rle.iou(dt, gt, crowd)
        assert got.dtype == np.float64 and got.shape == (len(dt), len(gt))
        assert got.flags.f_contiguous == expected.flags.f_contiguous
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(rle.iou(dt, gt, None), coco.iou(dt, gt, [0] * len(gt)))


def test_iou_takes_pycocotools_keywords_and_crowd_flags():
    full = {"size": [3, 4], "counts": b"0<"}
    column = rle.encode(np.pad(np.ones((3, 1), np.uint8), ((0, 0), (0, 3))))
    for crowd in ([0.5], [1.0], [True], np.array([2])):
        expected = coco.iou([column], [full], crowd)
        np.testing.assert_array_equal(rle.iou(dt=[column], gt=[full], pyiscrowd=crowd), expected)


def test_iou_sizes_boxes_and_empty(rng):
    a = coco_encode(smooth_masks(rng, 3, 20, 30))
    b = coco_encode(smooth_masks(rng, 2, 30, 20))
    np.testing.assert_array_equal(rle.iou(a, b, [0, 1]), coco.iou(a, b, [0, 1]))  # -1 where boxes meet
    boxes_dt = rng.uniform(0, 50, (7, 4))
    boxes_gt = rng.uniform(0, 50, (5, 4))
    boxes_gt[0] = boxes_dt[0]
    crowd = [0, 1, 0, 1, 0]
    np.testing.assert_array_equal(rle.iou(boxes_dt, boxes_gt, crowd), coco.iou(boxes_dt, boxes_gt, crowd))
    np.testing.assert_array_equal(
        rle.iou(boxes_dt.tolist(), boxes_gt.tolist(), crowd), coco.iou(boxes_dt.tolist(), boxes_gt.tolist(), crowd)
    )
    np.testing.assert_array_equal(
        rle.iou(boxes_dt.astype(np.float32), boxes_gt, crowd), coco.iou(boxes_dt.astype(np.float32), boxes_gt, crowd)
    )
    assert rle.iou([], a, [0, 0, 0]) == coco.iou([], a, [0, 0, 0]) == []
    assert rle.iou(a, [], []) == coco.iou(a, [], []) == []


@pytest.mark.parametrize("h,w", [(1, 1), (1, 9), (9, 1), (37, 41), (64, 48)])
def test_merge_matches_pycocotools(rng, h, w):
    masks = np.concatenate([smooth_masks(rng, 3, h, w), noise_masks(rng, 2, h, w), special_masks(h, w)[:2]])
    rles = coco_encode(masks)
    for intersect in (0, 1, False, True):
        for group in ([0], [0, 1], [0, 1, 2], [2, 3, 4], [5, 0], [6, 3], list(range(len(rles)))):
            chosen = [rles[i] for i in group]
            assert rle.merge(chosen, intersect) == coco.merge(chosen, intersect)
    union = rle.decode(rle.merge(rles[:3]))
    np.testing.assert_array_equal(union.transpose(), masks[:3].any(0).transpose())
    assert rle.merge(rles[:3], intersect=True) == rle.encode(masks[:3].all(0))
    assert rle.merge([]) == coco.merge([])


# ---------------------------------------------------------------- frPyObjects


def random_polygon(rng, h, w):
    k = int(rng.integers(1, 12))
    pts = np.stack([rng.uniform(-0.3 * w - 2, 1.3 * w + 2, k), rng.uniform(-0.3 * h - 2, 1.3 * h + 2, k)], 1)
    if rng.random() < 0.3:
        pts = np.round(pts)  # integer vertices: exact hits on the sampling grid
    if rng.random() < 0.3:
        pts = np.round(pts * 2) / 2
    if k > 2 and rng.random() < 0.3:
        pts[1] = pts[0]  # a repeated vertex
    flat = pts.reshape(-1).tolist()
    if rng.random() < 0.1:
        flat.append(3.0)  # odd length: the last number is ignored
    return flat


@pytest.mark.parametrize("h,w", [(1, 1), (7, 5), (40, 60), (97, 61)])
def test_frpyobjects_polygons_match_pycocotools(rng, h, w):
    polygons = [random_polygon(rng, h, w) for _ in range(60)]
    polygons = [p for p in polygons if len(p) > 4]
    assert rle.frPyObjects(polygons, h, w) == coco.frPyObjects(polygons, h, w)
    for p in polygons[:10]:
        assert rle.frPyObjects([p], h, w) == coco.frPyObjects([p], h, w)
        assert rle.frPyObjects(p, h, w) == coco.frPyObjects([p], h, w)[0]  # one flat polygon
        assert rle.frPyObjects([np.array(p)], h, w) == coco.frPyObjects([p], h, w)


def test_frpyobjects_boxes_and_uncompressed_match_pycocotools(rng):
    h, w = 50, 70
    boxes = np.concatenate([rng.uniform(-10, 80, (20, 2)), rng.uniform(0, 40, (20, 2))], 1)
    boxes[:5] = np.round(boxes[:5])
    expected = coco.frPyObjects(boxes, h, w)
    assert rle.frPyObjects(boxes, h, w) == expected
    assert rle.frPyObjects(boxes.tolist(), h, w) == expected
    assert rle.frPyObjects(boxes[0].tolist(), h, w) == expected[0]
    masks = smooth_masks(rng, 3, h, w)
    uncompressed = [{"size": [h, w], "counts": _counts(r)} for r in coco_encode(masks)]
    assert rle.frPyObjects(uncompressed, h, w) == coco.frPyObjects(uncompressed, h, w)
    assert rle.frPyObjects(uncompressed[0], 1, 1) == coco.frPyObjects(uncompressed[0], 1, 1)


# ---------------------------------------------------------------- portable paths


@pytest.fixture
def portable_paths():
    """The non-SIMD code paths (what a CPU without AVX2 runs), for the duration of a test."""
    C = _backend.native()
    C.rle_set_simd(False)
    yield
    C.rle_set_simd(True)


@pytest.mark.parametrize("h,w", [(1, 13), (13, 1), (31, 37), (97, 130), (130, 97)])
def test_portable_paths_match_pycocotools(rng, portable_paths, h, w):
    masks = all_masks(rng, h, w)
    expected = coco_encode(masks)
    assert rle.encode_masks(masks) == expected
    assert rle.encode_masks(np.asfortranarray(masks)) == expected
    assert rle.encode(np.asfortranarray(masks.transpose(1, 2, 0))) == expected
    np.testing.assert_array_equal(rle.decode_masks(expected).numpy(), masks)


# ---------------------------------------------------------------- the GPU logic, run on the CPU


@pytest.mark.parametrize("rows_per_segment", [1, 3, 32, 1000])
def test_reference_encode_decode_drive_gpu_logic(rng, rows_per_segment):
    C = _backend.native()
    for h, w in [(1, 1), (1, 9), (9, 1), (37, 23), (64, 40)]:
        masks = all_masks(rng, h, w)
        expected = coco_encode(masks)
        for view in (masks, masks.transpose(0, 2, 1).copy().transpose(0, 2, 1), masks[:, ::-1][:, ::-1]):
            got = C.rle_reference_encode(view.ctypes.data, len(view), h, w, *view.strides, rows_per_segment)
            assert got == expected
        out = np.empty_like(masks)
        C.rle_reference_decode(C.rle_parse(expected, "rles"), out.ctypes.data)
        np.testing.assert_array_equal(out, masks)
    assert C.rle_reference_encode(0, 0, 5, 5, 25, 5, 1, rows_per_segment) == []


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "counts,message",
    [
        (b"4", "sum to 4, expected h \\* w = 12"),  # fewer pixels than h * w
        (b"<1", "more than h \\* w"),  # more
        (b"", "sum to 0"),
        (b"P", "truncated"),  # the last group says "more follows"
        (b"1 1", "alphabet"),
        (b"1p", "alphabet"),  # 112: one past 'o'
        (b"\x001", "alphabet"),
        (b"\xff", "alphabet"),
        (b"PPPPPPP0", "overflow"),
        (b"123M", "outside \\[0, 2\\^32\\)"),  # a negative count after the delta
        ("ü", "alphabet"),
        ([5, 6, 2], "sum to 13"),
        ([-1, 13], "outside \\[0, 2\\^32\\)"),
        ([2**32, 0], "outside \\[0, 2\\^32\\)"),
    ],
)
def test_bad_counts_raise_value_error_in_every_op(counts, message):
    bad = {"size": [3, 4], "counts": counts}
    good = {"size": [3, 4], "counts": b"<"}
    calls = [
        lambda: rle.decode(bad),
        lambda: rle.decode([good, bad]),
        lambda: rle.decode_masks([bad]),
        lambda: rle.area(bad),
        lambda: rle.toBbox([bad]),
        lambda: rle.iou([bad], [good], [0]),
        lambda: rle.iou([good], [bad], [0]),
        lambda: rle.merge([good, bad]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize(
    "obj,error,message",
    [
        ("not a dict", TypeError, r"rleObjs\[0\] must be a dict"),
        ({"size": [3, 4]}, ValueError, "'size' and 'counts'"),
        ({"size": [3], "counts": b"<"}, ValueError, r"\['size'\] must be \[h, w\]"),
        ({"size": [-3, 4], "counts": b"<"}, ValueError, "non-negative"),
        ({"size": [2**16, 2**16], "counts": b"0"}, ValueError, "2\\^32"),
        ({"size": ["3", 4], "counts": b"<"}, TypeError, r"\['size'\]\[0\] must be an integer or a real number, got str"),
        ({"size": [3, float("nan")], "counts": b"<"}, ValueError, r"\['size'\]\[1\] = nan must be a number in \[0, 2\^32\)"),
        ({"size": [2**64, 4], "counts": b"<"}, ValueError, r"\['size'\]\[0\] is out of range"),
        ({"size": [3, 4], "counts": 12}, TypeError, "bytes, str or a list of ints"),
        ({"size": [3, 4], "counts": [12.0]}, TypeError, "must be an integer"),
        ({"size": [3, 4], "counts": np.array([12.0])}, TypeError, "1-D integers"),
    ],
)
def test_bad_rle_objects_name_the_argument(obj, error, message):
    with pytest.raises(error, match=message):
        rle.decode([obj])


class _CountsWithWrongLen:
    """Iterates over two counts but says it holds a million: the length must not be trusted."""

    def __len__(self):
        return 1_000_000

    def __iter__(self):
        return iter([6, 6])


class _ArrayWithWrongLen(np.ndarray):
    """An ndarray subclass whose len() lies (issue 11: read_count_list read len() values from it)."""

    def __len__(self):
        return 50_000_000


def test_counts_are_what_iteration_or_the_buffer_holds_whatever_len_says():
    expected = np.zeros((3, 4), np.uint8, order="F")
    expected.flat[6:] = 1  # column-major position 6 on
    assert (rle.decode([{"size": [3, 4], "counts": _CountsWithWrongLen()}])[:, :, 0] == expected.reshape(4, 3).T).all()
    for dtype in (np.int64, np.uint8, np.int32):
        lying = np.array([1, 3], dtype).view(_ArrayWithWrongLen)
        assert rle.area([{"size": [2, 2], "counts": lying}]).tolist() == [3]
        strided = np.array([1, 9, 3, 9], dtype)[::2].view(_ArrayWithWrongLen)
        assert rle.decode({"size": [2, 2], "counts": strided}).tolist() == [[0, 1], [1, 1]]
    with pytest.raises(ValueError, match=r"counts sum to 3, expected h \* w = 5"):
        rle.area([{"size": [1, 5], "counts": np.array([1, 2], np.int64).view(_ArrayWithWrongLen)}])


class _IndexWithSideEffect:
    """An int whose __index__ first runs `action` (which changes the containers being parsed)."""

    def __init__(self, value, action):
        self.value, self.action = value, action

    def __index__(self):
        self.action()
        return self.value


def test_parsing_survives_an_index_that_changes_its_containers():
    counts = [None, 6, 0, 0]
    counts[0] = _IndexWithSideEffect(6, counts.clear)  # counts are read as iterated: [6] alone
    with pytest.raises(ValueError, match=r"counts sum to 6, expected h \* w = 12"):
        rle.decode({"size": [3, 4], "counts": counts})
    counts = [None, 6]
    counts[0] = _IndexWithSideEffect(6, lambda: counts.extend([0] * 100_000))
    assert rle.decode({"size": [3, 4], "counts": counts}).sum() == 6
    size = [None, 4]
    size[0] = _IndexWithSideEffect(3, size.clear)
    assert rle.area({"size": size, "counts": b"<"}) == 0
    objs = []
    objs += [{"size": [_IndexWithSideEffect(3, objs.clear), 4], "counts": b"<"}, {"size": [3, 4], "counts": b"0<"}]
    assert rle.area(objs).tolist() == [0, 12]
    obj = {"size": None, "counts": bytes(b"0<")}
    obj["size"] = [_IndexWithSideEffect(3, lambda: obj.pop("counts")), 4]
    assert rle.area(obj) == 12


@pytest.mark.parametrize("big", [2**32, 2**32 + 5, 2**33, 2**63 - 1])
def test_a_side_that_does_not_fit_is_a_value_error_whatever_the_other(big):
    """Issue 11: a side of 2^32 or more was stored truncated (to 5 for 2^32 + 5) when the other was 0."""
    for size in ([0, big], [big, 0], [1, big]):
        message = rf"\['size'\] must be non-negative with h, w and h \* w below 2\^32, got h={size[0]}, w={size[1]}"
        calls = [
            lambda: rle.area({"size": size, "counts": b""}),
            lambda: rle.toBbox([{"size": size, "counts": b""}]),
            lambda: rle.decode({"size": size, "counts": b""}),
            lambda: rle.frPyObjects({"size": size, "counts": [0]}, 1, 1),
        ]
        for call in calls:
            with pytest.raises(ValueError, match=message):
                call()
        with pytest.raises(ValueError, match=rf"\(h, w\) must be.*got h={size[0]}, w={size[1]}"):
            rle.frPyObjects([[0, 0, 1, 1]], *size)
    for shape in ((1, 0, big), (1, big, 0)):
        with pytest.raises(ValueError, match=rf"masks \(h, w\) must be.*got h={shape[1]}, w={shape[2]}"):
            rle.encode_masks(torch.zeros(shape, dtype=torch.uint8))
        with pytest.raises(ValueError, match=rf"bimask \(h, w\) must be.*got h={shape[1]}, w={shape[2]}"):
            rle.encode(torch.zeros(shape[1:], dtype=torch.uint8))
    assert rle.area({"size": [0, 2**32 - 1], "counts": b""}) == 0
    assert rle.encode_masks(torch.zeros(1, 0, 2**32 - 1, dtype=torch.uint8)) == [{"size": [0, 2**32 - 1], "counts": b"0"}]


def test_float_sizes_are_truncated_as_pycocotools_does():
    """Issue 11: annotation files with float heights/widths (COCO.annToRLE calls frPyObjects(segm, h, w))."""
    from decimal import Decimal
    from fractions import Fraction

    polygon = [[0.5, 0.5, 3.5, 0.5, 3.5, 2.5, 0.5, 2.5]]
    string = {"size": [3, 4], "counts": b"3143"}
    for h in (3.0, 3.9, np.float32(3.5), np.float64(3.2), Decimal("3.7"), Fraction(7, 2), True, np.int16(3)):
        assert rle.frPyObjects(polygon, h, 4.5) == coco.frPyObjects(polygon, h, 4.5)
        uncompressed = {"size": [h, 4.0], "counts": [2, 1, int(h) * 4 - 3]}
        assert rle.frPyObjects(uncompressed, h, 4) == coco.frPyObjects(uncompressed, h, 4)
        obj = {"size": [h, np.float64(4.0)], "counts": string["counts"]}
        if int(h) == 3:
            assert rle.area(obj) == coco.area(obj)
            np.testing.assert_array_equal(rle.toBbox(obj), coco.toBbox(obj))
            np.testing.assert_array_equal(rle.decode(obj), coco.decode(obj))
    assert rle.frPyObjects({"size": np.array([3.0, 4.0]), "counts": [12]}, 3, 4) == {"size": [3, 4], "counts": b"<"}
    # Where pycocotools raises (NaN, infinities, -1.5, 1e30) or makes garbage (-0.5 -> 0; 2^32 fits no counts):
    for bad in (float("nan"), float("inf"), -float("inf"), -0.5, -1.5, 1e30, 2.0**32):
        with pytest.raises(ValueError, match=r"h = .* must be a number in \[0, 2\^32\)"):
            rle.frPyObjects(polygon, bad, 4)
        with pytest.raises(ValueError, match=r"\['size'\]\[0\] = .* must be a number in \[0, 2\^32\)"):
            rle.area({"size": [bad, 4], "counts": b"<"})
    with pytest.raises(ValueError, match=r"\(h, w\) must be.*got h=65536, w=65536"):
        rle.frPyObjects(polygon, 65536.5, 65536.0)
    for bad in ("3", complex(3, 0), None, [3]):
        with pytest.raises(TypeError, match="w must be an integer or a real number"):
            rle.frPyObjects(polygon, 3, bad)


def test_bad_masks_name_the_argument():
    with pytest.raises(TypeError, match="bimask must have dtype bool or uint8, got float32"):
        rle.encode(np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError, match="bimask must have dtype bool or uint8, got torch.int64"):
        rle.encode(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bimask must be 2-D \(h, w\) or 3-D \(h, w, n\), got shape \(5,\)"):
        rle.encode(np.zeros(5, np.uint8))
    with pytest.raises(TypeError, match="bimask must be a numpy.ndarray or torch.Tensor, got list"):
        rle.encode([[0, 1]])
    with pytest.raises(ValueError, match=r"masks must be 3-D \(N, H, W\), got shape \(3, 4\)"):
        rle.encode_masks(np.zeros((3, 4), np.uint8))
    with pytest.raises(ValueError, match="num_threads"):
        rle.encode_masks(np.zeros((1, 3, 4), np.uint8), num_threads=0)
    with pytest.raises(ValueError, match="2\\^32"):
        rle.encode_masks(np.broadcast_to(np.zeros(1, np.uint8), (1, 2**16, 2**16)))


def test_bad_arguments_of_the_other_ops():
    good = {"size": [3, 4], "counts": b"<"}
    with pytest.raises(ValueError, match="one size"):
        rle.decode([good, {"size": [4, 3], "counts": b"<"}])
    with pytest.raises(ValueError, match="one size"):
        rle.merge([good, {"size": [4, 3], "counts": b"<"}])
    with pytest.raises(ValueError, match="rleObjs is empty"):
        rle.decode([])
    with pytest.raises(TypeError, match="rles must be a list"):
        rle.decode_masks(good)
    with pytest.raises(TypeError, match="rleObjs must be an RLE dict or a list"):
        rle.area("x")
    with pytest.raises(ValueError, match="iscrowd must have one flag per gt"):
        rle.iou([good], [good], [0, 1])
    with pytest.raises(TypeError, match="both be RLEs or both be boxes"):
        rle.iou([good], [[0, 0, 1, 1]], [0])
    with pytest.raises(ValueError, match=r"dt as an array must be \(N, 4\)"):
        rle.iou(np.zeros((2, 3)), np.zeros((2, 4)), [0, 0])
    with pytest.raises(ValueError, match="not a mix"):
        rle.iou([good, [0, 0, 1, 1]], [good], [0])
    with pytest.raises(ValueError, match=r"\(h, w\) must be non-negative.*got h=-1, w=4"):
        rle.frPyObjects([[0, 0, 1, 1]], -1, 4)
    with pytest.raises(ValueError, match="not finite"):
        rle.frPyObjects([[0, 0, 1, float("nan"), 2, 2]], 4, 4)
    with pytest.raises(ValueError, match="boxes \\(4 numbers each\\) or polygons"):
        rle.frPyObjects([[0, 0, 1]], 4, 4)
    with pytest.raises(TypeError, match="empty list"):
        rle.frPyObjects([], 4, 4)
    with pytest.raises(ValueError, match="device must be a CPU or CUDA device"):
        rle.decode_masks([good], device="meta")


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_encode_masks_matches_cpu(rng):
    for h, w in [(1, 1), (1, 9), (9, 1), (33, 70), (480, 640)]:
        masks = all_masks(rng, h, w)
        expected = coco_encode(masks)
        gpu = torch.from_numpy(masks).cuda()
        assert rle.encode_masks(gpu) == expected
        assert rle.encode_masks(gpu.bool()) == expected
        assert rle.encode_masks(gpu.transpose(1, 2).contiguous().transpose(1, 2)) == expected
        assert rle.encode(gpu.permute(1, 2, 0)) == expected
        assert rle.encode(gpu[0]) == expected[0]
    assert rle.encode_masks(torch.zeros(0, 4, 5, dtype=torch.uint8, device="cuda")) == []


@pytest.mark.cuda
def test_cuda_decode_masks_matches_cpu(rng):
    for h, w in [(1, 1), (1, 9), (9, 1), (33, 70), (480, 640)]:
        masks = all_masks(rng, h, w)
        out = rle.decode_masks(coco_encode(masks), device="cuda")
        assert out.device.type == "cuda" and out.dtype == torch.uint8
        np.testing.assert_array_equal(out.cpu().numpy(), masks)
