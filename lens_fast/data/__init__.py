"""Referring-segmentation datasets: one sample type (``RefSample``), a synthetic set, RefCOCO family."""
from lens_fast.data.refcoco import RefCocoDataset
from lens_fast.data.sample import ImageLoadError, RefBatch, RefSample, collate_samples, mask_to_box
from lens_fast.data.synthetic import SyntheticConfig, SyntheticRefDataset, predict_largest_object

__all__ = [
    "ImageLoadError",
    "RefBatch",
    "RefCocoDataset",
    "RefSample",
    "SyntheticConfig",
    "SyntheticRefDataset",
    "collate_samples",
    "mask_to_box",
    "predict_largest_object",
]
