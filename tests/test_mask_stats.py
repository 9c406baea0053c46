"""ops.mask_stats / ops.mask_iou: every backend against the torch reference and plain numpy."""
from __future__ import annotations

import functools
import importlib
import math

import numpy as np
import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from mask_cases import EDGE_CASES, edge_case_masks

import lens_fast
from lens_fast import ops
from lens_fast.ops.mask_stats import mask_stats_torch

mask_stats_module = importlib.import_module("lens_fast.ops.mask_stats")  # the module, not the function
BACKENDS = ["torch", "cpu", "cpu-portable", "triton"]
DTYPES = [torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def numpy_stats(pred: torch.Tensor, gt: torch.Tensor, threshold: float = 0.0):
    """Independent per-mask loop in numpy: (intersection, union, pred_area, gt_area, box)."""
    if pred.dtype in FLOATS:
        p = pred.float().numpy() > np.float32(threshold)
    else:
        p = pred.numpy() != 0
    g = gt.numpy() != 0
    lead, (n_group, _, _) = p.shape[:-3], p.shape[-3:]
    inter = np.zeros((*lead, n_group), np.int64)
    pred_area = np.zeros((*lead, n_group), np.int64)
    gt_area = np.zeros(lead, np.int64)
    box = np.zeros((*lead, n_group, 4), np.float32)
    for idx in np.ndindex(*lead):
        gt_area[idx] = np.count_nonzero(g[idx])
        for k in range(n_group):
            mask = p[idx + (k,)]
            inter[idx + (k,)] = np.count_nonzero(mask & g[idx])
            pred_area[idx + (k,)] = np.count_nonzero(mask)
            ys, xs = np.nonzero(mask)
            if len(ys):
                box[idx + (k,)] = [xs.min(), ys.min(), xs.max(), ys.max()]
    union = pred_area + gt_area[..., None] - inter
    return inter, union, pred_area, gt_area, box


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend argument to pass; "cpu-portable" is the C++ kernel with its AVX2 paths off."""
    if request.param == "cpu-portable":
        portable = functools.partial(mask_stats_module.mask_stats_cpu, use_avx2=False)
        monkeypatch.setattr(mask_stats_module, "mask_stats_cpu", portable)
        return "cpu"
    return request.param


def random_pred(rng, shape, dtype) -> torch.Tensor:
    """Masks / logits with a random foreground density per mask (some empty, some full)."""
    density = rng.choice([0.0, 0.03, 0.5, 0.97, 1.0], size=shape[:-2])[..., None, None]
    logits = rng.normal(size=shape) + 2.5 * (2 * density - 1) * 3
    logits[rng.random(shape) < 0.05] = 0.0  # exact ties with the default threshold
    if dtype in FLOATS:
        return torch.from_numpy(logits.astype(np.float32)).to(dtype)
    fg = torch.from_numpy((rng.random(shape) < density))
    return fg if dtype == torch.bool else fg.to(torch.uint8) * torch.from_numpy(
        rng.integers(1, 256, size=shape).astype(np.uint8)
    )


def random_gt(rng, shape, dtype=torch.bool) -> torch.Tensor:
    density = rng.choice([0.0, 0.4, 1.0], p=[0.2, 0.6, 0.2], size=shape[:-2])[..., None, None]
    fg = torch.from_numpy(rng.random(shape) < density)
    return fg if dtype == torch.bool else fg.to(torch.uint8) * 7


def assert_stats(stats: ops.MaskStats, pred: torch.Tensor, gt: torch.Tensor, threshold=0.0):
    lead = pred.shape[:-2]
    assert isinstance(stats, ops.MaskStats)
    for name in ("intersection", "union", "pred_area"):
        t = getattr(stats, name)
        assert t.dtype == torch.int64 and t.shape == lead, name
    assert stats.gt_area.dtype == torch.int64 and stats.gt_area.shape == lead[:-1]
    assert stats.pred_box.dtype == torch.float32 and stats.pred_box.shape == (*lead, 4)
    expected = numpy_stats(pred, gt, threshold)
    for got, want, name in zip(stats, expected, stats._fields):
        np.testing.assert_array_equal(got.cpu().numpy(), want, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (1, 13, 17), (16, 7, 11), (2, 3, 4, 5, 9), (3, 8, 31, 37)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_random_masks_match_numpy_and_torch(rng, backend, dtype, shape):
    pred = random_pred(rng, shape, dtype)
    gt = random_gt(rng, shape[:-3] + shape[-2:], rng.choice([torch.bool, torch.uint8]))
    stats = ops.mask_stats(pred, gt, backend=backend)
    assert_stats(stats, pred, gt)
    reference = mask_stats_torch(pred.float() > 0 if dtype in FLOATS else pred != 0, gt != 0)
    for got, want in zip(stats, reference):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_edge_masks(backend, case, dtype):
    h, w = 5, 7
    pred, gt = edge_case_masks(case, h, w)
    pred = pred.to(dtype) if dtype == torch.uint8 else torch.where(pred, 3.0, -3.0)
    stats = ops.mask_stats(pred, gt, backend=backend)
    assert_stats(stats, pred, gt)
    iou = ops.mask_iou(pred, gt, backend=backend)
    want = {"empty_pred": 0.0, "empty_gt": 0.0, "both_empty": 1.0, "full": 1.0, "one_pixel": 0.0}
    assert torch.equal(iou, torch.full((2, 3), want[case]))
    if case == "full":
        assert torch.equal(stats.pred_box, torch.tensor([0.0, 0, w - 1, h - 1]).expand(2, 3, 4))
    if case == "one_pixel":
        assert torch.equal(stats.pred_box, torch.tensor([w - 1.0, h - 1, w - 1, h - 1]).expand(2, 3, 4))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # interpreter, NaN halves
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 0.1, -0.75, 2.0, 1e-30, -1e30, float("inf"), float("-inf")])
def test_thresholds(rng, backend, dtype, threshold):
    pred = torch.from_numpy(rng.normal(size=(2, 4, 9, 10)).astype(np.float32)).to(dtype)
    pred[0, 0, :3] = threshold  # ties: logit == threshold is background
    pred[0, 1, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.1])
    gt = random_gt(rng, (2, 9, 10))
    stats = ops.mask_stats(pred, gt, threshold=threshold, backend=backend)
    assert_stats(stats, pred, gt, threshold)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_views(rng, backend, dtype):
    pred = random_pred(rng, (2, 5, 4, 26, 19), dtype)
    gt = random_gt(rng, (2, 5, 26, 19))
    channels_last = random_pred(rng, (3, 23, 18, 4), dtype)
    views = {
        "cropped": (pred[..., 2:21, 3:17], gt[..., 2:21, 3:17]),
        "transposed": (pred.transpose(-1, -2), gt.transpose(-1, -2)),
        "strided": (pred[:, ::2, :, ::3, 1::2], gt[:, ::2, ::3, 1::2]),
        "group_last": (channels_last.permute(0, 3, 1, 2), random_gt(rng, (23, 18, 3)).permute(2, 0, 1)),
        "leading_transposed": (pred.transpose(0, 1), gt.transpose(0, 1)),
    }
    for name, (p, g) in views.items():
        assert not p.is_contiguous(), name
        assert_stats(ops.mask_stats(p, g, backend=backend), p.contiguous(), g.contiguous())


def test_broadcast_gt_and_leading_dims(rng, backend):
    pred = random_pred(rng, (3, 2, 4, 6, 8), torch.float16)
    gt = random_gt(rng, (1, 1, 6, 8)).expand(3, 2, 6, 8)  # stride-0 leading dims
    assert_stats(ops.mask_stats(pred, gt, backend=backend), pred, gt.contiguous())


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)])
def test_zero_sized(backend, shape):
    pred = torch.ones(shape, dtype=torch.uint8)
    gt = torch.ones(shape[:1] + shape[2:], dtype=torch.bool)
    stats = ops.mask_stats(pred, gt, backend=backend)
    assert_stats(stats, pred, gt)
    iou = ops.mask_iou(pred, gt, backend=backend)
    assert iou.shape == shape[:2] and iou.dtype == torch.float32


def test_threshold_types(rng, backend):
    pred = random_pred(rng, (2, 3, 6, 7), torch.float32)
    gt = random_gt(rng, (2, 6, 7))
    for threshold, as_float in [(np.float32(0.3), 0.3), (np.float64(-0.2), -0.2), (1, 1.0), (10**400, math.inf)]:
        assert_stats(ops.mask_stats(pred, gt, threshold=threshold, backend=backend), pred, gt, as_float)
    assert torch.equal(ops.mask_iou(pred, gt, empty=np.float32(0.5), backend=backend), ops.mask_iou(pred, gt, empty=0.5))


def test_numpy_inputs(rng, backend):
    pred = rng.random((2, 3, 7, 5)) < 0.5
    gt = (rng.random((2, 7, 5)) < 0.5).astype(np.uint8)
    stats = ops.mask_stats(pred, gt, backend=backend)
    assert_stats(stats, torch.from_numpy(pred), torch.from_numpy(gt))


@pytest.mark.parametrize("empty", [1.0, 0.0, float("nan")])
def test_mask_iou_values(rng, backend, empty):
    pred = random_pred(rng, (4, 8, 12, 10), torch.bfloat16)
    gt = random_gt(rng, (4, 12, 10))
    pred[0, 0] = -1.0  # empty pred
    gt[1] = False  # empty gt
    pred[1, 0] = -1.0  # both empty
    iou = ops.mask_iou(pred, gt, threshold=0.25, empty=empty, backend=backend)
    inter, union, *_ = numpy_stats(pred, gt, 0.25)
    want = np.where(union > 0, inter / np.maximum(union, 1), empty).astype(np.float32)
    assert iou.dtype == torch.float32 and iou.shape == (4, 8)
    np.testing.assert_array_equal(iou.numpy(), want)
    assert union[1, 0] == 0


@pytest.mark.parametrize("width", [63, 64, 65, 128, 131, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_word_boundaries(rng, backend, dtype, width):
    pred = random_pred(rng, (2, 3, 9, width), dtype)
    pred[0, 0, 4, width - 1] = 10  # a lone pixel in the last column, in the tail word
    gt = random_gt(rng, (2, 9, width))
    assert_stats(ops.mask_stats(pred, gt, backend=backend), pred, gt)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # interpreter, NaN halves
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_half_bit_pattern(backend, dtype):
    """All 65536 fp16/bf16 values against float32 thresholds at and between representable values."""
    pred = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 1, 256, 256)
    tiny = float(torch.finfo(dtype).smallest_normal) * (2.0**-10 if dtype == torch.float16 else 2.0**-7)
    largest = float(torch.finfo(dtype).max)
    for threshold in [0.0, -0.0, tiny, tiny / 2, -tiny, 0.1, -1.0, 1.0, 1.0 + 2**-11, 1.0 + 2**-10, 3.3e-39,
                      largest, -largest, largest * 1.001, 3e38, -3e38, float("inf"), float("-inf")]:
        want = pred.float() > np.float32(threshold)
        stats = ops.mask_stats(pred, want[0], threshold=threshold, backend=backend)
        area = int(want.sum())
        assert stats.pred_area.item() == stats.intersection.item() == stats.gt_area.item() == area, threshold


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16], ids=str)
def test_cpu_threads(rng, dtype):
    pred = random_pred(rng, (3, 5, 40, 70), dtype)
    gt = random_gt(rng, (3, 40, 70))
    before = lens_fast.get_num_threads()
    try:
        lens_fast.set_num_threads(2)
        stats = ops.mask_stats(pred, gt, backend="cpu")
    finally:
        lens_fast.set_num_threads(before)
    assert_stats(stats, pred, gt)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16], ids=str)
def test_triton_gpu_tiling_under_interpreter(rng, dtype):
    """The launch shapes a GPU gets (several tiles, row steps and group blocks), run interpreted."""
    from lens_fast.kernels import mask_stats as kernel

    def check(pred, gt, launch):
        out = mask_stats_module._new_stats(pred.shape[:-2], pred.device)
        kernel.mask_stats(pred, gt, 0.0, *out, launch=launch)
        assert_stats(out, pred, gt)

    pred = random_pred(rng, (2, 11, 21, 150), dtype)
    check(pred, random_gt(rng, (2, 21, 150), torch.uint8), kernel.tiling(pred.shape, pred.element_size(), True))
    pred = random_pred(rng, (1, 6, 13, 70), dtype)  # many small tiles: every loop and mask of both passes
    small = kernel.Tiling(group_block=4, block_h=4, block_w=32, row_steps=2, mask_block=4, tile_block=4)
    check(pred, random_gt(rng, (1, 13, 70), torch.uint8), small)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 20), st.integers(1, 150)),
    threshold=st.floats(-3, 3, width=32),
)
def test_cpu_kernel_on_random_layouts(data, dtype, shape, threshold):
    """The C++ kernel, both paths, on drawn shapes, slices and thresholds, against numpy."""
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    b, g, h, w = shape
    pred = random_pred(rng, (b, g, h + 2, w + 3), dtype)
    gt = random_gt(rng, (b, h + 2, w + 3))
    top, left = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 3))
    pred, gt = pred[..., top : top + h, left : left + w], gt[..., top : top + h, left : left + w]
    if data.draw(st.booleans(), label="transpose"):
        pred, gt = pred.transpose(-1, -2), gt.transpose(-1, -2)
    if dtype not in FLOATS:
        threshold = 0.0
    for use_avx2 in (True, False):
        stats = mask_stats_module.mask_stats_cpu(pred, gt, float(np.float32(threshold)), use_avx2=use_avx2)
        assert_stats(stats, pred.contiguous(), gt.contiguous(), threshold)


def test_triton_kernels_compile_for_cuda_without_gpu():
    """The compiled (not interpreted) path: both kernels build for sm_90, with vector loads."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lens_fast.kernels import mask_stats as kernel

    launch = kernel.tiling((8, 8, 480, 640), 1, compiled=True)
    ints = ["groups", "height", "width", "pred_stride_batch", "pred_stride_group", "pred_stride_row",
            "gt_stride_batch", "gt_stride_row"]  # fmt: skip
    for kind, pointer in [(0, "*u8"), (1, "*fp32"), (2, "*i16")]:
        signature = {"pred_ptr": pointer, "gt_ptr": "*u8", "partial_ptr": "*i32", "gt_partial_ptr": "*i32",
                     **{name: "i32" for name in ints}, "threshold": "fp32", "n_masks": "i32", "n_tiles": "i32"}  # fmt: skip
        constexprs = {"PRED_KIND": kind, "GROUP_BLOCK": launch.group_block, "BLOCK_H": launch.block_h,
                      "BLOCK_W": launch.block_w, "ROW_STEPS": launch.row_steps}  # fmt: skip
        signature.update({name: "constexpr" for name in constexprs})
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(12)}  # as Triton specialises 480 x 640
        compiled = triton.compile(
            ASTSource(kernel._mask_stats_tiles, signature, constexprs, aligned), target=GPUTarget("cuda", 90, 32)
        )
        assert "ld.global.v4.b32" in compiled.asm["ptx"]
    signature = {"partial_ptr": "*i32", "gt_partial_ptr": "*i32", **{f"{n}_ptr": "*i64" for n in
                 ("intersection", "union", "pred_area", "gt_area")}, "pred_box_ptr": "*fp32", "groups": "i32",
                 "n_masks": "i32", "n_tiles": "i32", "MASK_BLOCK": "constexpr", "TILE_BLOCK": "constexpr"}  # fmt: skip
    constexprs = {"MASK_BLOCK": launch.mask_block, "TILE_BLOCK": launch.tile_block}
    triton.compile(ASTSource(kernel._mask_stats_finish, signature, constexprs), target=GPUTarget("cuda", 90, 32))


