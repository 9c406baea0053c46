"""Referring-segmentation datasets: one sample type (``RefSample``), a synthetic set, RefCOCO family (refer
files or Hugging Face forms; ``build_ref_dataset(s)`` picks the reader from the CLIs' data options)."""
from lens_fast.data.build import REF_DATA, build_ref_dataset, build_ref_datasets
from lens_fast.data.hf import BadRowError, HfRefDataset
from lens_fast.data.refcoco import RefCocoDataset
from lens_fast.data.sample import ImageLoadError, RefBatch, RefSample, collate_samples, mask_to_box
from lens_fast.data.synthetic import SyntheticConfig, SyntheticRefDataset, predict_largest_object

__all__ = [
    "REF_DATA",
    "BadRowError",
    "HfRefDataset",
    "ImageLoadError",
    "RefBatch",
    "RefCocoDataset",
    "RefSample",
    "SyntheticConfig",
    "SyntheticRefDataset",
    "build_ref_dataset",
    "build_ref_datasets",
    "collate_samples",
    "mask_to_box",
    "predict_largest_object",
]
