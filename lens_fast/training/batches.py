"""Training batches read in order from a dataset and prepared for the model one batch ahead, on a
background thread, so that scene generation and image preprocessing overlap the step."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

from lens_fast.data import RefSample
from lens_fast.model import ImageBatch, LensModel


class Batches:
    """``next(size)``: samples ``position .. position + size - 1`` (modulo the dataset's length) and
    their :class:`ImageBatch`. ``position`` is where the next batch starts (saved in checkpoints)."""

    def __init__(self, dataset, model: LensModel, position: int = 0) -> None:
        self.dataset = dataset
        self.model = model
        self.position = position
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._ahead: Optional[tuple[int, int, Future]] = None

    def _load(self, position: int, size: int) -> tuple[list[RefSample], ImageBatch]:
        samples = [self.dataset[(position + i) % len(self.dataset)] for i in range(size)]
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
