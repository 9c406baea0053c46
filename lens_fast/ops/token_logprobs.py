"""``token_logprobs``: log-probs of chosen tokens from hidden states, never holding the [N, V] logits.

GRPO needs ``log_softmax(hidden @ W.T / T)[target]`` for every completion token (and optionally the
entropy). The naive path materialises the logits of every token: 8 rollouts x 768 tokens x 151,936
x 4 bytes = 3.7 GB, plus as much again for the softmax in backward. Here the tokens run in chunks:
one chunk's logits exist at a time, in forward (log-sum-exp, the target gathered inside the chunk)
and again in backward (recomputed from the saved ``hidden`` and ``weight``, turned into
d loss / d logits and multiplied straight into the gradients of ``hidden``, ``weight`` and ``bias``).
Memory beyond the inputs and gradients: one chunk of logits (and float32 work space of it on the
"cpu" path); compute: one extra LM-head matmul (the recompute), as in Liger's and Apple's
fused-linear losses.

Numerics, every backend: the matmul runs in the inputs' dtype (``F.linear``: fp32 accumulation
inside, the result rounded to bf16/fp16 for half inputs, exactly as the naive path's logits are), then
x = logits.float() / temperature and everything after it is float32. Gradients reach the matmuls in
the weight's dtype, as autograd of the naive path hands them. The weight gradient is accumulated over
chunks in the weight's dtype (one rounding per chunk for bf16; fp32 stays fp32).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Union

import torch
import torch.nn.functional as F

from lens_fast._backend import as_tensor, check_same_device, device_guard, resolve_backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
CHUNK_ELEMENTS = 2**25  # default chunk: about this many logits (128 MiB in fp32)


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk when ``chunk_size`` is None: ~2**25 logits (220 tokens for Qwen's 151,936)."""
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


