"""RefCOCO, RefCOCO+ and RefCOCOg in the Hugging Face ``datasets`` forms users have on disk.

Three published forms, told apart by their columns (``detect_form``):

- ``jxu124`` (``jxu124/refcoco``, ``jxu124/refcocoplus``, ``jxu124/refcocog``): one row per ref with the
  refer fields (``ref_id``, ``image_id``, ``split``, ``sentences`` [{raw, sent, sent_id, tokens}]) plus
  ``raw_anns`` (the COCO annotation as JSON: polygons or RLE, ``bbox`` xywh) and ``raw_image_info``
  (JSON: file_name, height, width); its ``bbox`` column is xyxy (the box is read from ``raw_anns``,
  as the refer reader reads it). No pixels: images come from a local COCO train2014 folder
  (``image_root``). Every split, train included; the samples equal the ``refer`` reader's sample for
  sample (sent_id, ref_id, image_id, mask, box, expression). Hub split names: ``validation`` holds
  val and, for refcoco / refcoco+, ``test`` holds testA; the rows' ``split`` column is checked.
- ``lmms`` (``lmms-lab/RefCOCO``, ``RefCOCOplus``, ``RefCOCOg``): evaluation rows with the image's
  bytes, ``answer`` (the ref's expressions), ``bbox`` xywh and ``segmentation`` as ONE flat polygon.
  An object the polygon cannot hold is excluded and counted, never scored with a wrong mask:
  ``not_polygon`` (crowd / RLE objects, an empty polygon) and ``multipart`` (the polygon's extent differs
  from the box by more than ``EXTENT_TOLERANCE`` px: a part of an object of several polygons). A form
  that joined the parts into one list would pass this check unseen; the rows hold no way to tell.
- ``segzero`` (Seg-Zero's evaluation parquet, e.g. ``Ricky06662/refcoco_testA``): one row per ref with
  the image's bytes, ``text`` (one expression), ``mask`` (a 2-D bool array), ``img_height``,
  ``img_width``, ``bbox`` (int xyxy pixels), ``image_id`` / ``ann_id`` as strings.

Sources (``open_source``): a directory written by ``save_to_disk`` (read memory-mapped), a directory of
parquet files (the hub's ``data/<split>-*.parquet`` or ``<split>/0000.parquet``; read one row group at
a time), or a hub name opened by ``datasets.load_dataset`` (its cache; it downloads what is missing).
Nothing is loaded whole: only
the light columns that index the samples are read up front; images are decoded in ``__getitem__``
(the trainer's data-loading thread).

Sample ids: ``jxu124`` keeps refer's ids. ``lmms`` and ``segzero`` rows carry no sentence id, so a
sample's ``sent_id`` is its position among the split's sentences (rows in order, a row's answers in
order; counted before any exclusion) and ``ref_id`` its row.

Bad rows (unparsable annotation JSON, a malformed polygon, an unreadable image, a mask of the wrong
shape) raise :class:`BadRowError` or ``ImageLoadError`` naming the row. Annotations are checked up front
where the columns are light (jxu124, lmms), so such a row stops the run before it starts; with
``skip_bad_rows`` those rows are left out and counted in ``excluded["bad_row"]``, and in
``mode="train"`` a row found bad later (its image, a Seg-Zero mask) is replaced by the next good one
and recorded in ``bad_rows``.
"""
from __future__ import annotations

import io
import json
import logging
import math
import re
import threading
from bisect import bisect_right
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from lens_fast.data.refcoco import MODES, _cached, annotation_mask, coco_box, read_image, sentence_text
from lens_fast.data.sample import ImageLoadError, RefSample, mask_to_box

