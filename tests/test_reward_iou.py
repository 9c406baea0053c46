"""ops.reward_iou: every backend against an independent numpy computation and the torch backend.

The Triton kernel runs under the interpreter, with tilings of several tiles and group blocks per
batch item so that the atomic accumulation and the last-arrival finish are exercised.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
from mask_cases import EDGE_CASES, edge_case_masks
from test_box_iou import numpy_iou
from test_mask_stats import DTYPES, numpy_stats, random_gt, random_pred

from lens_fast import ops
from lens_fast.kernels import mask_stats as mask_stats_kernel
from lens_fast.kernels import reward_iou as kernel

BACKENDS = ["torch", "cpu", "triton"]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf boxes, interpreted
# Small tiles: several row bands, column blocks and group blocks per batch item.
SMALL_TILES = mask_stats_kernel.Tiling(group_block=4, block_h=4, block_w=16, row_steps=2, mask_block=1, tile_block=1)


def random_boxes(rng, shape, size=60.0) -> torch.Tensor:
    """float32 xyxy boxes [*shape, 4]: mostly valid, some degenerate (x2 < x1), zero-sized, NaN or inf."""
    xy = rng.uniform(0, size, size=(*shape, 2))
    wh = rng.uniform(-size / 8, size / 2, size=(*shape, 2)) * (rng.random((*shape, 2)) > 0.1)
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    boxes[rng.random(shape) < 0.15] = np.nan  # "no valid box" rows
    boxes[..., 3][rng.random(shape) < 0.05] = np.inf
    return torch.from_numpy(boxes)


def numpy_reward_iou(pred, gt, pred_boxes, gt_boxes, threshold=0.0, empty=1.0):
    """Independent expectation: numpy mask counts and float64 box IoU, non-finite pairs scoring 0."""
    inter, union, *_ = numpy_stats(pred, gt, threshold)
    mask_iou = np.where(union > 0, inter / np.maximum(union, 1), empty).astype(np.float32)
    p = pred_boxes.float().numpy().astype(np.float64)
    g = gt_boxes.float().numpy().astype(np.float64)[..., None, :]
    finite = np.isfinite(p).all(-1) & np.isfinite(g).all(-1)
    box_iou = np.where(finite, numpy_iou(*(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (p, g))), 0.0)
    return mask_iou, box_iou


def assert_reward_iou(out, pred, gt, pred_boxes, gt_boxes, threshold=0.0, empty=1.0):
    mask_iou, box_iou = out
    lead = pred.shape[:-2]
    for t in out:
        assert t.dtype == torch.float32 and t.shape == lead
    want_mask, want_box = numpy_reward_iou(pred, gt, pred_boxes, gt_boxes, threshold, empty)
    np.testing.assert_array_equal(mask_iou.cpu().numpy(), want_mask)
    np.testing.assert_allclose(box_iou.cpu().numpy(), want_box, rtol=2e-6, atol=1e-7)
    reference = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, threshold, empty, backend="torch")
    for got, want in zip(out, reference):
        assert torch.equal(got.cpu(), want.cpu())


def random_case(rng, shape, dtype):
    pred = random_pred(rng, shape, dtype)
    gt = random_gt(rng, shape[:-3] + shape[-2:], rng.choice([torch.bool, torch.uint8]))
    return pred, gt, random_boxes(rng, shape[:-2]), random_boxes(rng, shape[:-3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (1, 13, 17), (8, 7, 11), (2, 3, 4, 5, 9), (3, 8, 31, 37)], ids=lambda s: "x".join(map(str, s))
)
def test_random_inputs_match_numpy(rng, backend, dtype, shape):
    pred, gt, pred_boxes, gt_boxes = random_case(rng, shape, dtype)
    out = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, backend=backend)
    assert_reward_iou(out, pred, gt, pred_boxes, gt_boxes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 8, 13, 70), (2, 5, 9, 33), (1, 1, 17, 40)], ids=lambda s: "x".join(map(str, s)))
def test_triton_last_arrival_over_many_tiles(rng, dtype, shape):
    """Interpreted with small tiles: every batch item spans several programs (row bands x column blocks)
    and group blocks, whose atomics meet in the last program to arrive."""
    pred, gt, pred_boxes, gt_boxes = random_case(rng, shape, dtype)
    batch, groups, height, width = shape
    assert triton.cdiv(height, 8) * triton.cdiv(width, 16) >= 3
    mask_iou = torch.full((batch, groups), -1.0)
    box_iou = torch.full((batch, groups), -1.0)
    pred_kernel = pred.view(torch.uint8) if dtype == torch.bool else pred
    kernel.reward_iou(pred_kernel, gt.to(torch.uint8), pred_boxes, gt_boxes, 0.0, 1.0, mask_iou, box_iou, SMALL_TILES)
    assert_reward_iou((mask_iou, box_iou), pred, gt, pred_boxes, gt_boxes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16], ids=str)
def test_triton_gpu_tiling_under_interpreter(rng, dtype):
    """The launch shape a GPU gets (several tiles and group blocks), run interpreted."""
    pred, gt, pred_boxes, gt_boxes = random_case(rng, (2, 11, 21, 150), dtype)
    launch = mask_stats_kernel.tiling(pred.shape, pred.element_size(), compiled=True)
    mask_iou, box_iou = torch.empty(2, 11), torch.empty(2, 11)
    kernel.reward_iou(pred, gt.to(torch.uint8), pred_boxes, gt_boxes, 0.0, 1.0, mask_iou, box_iou, launch)
    assert_reward_iou((mask_iou, box_iou), pred, gt, pred_boxes, gt_boxes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=str)
def test_edge_masks(backend, case, dtype):
    h, w = 5, 7
    pred, gt = edge_case_masks(case, h, w)
    pred = pred if dtype == torch.bool else torch.where(pred, 3.0, -3.0)
    boxes = torch.tensor([0.0, 0, w, h])
    for empty in (1.0, 0.0, 0.25):
        mask_iou, box_iou = ops.reward_iou(pred, gt, boxes.expand(2, 3, 4), boxes.expand(2, 4), empty=empty, backend=backend)
        want = {"empty_pred": 0.0, "empty_gt": 0.0, "both_empty": empty, "full": 1.0, "one_pixel": 0.0}[case]
        assert torch.equal(mask_iou, torch.full((2, 3), want))
        assert torch.equal(box_iou, torch.ones(2, 3))
    mask_iou, _ = ops.reward_iou(pred, gt, boxes.expand(2, 3, 4), boxes.expand(2, 4), empty=float("nan"), backend=backend)
    assert mask_iou.isnan().all() if case == "both_empty" else not mask_iou.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_edges(backend):
    """Identical, disjoint, touching, contained, degenerate, zero-sized and non-finite boxes, one pixel masks."""
    nan, inf = float("nan"), float("inf")
    gt_box = [10.0, 10, 20, 30]
    cases = {
        "identical": ([10.0, 10, 20, 30], gt_box, 1.0),
        "disjoint": ([30.0, 10, 40, 30], gt_box, 0.0),
        "touching": ([20.0, 10, 30, 30], gt_box, 0.0),
        "contained": ([10.0, 10, 15, 30], gt_box, 0.5),
        "half_overlap": ([15.0, 10, 25, 30], gt_box, 1 / 3),
        "inverted": ([20.0, 30, 10, 10], gt_box, 0.0),
        "zero_size_same": ([5.0, 5, 5, 5], [5.0, 5, 5, 5], 0.0),
        "degenerate_gt": ([10.0, 10, 20, 30], [20.0, 10, 10, 30], 0.0),
        "nan_pred": ([nan, nan, nan, nan], gt_box, 0.0),
        "one_nan_pred": ([10.0, 10, nan, 30], gt_box, 0.0),
        "nan_gt": ([10.0, 10, 20, 30], [nan, 10, 20, 30], 0.0),
        "inf_pred": ([-inf, -inf, inf, inf], gt_box, 0.0),
        "inf_gt": ([10.0, 10, 20, 30], [10.0, 10, 20, inf], 0.0),
    }
    pred_boxes = torch.tensor([[p] for p, _, _ in cases.values()])  # [N, G=1, 4]
    gt_boxes = torch.tensor([g for _, g, _ in cases.values()])
    want = torch.tensor([[v] for _, _, v in cases.values()], dtype=torch.float32)
    pred = torch.ones(len(cases), 1, 1, 1, dtype=torch.bool)
    gt = torch.ones(len(cases), 1, 1, dtype=torch.uint8)
    mask_iou, box_iou = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, backend=backend)
    assert torch.equal(mask_iou, torch.ones(len(cases), 1))
    torch.testing.assert_close(box_iou, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("box_dtype", [torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float64])
def test_box_dtypes_compared_in_float32(rng, backend, box_dtype):
    pred, gt, pred_boxes, gt_boxes = random_case(rng, (2, 8, 9, 10), torch.uint8)
    pred_boxes, gt_boxes = (b.nan_to_num(0.0, 0.0, 0.0).round() for b in (pred_boxes, gt_boxes))
    pred_boxes, gt_boxes = pred_boxes.to(box_dtype), gt_boxes.to(box_dtype)
    out = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, backend=backend)
    assert_reward_iou(out, pred, gt, pred_boxes.float(), gt_boxes.float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.bfloat16], ids=str)
def test_thresholds_and_non_contiguous_views(rng, backend, dtype):
    pred = random_pred(rng, (2, 5, 4, 26, 19), dtype)
    gt = random_gt(rng, (2, 5, 26, 19))
    boxes = random_boxes(rng, (2, 5, 4)).movedim(-1, 0).contiguous().movedim(0, -1)  # coordinate stride 40
    gt_boxes = random_boxes(rng, (2, 10))[:, ::2]
    views = {
        "cropped": (pred[..., 2:21, 3:17], gt[..., 2:21, 3:17]),
        "transposed": (pred.transpose(-1, -2), gt.transpose(-1, -2)),
        "strided": (pred[:, :, :, ::3, 1::2], gt[:, :, ::3, 1::2]),
    }
    threshold = 0.0 if dtype == torch.bool else 0.375
    for name, (p, g) in views.items():
        assert not p.is_contiguous() and not boxes.is_contiguous() and not gt_boxes.is_contiguous(), name
        out = ops.reward_iou(p, g, boxes, gt_boxes, threshold=threshold, backend=backend)
        assert_reward_iou(out, p.contiguous(), g.contiguous(), boxes, gt_boxes, threshold)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)])
def test_zero_sized(rng, backend, shape):
    pred = torch.ones(shape, dtype=torch.uint8)
    gt = torch.ones(shape[:1] + shape[2:], dtype=torch.bool)
    pred_boxes, gt_boxes = random_boxes(rng, shape[:2]), random_boxes(rng, shape[:1])
    out = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, backend=backend)
    assert_reward_iou(out, pred, gt, pred_boxes, gt_boxes)


def test_numpy_inputs_and_no_leading_dims(rng):
    pred = rng.random((3, 7, 5)) < 0.5
    gt = (rng.random((7, 5)) < 0.5).astype(np.uint8)
    pred_boxes, gt_boxes = random_boxes(rng, (3,)).numpy(), random_boxes(rng, ()).numpy()
    for backend in BACKENDS:
        out = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, backend=backend)
        tensors = [torch.from_numpy(x) for x in (pred, gt, pred_boxes, gt_boxes)]
        assert_reward_iou(out, *tensors)


def test_other_devices_run_the_torch_reference():
    pred = torch.zeros(2, 3, 4, 5, device="meta")
    gt = torch.zeros(2, 4, 5, dtype=torch.bool, device="meta")
    mask_iou, box_iou = ops.reward_iou(pred, gt, torch.zeros(2, 3, 4, device="meta"), torch.zeros(2, 4, device="meta"))
    assert mask_iou.shape == box_iou.shape == (2, 3) and box_iou.device.type == "meta"
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        ops.reward_iou(pred, gt, torch.zeros(2, 3, 4, device="meta"), torch.zeros(2, 4, device="meta"), backend="triton")


def test_bad_inputs():
    pred = torch.zeros(2, 3, 4, 5)
    gt = torch.zeros(2, 4, 5, dtype=torch.bool)
    boxes, gt_boxes = torch.zeros(2, 3, 4), torch.zeros(2, 4)
    with pytest.raises(TypeError, match="pred must be bool, uint8 or float32"):
        ops.reward_iou(pred.double(), gt, boxes, gt_boxes)
    with pytest.raises(ValueError, match=r"gt must be \[..., H, W\] = \(2, 4, 5\)"):
        ops.reward_iou(pred, gt[0], boxes, gt_boxes)
    with pytest.raises(ValueError, match=r"pred_boxes must be \[..., G, 4\] = \(2, 3, 4\) for pred of shape "
                       r"\(2, 3, 4, 5\).*got shape \(2, 4\)"):
        ops.reward_iou(pred, gt, gt_boxes, gt_boxes)
    with pytest.raises(ValueError, match=r"pred_boxes must be \[..., 4\] xyxy boxes, got shape \(2, 3, 5\)"):
        ops.reward_iou(pred, gt, torch.zeros(2, 3, 5), gt_boxes)
    with pytest.raises(ValueError, match=r"gt_boxes must be \[..., 4\] = \(2, 4\).*got shape \(2, 3, 4\)"):
        ops.reward_iou(pred, gt, boxes, boxes)
    with pytest.raises(ValueError, match=r"gt_boxes must be \[..., 4\] = \(2, 4\).*got shape \(1, 4\)"):
        ops.reward_iou(pred, gt, boxes, gt_boxes[:1])
    with pytest.raises(TypeError, match="gt_boxes must hold real .* coordinates, got torch.bool"):
        ops.reward_iou(pred, gt, boxes, gt_boxes.bool())
    with pytest.raises(TypeError, match="pred_boxes must be a torch.Tensor or numpy.ndarray, got list"):
        ops.reward_iou(pred, gt, [[0, 0, 1, 1]], gt_boxes)
    with pytest.raises(ValueError, match="one device.*pred on cpu, pred_boxes on meta"):
        ops.reward_iou(pred, gt, boxes.to("meta"), gt_boxes)
    with pytest.raises(ValueError, match="threshold=0.5 applies to float logits only"):
        ops.reward_iou(pred.bool(), gt, boxes, gt_boxes, threshold=0.5)
    with pytest.raises(TypeError, match="empty must be a real number, got NoneType"):
        ops.reward_iou(pred, gt, boxes, gt_boxes, empty=None)
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        ops.reward_iou(pred.to("meta"), gt.to("meta"), boxes.to("meta"), gt_boxes.to("meta"), backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.reward_iou(pred, gt, boxes, gt_boxes, backend="cuda")


def test_triton_kernel_compiles_for_cuda_without_gpu():
    """The compiled path builds for sm_90 for each pred kind: vector loads, gpu-scope atomics with the
    acq_rel arrival, and neither contracted FMA nor approximate division in the box IoU (it rounds as
    torch's separate ops do)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = mask_stats_kernel.tiling((8, 8, 480, 640), 1, compiled=True)
    ints = ["groups", "height", "width", "pred_stride_batch", "pred_stride_group", "pred_stride_row",
            "gt_stride_batch", "gt_stride_row", "pred_box_stride_batch", "pred_box_stride_group",
            "pred_box_stride_coord", "gt_box_stride_batch", "gt_box_stride_coord"]  # fmt: skip
    pointers = {"gt_ptr": "*u8", "pred_box_ptr": "*fp32", "gt_box_ptr": "*fp32", "mask_iou_ptr": "*fp32",
                "box_iou_ptr": "*fp32", "counts_ptr": "*i32", "gt_area_ptr": "*i32", "arrivals_ptr": "*i32"}  # fmt: skip
    for kind, pointer in [(0, "*u8"), (1, "*fp32"), (2, "*i16")]:
        signature = {"pred_ptr": pointer, **pointers, **{name: "i32" for name in ints}, "threshold": "fp32",
                     "empty": "fp32", "n_masks": "i32", "n_tiles": "i32"}  # fmt: skip
        constexprs = {"PRED_KIND": kind, "GROUP_BLOCK": launch.group_block, "BLOCK_H": launch.block_h,
                      "BLOCK_W": launch.block_w, "ROW_STEPS": launch.row_steps}  # fmt: skip
        signature.update({name: "constexpr" for name in constexprs})
        aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 9, 10, 11, 12, 13, 14)}  # as for 480 x 640
        compiled = triton.compile(
            ASTSource(kernel._reward_iou_kernel, signature, constexprs, aligned),
            target=GPUTarget("cuda", 90, 32),
            options={"enable_fp_fusion": False},
        )
        ptx = compiled.asm["ptx"]
        assert "ld.global.v4.b32" in ptx
        assert "atom.global.gpu.acq_rel.add" in ptx and "atom.global.gpu.relaxed.add" in ptx
        assert "fma.rn.f32" not in ptx and "div.full.f32" not in ptx and "div.rn.f32" in ptx


