"""Triton kernels of ``lens_fast.ops.token_logprobs``: the row-wise part of a chunk of LM-head logits.

The LM-head matmul of a chunk of tokens runs in cuBLAS (``F.linear``, input dtype, fp32
accumulation); these kernels replace the float32 copies torch would make of that [C, V] chunk:

- ``logits_stats_kernel``: one program per token row; one pass over the vocabulary in BLOCK_V
  slices keeping a per-lane online log-sum-exp (running max, sum of exp, and for the entropy the sum
  of exp * x), x = logit / temperature in float32. Writes lse, the target's x and (WITH_ENTROPY) the
  entropy lse - sum(p * x).
- ``logits_grad_kernel``: turns the logits chunk in place into d loss / d logits:
  (g_logp * (onehot - p) - g_ent * p * (x - E[x])) / temperature, cast to the chunk's dtype (what
  autograd of the naive ``(h @ W.T).float() / T`` would hand to the matmul backward).

Kernels assume validated inputs: ``logits`` [C, V] with unit column stride, targets in [0, V),
finite logits. Under the interpreter everything is float32 (loads are cast before any arithmetic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lens_fast.kernels.jit import jit

_FAR = tl.constexpr(-1.0e30)  # start of the per-lane running max: finite, so exp(_FAR - m) = 0 without NaN


@jit
def logits_stats_kernel(
    logits_ptr, target_ptr, lse_ptr, target_x_ptr, entropy_ptr, n_vocab, stride_row, inv_temperature,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """lse [C], target_x [C] and (WITH_ENTROPY) entropy [C], float32, of x = logits * inv_temperature."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    run_max = tl.zeros((BLOCK_V,), dtype=tl.float32) + _FAR
    run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    run_dot = tl.zeros((BLOCK_V,), dtype=tl.float32)  # sum of exp(x - run_max) * x
    for start in range(0, n_vocab, BLOCK_V):
        ok = start + cols < n_vocab
        x = tl.load(base + start + cols, mask=ok, other=0.0).to(tl.float32) * inv_temperature
        x_ok = tl.where(ok, x, _FAR)
        new_max = tl.maximum(run_max, x_ok)
        rescale = tl.exp(run_max - new_max)
        e = tl.where(ok, tl.exp(x_ok - new_max), 0.0)
        run_sum = run_sum * rescale + e
        if WITH_ENTROPY:
            run_dot = run_dot * rescale + e * x
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.exp(run_max - row_max)
    total = tl.sum(run_sum * lane_scale, axis=0)
    lse = row_max + tl.log(total)
    tl.store(lse_ptr + row, lse)
    target = tl.load(target_ptr + row)
    tl.store(target_x_ptr + row, tl.load(base + target).to(tl.float32) * inv_temperature)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, lse - tl.sum(run_dot * lane_scale, axis=0) / total)


@jit
def logits_grad_kernel(
    logits_ptr, target_ptr, lse_ptr, mean_x_ptr, grad_logp_ptr, grad_entropy_ptr, n_vocab, stride_row,
    inv_temperature, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """logits [C, V] <- d loss / d logits in place; mean_x = E_p[x] = lse - entropy (WITH_ENTROPY)."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    grad_logp = tl.load(grad_logp_ptr + row)
    target = tl.load(target_ptr + row)
    if WITH_ENTROPY:
        mean_x = tl.load(mean_x_ptr + row)
        grad_entropy = tl.load(grad_entropy_ptr + row)
    for start in range(0, n_vocab, BLOCK_V):
        ok = start + cols < n_vocab
        x = tl.load(base + start + cols, mask=ok, other=0.0).to(tl.float32) * inv_temperature
        p = tl.exp(tl.where(ok, x - lse, float("-inf")))
        grad = tl.where(start + cols == target, grad_logp, 0.0) - grad_logp * p
        if WITH_ENTROPY:
            grad -= grad_entropy * p * (x - mean_x)
        tl.store(base + start + cols, (grad * inv_temperature).to(logits_ptr.dtype.element_ty), mask=ok)


def _block_v(logits: torch.Tensor) -> dict:
    """GPU: 4096-wide slices, 8 warps. Interpreter: the whole (small) row in one slice."""
    n_vocab = logits.shape[1]
    if logits.is_cuda:
        return dict(BLOCK_V=min(4096, triton.next_power_of_2(n_vocab)), num_warps=8)
    return dict(BLOCK_V=min(16384, triton.next_power_of_2(n_vocab)))


def logits_stats_triton(
    logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse, target_x, entropy or None), float32 [C], of ``logits`` [C, V] (unit column stride)."""
    rows = logits.shape[0]
    out = torch.empty(3 if with_entropy else 2, rows, dtype=torch.float32, device=logits.device)
    entropy = out[2] if with_entropy else out[0]  # unused pointer when not WITH_ENTROPY
    if rows:
        logits_stats_kernel[(rows,)](
            logits, targets, out[0], out[1], entropy, logits.shape[1], logits.stride(0), inv_temperature,
            WITH_ENTROPY=with_entropy, **_block_v(logits),
        )
    return out[0], out[1], (out[2] if with_entropy else None)


def logits_grad_triton(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mean_x: torch.Tensor | None,
    grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, inv_temperature: float,
) -> torch.Tensor:
    """``logits`` [C, V] overwritten with d loss / d logits (its dtype); returns it."""
    rows = logits.shape[0]
    with_entropy = grad_entropy is not None
    if rows:
        logits_grad_kernel[(rows,)](
            logits, targets, lse, mean_x if with_entropy else lse, grad_logp,
            grad_entropy if with_entropy else grad_logp, logits.shape[1], logits.stride(0), inv_temperature,
            WITH_ENTROPY=with_entropy, **_block_v(logits),
        )
    return logits
