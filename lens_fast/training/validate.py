"""Held-out validation of a LensModel by the LISA protocol (greedy; gIoU, cIoU, box IoU), and a
detector of the collapse where the mask stops depending on the expression.

Under data parallelism every process validates a share of the batches (batch k of ``batch_size``
samples on process k mod N) and the per-sample statistics are gathered, so each process gets the
figures one process would compute: every batch holds the same samples as in a one-process run, and
the statistics are added up in sample order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from lens_fast import ops
from lens_fast.data.synthetic import SyntheticRefDataset, describe
from lens_fast.metrics import ReferringMetrics
from lens_fast.model import LensModel
from lens_fast.training.distributed import World


class _BatchResult(NamedTuple):
    """One validation batch's per-sample results (CPU tensors): mask statistics, one per sample; predicted
    boxes float32 [b, 4] (zeros where ``present`` is False) and ground-truth boxes [b, 4]; the masks
    predicted for the samples below ``collapse_samples`` (index -> bool [H, W])."""

    stats: list
    pred_boxes: torch.Tensor
    present: torch.Tensor
    gt_boxes: torch.Tensor
    own_masks: dict


def _batches(items: Sequence, size: int) -> list:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _mine(batches: list, world: Optional[World]) -> list[tuple[int, object]]:
    """(batch number, batch) of this process's share: batch k on process k mod N."""
    rank, size = (0, 1) if world is None else (world.rank, world.size)
    return [(k, batch) for k, batch in enumerate(batches) if k % size == rank]


def _gathered(local: dict, world: Optional[World]) -> list:
    """Every process's ``{batch number: result}`` merged, as a list in batch order."""
    merged: dict = {}
    for part in ([local] if world is None else world.gather_objects(local)):
        merged.update(part)
    return [merged[k] for k in sorted(merged)]


@torch.no_grad()
def validate(model: LensModel, dataset, *, size: int, batch_size: int, collapse_samples: int = 32,
             world: Optional[World] = None) -> dict:
    """Metrics (floats) of greedy predictions on ``dataset[:size]``: ``mask_iou`` (gIoU), ``cIoU``,
    ``box_iou``, ``box_acc``, and for synthetic data ``expression_dependence``: 1 - mean IoU between the
    masks predicted for the true expression and for another object's expression on the same image, over
    the first ``collapse_samples`` samples (near 0: the mask ignores the expression).

    ``world``: under data parallelism every process of ``world`` calls it (collective) and validates its
    share of the batches; every process returns the whole set's figures, equal to one process's. The
    model must be whole on every process: a DDP process's module, or an FSDP2-sharded model inside
    :func:`lens_fast.training.distributed.gathered`. Without ``world``: this process validates alone.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        batches = _batches(list(range(min(size, len(dataset)))), batch_size)
        collapse = collapse_samples if isinstance(dataset, SyntheticRefDataset) else 0  # (synthetic scenes only)
        local = {k: _predict_batch(model, dataset, chunk, collapse) for k, chunk in _mine(batches, world)}
        results = _gathered(local, world)
        metrics = ReferringMetrics()
        own_masks: dict[int, torch.Tensor] = {}
        for result in results:
            for stats in result.stats:
                metrics.update(stats)
            metrics.update_boxes(result.pred_boxes, result.gt_boxes, present=result.present)
            own_masks.update(result.own_masks)
        figures = metrics.compute()
        out = {"mask_iou": figures["gIoU"], "cIoU": figures["cIoU"], "box_iou": figures["box_IoU"],
               "box_acc": figures["box_Acc@0.5"]}
        dependence = _expression_dependence(model, dataset, own_masks, batch_size, world)
        if dependence is not None:
            out["expression_dependence"] = dependence
    finally:
        model.train(was_training)
    return out


def _predict_batch(model: LensModel, dataset, chunk: Sequence[int], collapse_samples: int) -> _BatchResult:
    samples = [dataset[i] for i in chunk]
    images = model.prepare_images([s.image for s in samples])
    _, low_res, _, boxes = model.predict(images, [s.expression for s in samples])
    stats, own_masks = [], {}
    for j, (index, sample) in enumerate(zip(chunk, samples)):
        gt = torch.from_numpy(sample.mask)
        stats.append(model.segmenter.mask_stats(low_res[j : j + 1].cpu(), gt))
        if index < collapse_samples:
            own_masks[index] = model.segmenter.masks(low_res[j].cpu(), gt.shape)
    present = torch.tensor([b is not None for b in boxes])
    pred = torch.tensor([b if b is not None else (0.0, 0.0, 0.0, 0.0) for b in boxes], dtype=torch.float32)
    return _BatchResult(stats, pred, present, torch.from_numpy(np.stack([s.box for s in samples])), own_masks)


def _expression_dependence(model: LensModel, dataset, own_masks: dict, batch_size: int,
                           world: Optional[World]) -> Optional[float]:
    """1 - mean IoU of the masks for another object's expression against ``own_masks`` (sample index ->
    the mask for its own expression, every process's), the pairs batched as one process would."""
    if not isinstance(dataset, SyntheticRefDataset) or not own_masks:
        return None
    pairs = []
    for index in sorted(own_masks):
        scene = dataset.scene(index)
        others = [e for j in range(len(scene.objects)) if j != scene.target for e in describe(scene.objects, j)["attribute"]]
        if others:
            pairs.append((index, scene.image, others[0]))
    if not pairs:
        return None
    local = {}
    for k, chunk in _mine(_batches(pairs, batch_size), world):
        images = model.prepare_images([image for _, image, _ in chunk])
        _, low_res, _, _ = model.predict(images, [expression for _, _, expression in chunk])
        local[k] = [float(ops.mask_iou(model.segmenter.masks(low_res[j].cpu(), image.shape[:2])[None], own_masks[index])[0])
                    for j, (index, image, _) in enumerate(chunk)]
    ious = [iou for chunk in _gathered(local, world) for iou in chunk]
    return 1.0 - float(np.mean(ious))
