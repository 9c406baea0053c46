"""RefCOCO, RefCOCO+ and RefCOCOg from the standard ``refer`` files.

Layout (the one LISA and LENS use)::

    <data_root>/<dataset>/refs(<split_by>).p    refs: image_id, ann_id, split, sentences [{sent_id, sent}]
    <data_root>/<dataset>/instances.json        COCO images (file_name, height, width) and annotations
    <image_root>/COCO_train2014_<id>.jpg        default image_root: <data_root>/images/mscoco/images/train2014

``split_by`` defaults to "unc" for refcoco and refcoco+ (splits train, val, testA, testB) and "umd"
for refcocog (train, val, test). Masks are decoded from the annotations' polygons or RLE with
:mod:`lens_fast.rle`; boxes are the annotations' ``bbox`` as xyxy.

``mode="eval"`` yields one sample per sentence (the LISA protocol; ``sent_id`` keys predictions),
``mode="train"`` one per ref with a sentence drawn at random (torch's RNG, so every DataLoader worker
draws differently) on each access.
"""
from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from lens_fast import rle
from lens_fast.data.sample import ImageLoadError, RefSample

SPLIT_BY: Dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
MODES = ("eval", "train")
IMAGE_SUBDIR = Path("images", "mscoco", "images", "train2014")
_IMAGE_CACHE = 4
_MASK_CACHE = 64


def default_image_root(data_root: Union[str, Path]) -> Path:
    """Where the COCO train2014 images live by default: ``<data_root>/images/mscoco/images/train2014``."""
    return Path(data_root) / IMAGE_SUBDIR


def expected_layout(data_root: Union[str, Path], dataset: str, split_by: str, image_root: Union[str, Path]) -> str:
    """The file layout the loader reads, spelled out for error messages."""
    root = Path(data_root)
    return (
        "expected the standard refer layout:\n"
        f"  {root / dataset / f'refs({split_by}).p'}\n"
        f"  {root / dataset / 'instances.json'}\n"
        f"  {Path(image_root) / 'COCO_train2014_<12-digit id>.jpg'}  (MS-COCO train2014; the image root is settable)"
    )


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers only: a refs file never needs code to load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refs pickles hold plain data (lists, dicts, strings, numbers); refusing to load {module}.{name}"
        )


def load_refs(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The list of refs in a ``refs(<split_by>).p`` file (Python 2 pickles read as latin-1 strings)."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            refs = _PlainDataUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise ValueError(f"{path} is not a refs pickle: {error}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path} must hold a list of ref dicts, got {type(refs).__name__}")
    return refs


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """bool [H, W] mask of a COCO ``segmentation``: polygons, uncompressed or compressed RLE.

    Several polygons (or RLEs) are one object: their union. An empty list is an empty mask.
    """
    if isinstance(segmentation, list) and len(segmentation) == 0:
        return np.zeros((height, width), dtype=bool)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        encoded = segmentation
    else:
        encoded = rle.frPyObjects(segmentation, height, width)
    if isinstance(encoded, list):
        encoded = rle.merge(encoded)
    mask = rle.decode(encoded)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation decodes to {mask.shape}, its image is {(height, width)}")
    return mask.astype(bool)


def read_image(
    path: Union[str, Path, BinaryIO], height: Optional[int] = None, width: Optional[int] = None, name: Optional[str] = None
) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of ``path`` (a file, or a file object of encoded bytes); ImageLoadError if
    missing, unreadable or not H x W, naming the image as ``name`` (default: the path)."""
    name = str(path) if name is None else name
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"cannot read image {name}: {error}") from None
    if height is not None and width is not None and pixels.shape[:2] != (height, width):
        raise ImageLoadError(
            f"image {name} is {pixels.shape[0]}x{pixels.shape[1]} (HxW); its annotation says {height}x{width}"
        )
    return pixels


def coco_box(bbox: Sequence[float]) -> np.ndarray:
    """float32 [4] xyxy pixels of a COCO ``bbox`` [x, y, w, h]."""
    x, y, w, h = (float(v) for v in bbox)
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def sentence_text(sentence: Dict[str, Any]) -> str:
    """The expression of a refer sentence dict: its tokenised ``sent`` (else ``raw``), stripped."""
    return str(sentence.get("sent", sentence.get("raw", ""))).strip()


def _cached(cache: "OrderedDict[Any, Any]", key: Any, size: int, make: Callable[[], Any]) -> Any:
    """``cache[key]``, computed by ``make`` on a miss; keeps the ``size`` most recent entries."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    cache[key] = value
    if len(cache) > size:
        cache.popitem(last=False)
    return value