def test_lens_reward_runs_one_fused_call(rng, monkeypatch):
    """With masks, lens_reward's numbers come from a single reward_iou call; the box component equals
    the one computed without masks (box_iou_aligned), unparsable answers scoring 0."""
    from lens_fast.rewards import lens_reward

    texts = ["[1, 2, 30, 40]", "no box", "(3, 4, 20, 20)", "[5, 5, 5, 5]"] * 2
    gt_boxes = [[0.0, 0, 30, 40], [2, 2, 25, 30]]
    pred = random_pred(rng, (2, 4, 9, 13), torch.float32)
    gt = random_gt(rng, (2, 9, 13))
    calls = []
    fused = ops.reward_iou
    monkeypatch.setattr(ops, "reward_iou", lambda *a, **k: calls.append(k) or fused(*a, **k))
    for name in ("mask_iou", "mask_stats", "box_iou_aligned"):
        monkeypatch.setattr(ops, name, lambda *a, name=name, **k: pytest.fail(f"lens_reward called ops.{name}"))
    out = lens_reward(texts, gt_boxes, pred_masks=pred, gt_masks=gt, backend="triton", policy_size=[[10, 20]] * 2,
                      gt_size=[[20, 20]] * 2)  # fmt: skip
    assert len(calls) == 1
    monkeypatch.undo()
    boxes_only = lens_reward(texts, gt_boxes, policy_size=[[10, 20]] * 2, gt_size=[[20, 20]] * 2)
    assert torch.equal(out.components["box"], boxes_only.components["box"])
    assert out.components["box"][1].item() == 0.0 and out.components["box"][0].item() > 0
    mask_iou, _ = numpy_reward_iou(pred, gt, torch.zeros(2, 4, 4), torch.zeros(2, 4))
    np.testing.assert_array_equal(out.components["mask"].numpy(), mask_iou.reshape(-1) ** 2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 8, 480, 640), (3, 5, 1001, 37), (1, 16, 33, 47)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_cpu(rng, dtype, shape):
    """On a GPU the programs of a batch item run concurrently: repeated launches must all equal the C++ result."""
    pred, gt, pred_boxes, gt_boxes = random_case(rng, shape, dtype)
    want = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, backend="cpu")
    args = [t.cuda() for t in (pred, gt, pred_boxes, gt_boxes)]
    for _ in range(20):
        mask_iou, box_iou = ops.reward_iou(*args)
        assert mask_iou.is_cuda and torch.equal(mask_iou.cpu(), want[0])
        torch.testing.assert_close(box_iou.cpu(), want[1], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_cuda_last_arrival_over_many_launches(rng, dtype):
    """The program that arrives last for a batch item writes that item's IoUs from every other program's
    counts: 32 items of many tiles each, 200 launches queued back to back without a sync (each zeroes
    its own workspace), every result equal to the C++ one."""
    pred, gt, pred_boxes, gt_boxes = random_case(rng, (32, 4, 517, 389), dtype)
    want_mask, want_box = ops.reward_iou(pred, gt, pred_boxes, gt_boxes, backend="cpu")
    args = [t.cuda() for t in (pred, gt, pred_boxes, gt_boxes)]
    results = [ops.reward_iou(*args) for _ in range(200)]
    mask_iou = torch.stack([r[0] for r in results]).cpu()
    box_iou = torch.stack([r[1] for r in results]).cpu()
    bad = [i for i in range(len(results)) if not torch.equal(mask_iou[i], want_mask)]
    assert not bad, f"launches {bad[:10]} (of {len(bad)}) differ from the C++ mask IoUs"
    assert torch.equal(box_iou, want_box.expand_as(box_iou))
