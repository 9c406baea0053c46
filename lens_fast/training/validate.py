"""Held-out validation of a LensModel by the LISA protocol (greedy; gIoU, cIoU, box IoU), and a
detector of the collapse where the mask stops depending on the expression."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from lens_fast import ops
from lens_fast.data.synthetic import SyntheticRefDataset, describe
from lens_fast.metrics import ReferringMetrics
from lens_fast.model import LensModel


def _batches(indices: Sequence[int], size: int):
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


@torch.no_grad()
def validate(model: LensModel, dataset, *, size: int, batch_size: int, collapse_samples: int = 32) -> dict:
    """Metrics of greedy predictions on ``dataset[:size]``: ``mask_iou`` (gIoU), ``cIoU``, ``box_iou``,
    ``box_acc``, and for synthetic data ``expression_dependence``: 1 - mean IoU between the masks
    predicted for the true expression and for another object's expression on the same image (near 0:
    the mask ignores the expression)."""
    was_training = model.training
    model.eval()
    metrics = ReferringMetrics()
    indices = list(range(min(size, len(dataset))))
    own_masks: dict[int, torch.Tensor] = {}
    for chunk in _batches(indices, batch_size):
        samples = [dataset[i] for i in chunk]
        images = model.prepare_images([s.image for s in samples])
        texts, low_res, _, boxes = model.predict(images, [s.expression for s in samples])
        for j, sample in enumerate(samples):
            gt = torch.from_numpy(sample.mask)
            stats = model.segmenter.mask_stats(low_res[j : j + 1].cpu(), gt)
            metrics.update(stats)
            if chunk[j] < collapse_samples:
                own_masks[chunk[j]] = model.segmenter.masks(low_res[j].cpu(), gt.shape)
        present = torch.tensor([b is not None for b in boxes])
        pred = torch.tensor([b if b is not None else (0.0, 0.0, 0.0, 0.0) for b in boxes], dtype=torch.float32)
        metrics.update_boxes(pred, torch.from_numpy(np.stack([s.box for s in samples])), present=present)
    result = metrics.compute()
    out = {"mask_iou": result["gIoU"], "cIoU": result["cIoU"], "box_iou": result["box_IoU"], "box_acc": result["box_Acc@0.5"]}
    dependence = _expression_dependence(model, dataset, own_masks, batch_size)
    if dependence is not None:
        out["expression_dependence"] = dependence
    model.train(was_training)
    return out


def _expression_dependence(model: LensModel, dataset, own_masks: dict, batch_size: int) -> Optional[float]:
    if not isinstance(dataset, SyntheticRefDataset) or not own_masks:
        return None
    pairs = []
    for index in own_masks:
        scene = dataset.scene(index)
        others = [e for j in range(len(scene.objects)) if j != scene.target for e in describe(scene.objects, j)["attribute"]]
        if others:
            pairs.append((index, scene.image, others[0]))
    if not pairs:
        return None
    ious = []
    for chunk in _batches(pairs, batch_size):
        images = model.prepare_images([image for _, image, _ in chunk])
        _, low_res, _, _ = model.predict(images, [expression for _, _, expression in chunk])
        for j, (index, image, _) in enumerate(chunk):
            other = model.segmenter.masks(low_res[j].cpu(), image.shape[:2])
            ious.append(float(ops.mask_iou(other[None], own_masks[index])[0]))
    return 1.0 - float(np.mean(ious))
