"""ops.postprocess_masks / postprocess_mask_stats against segment_anything's ``Sam.postprocess_masks``.

Every backend runs ("triton" on CPU tensors = Triton's interpreter, so sizes stay small). Values must
match the reference to float32 rounding. Thresholded masks and stats must match exactly except at
pixels whose reference logit lies within NEAR of the threshold: there a different (equally valid)
float32 rounding order can flip the comparison, and only those pixels may differ.
"""
import types

import numpy as np
import pytest
import torch

from lens_fast.ops.mask_stats import mask_stats_torch
from lens_fast.ops.postprocess_masks import postprocess_mask_stats, postprocess_masks

Sam = pytest.importorskip("segment_anything.modeling").Sam  # the reference of every test here
ResizeLongestSide = pytest.importorskip("segment_anything.utils.transforms").ResizeLongestSide

BACKENDS = ["cpu", "triton", "torch"]
NEAR = 1e-5  # |reference logit - threshold| below which rounding order may flip a pixel


def resize_longest_side(height: int, width: int, image_size: int) -> tuple[int, int]:
    """segment_anything's own SAM v1 input size (``ops.resize_longest_side`` is tested equal to it in
    tests/test_segmenter.py)."""
    return ResizeLongestSide.get_preprocess_shape(height, width, image_size)


def sam_reference(low_res, input_size, original_size, image_size):
    """``Sam.postprocess_masks`` itself (unbound, on a stub encoder) over any leading dims, float32."""
    stub = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=image_size))
    x = low_res.float().reshape(1, -1, *low_res.shape[-2:])
    out = Sam.postprocess_masks(stub, x, tuple(input_size), tuple(original_size))
    return out.reshape(*low_res.shape[:-2], *out.shape[-2:])


def assert_masks_match(masks, ref_logits, threshold):
    """``masks`` equals ``ref_logits > threshold`` except at near-threshold pixels (counted, allowed)."""
    assert masks.dtype == torch.bool and masks.shape == ref_logits.shape
    near = (ref_logits - threshold).abs() <= NEAR
    differ = masks != (ref_logits > threshold)
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} pixels differ away from the threshold"
    return int(differ.sum())


def logits(rng, shape, dtype=torch.float32, scale=4.0):
    return (torch.from_numpy(rng.standard_normal(shape)).float() * scale).to(dtype)


# (leading dims + (h, w), image_size, input_size or None = ResizeLongestSide, original_size)
CASES = [
    ((1, 1, 32, 32), 64, (64, 64), (37, 61)),  # LENS: squashed square input, odd original
    ((2, 8, 32, 32), 128, None, (37, 61)),  # aspect-preserving crop, G = 8
    ((1, 8, 16, 16), 64, None, (97, 53)),  # prime original, upsampling past image_size
    ((1, 2, 17, 29), 64, (64, 64), (31, 29)),  # non-square, odd low-res
    ((1, 3, 40, 40), 32, (32, 20), (13, 7)),  # low-res larger than image_size (first resize shrinks)
    ((2, 1, 32, 32), 32, (32, 32), (32, 32)),  # both resizes are identities
    ((1, 2, 1, 1), 16, (9, 16), (5, 3)),  # 1 x 1 logits
]


def case_sizes(case):
    shape, image_size, input_size, original_size = case
    if input_size is None:
        input_size = resize_longest_side(*original_size, image_size)
    return shape, image_size, input_size, original_size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[1]}-{c[3]}")
def test_values_match_sam(rng, backend, case):
    shape, image_size, input_size, original_size = case_sizes(case)
    low = logits(rng, shape)
    ref = sam_reference(low, input_size, original_size, image_size)
    out = postprocess_masks(low, input_size, original_size, image_size=image_size, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (*shape[:-2], *original_size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 0.7, -1.25])
def test_thresholded_masks_match_sam(rng, backend, threshold):
    shape, image_size, input_size, original_size = case_sizes(CASES[1])
    low = logits(rng, shape)
    ref = sam_reference(low, input_size, original_size, image_size)
    masks = postprocess_masks(low, input_size, original_size, threshold, image_size, backend=backend)
    assert_masks_match(masks, ref, torch.tensor(threshold, dtype=torch.float32).item())


