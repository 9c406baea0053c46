"""Fuzzing lens_fast.rle's parsers: any bytes, text or count list gives a result or a ValueError (or a
TypeError for wrong types), never a crash; valid inputs agree with pycocotools and a plain-Python
reference of the string format."""
import os

import numpy as np
import pycocotools.mask as coco
import pytest
import torch
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


# ------------------------------------------------ sizes near every limit, hostile Python objects
#
# These can crash the interpreter when a check is missing (issue 11: a segfault at 1 x (2^32 - 1), a
# heap over-read through a lying len()), so they run in a subprocess: a crash is a failed test, not a
# dead test run. Each fuzz_* function is a hypothesis search; run_crashable() runs them all there.

LIMIT_SIDES = [0, 1, 2, 2**16 - 1, 2**16, 2**16 + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**33, 2**63 - 1, -1]
CRASHABLE = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
CASES = [0]  # examples run in this process


def _near_product_limit(h):
    """w with h * w just below, at and just above 2^32 - 1."""
    q = (2**32 - 1) // h
    return st.sampled_from([q - 1, q, q + 1])


limit_sizes = st.one_of(
    st.tuples(st.sampled_from(LIMIT_SIDES), st.sampled_from(LIMIT_SIDES)),
    st.tuples(st.sampled_from(LIMIT_SIDES), st.integers(0, 12)),
    st.integers(1, 2**16).flatmap(lambda h: st.tuples(st.just(h), _near_product_limit(h))).map(
        lambda hw: hw[::-1] if hw[0] % 2 else hw
    ),
)


def _fits(h, w):
    return 0 <= h < 2**32 and 0 <= w < 2**32 and h * w < 2**32


def _canonical_counts(draw, pixels):
    """Counts summing to pixels: a few runs, no zero-length run past the first."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(pixels - 1, 1)), max_size=5)))) if pixels > 1 else []
    return np.diff([0, *cuts, pixels]).tolist()


@CRASHABLE
@given(size=limit_sizes, data=st.data(), as_float=st.booleans())
def fuzz_sizes_near_the_limits(size, data, as_float):
    """Every op on RLEs of any size: exact when it fits, a ValueError naming the size otherwise.
    pycocotools (which works on the counts alone) is the reference below 2^30 pixels: beyond, its
    string parser shifts a C int by 30 bits and its area, merge and iou go wrong."""
    CASES[0] += 1
    h, w = size
    fits = _fits(h, w)
    counts = _canonical_counts(data.draw, h * w) if fits else [0]
    given_size = [float(h), float(w)] if as_float and max(h, w) < 2**53 else [h, w]
    obj = {"size": given_size, "counts": counts}
    if not fits:
        for call in (lambda: rle.area(obj), lambda: rle.toBbox(obj), lambda: rle.frPyObjects(obj, 1, 1)):
            with pytest.raises(ValueError, match=r"\['size'\]"):
                call()
        with pytest.raises(ValueError, match=r"\(h, w\) must be|[hw] = .* must be a number in"):
            rle.frPyObjects([[0, 0, 1, 1]], *given_size)
        if h >= 0 and w >= 0 and min(h, w) == 0:  # an empty array of any shape costs nothing
            with pytest.raises(ValueError, match="masks \\(h, w\\) must be"):
                rle.encode_masks(torch.zeros(1, h, w, dtype=torch.uint8))
        return
    r = rle.frPyObjects(obj, 1, 1)
    assert r["size"] == [h, w]
    area = sum(counts[1::2])
    assert rle.area(r) == area
    assert rle.merge([r, r], intersect=1) == r == rle.merge([r, r])  # canonical counts
    assert rle.iou([r], [r], [0]).tolist() == [[1.0 if area else 0.0]]
    if h * w < 2**30:
        assert coco.area(r) == area
        np.testing.assert_array_equal(rle.toBbox(r), coco.toBbox(r))
        assert rle.merge([r, r], intersect=1) == coco.merge([r, r], intersect=1)
        np.testing.assert_array_equal(rle.iou([r], [r], [0]), coco.iou([r], [r], [0]))
    if h * w <= 4096:
        np.testing.assert_array_equal(rle.decode(r), reference_mask(counts, h, w))
        np.testing.assert_array_equal(rle.decode_masks([r])[0].numpy(), reference_mask(counts, h, w))
    if min(h, w) == 0:
        assert rle.encode_masks(torch.zeros(2, h, w, dtype=torch.uint8)) == [{"size": [h, w], "counts": b"0"}] * 2


class LyingList(list):
    def __len__(self):
        return self.lie


class LyingArray(np.ndarray):
    def __len__(self):
        return self.lie


class LyingBytes(bytes):
    def __len__(self):
        return self.lie


class LyingStr(str):
    def __len__(self):
        return self.lie


class IterOnly:
    """An iterable with a lying len() and no __getitem__."""

    def __init__(self, values, lie):
        self.values, self.lie = values, lie

    def __len__(self):
        return self.lie

    def __iter__(self):
        return iter(self.values)


def _lie(obj, lie):
    obj.lie = lie
    return obj


@st.composite
def hostile_counts(draw, counts):
    """The same counts in a hostile container whose len() lies; parsing must see exactly `counts`."""
    lie = draw(st.sampled_from([0, 1, len(counts) + 1, 50_000_000, 2**62]))
    text = rle.frPyObjects({"size": [1, sum(counts)], "counts": counts}, 1, 1)["counts"]
    dtype = draw(st.sampled_from([np.int64, np.int32, np.uint32, np.uint64, np.int16]))
    kind = draw(st.sampled_from(["list", "tuple", "iter", "array", "strided", "bytes", "str"]))
    if kind in ("array", "strided") and max(counts, default=0) > np.iinfo(dtype).max:
        dtype = np.int64
    if kind == "list":
        return _lie(LyingList(counts), lie)
    if kind == "tuple":
        return tuple(counts)
    if kind == "iter":
        return IterOnly(counts, lie)
    if kind == "array":
        return _lie(np.array(counts, dtype).view(LyingArray), lie)
    if kind == "strided":
        return _lie(np.repeat(np.array(counts, dtype), 2)[::2].view(LyingArray), lie)
    if kind == "bytes":
        return _lie(LyingBytes(text), lie)
    return _lie(LyingStr(text.decode()), lie)


@CRASHABLE
@given(data=st.data(), w=st.integers(0, 40))
def fuzz_hostile_containers(data, w):
    """Lying len() and subclasses of list, ndarray, bytes and str as counts or size: the result is
    that of the plain values (no read past a buffer sized from len())."""
    CASES[0] += 1
    counts = _canonical_counts(data.draw, w)
    counts_obj = data.draw(hostile_counts(counts))
    size = data.draw(st.sampled_from([_lie(LyingList([1, w]), 7), (1, w), np.array([1, w]), np.array([1.0, w])]))
    expected = reference_mask(counts, 1, w)
    np.testing.assert_array_equal(all_ops({"size": size, "counts": counts_obj}), expected)
    r = rle.frPyObjects({"size": size, "counts": counts_obj}, 1, w) if not isinstance(counts_obj, (bytes, str)) else None
    if r is not None:
        assert r == coco.encode(np.asfortranarray(expected))


class Mutating:
    """An int whose __index__ first changes the containers being parsed."""

    def __init__(self, value, action):
        self.value, self.action = value, action

    def __index__(self):
        self.action()
        return self.value


ACTIONS = {
    "clear": lambda c: c.clear(),
    "grow": lambda c: c.extend([7] * 1000),
    "garbage": lambda c: c.__setitem__(slice(None), [2**40, -3, "x"]),
    "shrink": lambda c: c.__delitem__(slice(1, None)),
}


@CRASHABLE
@given(
    data=st.data(),
    where=st.sampled_from(["counts", "size", "dict", "objs"]),
    action=st.sampled_from(sorted(ACTIONS)),
    value=st.sampled_from([0, 1, 6, 12, -1, 2**32, 2**40]),
)
def fuzz_index_that_mutates(data, where, action, value):
    """__index__ that empties, grows or fills with garbage the list, size, dict or list of dicts
    being parsed: a result or a ValueError/TypeError, never a read of freed or unsized memory."""
    CASES[0] += 1
    counts = [6, 6]
    size = [3, 4]
    obj = {"size": size, "counts": counts}
    objs = [obj, {"size": [3, 4], "counts": b"<"}]
    target = {"counts": counts, "size": size, "objs": objs}.get(where)
    if where == "dict":
        mutate = lambda: (obj.clear(), obj.update(size=None, counts=b"garbage"))  # noqa: E731
    else:
        mutate = lambda: ACTIONS[action](target)  # noqa: E731
    if data.draw(st.booleans()):
        counts[0] = Mutating(value, mutate)
    else:
        size[0] = Mutating(value, mutate)
    try:
        rle.area(objs)
        rle.decode(objs[:1])
    except (ValueError, TypeError):
        pass


def run_crashable():
    """Runs every fuzz_* search here; prints the number of examples."""
    for fuzz in (fuzz_sizes_near_the_limits, fuzz_hostile_containers, fuzz_index_that_mutates):
        fuzz()
    print(f"crashable fuzz cases: {CASES[0]}")


def _in_subprocess(code, timeout):
    """Runs `code` in a fresh interpreter (tests/ on the path); returns its stdout, failing on a
    crash, a hang or an exception with the tail of its output."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s:\n{(e.stdout or '')[-3000:]}{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"exit code {proc.returncode} (negative: killed by that signal)\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
    return proc.stdout


