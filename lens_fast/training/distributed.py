"""Data parallelism with PyTorch's own engine: ``torchrun --nproc_per_node N -m lens_fast.train``.

Each process takes its share of every batch's prompts (a batch of B prompts is split into N
contiguous slices of B / N; a group never spans processes), rewards are computed per process and
advantages from every process's rewards (:meth:`World.gather_rows`: ``scale_rewards=batch`` and
``normalize_then_sum`` use batch statistics, as TRL gathers them), gradients are averaged over
processes during backward, logged metrics are averaged, and validation is sharded across processes
(:meth:`World.gather_objects` collects its per-sample statistics). The process group's timeout (how
long one process waits for the others in a collective) is ``init_world``'s ``timeout_minutes``.
Two engines (``sharding``):

- ``ddp``: every process holds the whole model (``DistributedDataParallel``); process 0 writes
  checkpoints.
- ``fsdp``: FSDP2 (``fully_shard``) shards parameters, gradients and AdamW states across processes
  (:func:`shard_model`; a bf16 model's fp32 parameters, SAM's prompt encoder, stay whole on every
  process and their gradients are averaged by an all-reduce); calls outside the training forward (generation, validation) run inside
  :func:`gathered`, and every process writes its shard of each checkpoint.

Checkpoints resume at any process count (data positions and sampling seeds are global).
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

SHARDINGS = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, and its device."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int) -> tuple[int, int]:
        """(first prompt, count) of this process's slice of a global batch; ValueError unless it divides."""
        if batch_size % self.size:
            raise ValueError(f"batch size {batch_size} must be a multiple of the {self.size} processes")
        count = batch_size // self.size
        return self.rank * count, count

    def mean(self, values: dict) -> dict:
        """The float entries of ``values`` averaged over processes (others kept as they are)."""
        if self.size == 1:
            return values
        keys = sorted(k for k, v in values.items() if isinstance(v, float))
        stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked)
        return {**values, **dict(zip(keys, (stacked / self.size).tolist()))}

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (e.g. a stop signal seen by one)."""
        if self.size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(every process's ``rows`` concatenated in rank order, the index of this process's first row in it).

        ``rows``: [n, ...] of any dtype and device; n may differ between processes, the trailing shape and
        the dtype may not. The result has ``rows``' dtype and device. Collective: every process calls it (the
        transfer goes through the world's device: the GPU under NCCL). In a world of one: ``(rows, 0)``.
        """
        if not isinstance(rows, torch.Tensor) or rows.dim() < 1:
            raise TypeError(f"rows must be a tensor of at least one dimension, got {type(rows).__name__}"
                            + (f" of shape {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else ""))
        if self.size == 1:
            return rows, 0
        local = rows.to(self.device)
        counts = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.int64, device=self.device))
        sizes = [int(c.item()) for c in counts]
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        whole = torch.cat([part[:n] for part, n in zip(parts, sizes)])
        return whole.to(rows.device), sum(sizes[: self.rank])

    def gather_objects(self, value: Any) -> list:
        """Every process's picklable ``value``, in rank order (``torch.distributed.all_gather_object``: tensors
        inside travel pickled; keep them on the CPU). Collective; ``[value]`` in a world of one."""
        if self.size == 1:
            return [value]
        values: list = [None] * self.size
        dist.all_gather_object(values, value)
        return values


def init_world(device: str, sharding: str = "ddp", timeout_minutes: float = 30.0) -> World:
    """Join the process group torchrun set up (WORLD_SIZE > 1: gloo on CPU, nccl on CUDA), or a world of
    one (with ``sharding="fsdp"``, a process group of one: FSDP2 needs one). ``timeout_minutes``: how long a
    collective waits for the slowest process before the run fails (torch's defaults: 10 for NCCL, 30 for
    gloo); it must cover the longest work one process does while the others wait (checkpoint writing)."""
    if isinstance(timeout_minutes, bool) or not isinstance(timeout_minutes, (int, float)) or not timeout_minutes > 0:
        raise ValueError(f"timeout_minutes must be a number > 0, got {timeout_minutes!r}")
    timeout = timedelta(minutes=timeout_minutes)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    elif sharding == "fsdp" and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return World(rank, size, chosen)


