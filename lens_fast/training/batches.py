"""Training batches read in order from a dataset and prepared for the model one batch ahead, on a
background thread, so that scene generation and image preprocessing overlap the step."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from lens_fast.data import RefSample
from lens_fast.model import ImageBatch, LensModel
from lens_fast.training.distributed import World


class Batches:
    """``next(size)``: this process's share of samples ``position .. position + size - 1`` (modulo the
    dataset's length; see :meth:`World.share`) and their :class:`ImageBatch`. ``position`` is where the
    next global batch starts (saved in checkpoints, the same at any process count)."""

    def __init__(self, dataset, model: LensModel, position: int = 0, world: Optional[World] = None) -> None:
        self.dataset = dataset
        self.model = model
        self.position = position
        self.world = world
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._ahead: Optional[tuple[int, int, Future]] = None

    def _load(self, position: int, size: int) -> tuple[list[RefSample], ImageBatch]:
        first, count = self.world.share(size) if self.world is not None else (0, size)
        samples = [self.dataset[(position + first + i) % len(self.dataset)] for i in range(count)]
        return samples, self.model.prepare_images([s.image for s in samples])

    def next(self, size: int) -> tuple[list[RefSample], ImageBatch]:
        if self._ahead is not None and self._ahead[:2] == (self.position, size):
            batch = self._ahead[2].result()
        else:
            batch = self._load(self.position, size)
        self.position += size
        self._ahead = (self.position, size, self._pool.submit(self._load, self.position, size))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def sampling_generators(seed: int, step: int, first_prompt: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One torch generator per prompt, seeded by the prompt's place in the run (``first_prompt``: its
    global index in the data stream), so a prompt's samples are the same at any process count and
    after a resume."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + 7919 * step + first_prompt + i) for i in range(count)]


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward pass of a step: the rows ``rows`` (completion ``b * G + g`` answers prompt
    b), which answer the prompts ``prompts``; ``last``: the step's last pass."""

    prompts: list[int]
    rows: slice
    last: bool
    whole_groups: bool  # every group of ``prompts`` lies in this pass (its advantages need no other pass)


def micro_batches(num_prompts: int, group: int, rows_per_pass: int) -> list[MicroBatch]:
    """The passes of a step over ``num_prompts * group`` rows, ``rows_per_pass`` rows each (0, or at
    least all the rows: one pass). ``rows_per_pass`` must be a multiple of ``group`` (whole groups per
    pass) or divide it (a group over several passes); ValueError otherwise."""
    rows = num_prompts * group
    if rows_per_pass <= 0 or rows_per_pass >= rows:
        return [MicroBatch(list(range(num_prompts)), slice(0, rows), True, True)]
    if rows_per_pass % group and group % rows_per_pass:
        raise ValueError(f"micro_batch {rows_per_pass} must be a multiple or a divisor of the group size {group}")
    passes = []
    for start in range(0, rows, rows_per_pass):
        stop = min(rows, start + rows_per_pass)
        passes.append(MicroBatch(list(range(start // group, (stop - 1) // group + 1)), slice(start, stop), stop == rows,
                                  rows_per_pass % group == 0))
    return passes