def test_numpy_scalar_arguments(rng):
    """numpy thresholds and image sizes are taken like Python numbers (as ops.mask_stats takes them)."""
    low = logits(rng, (1, 3, 8, 8))
    ref = sam_reference(low, (16, 12), (5, 7), 16)
    masks = postprocess_masks(low, (16, 12), (5, 7), np.float32(0.25), np.int64(16), backend="cpu")
    assert_masks_match(masks, ref, float(np.float32(0.25)))
    assert not postprocess_masks(low, (16, 12), (5, 7), 10**400, 16, backend="cpu").any()  # beyond float: +inf


def test_thresholds_near_zero_flip_only_there(rng):
    """Logits crowded around the threshold: any flips stay at near-threshold pixels."""
    low = logits(rng, (1, 4, 32, 32), scale=1e-5)
    ref = sam_reference(low, (64, 40), (45, 29), 64)
    for backend in BACKENDS:
        masks = postprocess_masks(low, (64, 40), (45, 29), 0.0, 64, backend=backend)
        assert_masks_match(masks, ref, 0.0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(rng, backend, dtype):
    shape, image_size, input_size, original_size = case_sizes(CASES[2])
    low = logits(rng, shape, dtype)
    ref32 = sam_reference(low, input_size, original_size, image_size)  # of the upcast logits
    out = postprocess_masks(low, input_size, original_size, image_size=image_size, backend=backend)
    assert out.dtype == dtype
    # computed in float32, rounded once on store (the interpreter may round bf16 one ulp off)
    torch.testing.assert_close(out.float(), ref32.to(dtype).float(), rtol=2**-7, atol=1e-3)
    # SAM itself on half logits rounds after each resize: close, not equal
    stub = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=image_size))
    sam_half = Sam.postprocess_masks(stub, low, input_size, original_size)
    torch.testing.assert_close(out.float(), sam_half.float(), rtol=3e-2, atol=3e-2)
    masks = postprocess_masks(low, input_size, original_size, 0.0, image_size, backend=backend)
    assert_masks_match(masks, ref32, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_views(rng, backend):
    base = logits(rng, (3, 2, 4, 24, 20))
    low = base[::2, :, 1:].transpose(-1, -2)  # [2, 2, 3, 20, 24], non-contiguous in every dim
    assert not low.is_contiguous()
    ref = sam_reference(low, (48, 40), (23, 19), 48)
    out = postprocess_masks(low, (48, 40), (23, 19), image_size=48, backend=backend)
    assert out.shape == (2, 2, 3, 23, 19)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    single = postprocess_masks(low[1, 0, 2], (48, 40), (23, 19), 0.5, 48, backend=backend)
    assert single.shape == (23, 19)
    assert_masks_match(single, ref[1, 0, 2], 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_masks(backend):
    out = postprocess_masks(torch.zeros(2, 0, 8, 8), (16, 16), (5, 7), 0.0, 16, backend=backend)
    assert out.shape == (2, 0, 5, 7) and out.dtype == torch.bool
    gt = torch.ones(2, 5, 7, dtype=torch.bool)
    stats = postprocess_mask_stats(torch.zeros(2, 0, 8, 8), gt, (16, 16), (5, 7), image_size=16, backend=backend)
    assert stats.intersection.shape == (2, 0) and stats.pred_box.shape == (2, 0, 4)
    assert stats.gt_area.tolist() == [35, 35]


def assert_stats_match(low, gt, input_size, original_size, threshold, image_size, backend):
    """Stats equal mask_stats_torch of this backend's masks, which match SAM's up to near-threshold flips."""
    ref = sam_reference(low, input_size, original_size, image_size)
    masks = postprocess_masks(low, input_size, original_size, threshold, image_size, backend=backend)
    assert_masks_match(masks, ref, threshold)
    want = mask_stats_torch(masks, gt != 0)
    got = postprocess_mask_stats(low, gt, input_size, original_size, threshold, image_size, backend=backend)
    for name, a, b in zip(want._fields, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {a} != {b}"
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "x".join(map(str, c[0])) + f"-{c[3]}")
def test_stats_match_sam(rng, backend, case):
    shape, image_size, input_size, original_size = case_sizes(case)
    low = logits(rng, shape)
    low[..., : shape[-2] // 2, :] -= 3.0  # masks with some structure, not half-noise
    gt = torch.from_numpy(rng.random((*shape[:-3], *original_size)) < 0.4)
    assert_stats_match(low, gt, input_size, original_size, 0.0, image_size, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_edges(rng, backend):
    """Empty and full predictions, an empty gt, uint8 gt with any nonzero value, views, thresholds."""
    low = logits(rng, (2, 2, 3, 16, 16))
    low[0, 0, 0] = -20.0  # empty prediction
    low[0, 0, 1] = 20.0  # full prediction
    low[1, 1, 2] = -0.5  # empty at threshold 0, full at threshold -1
    gt = torch.from_numpy(rng.integers(0, 3, (2, 2, 29, 35)).astype("uint8") * 100)
    gt[0, 1] = 0  # empty gt
    big = torch.zeros(2, 2, 29, 70, dtype=torch.uint8)
    big[..., ::2] = gt
    view = big[..., ::2]  # non-unit column stride
    input_size = resize_longest_side(29, 35, 32)
    stats = assert_stats_match(low, gt, input_size, (29, 35), 0.0, 32, backend)
    assert stats.gt_area[0, 1] == 0
    assert stats.pred_area[0, 0, 0] == 0 and stats.pred_box[0, 0, 0].tolist() == [0, 0, 0, 0]
    assert stats.pred_area[0, 0, 1] == 29 * 35 and stats.pred_box[0, 0, 1].tolist() == [0, 0, 34, 28]
    assert stats.pred_area[1, 1, 2] == 0
    stats = assert_stats_match(low, view, input_size, (29, 35), -1.0, 32, backend)
    assert stats.pred_area[1, 1, 2] == 29 * 35
    assert_stats_match(low, gt.bool(), input_size, (29, 35), 2.5, 32, backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_stats_half_precision_and_group_of_one(rng, backend):
    low = logits(rng, (3, 1, 32, 32), torch.bfloat16)
    gt = torch.from_numpy(rng.random((3, 40, 24)) < 0.5)
    assert_stats_match(low, gt, resize_longest_side(40, 24, 64), (40, 24), 0.0, 64, backend)


def test_backends_agree_on_many_masks(rng):
    """C++ with several threads against the Triton kernels and the reference, 8 groups x 8 masks."""
    import lens_fast

    low = logits(rng, (8, 8, 16, 16))
    gt = torch.from_numpy(rng.random((8, 21, 34)) < 0.3)
    before = lens_fast.get_num_threads()
    lens_fast.set_num_threads(3)
    try:
        cpu = postprocess_mask_stats(low, gt, (20, 32), (21, 34), 0.0, 32, backend="cpu")
    finally:
        lens_fast.set_num_threads(before)
    triton_stats = postprocess_mask_stats(low, gt, (20, 32), (21, 34), 0.0, 32, backend="triton")
    masks = postprocess_masks(low, (20, 32), (21, 34), 0.0, 32, backend="cpu")
    assert_masks_match(masks, sam_reference(low, (20, 32), (21, 34), 32), 0.0)
    for a, b in zip(cpu, triton_stats):
        assert torch.equal(a, b) or (a - b).abs().max() <= 1  # a near-threshold flip at most


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["sam-like", "low-res-above-image-size"])
def test_triton_gpu_tiling_under_interpreter(rng, monkeypatch, case):
    """GPU-style tiles on CPU: several row tiles (windows starting mid-image), column tiles with a
    ragged end, and a ragged last block of masks; the interpreter otherwise runs one program."""
    from lens_fast.kernels import postprocess_masks as kernels

    shape, image_size, input_size, original_size = case_sizes(case)
    low = logits(rng, (3, *shape[-3:]))[:, :3]  # 3 x 3 = 9 masks: blocks of 4 leave 1
    gt = torch.from_numpy(rng.random((3, *original_size)) < 0.5)
    spans = kernels._tiles(low, image_size, original_size)
    monkeypatch.setattr(
        kernels, "_tiles", lambda *args: dict(spans, MASKS=4, ROWS=9, BLOCK_X=32)
    )
    ref = sam_reference(low, input_size, original_size, image_size)
    out = postprocess_masks(low, input_size, original_size, image_size=image_size, backend="triton")
    # logits reach ~16, where a float32 ulp is 1.9e-6; the downsampling case sums more taps than torch in
    # another order (seed 1610121483 gave 1.04e-5): 2e-5 is ~10 ulps
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    assert_stats_match(low, gt, input_size, original_size, 0.0, image_size, "triton")


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="torch's CPU kernel fuses multiply-adds only in its AVX2/AVX-512 builds",
)
def test_cpp_equals_torch_cpu_bit_for_bit(rng):
    """The C++ kernel sums in torch's order with FMAs like torch's vectorised CPU builds: where torch
    runs its generic kernel (out_h + out_w > 128 for both resizes) the values are identical."""
    from lens_fast._backend import native

    if not native().cpu_has_avx2():
        pytest.skip("no AVX2/FMA here: the C++ kernel uses plain multiply-adds")
    low = logits(rng, (2, 3, 32, 32))
    input_size = resize_longest_side(97, 53, 128)
    ref = sam_reference(low, input_size, (97, 53), 128)
    assert torch.equal(postprocess_masks(low, input_size, (97, 53), image_size=128, backend="cpu"), ref)


def test_default_backend_on_cpu_is_cpp(rng):
    low = logits(rng, (1, 2, 8, 8))
    assert torch.equal(
        postprocess_masks(low, (16, 16), (9, 11), image_size=16),
        postprocess_masks(low, (16, 16), (9, 11), image_size=16, backend="cpu"),
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(low_res=torch.zeros(1, 2, 8, 8, dtype=torch.int32)), TypeError, "low_res must be float32"),
        (dict(low_res=torch.zeros(8)), ValueError, r"low_res must be \[\.\.\., h, w\]"),
        (dict(low_res=torch.zeros(1, 0, 8)), ValueError, "h, w >= 1"),
        (dict(low_res=[[0.0]]), TypeError, "low_res must be a torch.Tensor"),
        (dict(input_size=(17, 16)), ValueError, "must fit in image_size"),
        (dict(input_size=(0, 16)), ValueError, "input_size must be positive"),
        (dict(input_size=(16,)), TypeError, "input_size must be a pair"),
        (dict(input_size=16), TypeError, "input_size must be a pair"),
        (dict(input_size=(16.0, 16)), TypeError, "input_size must be a pair"),
        (dict(original_size=(True, 5)), TypeError, "original_size must be a pair"),
        (dict(original_size=(-5, 5)), ValueError, "original_size must be positive"),
        (dict(original_size=(2**16, 2**15)), ValueError, "2\\*\\*31 pixels"),
        (dict(image_size=0), ValueError, "image_size must be a positive int"),
        (dict(image_size=16.0), ValueError, "image_size must be a positive int"),
        (dict(threshold=float("nan")), ValueError, "threshold must not be NaN"),
        (dict(threshold="0"), TypeError, "threshold must be a real number"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_postprocess_masks_rejects_bad_input(kwargs, error, match):
    args = dict(low_res=torch.zeros(1, 2, 8, 8), input_size=(16, 16), original_size=(5, 7), image_size=16)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        postprocess_masks(**args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(low_res=torch.zeros(8, 8)), ValueError, r"low_res must be \[\.\.\., G, h, w\]"),
        (dict(gt=torch.zeros(1, 5, 7)), TypeError, "gt must be a bool or uint8"),
        (dict(gt=torch.zeros(1, 5, 8, dtype=torch.bool)), ValueError, r"gt must be \[\.\.\., H, W\] = \(1, 5, 7\)"),
        (dict(gt=torch.zeros(2, 5, 7, dtype=torch.bool)), ValueError, "got gt of shape \\(2, 5, 7\\)"),
        (dict(gt=torch.zeros(1, 5, 7, dtype=torch.bool, device="meta")), ValueError, "one device"),
        (dict(threshold=None), TypeError, "threshold must be a real number"),
    ],
)
def test_postprocess_mask_stats_rejects_bad_input(kwargs, error, match):
    args = dict(
        low_res=torch.zeros(1, 2, 8, 8), gt=torch.zeros(1, 5, 7, dtype=torch.bool),
        input_size=(16, 16), original_size=(5, 7), image_size=16,
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        postprocess_mask_stats(**args)


def test_other_devices_run_the_torch_reference():
    """backend=None on a device without a kernel (meta here) runs the torch reference."""
    low_res = torch.zeros(2, 3, 4, 5, device="meta")
    assert postprocess_masks(low_res, (8, 8), (7, 9), image_size=8).shape == (2, 3, 7, 9)
    gt = torch.zeros(2, 7, 9, dtype=torch.bool, device="meta")
    stats = postprocess_mask_stats(low_res, gt, (8, 8), (7, 9), image_size=8)
    assert stats.union.device.type == "meta" and stats.union.shape == (2, 3)


def test_kernels_compile_for_gpu(compile_for_sm90):
    """The Triton kernels compile to sm_90 cubins (no GPU needed), which the interpreter cannot check.

    Fresh cache: runs after the interpreted tests, so it also catches interpreter patches of
    triton.language that would leak into later compilations.
    """
    from lens_fast.kernels import postprocess_masks as kernels


    floats = {n: "fp32" for n in ("threshold", "scale_h1", "scale_w1", "scale_h2", "scale_w2")}
    taps = {"taps_i_ptr": "*i32", "taps_f_ptr": "*fp32"}
    gpu = {"MASKS": 4, "ROWS": 32, "BLOCK_X": 128, "SPAN_Y": 3, "SPAN_X": 3}
    try:
        compile_for_sm90(
            kernels.postprocess_masks_kernel, {"low_ptr": "*bf16", "out_ptr": "*bf16", **taps, **floats},
            {"APPLY_THRESHOLD": False, **gpu},
        )
    except (FileNotFoundError, RuntimeError) as error:  # no ptxas in this Triton install
        pytest.skip(f"cannot compile for CUDA here: {error}")
    compile_for_sm90(
        kernels.postprocess_masks_kernel, {"low_ptr": "*fp32", "out_ptr": "*u8", **taps, **floats},
        {"APPLY_THRESHOLD": True, **gpu, "SPAN_Y": 5, "SPAN_X": 4, "out_w": 1},
    )
    compile_for_sm90(
        kernels.postprocess_mask_stats_kernel,
        {"low_ptr": "*fp16", "gt_ptr": "*u8", "acc_ptr": "*i32", "gt_acc_ptr": "*i32", **taps, **floats}, gpu,
    )
    compile_for_sm90(kernels.composite_taps_kernel, {**taps, **floats}, {"BLOCK": 1024})
    compile_for_sm90(
        kernels.finalize_mask_stats_kernel,
        {"acc_ptr": "*i32", "gt_acc_ptr": "*i32", "inter_ptr": "*i64", "union_ptr": "*i64",
         "area_ptr": "*i64", "gt_area_ptr": "*i64", "box_ptr": "*fp32"},
        {"BLOCK": 1024},
    )


@pytest.mark.cuda
@pytest.mark.parametrize("original_size", [(480, 640), (1024, 1024), (37, 61)])
def test_cuda_matches_sam_at_full_size(original_size):
    torch.manual_seed(0)
    low = torch.randn(2, 8, 256, 256, device="cuda") * 4
    input_size = resize_longest_side(*original_size, 1024)
    ref = sam_reference(low, input_size, original_size, 1024)
    out = postprocess_masks(low, input_size, original_size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    masks = postprocess_masks(low, input_size, original_size, 0.0)
    assert_masks_match(masks, ref, 0.0)
    gt = torch.rand(2, *original_size, device="cuda") < 0.4
    got = postprocess_mask_stats(low, gt, input_size, original_size)
    for a, b in zip(got, mask_stats_torch(masks, gt)):
        assert torch.equal(a, b)
    half = postprocess_masks(low.bfloat16(), input_size, original_size)
    torch.testing.assert_close(half.float(), sam_reference(low.bfloat16(), input_size, original_size, 1024)
                               .bfloat16().float(), rtol=2**-7, atol=1e-3)
