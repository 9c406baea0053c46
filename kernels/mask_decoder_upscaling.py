"""Fused SAM mask-decoder upscaling: ``output_upscaling`` + the hypernetwork product, forward and backward.

SAM's ``MaskDecoder`` turns the transformer's image tokens ``src`` (B, h*w, C) into mask logits:
ConvTranspose2d(C -> C/4, k2 s2) -> LayerNorm2d(C/4) -> GELU -> ConvTranspose2d(C/4 -> C/8, k2 s2)
-> GELU gives (B, C/8, 4h, 4w), and ``hyper_in`` (B, T, C/8) @ that gives (B, T, 4h, 4w).

A k2 s2 transposed conv is a per-pixel linear map followed by a pixel shuffle, so everything runs per
pixel of the h x w grid: pixel (i, j) becomes the 4 x 4 patch of rows 4i + 2*di + ei, columns
4j + 2*dj + ej of every token's logits, where (di, dj) is the first conv's kernel tap ("d1" = 2*di + dj)
and (ei, ej) the second's ("d2" = 2*ei + ej). The C/4 x 2h x 2w and C/8 x 4h x 4w activations are
never written: the backward kernel recomputes them from the inputs. Weights come packed per tap:
``w1`` (4, C, C/4) with ``w1[d1] = conv1.weight[:, :, di, dj]``, ``w2`` (4, C/4, C/8) likewise.

Kernels assume contiguous inputs and fp32 math: tiles are loaded, cast to fp32 and combined with fp32
accumulation. Matrix products take fp16/bf16 operands on the GPU when the inputs are half precision.
For fp32 inputs each product uses TF32 exactly when PyTorch would for the op it replaces
(:func:`product_precisions`): the products of the two transposed convolutions (and of their
backward) follow cuDNN's convolution setting (``torch.backends.cudnn.conv.fp32_precision``, legacy
``torch.backends.cudnn.allow_tf32``, default TF32), the hypernetwork product and its backward follow
cuBLAS's matmul setting (``torch.backends.cuda.matmul.fp32_precision``, legacy
``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``, default IEEE fp32).
The two remaining products of the first convolution's backward are torch matmuls (see
:func:`mask_decoder_upscaling_backward`), so they follow the matmul setting. Under Triton's
interpreter every product is IEEE fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lens_fast._backend import device_guard
from lens_fast.kernels.jit import jit

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# Operand type of the matrix products (constexpr DOT_KIND).
_DOT_FP32, _DOT_FP16, _DOT_BF16 = 0, 1, 2


@jit
def _gelu(x):
    """Exact (erf) GELU of an fp32 tile."""
    return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))


@jit
def _gelu_grad(x):
    """d GELU(x) / dx = Phi(x) + x * phi(x) for an fp32 tile."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2))
    return cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI


