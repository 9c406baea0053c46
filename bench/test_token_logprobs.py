"""token_logprobs: memory and time of the chunked op beside the naive path (and Liger's fused GRPO loss).

Qwen2.5-VL's vocabulary (151,936) with the hidden size scaled down from 2048 to 256 and 256 tokens
(8 rollouts x 32), fp32, so that a CPU step takes seconds: the logits ([256, 151936] fp32 = 148 MiB)
are what the op removes, and they scale with tokens x V, not with D. Each benchmark times forward +
backward (upstream gradient on the log-probs; grads of hidden and the LM-head weight) and records:
- ``peak_mib``: the process' peak resident memory during one step beyond what was resident before
  (Linux VmHWM reset through /proc/self/clear_refs: every byte touched, tensors, BLAS scratch and
  allocator slack included). The inputs and the previous step's gradients are resident before (the
  step drops and reallocates them), so the figure is what a step needs beyond its inputs and one set
  of gradients (the weight gradient alone is 148 MiB here);
- ``saved_mib``: tensors autograd keeps between forward and backward (saved_tensors_hooks).
GPU (skipped without CUDA): the real D = 2048, bf16, 8 x 768 tokens, ``torch.cuda`` peak memory.
Run: ``python -m pytest bench/test_token_logprobs.py --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch

from lens_fast import ops
from lens_fast.ops.token_logprobs import token_logprobs_torch

from bench_utils import cpu_peak_mib, cuda_peak_mib, synced

VOCAB = 151936
CPU_SHAPE = (8, 32, 256)  # sequences, tokens each, hidden size
GPU_SHAPE = (8, 768, 2048)


def make(shape, device, dtype):
    generator = torch.Generator().manual_seed(0)
    b, t, d = shape
    hidden = torch.randn(b, t, d, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(VOCAB, d, generator=generator) / d**0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, VOCAB, (b, t), generator=generator).to(device)
    upstream = torch.randn(b, t, generator=generator).to(device)
    return hidden, weight, target, upstream


def step_fn(impl, hidden, weight, target, upstream):
    """One forward + backward of ``impl``; grads are dropped before each step."""
    if impl == "liger_fused_linear_grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False, chunk_size=1)
        mask = torch.ones_like(target)

        def step():
            hidden.grad = weight.grad = None
            loss = loss_fn(hidden, weight, target, mask, upstream[:, 0])[0]
            loss.backward()
        return step

    def step():
        hidden.grad = weight.grad = None
        if impl == "naive":
            logp = token_logprobs_torch(hidden, weight, target)
        else:
            chunk = {"lean_chunk_default": None, "lean_chunk_64": 64}[impl]
            logp = ops.token_logprobs(hidden, weight, target, chunk_size=chunk)
        (logp * upstream).sum().backward()
    return step


def saved_mib(step) -> float:
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(total) / 2**20


CPU_IMPLS = ["naive", "lean_chunk_default", "lean_chunk_64", "liger_fused_linear_grpo"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_token_logprobs_cpu(benchmark, impl):
    if impl.startswith("liger"):
        pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, target, upstream = make(CPU_SHAPE, "cpu", torch.float32)
    step = step_fn(impl, hidden, weight, target, upstream)
    benchmark.group = f"token_logprobs cpu fwd+bwd {CPU_SHAPE[0]}x{CPU_SHAPE[1]} tokens D {CPU_SHAPE[2]} V {VOCAB} fp32"
    benchmark.extra_info["reference"] = impl == "naive"
    step()  # warm up (and allocate the gradients once)
    benchmark.extra_info["peak_mib"] = cpu_peak_mib(step)
    if not impl.startswith("liger"):  # Liger computes its gradients in forward: nothing comparable is saved
        benchmark.extra_info["saved_mib"] = saved_mib(step)
    benchmark.pedantic(step, rounds=1 if impl.startswith("liger") else 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["naive", "lean_chunk_default", "liger_fused_linear_grpo"])
def test_token_logprobs_cuda(benchmark, impl):
    if impl.startswith("liger"):
        pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, target, upstream = make(GPU_SHAPE, "cuda", torch.bfloat16)
    step = synced(step_fn(impl, hidden, weight, target, upstream), "cuda")
    benchmark.group = f"token_logprobs cuda fwd+bwd {GPU_SHAPE[0]}x{GPU_SHAPE[1]} tokens D {GPU_SHAPE[2]} V {VOCAB} bf16"
    benchmark.extra_info["reference"] = impl == "naive"
    step()
    benchmark.extra_info["peak_mib"] = cuda_peak_mib(step)
    benchmark(step)
