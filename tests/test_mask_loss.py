"""ops.mask_loss against the plain path: SAM's ``F.interpolate`` chain + BCE-with-logits + Dice.

Loss values and gradients w.r.t. the low-res logits must match the reference's autograd to float32
rounding (the banded path multiplies torch's own interpolation weights, composed, instead of
rounding after each resize; the Triton kernels compute the same weights and sum in another order).
The Triton kernels run here under Triton's interpreter (``backend="triton"`` on CPU tensors), so
their cases stay small.
"""
import pytest
import torch
import torch.nn.functional as F

from lens_fast import ops
from lens_fast.ops.postprocess_masks import postprocess_masks_torch


def reference(low, gt, input_size, original_size, image_size, bce_weight=1.0, dice_weight=1.0):
    """The plain path, written out: per-mask BCE (pixel mean) + Dice with smooth 1."""
    x = postprocess_masks_torch(low, input_size, original_size, image_size)
    g = gt.float().expand_as(x)
    bce = F.binary_cross_entropy_with_logits(x, g, reduction="none").mean(dim=(-2, -1))
    p = torch.sigmoid(x)
    dice = 1 - (2 * (p * g).sum(dim=(-2, -1)) + 1) / (p.sum(dim=(-2, -1)) + g.sum(dim=(-2, -1)) + 1)
    return bce_weight * bce + dice_weight * dice


def blobs(rng, shape, scale=4.0):
    return torch.from_numpy(rng.standard_normal(shape)).float() * scale


def grad_of(fn, low, upstream):
    low.grad = None
    (fn() * upstream).sum().backward()
    return low.grad.clone()


# (low shape, image_size, input_size, original_size, gt shared by the group)
CASES = [
    ((2, 3, 17, 29), 64, (64, 48), (31, 23), True),  # odd low-res, prime original, G = 3 shares a gt
    ((4, 16, 16), 64, (64, 64), (97, 53), False),  # upsampling past image_size, one gt per mask
    ((1, 2, 40, 40), 32, (32, 20), (13, 7), True),  # low-res larger than image_size (span 4)
    ((3, 1, 1), 16, (9, 16), (5, 3), False),  # 1 x 1 logits
    ((2, 2, 32, 32), 32, (32, 32), (32, 32), False),  # identities
]