def test_limits_and_hostile_objects_in_a_subprocess(record_property):
    out = _in_subprocess("import test_rle_fuzz as f; f.run_crashable()", timeout=300)
    cases = int(out.rsplit("crashable fuzz cases: ", 1)[1].split()[0])
    record_property("crashable_fuzz_cases", cases)
    assert cases >= 500, out


def _available_memory():
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


WIDEST_ENCODE = """
import numpy as np
from lens_fast import rle
for shape in ((1, 1, 2**32 - 1), (1, 2**32 - 1, 1)):  # zero pages: no memory is touched
    assert rle.encode_masks(np.zeros(shape, np.uint8)) == [{"size": list(shape[1:]), "counts": b"oooooo3"}]
print("ok")
"""

WIDEST_DECODE = """
from lens_fast import rle
out = rle.decode_masks([{"size": [1, 2**32 - 1], "counts": b"oooooo3"}])  # one run of 2^32 - 1 zeros
assert out.shape == (1, 1, 2**32 - 1) and int(out.count_nonzero()) == 0
print("ok")
"""


def test_widest_mask_encodes():
    """1 x (2^32 - 1) and (2^32 - 1) x 1, the longest columns check_size accepts: the SIMD column
    scan's bound i + 64 <= len wrapped there (an endless loop reading past the mask)."""
    assert _in_subprocess(WIDEST_ENCODE, timeout=300).strip().endswith("ok")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LENS_FAST_BIG_MASKS") != "1" or _available_memory() < 10 * 2**30,
    reason="writes a 4 GiB mask (~30 s where page faults are slow): set LENS_FAST_BIG_MASKS=1, 10 GiB free",
)
def test_widest_mask_decodes():
    """Issue 11's reproducer: decode_masks of 1 x (2^32 - 1) died of SIGSEGV (32-bit row buffer sizes)."""
    assert _in_subprocess(WIDEST_DECODE, timeout=300).strip().endswith("ok")
