"""ops.mask_loss against the plain path: SAM's ``F.interpolate`` chain + BCE-with-logits + Dice.

Loss values and gradients w.r.t. the low-res logits must match the reference's autograd to float32
rounding (the banded path multiplies torch's own interpolation weights, composed, instead of
rounding after each resize).
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
    scale = 1024 / max(original_size)
    input_size = tuple(int(v * scale + 0.5) for v in original_size)
    up = torch.rand(2, 8, device="cuda")
    ours = lambda: ops.mask_loss(low, gt, input_size, original_size, reduction="none")  # noqa: E731
    ref = lambda: reference(low, gt.unsqueeze(1), input_size, original_size, 1024)  # noqa: E731
    torch.testing.assert_close(ours(), ref(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_of(ours, low, up), grad_of(ref, low, up), rtol=1e-3, atol=1e-8)
