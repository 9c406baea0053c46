"""lens_fast.nn.fuse_mask_decoder and mask_decoder_upscaling against segment_anything's own MaskDecoder.

Tiny random decoders (transformer_dim 32/40/64, 8x8 or 5x7 embeddings); the Triton backend runs under
the interpreter on CPU tensors. Errors are max-abs relative to the reference's largest magnitude.
"""
import contextlib
import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("segment_anything")  # lens_fast.nn builds on it, and it is every test's reference
from segment_anything import SamPredictor  # noqa: E402
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402

from lens_fast.kernels import mask_decoder_upscaling as kernels  # noqa: E402
from lens_fast.nn import FusedMaskDecoder, fuse_mask_decoder, mask_decoder_upscaling  # noqa: E402

BACKENDS = ["torch", "triton"]


def make_decoder(dim: int, num_multimask_outputs: int = 3, activation=nn.GELU) -> MaskDecoder:
    """A random MaskDecoder; LayerNorm2d's affine parameters are randomised too (they start at 1, 0)."""
    decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2),
        num_multimask_outputs=num_multimask_outputs,
        activation=activation,
        iou_head_hidden_dim=dim,
    )
    with torch.no_grad():
        norm = decoder.output_upscaling[1]
        norm.weight.add_(0.5 * torch.randn_like(norm.weight))
        norm.bias.add_(0.5 * torch.randn_like(norm.bias))
        for conv in (decoder.output_upscaling[0], decoder.output_upscaling[3]):
            conv.bias.normal_(0.0, 0.5)
    return decoder


def decoder_inputs(dim: int, height: int, width: int, prompts: int, dtype=torch.float32) -> dict:
    """Keyword arguments of MaskDecoder.forward (minus multimask_output), 2 sparse tokens per prompt."""
    return dict(
        image_embeddings=torch.randn(1, dim, height, width, dtype=dtype),
        image_pe=torch.randn(1, dim, height, width, dtype=dtype),
        sparse_prompt_embeddings=torch.randn(prompts, 2, dim, dtype=dtype),
        dense_prompt_embeddings=torch.randn(prompts, dim, height, width, dtype=dtype),
    )


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    scale = max(want.double().abs().max().item(), floor, 1e-30)
    return (got.double() - want.double()).abs().max().item() / scale


def run_with_grads(decoder: MaskDecoder, inputs: dict, multimask: bool, seed: int):
    """Outputs and the gradients of a random linear loss w.r.t. every parameter and input."""
    inputs = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    decoder.zero_grad(set_to_none=True)
    masks, iou_pred = decoder(**inputs, multimask_output=multimask)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=gen).to(t.device) for t in (masks, iou_pred)]
    ((masks.float() * weights[0]).sum() + (iou_pred.float() * weights[1]).sum()).backward()
    grads = {f"input.{k}": v.grad for k, v in inputs.items()}
    grads.update({n: p.grad for n, p in decoder.named_parameters()})
    return masks.detach(), iou_pred.detach(), grads


CASES = [(32, 8, 8, 1), (64, 5, 7, 3)]  # transformer_dim, h, w, prompts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim,height,width,prompts", CASES)
@pytest.mark.parametrize("multimask", [True, False])
def test_forward_matches_segment_anything(rng, backend, dim, height, width, prompts, multimask):
    decoder = make_decoder(dim)
    inputs = decoder_inputs(dim, height, width, prompts)
    fused = fuse_mask_decoder(copy.deepcopy(decoder), backend=backend)
    with torch.no_grad():
        want_masks, want_iou = decoder(**inputs, multimask_output=multimask)
        masks, iou = fused(**inputs, multimask_output=multimask)
    assert masks.shape == want_masks.shape == (prompts, 3 if multimask else 1, 4 * height, 4 * width)
    assert masks.dtype == torch.float32
    assert rel_err(masks, want_masks) <= 1e-4
    assert rel_err(iou, want_iou) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim,height,width,prompts", CASES)