def test_other_devices_run_the_torch_reference():
    """backend=None on a device the kernels cannot read (meta here) runs the torch reference, not C++ on
    a null pointer; forcing "cpu" or "triton" there is a ValueError."""
    pred = torch.zeros(2, 3, 4, 5, device="meta")
    gt = torch.zeros(2, 4, 5, dtype=torch.bool, device="meta")
    stats = ops.mask_stats(pred, gt)
    assert stats.union.device.type == "meta" and stats.union.shape == (2, 3) and stats.pred_box.shape == (2, 3, 4)
    assert ops.mask_iou(pred, gt).shape == (2, 3)
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors, got tensors on meta"):
        ops.mask_stats(pred, gt, backend="cpu")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        ops.mask_stats(pred, gt, backend="triton")


def test_bad_inputs():
    pred = torch.zeros(2, 3, 4, 5)
    gt = torch.zeros(2, 4, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="pred must be bool, uint8 or float32"):
        ops.mask_stats(pred.double(), gt)
    with pytest.raises(TypeError, match="pred must be bool, uint8 or float32"):
        ops.mask_stats(pred.long(), gt)
    with pytest.raises(TypeError, match="gt must be a bool or uint8 mask, got torch.float32"):
        ops.mask_stats(pred, gt.float())
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        ops.mask_stats([[[0]]], gt)
    with pytest.raises(ValueError, match=r"pred must be \[..., G, H, W\].*\(4, 5\)"):
        ops.mask_stats(pred[0, 0], gt)
    with pytest.raises(ValueError, match=r"gt must be \[..., H, W\] = \(2, 4, 5\).*got gt of shape \(2, 5, 4\)"):
        ops.mask_stats(pred, gt.transpose(1, 2))
    with pytest.raises(ValueError, match=r"gt must be \[..., H, W\] = \(2, 4, 5\).*\(3, 4, 5\)"):
        ops.mask_stats(pred, torch.zeros(3, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"gt must be \[..., H, W\].*\(4, 5\)"):
        ops.mask_stats(pred, gt[0])
    with pytest.raises(ValueError, match="gt must be"):
        ops.mask_stats(pred, gt[0, 0])
    with pytest.raises(ValueError, match="one device.*pred on cpu, gt on meta"):
        ops.mask_stats(pred, gt.to("meta"))
    with pytest.raises(ValueError, match="threshold must not be NaN"):
        ops.mask_stats(pred, gt, threshold=float("nan"))
    with pytest.raises(TypeError, match="threshold must be a real number, got str"):
        ops.mask_stats(pred, gt, threshold="0.5")
    with pytest.raises(TypeError, match="threshold must be a real number, got bool"):
        ops.mask_stats(pred, gt, threshold=True)
    with pytest.raises(ValueError, match="threshold=0.5 applies to float logits only; pred is torch.uint8"):
        ops.mask_stats(pred.to(torch.uint8), gt, threshold=0.5)
    with pytest.raises(ValueError, match="threshold=inf applies to float logits only"):
        ops.mask_stats(pred.to(torch.uint8), gt, threshold=10**400)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.mask_stats(pred, gt, backend="cuda")
    with pytest.raises(TypeError, match="empty must be a real number"):
        ops.mask_iou(pred, gt, empty=None)