FORM_COLUMNS: Dict[str, Tuple[str, ...]] = {
    "jxu124": ("ref_id", "image_id", "sentences", "raw_anns", "raw_image_info"),
    "lmms": ("image", "answer", "segmentation", "bbox"),
    "segzero": ("image", "text", "mask"),
}
SPLIT_ALIASES: Dict[str, Tuple[str, ...]] = {"val": ("validation",), "testA": ("test",)}
STANDARD_REFS: Dict[Tuple[str, str], int] = {  # refs per split of refer's unc (refcoco, refcoco+) / umd (refcocog)
    ("refcoco", "train"): 42404, ("refcoco", "val"): 3811, ("refcoco", "testA"): 1975, ("refcoco", "testB"): 1810,
    ("refcoco+", "train"): 42278, ("refcoco+", "val"): 3805, ("refcoco+", "testA"): 1975, ("refcoco+", "testB"): 1798,
    ("refcocog", "train"): 42226, ("refcocog", "val"): 2573, ("refcocog", "test"): 5023,
}
EXTENT_TOLERANCE = 1.0  # px between an lmms polygon's extent and its COCO box
DATA_EXTRA = "the Hugging Face forms need the 'data' extra: pip install -e \".[data]\" (datasets, pyarrow)"
_ROW_GROUP_CACHE = 2
_IMAGE_CACHE = 4
_MASK_CACHE = 64
log = logging.getLogger("lens_fast.data")


class BadRowError(ValueError):
    """A row whose annotation cannot give a sample (the message names the row and what is wrong)."""


def _require(module: str) -> Any:
    """Import ``module`` (datasets or pyarrow); ImportError naming the extra when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{DATA_EXTRA}; importing {module} failed: {error}") from None


class ArrowRows:
    """Random access to the rows of Arrow data without reading it whole: ``parts`` are pyarrow Tables
    (memory-mapped by ``datasets``) or ``(ParquetFile, row_group, file path, the group's first row in
    its file)``, read one at a time. ``where`` names the split in messages."""

    def __init__(self, parts: Sequence[Any], where: str) -> None:
        self.parts = list(parts)
        self.where = where
        sizes = [self._size(p) for p in self.parts]
        self.starts = np.cumsum([0] + sizes).tolist()
        first = self.parts[0] if self.parts else None
        schema = first[0].schema_arrow if isinstance(first, tuple) else getattr(first, "schema", None)
        self.column_names: List[str] = list(schema.names) if schema is not None else []
        self._cache: "OrderedDict[int, Any]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(part: Any) -> int:
        return part[0].metadata.row_group(part[1]).num_rows if isinstance(part, tuple) else part.num_rows

    @staticmethod
    def _read(part: Any, columns: Optional[List[str]] = None) -> Any:
        if isinstance(part, tuple):
            return part[0].read_row_group(part[1], columns=columns)
        return part if columns is None else part.select(columns)

    def __len__(self) -> int:
        return self.starts[-1]

    def columns(self, names: Sequence[str]) -> Dict[str, list]:
        """Python lists of the columns ``names`` over every row (read part by part, those columns only)."""
        out: Dict[str, list] = {n: [] for n in names}
        for part in self.parts:
            table = self._read(part, list(names))
            for n in names:
                out[n].extend(table.column(n).to_pylist())
        return out

    def row(self, index: int) -> Any:
        """Row ``index`` as a one-row pyarrow Table."""
        k = bisect_right(self.starts, index) - 1
        with self._lock:
            table = _cached(self._cache, k, _ROW_GROUP_CACHE, lambda: self._read(self.parts[k]))
        return table.slice(index - self.starts[k], 1)

    def describe(self, index: int) -> str:
        """"row <index> of <where>", plus the parquet file and the row within it."""
        k = bisect_right(self.starts, index) - 1
        part = self.parts[k]
        inside = f" ({Path(part[2]).name} row {part[3] + index - self.starts[k]})" if isinstance(part, tuple) else ""
        return f"row {index} of {self.where}{inside}"


def _parquet_split(path: Path) -> str:
    """The split a parquet file holds by the hub's naming: ``<split>-00000-of-00001[-hash].parquet``, or
    ``<split>/0000.parquet`` (the hub's parquet conversion)."""
    stem = path.name[: -len(".parquet")]
    return path.parent.name if stem.isdigit() else stem.split("-", 1)[0]


def _dataset_table(dataset: Any) -> Any:
    """The (memory-mapped) pyarrow Table behind a ``datasets.Dataset``, its indices applied."""
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    return dataset.data.table


def open_source(source: Union[str, Path]) -> Dict[str, ArrowRows]:
    """The splits of ``source`` by name: a ``save_to_disk`` directory, a directory of parquet files or a
    hub name in ``datasets``' cache (see module docstring). FileNotFoundError / ValueError with the reason."""
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = _require("datasets").load_from_disk(str(path))
            if not hasattr(loaded, "keys"):  # one Dataset: a single split, named by its rows
                return {"": ArrowRows([_dataset_table(loaded)], str(path))}
            return {name: ArrowRows([_dataset_table(d)], f"{path} [{name}]") for name, d in loaded.items()}
        pq = _require("pyarrow.parquet")
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"{path} holds no parquet files and no save_to_disk dataset (dataset_dict.json / state.json)"
            )
        groups: Dict[str, list] = {}
        for file in files:
            groups.setdefault(_parquet_split(file), []).append(file)
        splits = {}
        for name, members in groups.items():
            parts = []
            for file in members:
                handle = pq.ParquetFile(file)
                sizes = [handle.metadata.row_group(g).num_rows for g in range(handle.metadata.num_row_groups)]
                parts += [(handle, g, file, sum(sizes[:g])) for g in range(len(sizes))]
            splits[name] = ArrowRows(parts, f"{path} [{name}]")
        return splits
    if path.exists() or path.suffix == ".parquet":
        raise FileNotFoundError(f"{path} is not a directory of parquet files or a save_to_disk dataset")
    datasets = _require("datasets")
    try:
        loaded = datasets.load_dataset(str(source))
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        raise FileNotFoundError(
            f"{source!r} is neither a local directory nor a dataset datasets.load_dataset can open: {error}"
        ) from None
    return {name: ArrowRows([_dataset_table(d)], f"{source} [{name}]") for name, d in loaded.items()}


