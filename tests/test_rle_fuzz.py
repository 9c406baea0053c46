"""Fuzzing lens_fast.rle's parsers: any bytes, text or count list gives a result or a ValueError (or a
TypeError for wrong types), never a crash; valid inputs agree with pycocotools and a plain-Python
reference of the string format."""
import numpy as np
import pycocotools.mask as coco
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lens_fast import rle
from test_rle import check_exact_on_any_counts

# pycocotools' decode warns on numpy 2 (its __array__ takes no copy keyword): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sizes = st.tuples(st.integers(0, 12), st.integers(0, 12))


def reference_counts(s: bytes):
    """Counts of a compressed string by the format's definition (unbounded ints), or None if the
    string is malformed (a byte outside '0'..'o' or a truncated last count)."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p == len(s) or not 48 <= s[p] <= 111:
                return None
            c = s[p] - 48
            x |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p += 1
            k += 1
        if c & 0x10:
            x -= 1 << 5 * k
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def reference_mask(counts, h, w):
    flat = np.zeros(h * w, np.uint8)
    p = 0
    for i, c in enumerate(counts):
        flat[p : p + c] = i % 2
        p += c
    return flat.reshape(w, h).T


def all_ops(obj):
    """Every op that parses counts, on one RLE; returns the decoded mask."""
    mask = rle.decode(obj)
    rle.area(obj)
    rle.toBbox([obj, obj])
    rle.iou([obj], [obj], [1])
    rle.merge([obj, obj], intersect=True)
    rle.decode_masks([obj])
    return mask


@SETTINGS
@given(size=sizes, data=st.binary(max_size=40))
def test_any_bytes_give_a_mask_or_value_error(size, data):
    h, w = size
    expected = reference_counts(data)
    valid = (
        expected is not None
        and all(0 <= c < 2**32 for c in expected)
        and sum(expected) == h * w
        and all(len(g) <= 7 for g in _groups(data))  # no count longer than 7 characters
    )
    obj = {"size": [h, w], "counts": data}
    if valid:
        np.testing.assert_array_equal(all_ops(obj), reference_mask(expected, h, w))
    else:
        with pytest.raises(ValueError):
            all_ops(obj)


def _groups(data: bytes):
    """The characters of each count (a count ends at a character without bit 0x20)."""
    groups, current = [], []
    for b in data:
        current.append(b)
        if not (b - 48) & 0x20:
            groups.append(current)
            current = []
    return groups + ([current] if current else [])


@SETTINGS
@given(size=sizes, text=st.text(max_size=20))
def test_any_text_gives_a_mask_or_value_error(size, text):
    h, w = size
    try:
        all_ops({"size": [h, w], "counts": text})
    except ValueError:
        pass


@SETTINGS
@given(size=sizes, counts=st.lists(st.integers(-(2**40), 2**40), max_size=12))
def test_any_count_list_gives_a_mask_or_value_error(size, counts):
    h, w = size
    obj = {"size": [h, w], "counts": counts}
    if all(0 <= c < 2**32 for c in counts) and sum(counts) == h * w:
        np.testing.assert_array_equal(all_ops(obj), reference_mask(counts, h, w))
    else:
        with pytest.raises(ValueError):
            all_ops(obj)


@st.composite
def valid_counts(draw):
    """Counts summing to h * w, zero-length runs allowed anywhere."""
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    cuts = sorted(draw(st.lists(st.integers(0, h * w), max_size=20)))
    counts = np.diff([0, *cuts, h * w]).tolist()
    return h, w, counts


@SETTINGS
@given(valid_counts())
def test_valid_strings_agree_with_pycocotools(case):
    """Exact on any valid counts; equal to pycocotools on canonical ones (all it ever produces). On
    the others pycocotools' merge overruns its buffer, so it is not called there."""
    h, w, counts = case
    other_mask = np.asfortranarray(np.tri(h, w, dtype=np.uint8))
    r, _ = check_exact_on_any_counts(counts, h, w, other_mask)
    if all(c > 0 for c in counts[1:]):
        np.testing.assert_array_equal(rle.toBbox(r), coco.toBbox(r))
        for pair in ([r, coco.encode(other_mask)], [r, r]):
            for intersect in (0, 1):
                assert rle.merge(pair, intersect) == coco.merge(pair, intersect)
            for crowd in ([0], [1]):
                np.testing.assert_array_equal(rle.iou(pair[:1], pair[1:], crowd), coco.iou(pair[:1], pair[1:], crowd))


@SETTINGS
@given(
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    points=st.lists(
        st.tuples(st.floats(-60, 100, allow_nan=False), st.floats(-60, 100, allow_nan=False)), min_size=3, max_size=10
    ),
)
def test_polygons_agree_with_pycocotools(size, points):
    h, w = size
    polygon = [v for p in points for v in p]
    assert rle.frPyObjects([polygon], h, w) == coco.frPyObjects([polygon], h, w)


@SETTINGS
@given(
    masks=st.integers(1, 4).flatmap(
        lambda n: st.tuples(st.integers(1, 25), st.integers(1, 25)).flatmap(
            lambda hw: st.lists(st.booleans(), min_size=n * hw[0] * hw[1], max_size=n * hw[0] * hw[1]).map(
                lambda bits: np.array(bits, np.uint8).reshape(n, *hw)
            )
        )
    )
)
def test_masks_round_trip_and_match_pycocotools(masks):
    expected = coco.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    assert rle.encode_masks(masks) == expected
    np.testing.assert_array_equal(rle.decode_masks(expected).numpy(), masks)