def close_world(world: World) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(module: nn.Module, world: World) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel over the world (itself in a world of one). Wrap after
    choosing the trainable parameters: DDP reduces the gradients of those only."""
    if world.size == 1:
        return module
    ids: Optional[list[int]] = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_model` shards one by one: each decoder layer of the policy's language
    model and each block of its vision tower (called through their ``forward``, one chain: the vision
    tower feeds the language model). Everything else (embeddings and the tied LM head, norms, the
    vision merger, queries, connector, all of SAM) forms the root unit, gathered for the whole pass.
    SAM's encoder blocks are not units: they sit on a branch parallel to the policy, whose backward
    the autograd engine may interleave with the policy's in a different order on each process (their
    graphs differ with the images' sizes), and FSDP2's collectives must come in the same order."""
    policy = model.policy
    return [*policy.language_model.layers, *policy.visual.blocks]


def shard_model(model: nn.Module, world: World) -> nn.Module:
    """Shard ``model`` (a LensModel) in place with FSDP2 over the world's processes: every
    :func:`fsdp_units` module, then the root. Gradients are averaged over processes (reduce-scatter,
    mean: as DDP's all-reduce); parameters are all-gathered in their own dtype (fp32 under
    ``bf16-mixed``, autocast computes in bf16 as with DDP). Frozen parameters are sharded too and get
    no gradient. Parameters whose dtype differs from the model's weights (:func:`replicated_parameters`:
    a bf16 model keeps SAM's prompt encoder in fp32, and FSDP2 reduces one dtype per unit) are left
    whole on every process (FSDP2's ``ignored_params``); :func:`gradient_sync` averages their gradients.
    Call it once, before building an optimiser; trainable parts may change afterwards (``requires_grad_``
    on the sharded parameters)."""
    mesh = init_device_mesh(world.device.type, (world.size,))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(replicated_parameters(model)) or None)
    # Answer-prompted SAM (``prompts`` mode) is skipped on a process whose answers all lack a box: its
    # trainable SAM parameters then have no gradient there, and every process must reduce the same set.
    model.set_reduce_scatter_unused_params(model.config.mode == "prompts")
    fully_shard.state(model)._lazy_init()  # the root, before any unit's forward runs alone (gathered)
    return model


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` (a LensModel) whose dtype is not its weights' (the LM head's): those
    :func:`shard_model` leaves whole on every process (none unless the weights are bf16)."""
    dtype = model.policy.lm_head.weight.dtype
    return [p for p in model.parameters() if p.dtype != dtype]


def average_replicated_gradients(model: nn.Module) -> None:
    """Average over the processes the gradients of the trainable parameters FSDP2 left whole (not DTensors:
    :func:`replicated_parameters`), as its reduce-scatter averages the sharded ones (a process without a
    gradient adds zeros); a parameter without a gradient on every process keeps none. Collective; nothing
    in a world of one or without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if not params:
        return
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = torch.cat([has_grad, *[(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1)
                                  for p in params]])
    dist.all_reduce(flat)
    offset = len(params)
    for p, count in zip(params, flat[:len(params)].tolist()):
        if count > 0:
            p.grad = (flat[offset:offset + p.numel()].view(p.shape) / dist.get_world_size()).to(p.dtype)
        offset += p.numel()


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every parameter of an FSDP2-sharded ``model`` all-gathered for the block, for calls that do not
    go through its ``forward`` or whose number of unit calls differs between processes (generation
    stops when a process's completions have ended): inside, the units' hooks run no collective. Every
    process must enter it (the all-gathers are collective). On leaving, the parameters are sharded
    again and FSDP2's per-iteration state is reset: the forward order it recorded inside (validation
    shards and generation lengths differ by process) must not steer the next backward's prefetches, which have
    to match on every process. Enter it between steps only. A model that is not sharded: nothing
    happens."""
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        if unit is not model:
            unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            if unit is not model:
                unit.set_reshard_after_forward(True, recurse=False)
        if units:
            model.reset_iter_state()  # reshards every unit


def gradient_sync(module: nn.Module, enabled: bool) -> ContextManager:
    """A context for one backward of a step split into micro-batches: gradients are reduced across
    processes only when ``enabled`` (the step's last backward); the others accumulate locally (DDP's
    ``no_sync``; FSDP2's ``set_requires_gradient_sync``: unsharded gradients kept until the last pass)."""
    if isinstance(module, FSDPModule):
        return _fsdp_gradient_sync(module, enabled)
    if enabled or not isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


@contextmanager
def _fsdp_gradient_sync(module: FSDPModule, enabled: bool) -> Iterator[None]:
    module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
    if enabled:  # (not after an exception: the processes may not all get here)
        average_replicated_gradients(module)