def test_gradients_match_autograd(rng, backend, dim, height, width, prompts):
    decoder = make_decoder(dim)
    inputs = decoder_inputs(dim, height, width, prompts)
    fused = fuse_mask_decoder(copy.deepcopy(decoder), backend=backend)
    want_masks, want_iou, want = run_with_grads(decoder, inputs, True, seed=1)
    masks, iou, got = run_with_grads(fused, inputs, True, seed=1)
    assert rel_err(masks, want_masks) <= 1e-4
    assert set(got) == set(want)
    # Attention key biases have a zero true gradient (softmax ignores a shift): both sides hold
    # rounding noise there, so every tensor is compared on the scale of the largest gradient.
    floor = 1e-3 * max(g.abs().max().item() for g in want.values())
    for name in want:
        assert got[name] is not None, name
        assert rel_err(got[name], want[name], floor) <= 1e-4, name


def upscaling_reference(src, hyper_in, size, upscaling):
    """segment_anything's own computation: output_upscaling on the (B, C, h, w) view, then the product."""
    batch, _, dim = src.shape
    upscaled = upscaling(src.transpose(1, 2).reshape(batch, dim, *size))
    b, c, h, w = upscaled.shape
    return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)


def check_op_against_fp32(backend, dtype, dim, size, batch, tokens, device, tol):
    """The fused op on ``dtype`` inputs against segment_anything's computation in fp32 on the same values."""
    upscaling = make_decoder(dim).output_upscaling.to(device, dtype)
    height, width = size
    src = torch.randn(batch, height * width, dim).to(device, dtype).requires_grad_(True)
    hyper_in = torch.randn(batch, tokens, dim // 8).to(device, dtype).requires_grad_(True)
    got = mask_decoder_upscaling(src, hyper_in, size, upscaling, backend=backend)
    reference = copy.deepcopy(upscaling).float()
    src32, hyper32 = (t.detach().float().requires_grad_(True) for t in (src, hyper_in))
    want = upscaling_reference(src32, hyper32, size, reference)
    assert got.dtype == dtype
    assert rel_err(got, want) <= tol
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [src, hyper_in, *upscaling.parameters()], grad.to(dtype))
    want_grads = torch.autograd.grad(want, [src32, hyper32, *reference.parameters()], grad)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.dtype == dtype
        assert rel_err(g, w) <= tol, i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_op_close_to_fp32(rng, backend, dtype):
    check_op_against_fp32(backend, dtype, 64, (5, 7), 2, 4, "cpu", 2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decoder_no_worse_than_segment_anything(rng, backend, dtype):
    """Whole decoder in half precision: as close to the fp32 decoder as segment_anything's own half run."""
    dim, height, width, prompts = 32, 8, 8, 2
    decoder = make_decoder(dim).to(dtype)
    inputs = decoder_inputs(dim, height, width, prompts, dtype)
    fused = fuse_mask_decoder(copy.deepcopy(decoder), backend=backend)
    reference = copy.deepcopy(decoder).float()
    with torch.no_grad():
        masks, iou = fused(**inputs, multimask_output=True)
        half_masks, half_iou = decoder(**inputs, multimask_output=True)
        want_masks, want_iou = reference(**{k: v.float() for k, v in inputs.items()}, multimask_output=True)
    assert masks.dtype == dtype and iou.dtype == dtype
    assert rel_err(masks, want_masks) <= max(2e-2, 1.25 * rel_err(half_masks, want_masks))
    assert torch.equal(iou, half_iou)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dim,size,batch,tokens",
    [(40, (1, 1), 1, 1), (40, (3, 5), 2, 3), (16, (8, 8), 1, 4), (24, (7, 11), 2, 2), (16, (16, 17), 1, 2)],
)
def test_mask_decoder_upscaling_matches_module(rng, backend, dim, size, batch, tokens):
    upscaling = make_decoder(dim).output_upscaling
    height, width = size
    # Non-contiguous inputs: src as a channel-major buffer seen pixel-major, hyper_in sliced.
    src = torch.randn(batch, dim, height * width).transpose(1, 2).requires_grad_(True)
    hyper_in = torch.randn(batch, tokens + 1, dim // 8)[:, 1:].requires_grad_(True)
    got = mask_decoder_upscaling(src, hyper_in, size, upscaling, backend=backend)
    want = upscaling_reference(src, hyper_in, size, upscaling)
    assert got.shape == (batch, tokens, 4 * height, 4 * width)
    assert rel_err(got, want) <= 1e-4
    grad = torch.randn_like(want)
    params = [src, hyper_in, *upscaling.parameters()]
    got_grads = torch.autograd.grad(got, params, grad)
    want_grads = torch.autograd.grad(want, params, grad)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert rel_err(g, w) <= 1e-4, i


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_keeps_only_inputs(backend):
    """Nothing of the upscaled activations' size is saved for backward: only inputs (or views)."""
    dim, size, batch = 32, (8, 8), 2
    upscaling = make_decoder(dim).output_upscaling
    src = torch.randn(batch, 64, dim, requires_grad=True)
    hyper_in = torch.randn(batch, 4, dim // 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mask_decoder_upscaling(src, hyper_in, size, upscaling, backend=backend)
    out.sum().backward()
    assert saved and max(saved) <= src.numel()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        upscaling_reference(src, hyper_in, size, upscaling).sum().backward()
    assert max(saved) >= batch * dim // 8 * 16 * 64  # the original keeps the 4h x 4w activations


def test_state_dict_compatible_both_ways(rng):
    original = make_decoder(32)
    fused = fuse_mask_decoder(make_decoder(32))
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict(), strict=True)
    plain = make_decoder(32)
    plain.load_state_dict(fused.state_dict(), strict=True)
    inputs = decoder_inputs(32, 8, 8, 2)
    with torch.no_grad():
        assert rel_err(fused(**inputs, multimask_output=True)[0], original(**inputs, multimask_output=True)[0]) <= 1e-4
        assert torch.equal(plain(**inputs, multimask_output=False)[0], original(**inputs, multimask_output=False)[0])


def test_fuse_is_in_place_copyable_and_picklable(rng):
    decoder = make_decoder(32)
    params = [p.data_ptr() for p in decoder.parameters()]
    fused = fuse_mask_decoder(decoder, backend="torch")
    assert fused is decoder and isinstance(fused, FusedMaskDecoder) and isinstance(fused, MaskDecoder)
    assert [p.data_ptr() for p in fused.parameters()] == params
    assert fuse_mask_decoder(fused, backend="triton") is fused and fused.fused_backend == "triton"
    inputs = decoder_inputs(32, 5, 7, 1)
    with torch.no_grad():
        want = fused(**inputs, multimask_output=True)[0]
        for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert type(clone) is FusedMaskDecoder and clone.fused_backend == "triton"
            assert torch.equal(clone(**inputs, multimask_output=True)[0], want)


def make_tiny_sam(dim: int = 32) -> Sam:
    """A random SAM on 64x64 images: 8x8 patches of 8 pixels, the given decoder width."""
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2, out_chans=dim, window_size=0
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=8
        ),
        mask_decoder=make_decoder(dim),
    )
    return sam.eval()