@pytest.mark.parametrize("band_rows", [None, 1, 7])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[3][0]}x{c[3][1]}")
def test_loss_and_grad_match_reference(rng, case, band_rows):
    shape, image_size, input_size, original_size, shared = case
    low = blobs(rng, shape).requires_grad_()
    gt_shape = (*shape[:-3], *original_size) if shared else (*shape[:-2], *original_size)
    gt = torch.from_numpy(rng.random(gt_shape) < 0.4)
    truth = gt.unsqueeze(-3) if shared else gt
    up = torch.rand(shape[:-2])
    ours = lambda: ops.mask_loss(low, gt, input_size, original_size, image_size=image_size, reduction="none",  # noqa: E731
                                 band_rows=band_rows, bce_weight=0.7, dice_weight=1.3)
    ref = lambda: reference(low, truth, input_size, original_size, image_size, 0.7, 1.3)  # noqa: E731
    torch.testing.assert_close(ours(), ref(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(ours, low, up), grad_of(ref, low, up), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dtypes_reductions_parts_and_views(rng, dtype):
    """bf16 logits (float32 math, bf16 gradient), uint8 gt, non-contiguous inputs, every reduction."""
    base = blobs(rng, (3, 2, 20, 26)).to(dtype)
    low = base[:, :, ::2, 1:].transpose(-1, -2).detach().requires_grad_()  # [3, 2, 25, 10] after transpose
    leaf = low
    low = low[::2]  # [2, 2, 25, 10], non-contiguous
    gt = torch.from_numpy(rng.random((2, 29, 25)) < 0.5).to(torch.uint8)[:, :, 3:22]  # [2, 29, 19] view
    assert not low.is_contiguous() and not gt.is_contiguous()
    geometry = ((40, 16), (29, 19))
    ref_per_mask = reference(low, gt.unsqueeze(1), *geometry, 40)
    for reduction, reduce in [("mean", torch.mean), ("sum", torch.sum), ("none", lambda t: t)]:
        out = ops.mask_loss(low, gt, *geometry, image_size=40, reduction=reduction, return_parts=True)
        assert isinstance(out, ops.MaskLoss) and out.loss.dtype == torch.float32
        torch.testing.assert_close(out.loss, reduce(ref_per_mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, out.bce + out.dice, rtol=1e-6, atol=1e-6)
    up = torch.rand(2, 2)
    got = grad_of(lambda: ops.mask_loss(low, gt, *geometry, image_size=40, reduction="none"), leaf, up)
    want = grad_of(lambda: reference(low, gt.unsqueeze(1), *geometry, 40), leaf, up)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    else:  # both rounded once to bf16 from float32 values equal to float32 rounding: one ulp at most
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-7)


def test_per_sample_original_sizes(rng):
    """A list of gts with per-image sizes (LENS: square input, different originals)."""
    low = blobs(rng, (3, 2, 16, 16)).requires_grad_()
    sizes = [(23, 31), (40, 17), (16, 16)]
    gts = [torch.from_numpy(rng.random(size) < 0.3) for size in sizes]
    inputs = [(32, 32), (32, 14), (32, 32)]
    up = torch.rand(3, 2)
    ours = lambda: ops.mask_loss(low, gts, inputs, sizes, image_size=32, reduction="none")  # noqa: E731
    ref = lambda: torch.stack([  # noqa: E731
        reference(low[i], gts[i], inputs[i], sizes[i], 32) for i in range(3)
    ])
    torch.testing.assert_close(ours(), ref(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(ours, low, up), grad_of(ref, low, up), rtol=1e-4, atol=1e-7)
    one_input = ops.mask_loss(low, gts, (32, 32), sizes, image_size=32, reduction="sum")
    assert one_input.shape == ()


def test_torch_backend_is_the_reference_and_saves_little(rng):
    low = blobs(rng, (2, 4, 32, 32)).requires_grad_()
    gt = torch.from_numpy(rng.random((2, 60, 50)) < 0.5)
    ref = ops.mask_loss(low, gt, (64, 64), (60, 50), image_size=64, backend="torch")
    torch.testing.assert_close(ops.mask_loss(low, gt, (64, 64), (60, 50), image_size=64), ref)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ops.mask_loss(low, gt, (64, 64), (60, 50), image_size=64)
    assert max(saved) == max(low.numel(), gt.numel())  # no full-resolution or 64 x 64 tensor kept


def test_no_masks():
    out = ops.mask_loss(torch.zeros(2, 0, 8, 8), torch.zeros(2, 5, 7, dtype=torch.bool), (16, 16), (5, 7),
                        image_size=16, reduction="none")
    assert out.shape == (2, 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(low_res_logits=torch.zeros(1, 2, 8, 8, dtype=torch.int32)), TypeError, "low_res_logits must be float32"),
        (dict(low_res_logits=torch.zeros(8)), ValueError, "low_res_logits must be"),
        (dict(gt_masks=torch.zeros(1, 5, 7)), TypeError, "gt_masks must be a bool or uint8"),
        (dict(gt_masks=torch.zeros(1, 6, 7, dtype=torch.bool)), ValueError,
         r"gt_masks must be \(1, 2, 5, 7\) \(one per mask\) or \(1, 5, 7\) \(one per group\), got shape \(1, 6, 7\)"),
        (dict(input_size=(32, 8)), ValueError, "input_size"),
        (dict(original_size=(0, 7)), ValueError, "original_size must be positive"),
        (dict(image_size=0), ValueError, "image_size must be a positive int"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
        (dict(bce_weight=-1.0), ValueError, "bce_weight must be a finite number >= 0"),
        (dict(dice_weight="1"), TypeError, "dice_weight must be a real number"),
        (dict(smooth=0.0), ValueError, "smooth must be"),
        (dict(band_rows=0), ValueError, "band_rows must be a positive int"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(gt_masks=torch.zeros(1, 5, 7, dtype=torch.bool, device="meta")), ValueError, "one device"),
        (dict(gt_masks=[torch.zeros(2, 5, 7, dtype=torch.bool)] * 2), ValueError, r"gt_masks must hold B = 1"),
        (dict(gt_masks=[torch.zeros(2, 5, 7, dtype=torch.bool)], original_size=[(5, 7), (5, 7)]), ValueError,
         "original_size must be a pair or a list of B = 1 pairs"),
        (dict(gt_masks=[torch.zeros(2, 5, 6, dtype=torch.bool)], original_size=[(5, 7)]), ValueError,
         r"gt_masks\[0\] must be \(2, 5, 7\)"),
    ],
)
def test_rejects_bad_input(kwargs, error, match):
    args = dict(low_res_logits=torch.zeros(1, 2, 8, 8), gt_masks=torch.zeros(1, 5, 7, dtype=torch.bool),
                input_size=(16, 16), original_size=(5, 7), image_size=16)
    args.update(kwargs)
    low, gt, input_size, original_size = (args.pop(k) for k in ("low_res_logits", "gt_masks", "input_size", "original_size"))
    with pytest.raises(error, match=match):
        ops.mask_loss(low, gt, input_size, original_size, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("original_size", [(480, 640), (37, 61)])
def test_cuda_matches_reference_at_full_size(original_size):
    torch.manual_seed(0)
    low = (torch.randn(2, 8, 256, 256, device="cuda") * 4).requires_grad_()
    gt = torch.rand(2, *original_size, device="cuda") < 0.4
    input_size = ops.resize_longest_side(original_size, 1024)
    up = torch.rand(2, 8, device="cuda")
    ours = lambda: ops.mask_loss(low, gt, input_size, original_size, reduction="none")  # noqa: E731
    ref = lambda: reference(low, gt.unsqueeze(1), input_size, original_size, 1024)  # noqa: E731
    torch.testing.assert_close(ours(), ref(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_of(ours, low, up), grad_of(ref, low, up), rtol=1e-3, atol=1e-8)


def check_backend(low, gt, input_size, original_size, image_size, backend, leaf=None, grad_tol=None, **kwargs):
    """``mask_loss(backend=...)`` per mask against the reference: values, parts and the gradient of ``leaf``."""
    leaf = low if leaf is None else leaf
    truth = gt.unsqueeze(-3) if gt.dim() == low.dim() - 1 else gt
    up = torch.rand(low.shape[:-2])
    ours = lambda: ops.mask_loss(low, gt, input_size, original_size, image_size=image_size,  # noqa: E731
                                 reduction="none", backend=backend, **kwargs)
    ref = lambda: reference(low, truth, input_size, original_size, image_size,  # noqa: E731
                            kwargs.get("bce_weight", 1.0), kwargs.get("dice_weight", 1.0))
    values = []
    got = grad_of(lambda: values.append(ours()) or values[-1], leaf, up)  # one launch of each kernel
    want = grad_of(lambda: values.append(ref()) or values[-1], leaf, up)
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    assert got.dtype == leaf.dtype
    torch.testing.assert_close(got.float(), want.float(), **(grad_tol or dict(rtol=1e-4, atol=1e-7)))
    return got


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[3][0]}x{c[3][1]}")
def test_triton_matches_reference(rng, case):
    """Both kernels (interpreted) on every geometry of CASES: odd and prime sizes, span-4 taps, 1 x 1, identities."""
    shape, image_size, input_size, original_size, shared = case
    low = blobs(rng, shape).requires_grad_()
    gt_shape = (*shape[:-3], *original_size) if shared else (*shape[:-2], *original_size)
    gt = torch.from_numpy(rng.random(gt_shape) < 0.4)
    check_backend(low, gt, input_size, original_size, image_size, "triton", bce_weight=0.7, dice_weight=1.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_dtypes_and_views(rng, dtype):
    """fp32/fp16/bf16 logits read in place through strided views, uint8 gt view with a row stride."""
    base = blobs(rng, (3, 2, 20, 26)).to(dtype)
    leaf = base[:, :, ::2, 1:].transpose(-1, -2).detach().requires_grad_()  # [3, 2, 25, 10]
    low = leaf[::2]  # [2, 2, 25, 10], non-contiguous
    gt = torch.from_numpy(rng.random((2, 29, 25)) < 0.5).to(torch.uint8)[:, :, 3:22]  # [2, 29, 19] view
    assert not low.is_contiguous() and not gt.is_contiguous()
    # reduced precision: both gradients are float32 values equal to float32 rounding, rounded once
    tol = None if dtype == torch.float32 else dict(rtol=2**-6 if dtype == torch.bfloat16 else 2**-9, atol=1e-7)
    got = check_backend(low, gt, (40, 16), (29, 19), 40, "triton", leaf=leaf, grad_tol=tol)
    assert torch.equal(got[1::2], torch.zeros_like(got[1::2]))  # the masks left out of the view get nothing


@pytest.mark.parametrize(
    "name, shape, image_size, input_size, original_size",
    [
        ("empty-gt", (2, 3, 12, 12), 24, (24, 18), (11, 8)),
        ("full-gt", (2, 3, 12, 12), 24, (24, 18), (11, 8)),
        ("one-gt-pixel", (2, 3, 12, 12), 24, (24, 18), (11, 8)),
        ("one-output-pixel", (2, 3, 12, 12), 24, (24, 18), (1, 1)),
        ("saturated-logits", (1, 2, 9, 7), 16, (16, 13), (7, 5)),
    ],
)
def test_triton_edges(rng, name, shape, image_size, input_size, original_size):
    low = blobs(rng, shape, scale=60.0 if name == "saturated-logits" else 4.0).requires_grad_()
    gt = torch.from_numpy(rng.random((shape[0], *original_size)) < 0.5)
    if name == "empty-gt":
        gt[:] = False
    elif name == "full-gt":
        gt[:] = True
    elif name == "one-gt-pixel":
        gt[:] = False
        gt[:, 5, 3] = True
    check_backend(low, gt, input_size, original_size, image_size, "triton")


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["sam-like", "low-res-above-image-size"])
def test_triton_gpu_tiling_under_interpreter(rng, monkeypatch, case):
    """GPU-style tiles on CPU: several row tiles (windows and gradient accumulators starting mid-image,
    border rows and columns shared by programs through the atomics), column tiles with a ragged end,
    a ragged last block of masks, and several partial sums per mask."""
    from lens_fast.kernels import mask_loss as kernels

    shape, image_size, input_size, original_size, _ = case
    low = blobs(rng, (5, 1, *shape[-2:])).requires_grad_()  # 5 masks: blocks of 4 leave 1
    gt = torch.from_numpy(rng.random((5, *original_size)) < 0.4)
    tiles = kernels._tiles(low, image_size, original_size)
    monkeypatch.setattr(kernels, "_tiles", lambda *args: dict(tiles, MASKS=4, ROWS=6, BLOCK_X=16))
    check_backend(low, gt, input_size, original_size, image_size, "triton")


def test_triton_per_sample_sizes_and_saved_tensors(rng):
    """A list of gts with per-image sizes through the kernels; autograd keeps only the inputs and the sums."""
    low = blobs(rng, (2, 2, 16, 16)).requires_grad_()
    sizes, inputs = [(23, 31), (40, 17)], [(32, 32), (32, 14)]
    gts = [torch.from_numpy(rng.random(size) < 0.3) for size in sizes]
    up = torch.rand(2, 2)
    ours = lambda: ops.mask_loss(low, gts, inputs, sizes, image_size=32,  # noqa: E731
                                 reduction="none", backend="triton")
    ref = lambda: torch.stack([reference(low[i], gts[i], inputs[i], sizes[i], 32) for i in range(2)])  # noqa: E731
    torch.testing.assert_close(ours(), ref(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(ours, low, up), grad_of(ref, low, up), rtol=1e-4, atol=1e-7)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ops.mask_loss(low, gts, inputs, sizes, image_size=32, backend="triton")
    assert max(saved) == max(low[0].numel(), max(g.numel() for g in gts))


def test_backend_choice_on_cpu(rng):
    """None on CPU tensors is the banded path ("cpu"), bit for bit; "triton" agrees to float32 rounding."""
    low = blobs(rng, (2, 3, 16, 16))
    gt = torch.from_numpy(rng.random((2, 21, 30)) < 0.5)
    args = (low, gt, (24, 32), (21, 30))
    default = ops.mask_loss(*args, image_size=32, reduction="none")
    assert torch.equal(default, ops.mask_loss(*args, image_size=32, reduction="none", backend="cpu"))
    torch.testing.assert_close(ops.mask_loss(*args, image_size=32, reduction="none", backend="triton"), default,
                               rtol=1e-5, atol=1e-6)


def test_kernels_compile_for_gpu(compile_for_sm90):
    """Both kernels compile to sm_90 (no GPU needed) for fp32/fp16/bf16 logits, SAM's spans and wider ones."""
    from lens_fast.kernels import mask_loss as kernels

    common = {"taps_i_ptr": "*i32", "taps_f_ptr": "*fp32", "gt_ptr": "*u8"}
    gpu = {"MASKS": 4, "ROWS": 32, "BLOCK_X": 128, "SPAN_Y": 3, "SPAN_X": 3}
    for dtype, spans in [("bf16", {}), ("fp16", {}), ("fp32", {"SPAN_Y": 5, "SPAN_X": 4})]:
        try:
            compile_for_sm90(kernels.mask_loss_sums_kernel,
                           {**common, "low_ptr": f"*{dtype}", "partial_ptr": "*fp32"}, {**gpu, **spans})
        except (FileNotFoundError, RuntimeError) as error:  # no ptxas in this Triton install
            pytest.skip(f"cannot compile for CUDA here: {error}")
        compile_for_sm90(kernels.mask_loss_grad_kernel,
                       {**common, "low_ptr": f"*{dtype}", "coef_ptr": "*fp32", "grad_ptr": "*fp32"},
                       {**gpu, **spans})


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_triton_matches_banded_and_reference(dtype):
    """SAM's real geometry on the GPU: Triton (the default) against the banded path and the reference;
    the forward's sums are deterministic (per-program partials), run twice."""
    from lens_fast.ops.mask_loss import mask_loss_parts_banded

    torch.manual_seed(0)
    low = (torch.randn(3, 8, 256, 256, device="cuda") * 4).to(dtype).requires_grad_()
    gt = torch.rand(3, 480, 640, device="cuda") < 0.4
    geometry = ((768, 1024), (480, 640))
    up = torch.rand(3, 8, device="cuda")
    ours = lambda: ops.mask_loss(low, gt, *geometry, reduction="none")  # noqa: E731
    banded = lambda: sum(mask_loss_parts_banded(low, gt.view(torch.uint8), *geometry))  # noqa: E731
    ref = lambda: reference(low, gt.unsqueeze(1), *geometry, 1024)  # noqa: E731
    first = ours()
    assert torch.equal(first, ours())
    torch.testing.assert_close(first, ref(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, banded(), rtol=1e-5, atol=1e-5)
    got, want = grad_of(ours, low, up), grad_of(ref, low, up)
    scale = want.float().abs().max()
    tol = dict(rtol=1e-3, atol=1e-8) if dtype == torch.float32 else dict(rtol=2**-6, atol=1e-8)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol)
    torch.testing.assert_close(grad_of(banded, low, up).float() / scale, want.float() / scale, **tol)