def token_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """The naive reference: full logits, ``log_softmax(F.linear(h, W, b).float() / T).gather(target)``."""
    x = F.linear(hidden, weight, bias).float() / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def _chunk_stats_torch(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """(lse, target x, entropy or None) of a chunk; overwrites ``logits`` (a fresh F.linear output)."""
    x = logits.float()  # ``logits`` itself when float32: one [C, V] buffer, updated in place
    x.div_(temperature)
    target_x = x.gather(1, targets.unsqueeze(1)).squeeze(1)
    row_max = x.amax(1, keepdim=True)
    x.sub_(row_max)
    entropy = None
    if with_entropy:
        e = x.exp()
        total = e.sum(1)
        entropy = total.log() - (e.mul_(x)).sum(1) / total  # lse - E[x], both shifted by the row max
    else:
        total = x.exp_().sum(1)
    return row_max.squeeze(1) + total.log(), target_x, entropy


def _chunk_grad_torch(logits, targets, lse, mean_x, grad_logp, grad_entropy, temperature):
    """d loss / d logits of a chunk in the logits' dtype (float32 math); overwrites ``logits``."""
    x = logits.float()
    x.div_(temperature)
    if grad_entropy is None:
        grad = x.sub_(lse.unsqueeze(1)).exp_().mul_(grad_logp.neg().unsqueeze(1))
    else:
        p = (x - lse.unsqueeze(1)).exp_()
        # -g_logp p - g_ent p (x - E[x])
        grad = x.sub_(mean_x.unsqueeze(1)).mul_(grad_entropy.neg().unsqueeze(1)).sub_(grad_logp.unsqueeze(1)).mul_(p)
        del p
    grad.scatter_add_(1, targets.unsqueeze(1), grad_logp.unsqueeze(1))
    return grad.div_(temperature).to(logits.dtype)


class _TokenLogprobs(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] or None, targets int64 [N] -> (logp [N], entropy [N] or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, with_entropy, use_triton):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = F.linear(hidden[start:stop], weight, bias)
            if use_triton:
                from lens_fast.kernels.token_logprobs import logits_stats_triton

                with device_guard(logits.device):
                    c_lse, c_target, c_entropy = logits_stats_triton(
                        logits, targets[start:stop], 1.0 / temperature, with_entropy
                    )
            else:
                c_lse, c_target, c_entropy = _chunk_stats_torch(logits, targets[start:stop], temperature, with_entropy)
            del logits
            lse[start:stop] = c_lse
            logp[start:stop] = c_target - c_lse
            if with_entropy:
                entropy[start:stop] = c_entropy
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy, ctx.use_triton = temperature, chunk, with_entropy, use_triton
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        if grad_logp is None:
            grad_logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        grad_logp = grad_logp.float().contiguous()
        with_entropy = ctx.with_entropy and grad_entropy is not None
        mean_x = None
        if with_entropy:
            grad_entropy = grad_entropy.float().contiguous()
            mean_x = lse - entropy  # E_p[x]
        else:
            grad_entropy = None
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            rows = slice(start, stop)
            h = hidden[rows]
            logits = F.linear(h, weight, bias)
            args = (targets[rows], lse[rows], None if mean_x is None else mean_x[rows], grad_logp[rows],
                    None if grad_entropy is None else grad_entropy[rows])
            if ctx.use_triton:
                from lens_fast.kernels.token_logprobs import logits_grad_triton

                with device_guard(logits.device):
                    grad = logits_grad_triton(logits, *args, 1.0 / temperature)
            else:
                grad = _chunk_grad_torch(logits, *args, temperature)
            del logits
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[rows])
            if need_weight:
                grad_weight.addmm_(grad.t(), h)
            if need_bias:
                grad_bias += grad.sum(0, dtype=torch.float32)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive real number, got {type(temperature).__name__}")
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return value


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    return_entropy: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs ``log_softmax((hidden @ W.T + b) / T)[target]`` of the chosen tokens, chunked over tokens.

    ``hidden``: [..., D] float32/float16/bfloat16 hidden states (only the completion tokens: the LM
    head never needs to run on prompt or image tokens); ``lm_head_weight``: [V, D] of the same dtype
    (``model.lm_head.weight``); ``target_ids``: integer [...] in [0, V); ``bias``: optional [V];
    ``temperature``: the sampling temperature the logits are divided by (TRL's convention).
    ``chunk_size``: tokens per chunk (None: about 2**25 logits per chunk, 220 tokens at V = 151,936).
    ``return_entropy``: also return the entropy of each token's distribution (same pass, with its
    gradient). Returns float32 [...] (and entropy float32 [...]), differentiable w.r.t. ``hidden``,
    ``lm_head_weight`` and ``bias``.

    ``backend``: None = "triton" for CUDA tensors (cuBLAS matmul per chunk + Triton log-sum-exp /
    gradient kernels), "cpu" for CPU tensors (the same chunking, torch for the row-wise part);
    "triton" on CPU tensors runs the kernels under Triton's interpreter; "torch" is the naive
    reference that materialises all logits.
    """
    hidden = as_tensor("hidden", hidden)
    weight = as_tensor("lm_head_weight", lm_head_weight)
    target_ids = as_tensor("target_ids", target_ids)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32/float16/bfloat16, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must be [..., D] with D >= 1, got shape {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"lm_head_weight must be [V, D] with D = {hidden.shape[-1]} (hidden's last dim) and V >= 1, "
            f"got shape {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if bias is not None:
        bias = as_tensor("bias", bias)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must be [V] = ({vocab},), got shape {tuple(bias.shape)}")
    if target_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if tuple(target_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target_ids must be [...] = {tuple(hidden.shape[:-1])} (hidden's leading dims), "
            f"got shape {tuple(target_ids.shape)}"
        )
    devices = dict(hidden=hidden, lm_head_weight=weight, target_ids=target_ids)
    if bias is not None:
        devices["bias"] = bias
    device = check_same_device(**devices)
    temperature = _check_temperature(temperature)
    if chunk_size is not None:
        if isinstance(chunk_size, bool):
            raise TypeError("chunk_size must be a positive int or None, got bool")
        try:
            chunk_size = operator.index(chunk_size)
        except TypeError:
            raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}") from None
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if target_ids.numel() and device.type != "meta":
        low, high = target_ids.min().item(), target_ids.max().item()
        if low < 0 or high >= vocab:
            raise ValueError(f"target_ids must lie in [0, V) = [0, {vocab}), got values in [{low}, {high}]")
    backend = resolve_backend(backend, device)
    if backend == "torch":
        return token_logprobs_torch(hidden, weight, target_ids, bias, temperature, return_entropy)

    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = target_ids.reshape(-1).long().contiguous()
    chunk = chunk_size if chunk_size is not None else default_chunk_size(vocab)
    logp, entropy = _TokenLogprobs.apply(
        flat, weight, bias, targets, temperature, chunk, bool(return_entropy), backend == "triton"
    )
    if return_entropy:
        return logp.reshape(lead), entropy.reshape(lead)
    return logp.reshape(lead)
