"""fuse_mask_decoder speed and activation memory: forward + backward, fused beside segment_anything.

Two scopes, each against the original in the same run: the replaced part alone (output_upscaling +
hypernetwork product, from the transformer's image tokens to the logits) and the whole MaskDecoder.
GPU (skipped without CUDA): SAM's real decoder (dim 256, 64x64 embeddings, 4 mask tokens, 8 prompts),
Triton, fp32 and bf16; ``extra_info["peak_mib"]`` is the peak memory above the inputs.
CPU: the torch backend at a small size (dim 256, 16x16 embeddings, 2 prompts), one torch thread.
``extra_info["saved_mib"]`` is what autograd keeps for backward (unique storages, parameters excluded).
Run: ``python -m pytest bench/test_nn_fuse_mask_decoder.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

from bench_utils import cuda_peak_mib, synced

segment_anything = pytest.importorskip("segment_anything.modeling")  # lens_fast.nn builds on it; the baseline
MaskDecoder, TwoWayTransformer = segment_anything.MaskDecoder, segment_anything.TwoWayTransformer
from lens_fast.nn import fuse_mask_decoder, mask_decoder_upscaling  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MiB = 2**20


def sam_decoder(dim: int = 256) -> MaskDecoder:
    """SAM's decoder architecture (ViT-B/L/H share it) with random weights."""
    torch.manual_seed(0)
    return MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_hidden_dim=256,
    )


def decoder_inputs(dim: int, size: int, prompts: int, device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(1)
    shapes = dict(
        image_embeddings=(1, dim, size, size), image_pe=(1, dim, size, size),
        sparse_prompt_embeddings=(prompts, 2, dim), dense_prompt_embeddings=(prompts, dim, size, size),
    )
    return {k: torch.randn(s, generator=gen).to(device, dtype).requires_grad_(True) for k, s in shapes.items()}


def original_upscaling(src, hyper_in, size, upscaling):
    """segment_anything's MaskDecoder.predict_masks, from the image tokens on."""
    batch, _, dim = src.shape
    upscaled = upscaling(src.transpose(1, 2).view(batch, dim, *size))
    b, c, h, w = upscaled.shape
    return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)


def saved_mib(run, params) -> float:
    """MiB autograd saves for backward during ``run()`` (unique storages; parameters not counted)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values()) / MiB


def upscaling_step(module, size: int, prompts: int, device: str, dtype, backend):
    """fwd + bwd of the upscaling part (original when backend is None, else fused) and its output."""
    dim = module.transformer_dim
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(prompts, size * size, dim, generator=gen).to(device, dtype).requires_grad_(True)
    hyper_in = torch.randn(prompts, module.num_mask_tokens, dim // 8, generator=gen).to(device, dtype).requires_grad_(True)
    upscaling = module.output_upscaling

    def forward():
        if backend is None:
            return original_upscaling(src, hyper_in, (size, size), upscaling)
        return mask_decoder_upscaling(src, hyper_in, (size, size), upscaling, backend=backend)

    def step():
        forward().float().square().mean().backward()

    return step, forward


def decoder_step(module, inputs: dict):
    def forward():
        masks, iou = module(**inputs, multimask_output=True)
        return masks.float().square().mean() + iou.float().mean()

    return lambda: forward().backward(), forward


def bench(benchmark, group, step, forward, params, reference, device):
    benchmark.group = group
    benchmark.extra_info["reference"] = reference
    benchmark.extra_info["saved_mib"] = round(saved_mib(forward, params), 2)
    if device == "cuda":
        benchmark.extra_info["peak_mib"] = round(cuda_peak_mib(step), 1)
    benchmark(synced(step, device))


def make_module(dim, device, dtype, backend):
    module = sam_decoder(dim).to(device, dtype)
    return module if backend is None else fuse_mask_decoder(module, backend=backend)


CPU_CASES = [pytest.param(None, id="segment_anything"), pytest.param("torch", id="fused-torch")]



@pytest.mark.parametrize("backend", CPU_CASES)
def test_upscaling_cpu(benchmark, one_torch_thread, backend):
    module = make_module(256, "cpu", torch.float32, backend)
    step, forward = upscaling_step(module, 16, 2, "cpu", torch.float32, backend)
    bench(benchmark, "upscaling fwd+bwd cpu fp32 dim256 16x16 x2", step, forward,
          list(module.parameters()), backend is None, "cpu")


@pytest.mark.parametrize("backend", CPU_CASES)
def test_decoder_cpu(benchmark, one_torch_thread, backend):
    module = make_module(256, "cpu", torch.float32, backend)
    step, forward = decoder_step(module, decoder_inputs(256, 16, 2, "cpu", torch.float32))
    bench(benchmark, "MaskDecoder fwd+bwd cpu fp32 dim256 16x16 x2", step, forward,
          list(module.parameters()), backend is None, "cpu")


GPU_CASES = [pytest.param(None, id="segment_anything"), pytest.param("triton", id="fused-triton")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", GPU_CASES)
def test_upscaling_cuda(benchmark, backend, dtype):
    module = make_module(256, "cuda", dtype, backend)
    step, forward = upscaling_step(module, 64, 8, "cuda", dtype, backend)
    bench(benchmark, f"upscaling fwd+bwd cuda {str(dtype)[6:]} dim256 64x64 x8", step, forward,
          list(module.parameters()), backend is None, "cuda")


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", GPU_CASES)
def test_decoder_cuda(benchmark, backend, dtype):
    module = make_module(256, "cuda", dtype, backend)
    step, forward = decoder_step(module, decoder_inputs(256, 64, 8, "cuda", dtype))
    bench(benchmark, f"MaskDecoder fwd+bwd cuda {str(dtype)[6:]} dim256 64x64 x8", step, forward,
          list(module.parameters()), backend is None, "cuda")