@pytest.mark.parametrize("backend", [None, "triton"])
def test_sam_predictor_predict(rng, backend):
    sam = make_tiny_sam()
    fused_sam = copy.deepcopy(sam)
    fuse_mask_decoder(fused_sam.mask_decoder, backend=backend)
    image = rng.integers(0, 256, size=(37, 61, 3), dtype=np.uint8)
    points = np.array([[10.0, 20.0], [40.0, 7.0]])
    labels = np.array([1, 0])
    results = []
    for model in (sam, fused_sam):
        predictor = SamPredictor(model)
        predictor.set_image(image)
        results.append(predictor.predict(point_coords=points, point_labels=labels, multimask_output=True, return_logits=True))
    (want_masks, want_scores, want_low), (masks, scores, low) = results
    assert masks.shape == want_masks.shape == (3, 37, 61) and low.shape == (3, 32, 32)
    assert rel_err(torch.from_numpy(low), torch.from_numpy(want_low)) <= 1e-4
    assert rel_err(torch.from_numpy(masks), torch.from_numpy(want_masks)) <= 1e-4
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-6)


def test_sam_forward_batched(rng):
    sam = make_tiny_sam()
    fused_sam = copy.deepcopy(sam)
    fuse_mask_decoder(fused_sam.mask_decoder)
    batch = [
        {"image": torch.randint(0, 256, (3, 64, 48)).float(), "original_size": (80, 60),
         "boxes": torch.tensor([[4.0, 5.0, 40.0, 30.0], [0.0, 0.0, 20.0, 60.0]])},
        {"image": torch.randint(0, 256, (3, 64, 64)).float(), "original_size": (64, 64),
         "point_coords": torch.tensor([[[9.0, 9.0]]]), "point_labels": torch.tensor([[1]])},
    ]
    with torch.no_grad():
        want = sam(batch, multimask_output=False)
        got = fused_sam(batch, multimask_output=False)
    for g, w in zip(got, want):
        assert rel_err(g["low_res_logits"], w["low_res_logits"]) <= 1e-4
        assert rel_err(g["iou_predictions"], w["iou_predictions"]) <= 1e-4


