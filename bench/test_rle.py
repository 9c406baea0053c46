"""COCO RLE: lens_fast.rle beside pycocotools (the reference), faster-coco-eval and rlemasklib.

Single thread, 16 masks of 480x640 and 1024x1024, smooth shapes and random noise. Each peer is
called the way a user would get the same result from it:
- encode_masks: (N, H, W) C-ordered masks; pycocotools and faster-coco-eval need
  ``encode(np.asfortranarray(m.transpose(1, 2, 0)))``, rlemasklib ``encode(m, batch_first=True)``;
- encode Fortran: pycocotools' own (H, W, N) Fortran input;
- decode_masks: RLEs to (N, H, W); the reference, pycocotools' ``decode(r).transpose(2, 0, 1)``, is a
  view (no copy; "pycocotools_contiguous" also makes it C-ordered, as decode_masks returns it),
  rlemasklib gets its fastest path (``decode_into`` a C-ordered array);
- iou (16 x 16, half the gts crowd), area, toBbox on the same RLEs.
GB/s counts the mask bytes read (encode) or written (decode), beside a memcpy of as many bytes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lens_fast
from lens_fast import rle

coco = pytest.importorskip("pycocotools.mask")  # the reference of every benchmark here
fce = pytest.importorskip("faster_coco_eval.core.mask")
rlemasklib = pytest.importorskip("rlemasklib")
RLEMask = rlemasklib.RLEMask

# pycocotools' decode warns on numpy 2 (its __array__ takes no copy keyword): not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

N = 16
SIZES = {"480x640": (480, 640), "1024x1024": (1024, 1024)}
KINDS = ("smooth", "noise")
PEERS = ("pycocotools", "faster_coco_eval", "rlemasklib", "lens_fast")

_cache: dict = {}


def masks_of(size: str, kind: str, seed: int = 0) -> np.ndarray:
    """(N, H, W) uint8 C-ordered masks: unions of ellipses and boxes, or 50% random noise."""
    key = (size, kind, seed)
    if key not in _cache:
        h, w = SIZES[size]
        rng = np.random.default_rng(seed)
        if kind == "noise":
            masks = (rng.random((N, h, w)) < 0.5).astype(np.uint8)
        else:
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            masks = np.zeros((N, h, w), np.uint8)
            for i in range(N):
                for _ in range(3):
                    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
                    ry, rx = rng.uniform(0.1, 0.4) * h, rng.uniform(0.1, 0.4) * w
                    if rng.random() < 0.7:
                        masks[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
                    else:
                        masks[i] |= ((abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)).astype(np.uint8)
        _cache[key] = masks
    return _cache[key]


def rles_of(size: str, kind: str, seed: int = 0) -> list:
    return coco.encode(np.asfortranarray(masks_of(size, kind, seed).transpose(1, 2, 0)))


@pytest.fixture(autouse=True)
def single_thread():
    before = lens_fast.get_num_threads()
    lens_fast.set_num_threads(1)
    yield
    lens_fast.set_num_threads(before)


def setup(benchmark, record_traffic, group: str, peer: str, nbytes: int = 0) -> None:
    benchmark.group = group
    benchmark.extra_info["reference"] = peer == "pycocotools"
    if nbytes:
        record_traffic(benchmark, nbytes)


def rlemasklib_decode_into(rles: list) -> np.ndarray:
    h, w = rles[0]["size"]
    out = np.empty((len(rles), h, w), np.uint8)
    for i, r in enumerate(rles):
        RLEMask.from_dict(r).decode_into(out[i], 1, 0)
    return out


ENCODE_C = {
    "pycocotools": lambda m: coco.encode(np.asfortranarray(m.transpose(1, 2, 0))),
    "faster_coco_eval": lambda m: fce.encode(np.asfortranarray(m.transpose(1, 2, 0))),
    "rlemasklib": lambda m: rlemasklib.encode(m, batch_first=True),
    "lens_fast": lambda m: rle.encode_masks(m, num_threads=1),
}
ENCODE_F = {
    "pycocotools": coco.encode,
    "faster_coco_eval": fce.encode,
    "rlemasklib": rlemasklib.encode,
    "lens_fast": rle.encode,
}
DECODE = {
    "pycocotools": lambda r: coco.decode(r).transpose(2, 0, 1),
    "pycocotools_contiguous": lambda r: np.ascontiguousarray(coco.decode(r).transpose(2, 0, 1)),
    "faster_coco_eval": lambda r: fce.decode(r).transpose(2, 0, 1),
    "rlemasklib": rlemasklib_decode_into,
    "lens_fast": lambda r: rle.decode_masks(r, num_threads=1),
}
IOU = {
    "pycocotools": coco.iou,
    "faster_coco_eval": fce.iou,
    "rlemasklib": lambda dt, gt, crowd: RLEMask.iou_matrix(
        [RLEMask.from_dict(d) for d in dt], [RLEMask.from_dict(g) for g in gt]
    ),
    "lens_fast": rle.iou,
}
AREA = {"pycocotools": coco.area, "faster_coco_eval": fce.area, "rlemasklib": rlemasklib.area, "lens_fast": rle.area}
BBOX = {"pycocotools": coco.toBbox, "faster_coco_eval": fce.toBbox, "rlemasklib": rlemasklib.to_bbox, "lens_fast": rle.toBbox}


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_encode_masks_c_order(benchmark, record_traffic, size, kind, peer):
    masks = masks_of(size, kind)
    setup(benchmark, record_traffic, f"encode_masks (N,H,W) C-order {size} {kind}", peer, masks.nbytes)
    assert benchmark(ENCODE_C[peer], masks) == rles_of(size, kind)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_encode_fortran(benchmark, record_traffic, size, kind, peer):
    masks = np.asfortranarray(masks_of(size, kind).transpose(1, 2, 0))
    setup(benchmark, record_traffic, f"encode (H,W,N) Fortran {size} {kind}", peer, masks.nbytes)
    assert benchmark(ENCODE_F[peer], masks) == rles_of(size, kind)


@pytest.mark.parametrize("peer", list(DECODE))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_decode_masks(benchmark, record_traffic, size, kind, peer):
    masks, rles = masks_of(size, kind), rles_of(size, kind)
    setup(benchmark, record_traffic, f"decode_masks to (N,H,W) {size} {kind}", peer, masks.nbytes)
    out = benchmark(DECODE[peer], rles)
    np.testing.assert_array_equal(np.asarray(out), masks)


@pytest.mark.parametrize("peer", ("pycocotools", "faster_coco_eval", "lens_fast"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_decode_fortran(benchmark, record_traffic, size, kind, peer):
    rles = rles_of(size, kind)
    decode = {"pycocotools": coco.decode, "faster_coco_eval": fce.decode, "lens_fast": rle.decode}[peer]
    setup(benchmark, record_traffic, f"decode to (H,W,N) Fortran {size} {kind}", peer, masks_of(size, kind).nbytes)
    out = benchmark(decode, rles)
    assert out.flags.f_contiguous
    np.testing.assert_array_equal(out.transpose(2, 0, 1), masks_of(size, kind))


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("size,kind,count", [("480x640", "smooth", N), ("1024x1024", "smooth", N), ("480x640", "noise", 4)])
def test_iou(benchmark, record_traffic, size, kind, count, peer):
    dt, gt = rles_of(size, kind, seed=1)[:count], rles_of(size, kind, seed=2)[:count]
    crowd = [i % 2 for i in range(count)]
    setup(benchmark, record_traffic, f"iou {count}x{count} {size} {kind}", peer)
    out = benchmark(IOU[peer], dt, gt, crowd)
    expected = coco.iou(dt, gt, crowd if peer != "rlemasklib" else [0] * count)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("op", ["area", "toBbox"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_area_and_to_bbox(benchmark, record_traffic, size, kind, op, peer):
    rles = rles_of(size, kind)
    fn, reference = {"area": (AREA[peer], coco.area), "toBbox": (BBOX[peer], coco.toBbox)}[op]
    setup(benchmark, record_traffic, f"{op} {size} {kind}", peer)
    np.testing.assert_array_equal(np.asarray(benchmark(fn, rles)), reference(rles))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("peer", ("pycocotools", "lens_fast"))
@pytest.mark.parametrize("kind", KINDS)
def test_encode_masks_cuda(benchmark, record_traffic, kind, peer):
    masks = torch.from_numpy(masks_of("1024x1024", kind)).cuda()

    def pycocotools_after_cpu(m):
        return coco.encode(np.asfortranarray(m.cpu().numpy().transpose(1, 2, 0)))

    fn = pycocotools_after_cpu if peer == "pycocotools" else rle.encode_masks
    setup(benchmark, record_traffic, f"encode_masks CUDA (16,1024,1024) {kind}", peer, masks.numel())
    assert benchmark(fn, masks) == rles_of("1024x1024", kind)
