"""Data parallelism with PyTorch's own engine: ``torchrun --nproc_per_node N -m lens_fast.train``.

Every process holds the whole model; each takes its share of every batch's prompts (a batch of B
prompts is split into N contiguous slices of B / N), rewards and advantages are computed per group
(a group never spans processes), gradients are averaged by ``DistributedDataParallel`` during
backward, logged metrics are averaged over processes, and process 0 validates and writes
checkpoints (which resume at any process count: data positions and sampling seeds are global).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn


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


def init_world(device: str) -> World:
    """Join the process group torchrun set up (WORLD_SIZE > 1: gloo on CPU, nccl on CUDA), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return World(rank, size, chosen)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(module: nn.Module, world: World) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel over the world (itself in a world of one). Wrap after
    choosing the trainable parameters: DDP reduces the gradients of those only."""
    if world.size == 1:
        return module
    ids: Optional[list[int]] = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def gradient_sync(module: nn.Module, enabled: bool) -> ContextManager:
    """A context for one backward of a step split into micro-batches: DDP reduces gradients only when
    ``enabled`` (the step's last backward); the others accumulate locally (``no_sync``)."""
    if enabled or not isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()
