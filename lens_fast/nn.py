"""Fused pieces of SAM's mask decoder (``segment_anything.modeling.MaskDecoder``).

``fuse_mask_decoder(decoder)`` swaps the decoder's ``output_upscaling`` + hypernetwork product for
:func:`mask_decoder_upscaling`, one op (forward and backward) that goes from the transformer's image
tokens straight to the mask logits without storing the upscaled activations. See
``lens_fast._backend`` for the ``backend`` argument; this op has no C++ kernel ("cpu" is refused).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from lens_fast._backend import check_same_device, resolve_backend

__all__ = ["FusedMaskDecoder", "fuse_mask_decoder", "mask_decoder_upscaling", "mask_decoder_upscaling_torch"]

UpscalingParams = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _check_output_upscaling(upscaling: nn.Module) -> None:
    """ValueError unless ``upscaling`` is SAM's ConvT(k2 s2) -> LayerNorm2d -> GELU -> ConvT(k2 s2) -> GELU."""
    kinds = [type(m) for m in upscaling] if isinstance(upscaling, nn.Sequential) else []
    expected = [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU]
    if kinds != expected:
        got = [k.__name__ for k in kinds] or type(upscaling).__name__
        raise ValueError(
            "output_upscaling must be Sequential(ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d, "
            f"GELU) as in segment_anything's MaskDecoder, got {got}"
        )
    conv1, norm, gelu1, conv2, gelu2 = upscaling
    for name, act in (("output_upscaling[2]", gelu1), ("output_upscaling[4]", gelu2)):
        if act.approximate != "none":
            raise ValueError(f"{name} must be the exact GELU (approximate='none'), got {act.approximate!r}")
    dim = conv1.in_channels
    if dim % 8 != 0:
        raise ValueError(f"transformer_dim must be divisible by 8, got {dim}")
    for name, conv, c_in, c_out in (
        ("output_upscaling[0]", conv1, dim, dim // 4),
        ("output_upscaling[3]", conv2, dim // 4, dim // 8),
    ):
        plain = (
            conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.padding == (0, 0)
            and conv.output_padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is not None and conv.padding_mode == "zeros"
        )
        if not plain or (conv.in_channels, conv.out_channels) != (c_in, c_out):
            raise ValueError(
                f"{name} must be ConvTranspose2d({c_in}, {c_out}, kernel_size=2, stride=2) with bias, got {conv}"
            )
    if norm.weight.shape != (dim // 4,):
        raise ValueError(f"output_upscaling[1] must be LayerNorm2d({dim // 4}), got {tuple(norm.weight.shape)} channels")


def mask_decoder_upscaling_torch(
    src: torch.Tensor, hyper_in: torch.Tensor, size: Tuple[int, int], params: UpscalingParams, eps: float
) -> torch.Tensor:
    """Plain PyTorch reference of the fused op, in fp32, per-pixel formulation, activations recomputed.

    ``src`` (B, h*w, C) image tokens, ``hyper_in`` (B, T, C/8), ``params`` = (conv1 weight (C, C/4, 2, 2),
    conv1 bias, LayerNorm2d weight, bias, conv2 weight (C/4, C/8, 2, 2), conv2 bias) -> logits
    (B, T, 4h, 4w) in ``src.dtype``. Under autograd only the inputs are kept for backward
    (``torch.utils.checkpoint``).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (src, hyper_in, *params)):
        return checkpoint(_per_pixel_upscaling, src, hyper_in, size, *params, eps, use_reentrant=False)
    return _per_pixel_upscaling(src, hyper_in, size, *params, eps)


def _per_pixel_upscaling(src, hyper_in, size, conv1_w, conv1_b, norm_w, norm_b, conv2_w, conv2_b, eps):
    height, width = size
    batch, pixels, dim = src.shape
    tokens, c4, c8 = hyper_in.shape[1], dim // 4, dim // 8
    x, hyper, conv1_w, conv1_b, norm_w, norm_b, conv2_w, conv2_b = (
        t.float() for t in (src, hyper_in, conv1_w, conv1_b, norm_w, norm_b, conv2_w, conv2_b)
    )
    # First transposed conv per pixel: (C) -> (4 taps d1 = 2*di + dj, C/4); LayerNorm2d, GELU.
    pre1 = (x.reshape(-1, dim) @ conv1_w.permute(0, 2, 3, 1).reshape(dim, 4 * c4)).view(-1, 4, c4) + conv1_b
    z1 = F.gelu(F.layer_norm(pre1, (c4,), norm_w, norm_b, eps))
    # Second per sub-pixel: (C/4) -> (4 taps d2 = 2*ei + ej, C/8); GELU. Rows: pixel, d1, d2.
    pre2 = (z1.reshape(-1, c4) @ conv2_w.permute(0, 2, 3, 1).reshape(c4, 4 * c8)).view(-1, 4, c8) + conv2_b
    logits = F.gelu(pre2).view(batch, pixels * 16, c8) @ hyper.transpose(1, 2)
    # (B, i, j, di, dj, ei, ej, T) -> (B, T, rows 4i + 2di + ei, columns 4j + 2dj + ej).
    logits = logits.view(batch, height, width, 2, 2, 2, 2, tokens).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return logits.reshape(batch, tokens, 4 * height, 4 * width).to(src.dtype)


def mask_decoder_upscaling(
    src: torch.Tensor,
    hyper_in: torch.Tensor,
    size: Sequence[int],
    output_upscaling: nn.Sequential,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SAM's ``hyper_in @ output_upscaling(src)`` as one fused op: mask logits (B, T, 4h, 4w).

    ``src``: (B, h*w, C) image tokens as SAM's two-way transformer returns them (pixel-major,
    channels last); ``hyper_in``: (B, T, C/8); ``size``: (h, w); ``output_upscaling``: the decoder's
    module (its parameters are used, with autograd). fp32/fp16/bf16, fp32 math inside; the result
    has ``src``'s dtype (under autocast: the autocast dtype, as SAM's convolutions give).
    ``backend``: None -> "triton" for CUDA tensors, "torch" for CPU tensors.
    """
    _check_output_upscaling(output_upscaling)
    if not isinstance(src, torch.Tensor) or not isinstance(hyper_in, torch.Tensor):
        raise TypeError(f"src and hyper_in must be tensors, got {type(src).__name__}, {type(hyper_in).__name__}")
    conv1, norm, _, conv2, _ = output_upscaling
    dim = conv1.in_channels
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"size must be (h, w) positive ints, got {size!r}")
    height, width = size
    if src.dim() != 3 or src.shape[1:] != (height * width, dim):
        raise ValueError(f"src must be (B, h*w={height * width}, C={dim}), got {tuple(src.shape)}")
    if hyper_in.dim() != 3 or hyper_in.shape[0] != src.shape[0] or hyper_in.shape[2] != dim // 8:
        raise ValueError(f"hyper_in must be (B={src.shape[0]}, T, C/8={dim // 8}), got {tuple(hyper_in.shape)}")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if src.dtype not in floats or hyper_in.dtype not in floats:
        raise TypeError(f"src and hyper_in must be float32/float16/bfloat16, got {src.dtype}, {hyper_in.dtype}")
    params = (conv1.weight, conv1.bias, norm.weight, norm.bias, conv2.weight, conv2.bias)
    device = check_same_device(src=src, hyper_in=hyper_in, output_upscaling=conv1.weight)
    backend = resolve_backend(backend, device, has_cpu=False)
    if torch.is_autocast_enabled(device.type):  # like the ConvTranspose2d it replaces: autocast dtype out
        compute = torch.get_autocast_dtype(device.type)
        src, hyper_in = src.to(compute), hyper_in.to(compute)
    with torch.autocast(device.type, enabled=False):
        if backend == "torch" or hyper_in.numel() == 0:  # no image or no token: nothing to launch
            return mask_decoder_upscaling_torch(src, hyper_in, (height, width), params, norm.eps)
        return _upscaling_triton(src, hyper_in, height, width, params, norm.eps)


_MAX_PROMPTS_PER_LAUNCH = 65535


def _upscaling_triton(src, hyper_in, height, width, params, eps):
    from lens_fast.kernels.mask_decoder_upscaling import MaskDecoderUpscalingFunction

    conv1_w, conv1_b, norm_w, norm_b, conv2_w, conv2_b = params
    dim = conv1_w.shape[0]
    # Per-tap weights (4, C_in, C_out): w[2*di + dj] = weight[:, :, di, dj]; autograd maps the grads back.
    w1 = conv1_w.permute(2, 3, 0, 1).reshape(4, dim, dim // 4).contiguous()
    w2 = conv2_w.permute(2, 3, 0, 1).reshape(4, dim // 4, dim // 8).contiguous()
    weights = (w1, conv1_b.contiguous(), norm_w.contiguous(), norm_b.contiguous(), w2, conv2_b.contiguous())
    step = _MAX_PROMPTS_PER_LAUNCH  # the kernels put prompts on grid axis 1 (at most 65535 programs)
    chunks = [
        MaskDecoderUpscalingFunction.apply(
            src[start:start + step].contiguous(), hyper_in[start:start + step].contiguous(), *weights,
            height, width, float(eps),
        )
        for start in range(0, src.shape[0], step)
    ]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class FusedMaskDecoder(MaskDecoder):
    """A ``MaskDecoder`` whose upscaling + hypernetwork product run as :func:`mask_decoder_upscaling`.

    Made by :func:`fuse_mask_decoder` (which re-classes an existing decoder); same parameters and
    state_dict keys as ``MaskDecoder``. ``fused_backend`` is the ``backend`` passed to the op.
    """

    fused_backend: Optional[str] = None

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(masks (B, num_mask_tokens, 4h, 4w), iou_pred (B, num_mask_tokens)), as ``MaskDecoder``.

        ``image_embeddings``: (1, C, h, w) shared by the B prompts (SAM), or (B, C, h, w), one image
        per prompt (a batch of prompts on different images in one call).
        """
        prompts = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, prompts):
            raise ValueError(
                f"image_embeddings must have 1 or {prompts} (one per prompt) images, got {image_embeddings.shape[0]}"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse_prompt_embeddings), dim=1)
        # Every prompt reads its image embedding (plus its dense prompt) and the positional encoding.
        image = image_embeddings.expand(prompts, -1, -1, -1) + dense_prompt_embeddings
        image_pe = torch.repeat_interleave(image_pe, prompts, dim=0)
        height, width = image.shape[-2:]
        token_out, image_tokens = self.transformer(image, image_pe, tokens)
        mask_tokens_out = token_out[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        masks = mask_decoder_upscaling(
            image_tokens, hyper_in, (height, width), self.output_upscaling, backend=self.fused_backend
        )
        iou_pred = self.iou_prediction_head(token_out[:, 0, :])
        return masks, iou_pred


def fuse_mask_decoder(decoder: MaskDecoder, backend: Optional[str] = None) -> FusedMaskDecoder:
    """Fuse ``decoder``'s output_upscaling + hypernetwork product, **in place**; returns ``decoder``.

    The object becomes a :class:`FusedMaskDecoder` (still a ``MaskDecoder``): parameters, state_dict
    keys, ``forward`` and its outputs are unchanged, so checkpoints load either way and ``Sam`` /
    ``SamPredictor`` keep working. ``backend``: None (Triton for CUDA tensors, PyTorch for CPU
    tensors), "triton" (forced; Triton's interpreter on CPU tensors) or "torch". Calling it again
    only changes the backend. TypeError if ``decoder`` is not a MaskDecoder; ValueError for a
    transformer_dim not divisible by 8, an upscaling other than SAM's, or a backend it cannot run.
    """
    if not isinstance(decoder, MaskDecoder):
        raise TypeError(f"decoder must be a segment_anything MaskDecoder, got {type(decoder).__name__}")
    resolve_backend(backend, torch.device("cpu"), has_cpu=False)
    _check_output_upscaling(decoder.output_upscaling)
    if len(decoder.output_hypernetworks_mlps) != decoder.num_mask_tokens:
        raise ValueError(
            f"decoder has {len(decoder.output_hypernetworks_mlps)} hypernetwork MLPs for "
            f"{decoder.num_mask_tokens} mask tokens"
        )
    decoder.__class__ = FusedMaskDecoder
    decoder.fused_backend = backend
    return decoder
