"""One entry point from the CLIs' data options to RefCOCO-family datasets, whatever their form on disk."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from lens_fast.data.hf import HfRefDataset
from lens_fast.data.refcoco import SPLIT_BY, RefCocoDataset

REF_DATA = ("refcoco", "hf")  # refcoco: the refer files (refs(<split_by>).p + instances.json); hf: lens_fast.data.hf


def build_ref_dataset(
    data: str,
    data_root: Union[str, Path],
    dataset: str,
    split: str,
    mode: str = "eval",
    split_by: Optional[str] = None,
    image_root: Union[str, Path, None] = None,
    skip_bad_rows: bool = False,
) -> torch.utils.data.Dataset:
    """One split as a dataset of RefSample. ``data``: "refcoco" (``RefCocoDataset``) or "hf" (``HfRefDataset``:
    ``data_root`` a directory or a hub name, the form read from its columns). ``mode``: "eval" (one sample
    per sentence) or "train" (one per ref). ``split_by`` (refer files only) and ``skip_bad_rows`` (hf only)
    are refused where they mean nothing."""
    if dataset not in SPLIT_BY:
        raise ValueError(f"dataset must be one of {tuple(SPLIT_BY)}, got {dataset!r}")
    if data == "refcoco":
        if skip_bad_rows:
            raise ValueError("skip_bad_rows applies to data 'hf'; the refer files are read whole and checked up front")
        return RefCocoDataset(data_root, dataset, split, split_by=split_by, image_root=image_root, mode=mode)
    if data == "hf":
        if split_by not in (None, SPLIT_BY[dataset]):
            raise ValueError(f"split_by: the Hugging Face forms hold refer's {SPLIT_BY[dataset]} splits of {dataset}, "
                             f"got {split_by!r}")
        return HfRefDataset(data_root, dataset, split, image_root=image_root, mode=mode, skip_bad_rows=skip_bad_rows)
    raise ValueError(f"data must be one of {REF_DATA}, got {data!r}")


def build_ref_datasets(
    data: str,
    data_root: Union[str, Path],
    dataset: str,
    val_split: str = "val",
    split_by: Optional[str] = None,
    image_root: Union[str, Path, None] = None,
    skip_bad_rows: bool = False,
) -> Tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, val) for training: the "train" split in mode "train" (one sample per ref, a sentence drawn
    at random on each access) and ``val_split`` in mode "eval"; arguments as :func:`build_ref_dataset`."""
    kwargs = dict(split_by=split_by, image_root=image_root, skip_bad_rows=skip_bad_rows)
    return (build_ref_dataset(data, data_root, dataset, "train", mode="train", **kwargs),
            build_ref_dataset(data, data_root, dataset, val_split, mode="eval", **kwargs))