def test_rejects_what_is_not_a_mask_decoder():
    with pytest.raises(TypeError, match="MaskDecoder"):
        fuse_mask_decoder(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="MaskDecoder"):
        fuse_mask_decoder(None)


def test_rejects_transformer_dim_not_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8, got 36"):
        fuse_mask_decoder(make_decoder(36))


@pytest.mark.parametrize("activation", [nn.ReLU, lambda: nn.GELU(approximate="tanh")])
def test_rejects_other_activations(activation):
    with pytest.raises(ValueError, match="GELU"):
        fuse_mask_decoder(make_decoder(32, activation=activation))


@pytest.mark.parametrize("backend", ["cpu", "gpu", "numpy"])
def test_rejects_backends_it_cannot_run(backend):
    with pytest.raises(ValueError, match="backend"):
        fuse_mask_decoder(make_decoder(32), backend=backend)


def test_mask_decoder_upscaling_rejects_bad_inputs():
    upscaling = make_decoder(32).output_upscaling
    src, hyper_in = torch.randn(2, 64, 32), torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match=r"src must be \(B, h\*w=64, C=32\), got \(2, 63, 32\)"):
        mask_decoder_upscaling(src[:, :63], hyper_in, (8, 8), upscaling)
    with pytest.raises(ValueError, match="hyper_in must be"):
        mask_decoder_upscaling(src, hyper_in[:1], (8, 8), upscaling)
    with pytest.raises(ValueError, match="hyper_in must be"):
        mask_decoder_upscaling(src, torch.randn(2, 4, 5), (8, 8), upscaling)
    with pytest.raises(ValueError, match="size"):
        mask_decoder_upscaling(src, hyper_in, (8, 0), upscaling)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        mask_decoder_upscaling(src.to(torch.float64), hyper_in, (8, 8), upscaling)
    with pytest.raises(TypeError, match="tensors"):
        mask_decoder_upscaling(src.numpy(), hyper_in, (8, 8), upscaling)
    with pytest.raises(ValueError, match="output_upscaling must be Sequential"):
        mask_decoder_upscaling(src, hyper_in, (8, 8), nn.Sequential(nn.Identity()))
    with pytest.raises(ValueError, match="no C\\+\\+ kernel"):
        mask_decoder_upscaling(src, hyper_in, (8, 8), upscaling, backend="cpu")


PRECISION_SETTINGS = ("generic", "cuda", "conv", "rnn", "matmul")


def precision_settings() -> dict:
    b = torch.backends
    return dict(generic=b.fp32_precision, cuda=b.cudnn.fp32_precision, conv=b.cudnn.conv.fp32_precision,
                rnn=b.cudnn.rnn.fp32_precision, matmul=b.cuda.matmul.fp32_precision)


@contextlib.contextmanager
def restored_precision_settings():
    """Puts back PyTorch's fp32 precision settings (new API; parents first, as setting one sets its children)."""
    saved = precision_settings()
    try:
        yield
    finally:
        b = torch.backends
        b.fp32_precision = saved["generic"]
        b.cudnn.fp32_precision = saved["cuda"]
        b.cudnn.conv.fp32_precision = saved["conv"]
        b.cudnn.rnn.fp32_precision = saved["rnn"]
        b.cuda.matmul.fp32_precision = saved["matmul"]
    assert precision_settings() == saved