def detect_form(column_names: Sequence[str], where: str = "the data") -> str:
    """Which form (``FORM_COLUMNS``) rows with ``column_names`` are in; ValueError listing what each needs."""
    for form, needed in FORM_COLUMNS.items():
        if set(needed) <= set(column_names):
            return form
    wanted = "; ".join(f"{form}: {', '.join(cols)}" for form, cols in FORM_COLUMNS.items())
    raise ValueError(f"{where} has columns {sorted(column_names)}, none of the known forms ({wanted})")


def _choose_split(splits: Dict[str, ArrowRows], split: str) -> Tuple[str, ArrowRows]:
    """(name, rows) of the split that holds ``split``: its own name, then the hub's alias; else the only
    split of a one-split source (the caller decides whether its form allows that), else ("", None)."""
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if name in splits:
            return name, splits[name]
    if len(splits) == 1:
        return next(iter(splits.items()))
    return "", None


def _image_file(value: Any, name: str) -> Union[io.BytesIO, str]:
    """What to open for a ``datasets`` Image cell ({bytes, path}): its bytes, else its path when that file
    exists; ImageLoadError naming ``name`` otherwise."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, None)
    if isinstance(data, (bytes, bytearray)) and data:
        return io.BytesIO(data)
    if isinstance(path, str) and Path(path).is_file():
        return path
    raise ImageLoadError(f"cannot read image {name}: the row holds no image bytes (path {path!r})")


def _image_size(value: Any, name: str) -> Tuple[int, int]:
    """(height, width) from an Image cell's header, without decoding the pixels; BadRowError if unreadable."""
    try:
        with Image.open(_image_file(value, name)) as image:
            width, height = image.size
    except (OSError, ValueError) as error:
        raise BadRowError(f"{name}: its image header is unreadable ({error}), so its mask has no size") from None
    return height, width