@jit
def _dot(a, b, DOT_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tiles a @ b with fp32 accumulation; operands rounded to fp16/bf16 when DOT_KIND says so, else
    multiplied at Triton's fp32 ``input_precision`` PRECISION ("tf32" or "ieee")."""
    if DOT_KIND == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT_KIND == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@jit
def _first_stage(
    x_ptr, w1_ptr, b1_ptr, norm_w_ptr, norm_b_ptr,
    offs_p, mask_p, C, C4, eps,
    D1,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C4: tl.constexpr,
    DOT_KIND: tl.constexpr, PRECISION: tl.constexpr,
):
    """Tap D1 of the first transposed conv + LayerNorm over channels for BLOCK_P pixels.

    ``x_ptr`` points at this image's (h*w, C) tokens. Returns fp32 (BLOCK_P, BLOCK_C4) ``xhat`` (the
    normalised values), ``pre_gelu`` = xhat * norm_w + norm_b and (BLOCK_P,) ``rstd``; padded channels
    are 0 in both tiles.
    """
    offs_o = tl.arange(0, BLOCK_C4)
    mask_o = offs_o < C4
    acc = tl.zeros((BLOCK_P, BLOCK_C4), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        x = tl.load(
            x_ptr + offs_p[:, None] * C + offs_k[None, :],
            mask=mask_p[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        w = tl.load(
            w1_ptr + D1 * C * C4 + offs_k[:, None] * C4 + offs_o[None, :],
            mask=mask_k[:, None] & mask_o[None, :], other=0.0,
        ).to(tl.float32)
        acc += _dot(x, w, DOT_KIND, PRECISION)
    bias = tl.load(b1_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    y = acc + bias[None, :]
    mean = tl.sum(tl.where(mask_o[None, :], y, 0.0), axis=1) / C4
    centred = tl.where(mask_o[None, :], y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C4 + eps)
    xhat = centred * rstd[:, None]
    gamma = tl.load(norm_w_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    beta = tl.load(norm_b_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    pre_gelu = xhat * gamma[None, :] + beta[None, :]
    return xhat, pre_gelu, rstd


@jit
def _channel_offsets(C4, C8, T, BLOCK_C4: tl.constexpr, BLOCK_C8: tl.constexpr, BLOCK_T: tl.constexpr):
    """Offsets and masks of the C/4 channels, the C/8 channels and the tokens."""
    offs_o = tl.arange(0, BLOCK_C4)
    offs_q = tl.arange(0, BLOCK_C8)
    offs_t = tl.arange(0, BLOCK_T)
    return offs_o, offs_q, offs_t, offs_o < C4, offs_q < C8, offs_t < T


@jit
def _load_hyper(hyper_ptr, b, T, C8, offs_t, offs_q, mask_t, mask_q):
    """fp32 (BLOCK_T, BLOCK_C8) tile of hyper_in[b], zero-padded."""
    return tl.load(
        hyper_ptr + b * T * C8 + offs_t[:, None] * C8 + offs_q[None, :],
        mask=mask_t[:, None] & mask_q[None, :], other=0.0,
    ).to(tl.float32)


@jit
def _second_stage(z1, w2_ptr, b2, offs_o, offs_q, mask_o, mask_q, C4, C8, D2,
                  DOT_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """Tap D2 of the second transposed conv: its fp32 (BLOCK_C4, BLOCK_C8) weights and z1 @ w2 + b2."""
    w2 = tl.load(
        w2_ptr + D2 * C4 * C8 + offs_o[:, None] * C8 + offs_q[None, :],
        mask=mask_o[:, None] & mask_q[None, :], other=0.0,
    ).to(tl.float32)
    return w2, _dot(z1, w2, DOT_KIND, PRECISION) + b2[None, :]


@jit
def _mask_patch_offsets(offs_p, offs_t, W, T, HW, D1, D2):
    """Offsets in one image's (T, 4h, 4w) logits of sub-pixel (D1, D2) of pixels ``offs_p``, tokens ``offs_t``."""
    row = 4 * (offs_p // W) + 2 * (D1 // 2) + D2 // 2
    col = 4 * (offs_p % W) + 2 * (D1 % 2) + D2 % 2
    return offs_t[None, :] * (16 * HW) + (row * (4 * W) + col)[:, None]


@jit
def mask_decoder_upscaling_fwd_kernel(
    x_ptr, hyper_ptr, w1_ptr, b1_ptr, norm_w_ptr, norm_b_ptr, w2_ptr, b2_ptr, out_ptr,
    W, HW, C, C4, C8, T, eps,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C4: tl.constexpr,
    BLOCK_C8: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_KIND: tl.constexpr, CONV_PRECISION: tl.constexpr, MATMUL_PRECISION: tl.constexpr,
):
    """Grid (cdiv(h*w, BLOCK_P), B): the 4 x 4 logit patches of BLOCK_P pixels of image b, every token."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    offs_o, offs_q, offs_t, mask_o, mask_q, mask_t = _channel_offsets(C4, C8, T, BLOCK_C4, BLOCK_C8, BLOCK_T)
    x_ptr += b * HW * C
    out_ptr += b * T * 16 * HW
    hyper_t = tl.trans(_load_hyper(hyper_ptr, b, T, C8, offs_t, offs_q, mask_t, mask_q))
    b2 = tl.load(b2_ptr + offs_q, mask=mask_q, other=0.0).to(tl.float32)
    store_mask = mask_p[:, None] & mask_t[None, :]

    for D1 in range(4):  # not unrolled: unrolling the taps makes the compiler spill registers
        _xhat, pre_gelu, _rstd = _first_stage(
            x_ptr, w1_ptr, b1_ptr, norm_w_ptr, norm_b_ptr, offs_p, mask_p, C, C4, eps,
            D1, BLOCK_P, BLOCK_K, BLOCK_C4, DOT_KIND, CONV_PRECISION,
        )
        z1 = _gelu(pre_gelu)
        for D2 in range(4):
            _w2, pre2 = _second_stage(
                z1, w2_ptr, b2, offs_o, offs_q, mask_o, mask_q, C4, C8, D2, DOT_KIND, CONV_PRECISION
            )
            z2 = _gelu(pre2)
            logits = _dot(z2, hyper_t, DOT_KIND, MATMUL_PRECISION)
            offs = _mask_patch_offsets(offs_p, offs_t, W, T, HW, D1, D2)
            tl.store(out_ptr + offs, logits.to(out_ptr.dtype.element_ty), mask=store_mask)


@jit
def mask_decoder_upscaling_bwd_kernel(
    x_ptr, hyper_ptr, w1_ptr, b1_ptr, norm_w_ptr, norm_b_ptr, w2_ptr, b2_ptr, grad_ptr,
    grad_pre1_ptr, part_hyper_ptr, part_w2_ptr, part_b2_ptr, part_norm_w_ptr, part_norm_b_ptr,
    W, HW, C, C4, C8, T, eps, num_blocks,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C4: tl.constexpr,
    BLOCK_C8: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_KIND: tl.constexpr, CONV_PRECISION: tl.constexpr, MATMUL_PRECISION: tl.constexpr,
):
    """Grid (P, B): program (p, b) walks pixel blocks p, p + P, ... of image b, recomputing the forward.

    Writes ``grad_pre1`` (B, h*w, 4, C4): the gradient w.r.t. the first conv's output (before its
    LayerNorm), from which the caller gets the first conv's and ``src``'s gradients by two matmuls.
    Accumulates this program's share of the other gradients in fp32 partial buffers (padded to the
    block sizes, indexed by program ``b * P + p``): hyper_in (BLOCK_T, BLOCK_C8), w2 (4, BLOCK_C4,
    BLOCK_C8, zero-initialised), b2 (BLOCK_C8), LayerNorm weight and bias (BLOCK_C4).
    """
    pid_p = tl.program_id(0)
    num_programs = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    slot = b * num_programs + pid_p
    offs_o, offs_q, offs_t, mask_o, mask_q, mask_t = _channel_offsets(C4, C8, T, BLOCK_C4, BLOCK_C8, BLOCK_T)
    x_ptr += b * HW * C
    grad_ptr += b * T * 16 * HW
    grad_pre1_ptr += b * HW * 4 * C4
    hyper = _load_hyper(hyper_ptr, b, T, C8, offs_t, offs_q, mask_t, mask_q)
    b2 = tl.load(b2_ptr + offs_q, mask=mask_q, other=0.0).to(tl.float32)
    gamma = tl.load(norm_w_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    part_w2_ptr += slot * 4 * BLOCK_C4 * BLOCK_C8
    part_w2_offs = offs_o[:, None] * BLOCK_C8 + offs_q[None, :]

    acc_hyper = tl.zeros((BLOCK_T, BLOCK_C8), dtype=tl.float32)
    acc_b2 = tl.zeros((BLOCK_C8,), dtype=tl.float32)
    acc_norm_w = tl.zeros((BLOCK_C4,), dtype=tl.float32)
    acc_norm_b = tl.zeros((BLOCK_C4,), dtype=tl.float32)

    for block in range(pid_p, num_blocks, num_programs):
        offs_p = block * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        grad_mask = mask_p[:, None] & mask_t[None, :]
        for D1 in range(4):  # not unrolled: unrolling the taps makes the compiler spill registers
            xhat, pre_gelu, rstd = _first_stage(
                x_ptr, w1_ptr, b1_ptr, norm_w_ptr, norm_b_ptr, offs_p, mask_p, C, C4, eps,
                D1, BLOCK_P, BLOCK_K, BLOCK_C4, DOT_KIND, CONV_PRECISION,
            )
            z1 = _gelu(pre_gelu)
            grad_z1 = tl.zeros((BLOCK_P, BLOCK_C4), dtype=tl.float32)
            for D2 in range(4):
                w2, pre2 = _second_stage(
                    z1, w2_ptr, b2, offs_o, offs_q, mask_o, mask_q, C4, C8, D2, DOT_KIND, CONV_PRECISION
                )
                offs = _mask_patch_offsets(offs_p, offs_t, W, T, HW, D1, D2)
                grad_logits = tl.load(grad_ptr + offs, mask=grad_mask, other=0.0).to(tl.float32)
                acc_hyper += _dot(tl.trans(grad_logits), _gelu(pre2), DOT_KIND, MATMUL_PRECISION)
                grad_pre2 = _dot(grad_logits, hyper, DOT_KIND, MATMUL_PRECISION) * _gelu_grad(pre2)
                acc_b2 += tl.sum(grad_pre2, axis=0)
                grad_z1 += _dot(grad_pre2, tl.trans(w2), DOT_KIND, CONV_PRECISION)
                # Read-modify-write of this program's own slot; the barrier makes the stores of
                # every thread visible to the next read, whatever thread owns which element.
                part_w2 = tl.load(part_w2_ptr + D2 * BLOCK_C4 * BLOCK_C8 + part_w2_offs)
                part_w2 += _dot(tl.trans(z1), grad_pre2, DOT_KIND, CONV_PRECISION)
                tl.store(part_w2_ptr + D2 * BLOCK_C4 * BLOCK_C8 + part_w2_offs, part_w2)
                tl.debug_barrier()
            grad_pre_gelu = grad_z1 * _gelu_grad(pre_gelu)
            acc_norm_w += tl.sum(grad_pre_gelu * xhat, axis=0)
            acc_norm_b += tl.sum(grad_pre_gelu, axis=0)
            grad_xhat = grad_pre_gelu * gamma[None, :]
            mean_grad = tl.sum(grad_xhat, axis=1) / C4
            mean_grad_xhat = tl.sum(grad_xhat * xhat, axis=1) / C4
            grad_pre1 = rstd[:, None] * (grad_xhat - mean_grad[:, None] - xhat * mean_grad_xhat[:, None])
            tl.store(
                grad_pre1_ptr + offs_p[:, None] * (4 * C4) + D1 * C4 + offs_o[None, :],
                grad_pre1.to(grad_pre1_ptr.dtype.element_ty),
                mask=mask_p[:, None] & mask_o[None, :],
            )

    tl.store(
        part_hyper_ptr + slot * BLOCK_T * BLOCK_C8 + offs_t[:, None] * BLOCK_C8 + offs_q[None, :],
        acc_hyper,
    )
    tl.store(part_b2_ptr + slot * BLOCK_C8 + offs_q, acc_b2)
    tl.store(part_norm_w_ptr + slot * BLOCK_C4 + offs_o, acc_norm_w)
    tl.store(part_norm_b_ptr + slot * BLOCK_C4 + offs_o, acc_norm_b)


def _block(n: int) -> int:
    """Power-of-two block covering n, at least 16 (the smallest ``tl.dot`` dimension)."""
    return max(16, triton.next_power_of_2(n))


FWD_NUM_WARPS, BWD_NUM_WARPS = 4, 8


def _first_set(*settings: str) -> str:
    """Triton's fp32 ``input_precision`` for PyTorch ``fp32_precision`` settings ordered from the op's
    own to the global one: the first that is not "none" ("none" inherits from the next) decides."""
    for setting in settings:
        if setting != "none":
            return "tf32" if setting == "tf32" else "ieee"
    return "ieee"


def product_precisions() -> Tuple[str, str]:
    """Triton ``input_precision`` ("tf32" or "ieee") of the fp32 products that replace the transposed
    convolutions and of those that replace the hypernetwork matmul: what PyTorch would use for a cuDNN
    convolution and for a cuBLAS matmul now (the op's setting, else CUDA's, else the global one; the
    legacy ``allow_tf32`` flags and ``torch.set_float32_matmul_precision`` write these settings)."""
    cuda_all, generic = torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision
    return (
        _first_set(torch.backends.cudnn.conv.fp32_precision, cuda_all, generic),
        _first_set(torch.backends.cuda.matmul.fp32_precision, cuda_all, generic),
    )


def launch_config(on_cuda: bool, dtype: torch.dtype, C: int, C4: int, C8: int, T: int) -> dict:
    """Constexpr arguments of both kernels: block sizes and matrix-product precision.

    One configuration per device kind (compiled GPU code / interpreter), for inputs of ``dtype``.
    """
    if on_cuda:
        dot_kind = {torch.float16: _DOT_FP16, torch.bfloat16: _DOT_BF16}.get(dtype, _DOT_FP32)
        conv_precision, matmul_precision = product_precisions()
        block_p, block_k = 64, min(64, _block(C))
    else:  # interpreter: fp32 everywhere, few big blocks
        dot_kind, conv_precision, matmul_precision = _DOT_FP32, "ieee", "ieee"
        block_p, block_k = 64, min(256, _block(C))
    return dict(
        BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_C4=_block(C4), BLOCK_C8=_block(C8), BLOCK_T=_block(T),
        DOT_KIND=dot_kind, CONV_PRECISION=conv_precision, MATMUL_PRECISION=matmul_precision,
    )


def _num_pixel_programs(num_blocks: int, batch: int, device: torch.device) -> int:
    """Backward programs per image: on a GPU enough to fill it a few times over (bounding the
    partial buffers); under the interpreter two blocks per program, so tests walk the block loop."""
    if device.type != "cuda":
        return triton.cdiv(num_blocks, 2)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_blocks, triton.cdiv(4 * sm_count, batch)))


def mask_decoder_upscaling_forward(
    src: torch.Tensor, hyper_in: torch.Tensor, height: int, width: int,
    w1: torch.Tensor, b1: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, eps: float,
) -> torch.Tensor:
    """Logits (B, T, 4h, 4w) in ``src.dtype``; all inputs contiguous, shapes as in the module docstring."""
    B, HW, C = src.shape
    T = hyper_in.shape[1]
    C4, C8 = w1.shape[2], w2.shape[2]
    out = torch.empty((B, T, 4 * height, 4 * width), dtype=src.dtype, device=src.device)
    config = launch_config(src.is_cuda, src.dtype, C, C4, C8, T)
    grid = (triton.cdiv(HW, config["BLOCK_P"]), B)
    mask_decoder_upscaling_fwd_kernel[grid](
        src, hyper_in, w1, b1, norm_w, norm_b, w2, b2, out,
        width, HW, C, C4, C8, T, eps, **config, num_warps=FWD_NUM_WARPS,
    )
    return out


def mask_decoder_upscaling_backward(
    grad_out: torch.Tensor, src: torch.Tensor, hyper_in: torch.Tensor, height: int, width: int,
    w1: torch.Tensor, b1: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, eps: float, needs_input_grad: Tuple[bool, ...],
) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients w.r.t. (src, hyper_in, w1, b1, norm_w, norm_b, w2, b2), each in its input's dtype.

    ``needs_input_grad`` (8 flags, that order) skips the two matmuls of src and w1 when not needed. Those
    two are torch matmuls, so for fp32 they follow the matmul precision setting where the first
    convolution's backward in segment_anything follows cuDNN's (under PyTorch's defaults they are
    IEEE fp32, more precise than the TF32 convolution backward they replace).
    """
    B, HW, C = src.shape
    T = hyper_in.shape[1]
    C4, C8 = w1.shape[2], w2.shape[2]
    config = launch_config(src.is_cuda, src.dtype, C, C4, C8, T)
    bp, bc4, bc8, bt = config["BLOCK_P"], config["BLOCK_C4"], config["BLOCK_C8"], config["BLOCK_T"]
    num_blocks = triton.cdiv(HW, bp)
    programs = _num_pixel_programs(num_blocks, B, src.device)
    slots = B * programs
    grad_dtype = torch.float32 if src.dtype == torch.float32 or not src.is_cuda else src.dtype
    f32 = dict(dtype=torch.float32, device=src.device)
    grad_pre1 = torch.empty((B, HW, 4, C4), dtype=grad_dtype, device=src.device)
    part_hyper = torch.empty((B, programs, bt, bc8), **f32)
    part_w2 = torch.zeros((slots, 4, bc4, bc8), **f32)
    part_b2 = torch.empty((slots, bc8), **f32)
    part_norm_w = torch.empty((slots, bc4), **f32)
    part_norm_b = torch.empty((slots, bc4), **f32)
    mask_decoder_upscaling_bwd_kernel[(programs, B)](
        src, hyper_in, w1, b1, norm_w, norm_b, w2, b2, grad_out,
        grad_pre1, part_hyper, part_w2, part_b2, part_norm_w, part_norm_b,
        width, HW, C, C4, C8, T, eps, num_blocks, **config, num_warps=BWD_NUM_WARPS,
    )
    grad_pre1 = grad_pre1.view(B * HW, 4 * C4)
    grad_src = grad_w1 = None
    if needs_input_grad[0]:
        w1_rows = w1.permute(1, 0, 2).reshape(C, 4 * C4).to(grad_dtype)
        grad_src = (grad_pre1 @ w1_rows.t()).view(B, HW, C).to(src.dtype)
    if needs_input_grad[2]:
        grad_w1 = (src.reshape(B * HW, C).to(grad_dtype).t() @ grad_pre1)
        grad_w1 = grad_w1.view(C, 4, C4).permute(1, 0, 2).to(w1.dtype)
    grad_b1 = grad_pre1.sum(0, dtype=torch.float32).view(4, C4).sum(0).to(b1.dtype)
    return (
        grad_src,
        part_hyper.sum(1)[:, :T, :C8].to(hyper_in.dtype),
        grad_w1,
        grad_b1,
        part_norm_w.sum(0)[:C4].to(norm_w.dtype),
        part_norm_b.sum(0)[:C4].to(norm_b.dtype),
        part_w2.sum(0)[:, :C4, :C8].to(w2.dtype),
        part_b2.sum(0)[:C8].to(b2.dtype),
    )


class MaskDecoderUpscalingFunction(torch.autograd.Function):
    """Autograd op: (src, hyper_in, w1, b1, norm_w, norm_b, w2, b2, height, width, eps) -> logits.

    Saves only its inputs for backward; the backward kernel recomputes the activations. Launches on
    the inputs' device, whichever CUDA device is current.
    """

    @staticmethod
    def forward(ctx, src, hyper_in, w1, b1, norm_w, norm_b, w2, b2, height, width, eps):
        ctx.save_for_backward(src, hyper_in, w1, b1, norm_w, norm_b, w2, b2)
        ctx.size_eps = (height, width, eps)
        with device_guard(src.device):
            return mask_decoder_upscaling_forward(src, hyper_in, height, width, w1, b1, norm_w, norm_b, w2, b2, eps)

    @staticmethod
    def backward(ctx, grad_out):
        src, hyper_in, w1, b1, norm_w, norm_b, w2, b2 = ctx.saved_tensors
        height, width, eps = ctx.size_eps
        with device_guard(src.device):
            grads = mask_decoder_upscaling_backward(
                grad_out.contiguous(), src, hyper_in, height, width, w1, b1, norm_w, norm_b, w2, b2, eps,
                ctx.needs_input_grad[:8],
            )
        return (*grads, None, None, None)
