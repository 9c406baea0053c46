"""The trainer's AdamW memory options (``lens_fast.training.optim``) beside torch AdamW: state memory and time.

Model: an MLP of 4.2 M fp32 parameters (1024 -> 2048 -> 1024, biases), one torch thread on CPU. Every entry
records in ``extra_info`` (printed with ``-s``) the optimizer's ``state_bytes_per_param`` (m and v, 8-bit
scales and maps; ``optim.state_bytes``), ``host_bytes_per_param`` (offload: the fp32 master and the fp32 host
gradient buffer) and ``grad_bytes_per_param`` (the full device gradient buffer: 0 with step in backward).

- ``optim step``: ``clip_grad_norm(optimizer, 1.0)`` + ``optimizer.step()`` on fixed gradients; torch AdamW
  (the trainer's CPU default, single-tensor) is the reference; also torch's fused CPU AdamW, bitsandbytes'
  AdamW8bit, and the offloaded ones (here the "device" is the CPU: the copies are host-to-host).
- ``optim train step``: forward + backward + clip + step of a batch of 64 rows, for the options whose work
  moves into backward (step in backward steps each parameter in its hook; with offload it streams the gradient
  into the host buffer and steps after backward, with clipping).
- ``optim step, FSDP2``: the same step on the MLP sharded by FSDP2 (``fully_shard``, a gloo world of one):
  torch AdamW on fp32 DTensor parameters (the trainer's ``--sharding fsdp`` default; reference) beside the
  offloaded AdamW on the local shards of bf16 ones (``--sharding fsdp --precision bf16 --optimizer-offload
  true``: the global norm's all-reduce, the shards' fp32 host masters). ``device_bytes_per_param``: what stays in the parameters' memory
  (weights, gradients, states) per parameter of the whole model, so / N for N processes.

Run: ``python -m pytest bench/test_optim.py --benchmark-only -s``. CPU only: on CUDA the offload's cost is
PCIe traffic, which no CPU run shows.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lens_fast.training.optim import LeanAdamW, build_adamw, clip_grad_norm, state_bytes

LR, WD = 1e-3, 0.01
ROUNDS = 25


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024))


STEP_OPTIONS = {
    "torch AdamW (reference)": None,
    "torch AdamW fused (CPU)": None,
    "8bit": dict(states="8bit"),
    "offload fp32": dict(offload=True),
    "offload 8bit": dict(states="8bit", offload=True),
}


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name.startswith("torch AdamW"):
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused="fused" in name)
    return build_adamw(model.parameters(), LR, WD, **STEP_OPTIONS[name])


def record_memory(benchmark, optimizer: torch.optim.Optimizer, model: nn.Module, gradient_buffer: bool) -> None:
    n = sum(p.numel() for p in model.parameters())
    benchmark.extra_info["params"] = n
    benchmark.extra_info["state_bytes_per_param"] = round(state_bytes(optimizer) / n, 3)
    host = [*optimizer.masters, *optimizer.host_grads] if isinstance(optimizer, LeanAdamW) else []
    benchmark.extra_info["host_bytes_per_param"] = sum(t.nbytes for t in host) / n
    benchmark.extra_info["grad_bytes_per_param"] = 4.0 if gradient_buffer else 0.0
    print(f"\n{benchmark.name}: states {state_bytes(optimizer) / n:.3f} B/param, host master + gradient "
          f"{benchmark.extra_info['host_bytes_per_param']:.0f} B/param, device gradient buffer "
          f"{benchmark.extra_info['grad_bytes_per_param']:.0f} B/param")


@pytest.mark.parametrize("name", list(STEP_OPTIONS))
def test_optimizer_step(benchmark, one_torch_thread, name):
    if "8bit" in name:
        pytest.importorskip("bitsandbytes")
    model = mlp()
    optimizer = make_optimizer(name, model)
    grads = [torch.randn_like(p) * 1e-2 for p in model.parameters()]

    def step():
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        clip_grad_norm(optimizer, 1.0)
        optimizer.step()

    step()  # states exist from here
    benchmark.group = "optim step: clip + AdamW of 4.2 M fp32 params, CPU 1 thread"
    benchmark.extra_info["reference"] = name == "torch AdamW (reference)"
    record_memory(benchmark, optimizer, model, gradient_buffer=True)
    benchmark.pedantic(step, rounds=ROUNDS)


TRAIN_OPTIONS = {
    "torch AdamW (reference)": dict(),
    "step in backward": dict(step_in_backward=True),
    "offload + step in backward": dict(offload=True, step_in_backward=True),
    "offload + step in backward, 8bit": dict(offload=True, step_in_backward=True, states="8bit"),
}


@pytest.mark.parametrize("name", list(TRAIN_OPTIONS))
def test_train_step(benchmark, one_torch_thread, name):
    options = TRAIN_OPTIONS[name]
    if options.get("states") == "8bit":
        pytest.importorskip("bitsandbytes")
    model = mlp()
    optimizer = build_adamw(model.parameters(), LR, WD, **options)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    clip = float("inf") if options.get("step_in_backward") and not options.get("offload") else 1.0

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        clip_grad_norm(optimizer, clip)
        optimizer.step()

    step()
    benchmark.group = "optim train step: fwd + bwd + clip + AdamW, 4.2 M fp32 params, 64 rows, CPU 1 thread"
    benchmark.extra_info["reference"] = name == "torch AdamW (reference)"
    record_memory(benchmark, optimizer, model, gradient_buffer=not options.get("step_in_backward"))
    benchmark.pedantic(step, rounds=ROUNDS)


SHARDED_OPTIONS = {  # the trainer's --sharding fsdp with fp32 weights (bf16-mixed), and with bf16 ones + offload
    "torch AdamW on FSDP2, fp32 weights (reference)": None,
    "offload fp32 on FSDP2, bf16 weights": dict(offload=True),
    "offload 8bit on FSDP2, bf16 weights": dict(offload=True, states="8bit"),
}


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo process group of one (FSDP2 needs a process group), destroyed after the module."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("name", list(SHARDED_OPTIONS))
def test_sharded_optimizer_step(benchmark, one_torch_thread, world_of_one, name):
    options = SHARDED_OPTIONS[name]
    if options and options.get("states") == "8bit":
        pytest.importorskip("bitsandbytes")
    model = mlp() if options is None else mlp().to(torch.bfloat16)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=world_of_one)
    fully_shard(model, mesh=world_of_one)
    params = list(model.parameters())
    if options is None:
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    else:
        optimizer = build_adamw(params, LR, WD, **options)
    grads = [torch.randn_like(p.to_local()) * 1e-2 for p in params]

    def step():
        for p, g in zip(params, grads):
            p.grad = torch.distributed.tensor.DTensor.from_local(g.clone(), world_of_one, p.placements)
        clip_grad_norm(optimizer, 1.0)
        optimizer.step()

    step()
    benchmark.group = "optim step, FSDP2: clip + AdamW of 4.2 M params sharded (1 gloo process), CPU 1 thread"
    benchmark.extra_info["reference"] = options is None
    n = sum(p.numel() for p in params)
    on_device = sum(p.to_local().nbytes + p.grad.to_local().nbytes for p in params)
    if not isinstance(optimizer, LeanAdamW):
        on_device += state_bytes(optimizer)
    benchmark.extra_info["device_bytes_per_param"] = round(on_device / n, 3)
    record_memory(benchmark, optimizer, model, gradient_buffer=True)
    print(f"{benchmark.name}: in the parameters' memory {on_device / n:.3f} B/param")
    benchmark.pedantic(step, rounds=ROUNDS)