def _numbers(values: Any, count: Optional[int] = None) -> bool:
    """Whether ``values`` is a list of finite numbers (of length ``count`` if given)."""
    return (isinstance(values, list) and (count is None or len(values) == count)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))


def polygon_error(polygon: Any) -> Optional[str]:
    """Why ``polygon`` is not a flat COCO polygon [x1, y1, x2, y2, ...] of >= 3 finite points, or None."""
    if not _numbers(polygon) or len(polygon) % 2 or len(polygon) < 6:
        size = len(polygon) if isinstance(polygon, list) else type(polygon).__name__
        return f"a polygon must be a flat list [x1, y1, x2, y2, ...] of >= 3 finite points, got {size}"
    return None


def segmentation_error(segmentation: Any, height: int, width: int) -> Optional[str]:
    """Why a COCO ``segmentation`` (a list of polygons, or an RLE {size, counts} of the image's size) cannot be
    decoded at ``height`` x ``width``, or None. Structure only: nothing is rasterised."""
    if isinstance(segmentation, list):
        return next((e for e in map(polygon_error, segmentation) if e), None)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = segmentation.get("size")
        return None if list(size or []) == [height, width] else f"RLE size {size} is not the image's [{height}, {width}]"
    return f"segmentation must be polygons or an RLE dict, got {type(segmentation).__name__}"


def lmms_problem(polygon: Any, bbox: Any, iscrowd: Any) -> Optional[str]:
    """Why an lmms row (one flat polygon, xywh ``bbox``) cannot be scored, or None: "bad: <why>" for
    malformed data; "not_polygon" (crowd / RLE objects: an empty polygon) and "multipart" (the polygon's
    extent differs from the box by more than ``EXTENT_TOLERANCE`` px: one part of several) for objects
    one polygon cannot hold."""
    if not _numbers(bbox, 4):
        return f"bad: bbox must be [x, y, w, h] finite numbers, got {str(bbox)[:60]}"
    if iscrowd or not polygon:
        return "not_polygon"
    error = polygon_error(polygon)
    if error:
        return f"bad: segmentation: {error}"
    x, y, w, h = bbox
    extent = (min(polygon[0::2]), min(polygon[1::2]), max(polygon[0::2]), max(polygon[1::2]))
    if max(abs(a - b) for a, b in zip(extent, (x, y, x + w, y + h))) > EXTENT_TOLERANCE:
        return "multipart"
    return None


