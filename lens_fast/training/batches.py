"""Training batches read in order from a dataset and prepared for the model one batch ahead, on a
background thread, so that scene generation and image preprocessing overlap the step."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
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