@pytest.fixture(params=["default precision", "tf32 off"])
def fp32_tol(request):
    """Runs a CUDA test under PyTorch's precision settings as a user finds them (TF32 convolutions,
    IEEE matmuls: the fused products follow the same) or with TF32 off everywhere; gives the fp32
    tolerance for each (TF32 rounds operands to 10 mantissa bits: ~1e-3 relative, as cuDNN)."""
    if request.param == "default precision":
        assert kernels.product_precisions() == ("tf32", "ieee"), "another test left PyTorch's precision changed"
        yield 1e-2
        return
    with restored_precision_settings():
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        yield 1e-4


def test_products_follow_the_precision_of_the_op_they_replace():
    """Transposed-conv products follow cuDNN's convolution setting, hypernetwork products the matmul
    setting, through the legacy flags and the new fp32_precision API alike (runs without a GPU)."""
    b = torch.backends
    with restored_precision_settings():
        b.fp32_precision, b.cudnn.fp32_precision = "none", "none"
        b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision = "tf32", "tf32", "none"
        assert kernels.product_precisions() == ("tf32", "ieee")  # PyTorch's defaults
        config = kernels.launch_config(True, torch.float32, 256, 64, 32, 4)
        assert (config["CONV_PRECISION"], config["MATMUL_PRECISION"]) == ("tf32", "ieee")
        interpreted = kernels.launch_config(False, torch.float32, 256, 64, 32, 4)
        assert (interpreted["CONV_PRECISION"], interpreted["MATMUL_PRECISION"]) == ("ieee", "ieee")
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            assert kernels.product_precisions() == ("ieee", "ieee")
        assert kernels.product_precisions() == ("tf32", "ieee")
        b.cuda.matmul.allow_tf32 = True
        assert kernels.product_precisions() == ("tf32", "tf32")
        b.cuda.matmul.allow_tf32 = False
        assert kernels.product_precisions() == ("tf32", "ieee")
        torch.set_float32_matmul_precision("high")
        assert kernels.product_precisions() == ("tf32", "tf32")
        torch.set_float32_matmul_precision("highest")
        b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = "ieee", "tf32"
        assert kernels.product_precisions() == ("ieee", "tf32")
        b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = "none", "none"  # inherit CUDA's, then the global one
        assert kernels.product_precisions() == ("ieee", "ieee")
        b.fp32_precision = "tf32"
        assert kernels.product_precisions() == ("tf32", "tf32")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,size,batch,tokens", [(256, (64, 64), 3, 4), (40, (5, 7), 2, 3), (32, (1, 1), 1, 1)])