class HfRefDataset(torch.utils.data.Dataset):
    """One split of refcoco / refcoco+ / refcocog in a Hugging Face form; ``dataset[i]`` is a RefSample.

    ``source``: see :func:`open_source`. ``image_root``: the COCO train2014 folder (``jxu124`` only).
    ``mode``: "eval" (one sample per sentence) or "train" (one per ref, a sentence drawn at random on each
    access, torch's RNG; ``jxu124`` only, the other forms hold one or no train split). ``target(i)``: the
    sample without its image. After construction: ``form``, ``source_split`` (the split read),
    ``excluded`` (rows left out, by reason), ``notes`` (what a report should say), ``bad_rows``.
    """

    def __init__(
        self,
        source: Union[str, Path],
        dataset: str = "refcoco",
        split: str = "val",
        image_root: Union[str, Path, None] = None,
        mode: str = "eval",
        skip_bad_rows: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.source, self.dataset, self.split, self.mode = str(source), dataset, split, mode
        self.skip_bad_rows = skip_bad_rows
        splits = open_source(source)
        self.source_split, rows = _choose_split(splits, split)
        some = rows if rows is not None else next(iter(splits.values()))
        self.form = detect_form(some.column_names, some.where)
        if mode == "train" and self.form != "jxu124":
            raise ValueError(f"{self.source} is in the {self.form} form, an evaluation set; train from the jxu124 "
                             "form (or the refer files)")
        if rows is None or (self.source_split not in ("", split, *SPLIT_ALIASES.get(split, ())) and self.form != "segzero"):
            raise ValueError(f"{self.source} has no split {split!r} (nor {list(SPLIT_ALIASES.get(split, ()))}); its "
                             f"splits are {sorted(splits)}")  # segzero: one repo per split, each named "test"
        self.rows = rows
        self.image_root = Path(image_root) if image_root is not None else None
        if self.form == "jxu124" and (self.image_root is None or not self.image_root.is_dir()):
            raise FileNotFoundError(f"the jxu124 form holds no pixels: image_root must be the COCO train2014 folder "
                                    f"(COCO_train2014_<12-digit id>.jpg), got {image_root!r}")
        self.excluded: Counter = Counter()
        self.notes: List[str] = []
        self.bad_rows: Dict[int, str] = {}
        self._items: List[Tuple[int, int, int]] = []  # (row, sentence index or -1, sent_id)
        self._texts: Dict[int, List[str]] = {}
        getattr(self, f"_index_{self.form}")()
        if not self._items:
            raise ValueError(f"{self.rows.where}: no usable samples for split {split!r} (excluded: {dict(self.excluded)})")
        expected = STANDARD_REFS.get((dataset, split))
        refs = len({r for r, _, _ in self._items}) + sum(self.excluded.values())
        if expected is not None and refs != expected:
            self.notes.append(f"{self.source} {split!r} has {refs} refs; refer's standard {dataset} {split} has "
                              f"{expected}: not the standard split, scores are not comparable to published ones")
        if self.bad_rows:
            row, reason = next(iter(self.bad_rows.items()))
            self.notes.append(f"{len(self.bad_rows)} bad row(s) left out (skip_bad_rows), e.g. {self._name(row)}: {reason}")
        self._image_cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._mask_cache: "OrderedDict[int, np.ndarray]" = OrderedDict()

    # --- indexing: light columns only -------------------------------------------------------------
    def _name(self, row: int) -> str:
        return self.rows.describe(row)

    def _reject(self, row: int, reason: str) -> None:
        """A row that cannot give samples: counted under ``reason``, or (malformed, no skip) an error."""
        if reason.startswith("bad: "):
            if not self.skip_bad_rows:
                raise BadRowError(f"{self._name(row)}: {reason[5:]} (--skip-bad-rows leaves such rows out)")
            self.bad_rows[row] = reason[5:]
            reason = "bad_row"
        self.excluded[reason] += 1

    def _index_jxu124(self) -> None:
        names = ["ref_id", "image_id", "sentences", "raw_anns", "raw_image_info"]
        cols = self.rows.columns(names + (["split"] if "split" in self.rows.column_names else []))
        present, wanted = set(cols.get("split", [])), {self.split, *SPLIT_ALIASES.get(self.split, ())}
        if present and not present & wanted:
            raise ValueError(f"{self.rows.where}: its rows' split column holds {sorted(present)}, not {self.split!r}")
        # row -> (bbox xywh, height, width, file_name, ref_id, image_id, [(sent_id, text)]); polygons stay on disk
        self._refs: Dict[int, Tuple[List[float], int, int, str, int, int, List[Tuple[int, str]]]] = {}
        for row, sentences in enumerate(cols["sentences"]):
            if present and cols["split"][row] not in wanted:
                continue
            try:
                ann, info = json.loads(cols["raw_anns"][row]), json.loads(cols["raw_image_info"][row])
                height, width = int(info["height"]), int(info["width"])
                texts = [(int(s["sent_id"]), sentence_text(s)) for s in sentences]
                error = segmentation_error(ann["segmentation"], height, width)
                if error is None and not _numbers(ann["bbox"], 4):
                    error = f"raw_anns bbox must be [x, y, w, h] finite numbers, got {str(ann['bbox'])[:60]}"
                if error is None and not texts:
                    error = "sentences is empty"
            except (ValueError, KeyError, TypeError) as failure:
                error = f"raw_anns / raw_image_info / sentences unusable: {failure!r}"
            if error is not None:
                self._reject(row, f"bad: {error}")
                continue
            self._refs[row] = (ann["bbox"], height, width, str(info["file_name"]), int(cols["ref_id"][row]),
                               int(cols["image_id"][row]), texts)
            if self.mode == "train":
                self._items.append((row, -1, -1))
            else:
                self._items += [(row, k, sent_id) for k, (sent_id, _) in enumerate(texts)]

    def _index_lmms(self) -> None:
        crowd_column = ["iscrowd"] if "iscrowd" in self.rows.column_names else []
        cols = self.rows.columns(["answer", "segmentation", "bbox"] + crowd_column)
        crowd = cols.get("iscrowd") or [0] * len(cols["answer"])
        position = 0
        for row, answers in enumerate(cols["answer"]):
            answers = [answers] if isinstance(answers, str) else list(answers or [])
            first, position = position, position + len(answers)
            problem = lmms_problem(cols["segmentation"][row], cols["bbox"][row], crowd[row])
            if problem is None and not answers:
                problem = "bad: answer holds no expression"
            if problem is not None:
                self._reject(row, problem)
                continue
            self._texts[row] = [str(a).strip() for a in answers]
            self._items += [(row, k, first + k) for k in range(len(answers))]
        if self.excluded["multipart"] or self.excluded["not_polygon"]:
            self.notes.append(
                f"lmms-lab's one flat polygon cannot hold {self.excluded['multipart']} multi-part object(s) and "
                f"{self.excluded['not_polygon']} crowd/RLE one(s): left out, not scored"
            )

    def _index_segzero(self) -> None:
        cols = self.rows.columns(["text"])
        for row, text in enumerate(cols["text"]):
            if not isinstance(text, str) or not text.strip():
                self._reject(row, "bad: text holds no expression")
                continue
            self._texts[row] = [text.strip()]
            self._items.append((row, 0, row))
        if self.source_split != self.split:
            self.notes.append(f"read the source's split {self.source_split!r} for {self.split!r}")

    # --- samples ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    @property
    def sent_ids(self) -> List[int]:
        """The sent_id of every sample, in order (mode="eval"; see the module docstring for lmms/segzero)."""
        if self.mode != "eval":
            raise ValueError("sent_ids name samples in mode='eval' only; mode='train' draws sentences at random")
        return [s for _, _, s in self._items]

    def _cell(self, table: Any, name: str) -> Any:
        return table.column(name)[0].as_py() if name in table.column_names else None

    def target(self, index: int) -> RefSample:
        """Sample ``index`` without its image (no pixel decoding): expression, mask, box and ids."""
        row, k, sent_id = self._items[index]
        return getattr(self, f"_target_{self.form}")(row, k, sent_id)

    def _target_jxu124(self, row: int, k: int, sent_id: int) -> RefSample:
        bbox, height, width, file_name, ref_id, image_id, texts = self._refs[row]
        if k < 0:
            k = int(torch.randint(len(texts), ()).item())
        mask = _cached(self._mask_cache, row, _MASK_CACHE, lambda: self._mask_from(
            row, json.loads(self._cell(self.rows.row(row), "raw_anns"))["segmentation"], height, width))
        return RefSample(image=None, expression=texts[k][1], mask=mask.copy(), box=coco_box(bbox),
                         sent_id=texts[k][0], ref_id=ref_id, image_id=image_id, file_name=file_name)

    def _mask_from(self, row: int, segmentation: Any, height: int, width: int) -> np.ndarray:
        try:
            return annotation_mask(segmentation, height, width)
        except (ValueError, TypeError, IndexError) as error:
            raise BadRowError(f"{self._name(row)}: its segmentation does not decode: {error}") from None

    def _target_lmms(self, row: int, k: int, sent_id: int) -> RefSample:
        table = self.rows.row(row)
        height, width = _image_size(self._cell(table, "image"), self._name(row))
        polygon, bbox = self._cell(table, "segmentation"), self._cell(table, "bbox")
        mask = _cached(self._mask_cache, row, _MASK_CACHE, lambda: self._mask_from(row, [polygon], height, width))
        file_name = self._cell(table, "file_name")
        digits = re.search(r"(\d{12})", file_name or "")
        return RefSample(image=None, expression=self._texts[row][k], mask=mask.copy(), box=coco_box(bbox),
                         sent_id=sent_id, ref_id=row, image_id=int(digits.group(1)) if digits else -1, file_name=file_name)

    def _target_segzero(self, row: int, k: int, sent_id: int) -> RefSample:
        table = self.rows.row(row)
        mask = _cached(self._mask_cache, row, _MASK_CACHE, lambda: self._segzero_mask(row, table))
        bbox = self._cell(table, "bbox")
        if bbox is not None and not _numbers(bbox, 4):
            raise BadRowError(f"{self._name(row)}: bbox must be [x1, y1, x2, y2] numbers, got {str(bbox)[:60]}")
        image_id = str(self._cell(table, "image_id") or "")
        return RefSample(image=None, expression=self._texts[row][k], mask=mask.copy(),
                         box=np.asarray(bbox, dtype=np.float32) if bbox is not None else mask_to_box(mask),
                         sent_id=sent_id, ref_id=row, image_id=int(image_id) if image_id.isdigit() else -1)

    def _segzero_mask(self, row: int, table: Any) -> np.ndarray:
        """bool [H, W] of a Seg-Zero ``mask`` cell (a list of rows), checked against img_height x img_width."""
        pc = _require("pyarrow.compute")
        column = table.column("mask")
        rows = pc.list_flatten(column)
        values = pc.list_flatten(rows).to_numpy(zero_copy_only=False)
        lengths = set(pc.list_value_length(rows).to_pylist())
        height, width = self._cell(table, "img_height"), self._cell(table, "img_width")
        if len(lengths) > 1 or (height is not None and (len(rows), *lengths) != (height, width)):
            raise BadRowError(f"{self._name(row)}: mask must be {height}x{width} bools (img_height x img_width), "
                              f"got {len(rows)} rows of lengths {sorted(lengths)[:5]}")
        return values.astype(bool).reshape(len(rows), -1)

    def load_image(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] pixels of sample ``index``'s image; ImageLoadError naming the row if unusable."""
        row = self._items[index][0]

        def read() -> np.ndarray:
            if self.form == "jxu124":
                _, height, width, file_name, _, _, _ = self._refs[row]
                path = self.image_root / file_name
                return read_image(path, height, width, name=f"{path} ({self._name(row)})")
            return read_image(_image_file(self._cell(self.rows.row(row), "image"), self._name(row)), name=self._name(row))

        return _cached(self._image_cache, row, _IMAGE_CACHE, read).copy()

    def _sample(self, index: int) -> RefSample:
        sample = self.target(index)
        sample.image = self.load_image(index)
        if sample.image.shape[:2] != sample.mask.shape:
            (h, w), (mh, mw) = sample.image.shape[:2], sample.mask.shape
            raise ImageLoadError(f"image of {self._name(self._items[index][0])} is {h}x{w} (HxW); its mask is {mh}x{mw}")
        return sample

    def __getitem__(self, index: int) -> RefSample:
        if self.mode == "eval" or not self.skip_bad_rows:
            return self._sample(index)
        for step in range(len(self._items)):  # train + skip_bad_rows: the next good row stands in
            j = (index + step) % len(self._items)
            if self._items[j][0] in self.bad_rows:
                continue
            try:
                return self._sample(j)
            except (ImageLoadError, BadRowError) as error:
                self.bad_rows[self._items[j][0]] = str(error)
                log.warning("skipping a bad row (%d so far): %s", len(self.bad_rows), error)
        raise ValueError(f"{self.rows.where}: every row is bad, e.g. {next(iter(self.bad_rows.values()))}")