class RefCocoDataset(torch.utils.data.Dataset):
    """One split of refcoco / refcoco+ / refcocog; ``dataset[i]`` is a RefSample (see module docstring).

    ``target(i)`` is the same sample without its image (no image I/O); ``__getitem__`` raises
    ImageLoadError for a missing or corrupt image, naming the file.
    """

    def __init__(
        self,
        data_root: Union[str, Path],
        dataset: str = "refcoco",
        split: str = "val",
        split_by: Optional[str] = None,
        image_root: Union[str, Path, None] = None,
        mode: str = "eval",
    ) -> None:
        if dataset not in SPLIT_BY:
            raise ValueError(f"dataset must be one of {tuple(SPLIT_BY)}, got {dataset!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.data_root = Path(data_root)
        self.dataset = dataset
        self.split = split
        self.split_by = split_by or SPLIT_BY[dataset]
        self.image_root = Path(image_root) if image_root is not None else default_image_root(data_root)
        self.mode = mode
        layout = expected_layout(self.data_root, dataset, self.split_by, self.image_root)
        refs_path = self.data_root / dataset / f"refs({self.split_by}).p"
        instances_path = self.data_root / dataset / "instances.json"
        for what, path in (("refs file", refs_path), ("instances file", instances_path)):
            if not path.is_file():
                raise FileNotFoundError(f"{what} not found: {path}\n{layout}")
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image root not found: {self.image_root}\n{layout}")

        refs = load_refs(refs_path)
        self.refs = [r for r in refs if r.get("split") == split]
        if not self.refs:
            present = sorted({str(r.get("split")) for r in refs})
            raise ValueError(f"split {split!r} has no refs in {refs_path}; its splits are {present}")
        try:
            with instances_path.open("r", encoding="utf-8") as f:
                instances = json.load(f)
            self.images = {im["id"]: im for im in instances["images"]}
            wanted = {r["ann_id"] for r in self.refs}
            self.annotations = {a["id"]: a for a in instances["annotations"] if a["id"] in wanted}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{instances_path} is not a COCO instances file: {error!r}") from None
        for r in self.refs:
            if r["ann_id"] not in self.annotations or r["image_id"] not in self.images:
                raise ValueError(
                    f"ref {r.get('ref_id')} names ann_id {r['ann_id']} / image_id {r['image_id']}, "
                    f"which {instances_path} lacks"
                )
        if mode == "eval":
            self._items: List[Tuple[int, int]] = [
                (k, s) for k, r in enumerate(self.refs) for s in range(len(r["sentences"]))
            ]
        else:
            self._items = [(k, -1) for k, r in enumerate(self.refs) if r["sentences"]]
        self._image_cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._mask_cache: "OrderedDict[int, np.ndarray]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def sent_ids(self) -> List[int]:
        """The sent_id of every sample, in order (eval mode: each sentence is one sample)."""
        if self.mode != "eval":
            raise ValueError("sent_ids name samples in mode='eval' only; mode='train' draws sentences at random")
        return [int(self.refs[k]["sentences"][s]["sent_id"]) for k, s in self._items]

    def image_path(self, index: int) -> Path:
        ref = self.refs[self._items[index][0]]
        return self.image_root / self.images[ref["image_id"]]["file_name"]

    def _mask(self, ann_id: int, height: int, width: int) -> np.ndarray:
        segmentation = self.annotations[ann_id]["segmentation"]
        return _cached(self._mask_cache, ann_id, _MASK_CACHE, lambda: annotation_mask(segmentation, height, width))

    def target(self, index: int) -> RefSample:
        """Sample ``index`` without its image: expression, mask, box and ids."""
        ref_index, sent_index = self._items[index]
        ref = self.refs[ref_index]
        if sent_index < 0:
            sent_index = int(torch.randint(len(ref["sentences"]), ()).item())
        sentence = ref["sentences"][sent_index]
        info = self.images[ref["image_id"]]
        ann = self.annotations[ref["ann_id"]]
        return RefSample(
            image=None,
            expression=sentence_text(sentence),
            mask=self._mask(ref["ann_id"], int(info["height"]), int(info["width"])).copy(),
            box=coco_box(ann["bbox"]),
            sent_id=int(sentence["sent_id"]),
            ref_id=int(ref["ref_id"]),
            image_id=int(ref["image_id"]),
            file_name=str(info["file_name"]),
        )

    def load_image(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] pixels of sample ``index``'s image; ImageLoadError if unusable."""
        ref = self.refs[self._items[index][0]]
        info = self.images[ref["image_id"]]
        path = self.image_path(index)
        pixels = _cached(
            self._image_cache,
            ref["image_id"],
            _IMAGE_CACHE,
            lambda: read_image(path, int(info["height"]), int(info["width"])),
        )
        return pixels.copy()

    def __getitem__(self, index: int) -> RefSample:
        sample = self.target(index)
        sample.image = self.load_image(index)
        return sample