def test_cuda_op_matches_fp32(rng, fp32_tol, dtype, dim, size, batch, tokens):
    """Compiled kernels, SAM's real sizes and odd ones, against segment_anything's fp32 computation
    under the same precision settings."""
    check_op_against_fp32(None, dtype, dim, size, batch, tokens, "cuda", fp32_tol if dtype == torch.float32 else 2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decoder_matches_segment_anything(rng, fp32_tol, dtype):
    """Whole SAM-size decoder (dim 256, 64x64) on the GPU: fp32 outputs and every gradient within the
    tolerance of the precision settings (1e-4 with TF32 off); bf16 masks no further from the fp32
    decoder than segment_anything's own bf16 run."""
    decoder = make_decoder(256).cuda()
    inputs = {k: v.cuda() for k, v in decoder_inputs(256, 64, 64, 3).items()}
    fused = fuse_mask_decoder(copy.deepcopy(decoder).to(dtype))
    want_masks, want_iou, want = run_with_grads(decoder, inputs, True, seed=3)
    half_inputs = {k: v.to(dtype) for k, v in inputs.items()}
    masks, iou, got = run_with_grads(fused, half_inputs, True, seed=3)
    if dtype == torch.float32:
        assert rel_err(masks, want_masks) <= fp32_tol and rel_err(iou, want_iou) <= fp32_tol
        floor = 1e-3 * max(g.abs().max().item() for g in want.values())
        for name in want:
            assert rel_err(got[name], want[name], floor) <= fp32_tol, name
    else:
        half_masks, _, _ = run_with_grads(copy.deepcopy(decoder).to(dtype), half_inputs, True, seed=3)
        assert rel_err(masks, want_masks) <= max(2e-2, 1.25 * rel_err(half_masks, want_masks))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_compile_for_hopper(dtype):
    """Both kernels compile to sm_90 machine code with SAM's sizes, no GPU needed.

    The interpreter runs the same source but accepts things the compiler rejects (non-constexpr
    globals, small dot shapes); this catches them on machines without a GPU.
    """
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = kernels.launch_config(True, dtype, 256, 64, 32, 4)
    element = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    for kernel, num_warps in (
        (kernels.mask_decoder_upscaling_fwd_kernel, kernels.FWD_NUM_WARPS),
        (kernels.mask_decoder_upscaling_bwd_kernel, kernels.BWD_NUM_WARPS),
    ):
        signature = {}
        for name in kernel.arg_names:
            if name in config:
                signature[name] = "constexpr"
            elif name.startswith("part_"):
                signature[name] = "*fp32"
            elif name.endswith("_ptr"):
                signature[name] = "*" + element
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
        # Pointers and the sizes SAM gives (all but T = 4) are 16-aligned, as the launcher would see.
        aligned = {
            (i,): [["tt.divisibility", 16]]
            for i, name in enumerate(kernel.arg_names)
            if signature[name].startswith("*") or (signature[name] == "i32" and name != "T")
        }
        constexprs = {(kernel.arg_names.index(k),): v for k, v in config.items()}
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": num_warps},
        )
        assert compiled.asm["cubin"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_gives_segment_anythings_dtype(rng, backend):
    decoder = make_decoder(32)
    inputs = decoder_inputs(32, 5, 7, 2)
    fused = fuse_mask_decoder(copy.deepcopy(decoder), backend=backend)
    with torch.no_grad():
        want_masks, _ = decoder(**inputs, multimask_output=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto_masks, auto_iou = decoder(**inputs, multimask_output=True)
            masks, iou = fused(**inputs, multimask_output=True)
    assert masks.dtype == auto_masks.dtype == torch.bfloat16 and iou.dtype == auto_iou.dtype
    assert rel_err(masks, want_masks) <= max(2e-2, 1.25 * rel_err(auto_masks, want_masks))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,tokens", [(0, 4), (2, 0)])
def test_mask_decoder_upscaling_empty(backend, batch, tokens):
    upscaling = make_decoder(32).output_upscaling
    src = torch.randn(batch, 15, 32, requires_grad=True)
    hyper_in = torch.randn(batch, tokens, 4, requires_grad=True)
    out = mask_decoder_upscaling(src, hyper_in, (3, 5), upscaling, backend=backend)
    assert out.shape == (batch, tokens, 12, 20)
    out.sum().backward()
    assert src.grad is not None and not src.grad.any()
    assert not upscaling[0].weight.grad.any()


def test_triton_splits_prompts_beyond_one_launch(rng, monkeypatch):
    """More prompts than one launch's grid axis holds: chunks give the same values and gradients."""
    import lens_fast.nn as lens_nn

    upscaling = make_decoder(32).output_upscaling
    src = torch.randn(5, 3 * 4, 32, requires_grad=True)
    hyper_in = torch.randn(5, 2, 4, requires_grad=True)
    want = upscaling_reference(src, hyper_in, (3, 4), upscaling)
    want_grads = torch.autograd.grad(want.square().sum(), (src, hyper_in))
    monkeypatch.setattr(lens_nn, "_MAX_PROMPTS_PER_LAUNCH", 2)
    got = mask_decoder_upscaling(src, hyper_in, (3, 4), upscaling, backend="triton")
    got_grads = torch.autograd.grad(got.square().sum(), (src, hyper_in))
    assert rel_err(got, want) <= 1e-4
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) <= 1e-4
