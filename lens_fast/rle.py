"""COCO run-length encoding (RLE): a drop-in for ``pycocotools.mask``, plus batched torch/GPU entry points.

``encode, decode, area, toBbox, iou, merge, frPyObjects`` take the arguments of pycocotools.mask and
return the same types with byte-identical contents for every valid input. Beyond pycocotools:

- ``encode`` takes any memory order (C or Fortran), bool or uint8, numpy arrays or torch tensors
  (CPU or CUDA); nonzero is foreground.
- ``encode_masks`` / ``decode_masks``: (N, H, W) masks <-> lists of RLE dicts; CUDA tensors are
  encoded on the GPU (only run lengths cross to the host) and ``device="cuda"`` decodes there.
- Counts may be uncompressed (a list of ints) wherever pycocotools takes compressed counts.
- Bad counts raise ValueError (counts not summing to h * w, characters outside '0'..'o', a
  truncated string, overflow) instead of reading or returning garbage; runs of 2^24 pixels or more
  (an empty 4096 x 4096 mask) are fine.

An RLE is ``{"size": [h, w], "counts": bytes}``; the mask is read in column-major order, counts
alternate runs of 0s and 1s starting with 0s. Boxes are ``[x, y, width, height]`` (COCO xywh).
C++ work is spread over ``num_threads`` threads across masks (None: ``lens_fast.get_num_threads()``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from lens_fast._backend import native

RLE = Dict[str, Any]
MaskArray = Union[np.ndarray, torch.Tensor]
IouOperand = Union[List[RLE], List[Sequence[float]], np.ndarray]

__all__ = [
    "encode",
    "decode",
    "area",
    "toBbox",
    "iou",
    "merge",
    "frPyObjects",
    "encode_masks",
    "decode_masks",
]

# Rows per GPU thread in the CUDA encoder (one thread per segment of a column).
_CUDA_ROWS_PER_SEGMENT = 32


def _threads(num_threads: Optional[int]) -> int:
    """num_threads for the C++ calls: 0 means the module default."""
    if num_threads is None:
        return 0
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
        raise ValueError(f"num_threads must be None or an int >= 1, got {num_threads!r}")
    return num_threads


class _Masks:
    """Raw view of a bool/uint8 mask array: address, shape and strides in bytes, device."""

    def __init__(self, name: str, masks: MaskArray, ndims: Tuple[int, ...], shape_doc: str) -> None:
        if isinstance(masks, np.ndarray):
            dtype_ok = masks.dtype in (np.bool_, np.uint8)
            dtype, self.device = masks.dtype, torch.device("cpu")
            self.address = masks.ctypes.data
            self.strides = tuple(masks.strides)
        elif isinstance(masks, torch.Tensor):
            dtype_ok = masks.dtype in (torch.bool, torch.uint8)
            dtype, self.device = masks.dtype, masks.device
            if self.device.type not in ("cpu", "cuda"):
                raise ValueError(f"{name} must be on the CPU or a CUDA device, got {self.device}")
            self.address = masks.data_ptr()
            self.strides = tuple(masks.stride())
        else:
            raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(masks).__name__}")
        if not dtype_ok:
            raise TypeError(f"{name} must have dtype bool or uint8, got {dtype}")
        if masks.ndim not in ndims:
            raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(masks.shape)}")
        self.name = name
        self.array = masks
        self.shape = tuple(masks.shape)


def _encode_view(masks: _Masks, axes: Tuple[int, int, int], num_threads: int) -> List[RLE]:
    """Encode the masks of ``masks`` whose (n, h, w) axes are ``axes`` of its array."""
    n, h, w = (masks.shape[a] for a in axes)
    native().rle_size(h, w, "h", "w", f"{masks.name} (h, w)")  # before any work, on any device
    strides = tuple(masks.strides[a] for a in axes)
    if masks.device.type == "cuda":
        return _encode_cuda(masks.array.permute(*axes), num_threads)
    return native().rle_encode(masks.address, n, h, w, *strides, num_threads)


def _encode_cuda(masks: torch.Tensor, num_threads: int) -> List[RLE]:
    """GPU encoder of (N, H, W) CUDA masks: run starts found and turned into counts on the GPU."""
    C = native()
    if not C.with_cuda:
        raise RuntimeError("lens_fast._C was built without CUDA; move the masks to the CPU or rebuild")
    n, h, w = masks.shape
    device = masks.device
    rows = _CUDA_ROWS_PER_SEGMENT
    segments = -(-h // rows)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        geometry = (masks.data_ptr(), n, h, w, *masks.stride(), rows)
        per_segment = torch.empty(n * w * segments, dtype=torch.int32, device=device)
        C.rle_cuda_count_segments(*geometry, per_segment.data_ptr(), stream)
        segment_ends = torch.cumsum(per_segment, 0)
        segment_offsets = segment_ends - per_segment
        start_offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
        if per_segment.numel():
            start_offsets[1:] = segment_ends.view(n, w * segments)[:, -1]
        count_offsets = start_offsets + torch.arange(n + 1, device=device)
        total_counts = int(count_offsets[-1])
        starts = torch.empty(max(total_counts - n, 1), dtype=torch.int32, device=device)
        C.rle_cuda_write_segments(*geometry, segment_offsets.data_ptr(), starts.data_ptr(), stream)
        counts = torch.empty(max(total_counts, 1), dtype=torch.int32, device=device)
        C.rle_cuda_run_lengths(
            starts.data_ptr(), start_offsets.data_ptr(), count_offsets.data_ptr(), n, total_counts,
            h * w, counts.data_ptr(), stream,
        )
        counts_host = counts.cpu()
        offsets_host = count_offsets.cpu()
    return C.rle_counts_to_dicts(counts_host.data_ptr(), offsets_host.data_ptr(), n, h, w, num_threads)


def encode(bimask: MaskArray) -> Union[RLE, List[RLE]]:
    """Encode binary masks: (h, w) -> one RLE dict, (h, w, n) -> a list of n RLE dicts.

    bimask: numpy array or torch tensor (CPU or CUDA), bool or uint8 (nonzero is foreground), any
    memory order. Counts are bytes, as in pycocotools.
    """
    masks = _Masks("bimask", bimask, (2, 3), "2-D (h, w) or 3-D (h, w, n)")
    if len(masks.shape) == 2:
        return _encode_view(_Masks("bimask", bimask[:, :, None], (3,), ""), (2, 0, 1), 0)[0]
    return _encode_view(masks, (2, 0, 1), 0)


def encode_masks(masks: MaskArray, num_threads: Optional[int] = None) -> List[RLE]:
    """Encode (N, H, W) masks (numpy or torch, CPU or CUDA, any order, bool or uint8) to N RLE dicts.

    CUDA tensors are encoded on the GPU: only the run lengths are copied to the host.
    """
    view = _Masks("masks", masks, (3,), "3-D (N, H, W)")
    return _encode_view(view, (0, 1, 2), _threads(num_threads))


def _parse(name: str, objs: Any, num_threads: int = 0) -> Any:
    """RLE dicts -> the C++ RleList (ValueError/TypeError naming ``name`` on bad input)."""
    return native().rle_parse(objs, name, num_threads)


def _rle_list(name: str, rleObjs: Any) -> Tuple[Any, bool]:
    """(parsed RLEs, whether a single dict was given)."""
    if isinstance(rleObjs, dict):
        return _parse(name, [rleObjs]), True
    if isinstance(rleObjs, (list, tuple)):
        return _parse(name, rleObjs), False
    raise TypeError(f"{name} must be an RLE dict or a list of them, got {type(rleObjs).__name__}")


def _common_size(name: str, rles: Any) -> Tuple[int, int]:
    if len(rles) == 0:
        raise ValueError(f"{name} is empty: there is no mask size to decode to")
    return rles.common_size(name)


def decode(rleObjs: Union[RLE, List[RLE]]) -> np.ndarray:
    """Decode RLEs of one size: a dict -> (h, w), a list -> (h, w, n); uint8, Fortran order."""
    rles, single = _rle_list("rleObjs", rleObjs)
    h, w = _common_size("rleObjs", rles)
    out = np.empty((h, w, len(rles)), dtype=np.uint8, order="F")
    native().rle_decode(rles, out.ctypes.data, True, 0)
    return out[:, :, 0] if single else out


def _empty_masks(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """An (n, h, w) uint8 tensor; MemoryError with the size when it cannot be allocated (torch
    reports that as a RuntimeError)."""
    try:
        return torch.empty((n, h, w), dtype=torch.uint8, device=device)
    except RuntimeError as e:
        raise MemoryError(f"decoding {n} masks of {h} x {w} needs {n * h * w} bytes on {device}: {e}") from e


def decode_masks(
    rles: Sequence[RLE], device: Union[str, torch.device, None] = None, num_threads: Optional[int] = None
) -> torch.Tensor:
    """Decode N RLEs of one size to an (N, H, W) uint8 tensor on ``device`` (default CPU).

    A CUDA device decodes on the GPU (counts are parsed on the CPU and copied over).
    """
    threads = _threads(num_threads)
    if not isinstance(rles, (list, tuple)):
        raise TypeError(f"rles must be a list of RLE dicts, got {type(rles).__name__}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    parsed = _parse("rles", rles, threads)
    h, w = _common_size("rles", parsed)
    n = len(parsed)
    C = native()
    if device.type == "cuda":
        if not C.with_cuda:
            raise RuntimeError("lens_fast._C was built without CUDA; decode to the CPU or rebuild")
        ends, offsets = C.rle_run_ends(parsed)
        with torch.cuda.device(device):
            ends_d = torch.from_numpy(ends.view(np.int32)).to(device)
            offsets_d = torch.from_numpy(offsets).to(device)
            out = _empty_masks(n, h, w, device)
            stream = torch.cuda.current_stream(device).cuda_stream
            C.rle_cuda_decode(ends_d.data_ptr(), offsets_d.data_ptr(), n, h, w, out.data_ptr(), stream)
        return out
    out = _empty_masks(n, h, w, device)
    C.rle_decode(parsed, out.data_ptr(), False, threads)
    return out


def area(rleObjs: Union[RLE, List[RLE]]) -> Union[np.ndarray, np.uint32]:
    """Foreground pixels: a dict -> np.uint32, a list -> uint32 array."""
    rles, single = _rle_list("rleObjs", rleObjs)
    a = native().rle_area(rles)
    return a[0] if single else a


def toBbox(rleObjs: Union[RLE, List[RLE]]) -> np.ndarray:
    """Bounding boxes [x, y, w, h] (float64): a dict -> (4,), a list -> (n, 4); empty masks -> 0s."""
    rles, single = _rle_list("rleObjs", rleObjs)
    boxes = native().rle_to_bbox(rles)
    return boxes[0] if single else boxes


def _iou_operand(name: str, objs: Any) -> Tuple[str, Any, int]:
    """(kind, data, length) with kind "rle" (parsed), "box" ((n, 4) float64) or "empty"."""
    if isinstance(objs, np.ndarray):
        if objs.size == 0:
            return "empty", None, 0
        if objs.ndim != 2 or objs.shape[1] != 4:
            raise ValueError(f"{name} as an array must be (N, 4) boxes [x, y, w, h], got shape {objs.shape}")
        return "box", np.ascontiguousarray(objs, dtype=np.float64), len(objs)
    if not isinstance(objs, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of RLE dicts, a list of [x, y, w, h] boxes or an (N, 4) array, "
            f"got {type(objs).__name__}"
        )
    if len(objs) == 0:
        return "empty", None, 0
    if all(isinstance(o, dict) for o in objs):
        rles = _parse(name, objs)
        return "rle", rles, len(rles)
    if all(isinstance(o, (list, tuple, np.ndarray)) and len(o) == 4 for o in objs):
        boxes = np.asarray(objs, dtype=np.float64).reshape(len(objs), 4)
        return "box", np.ascontiguousarray(boxes), len(objs)
    raise ValueError(f"{name} must be a list of RLE dicts or a list of [x, y, w, h] boxes, not a mix")


def iou(dt: IouOperand, gt: IouOperand, pyiscrowd: Optional[Sequence[Any]]) -> Union[np.ndarray, list]:
    """IoU of every dt with every gt: an (len(dt), len(gt)) float64 array (Fortran order).

    dt, gt: both RLEs (lists of dicts) or both boxes (lists of [x, y, w, h] or (N, 4) arrays).
    pyiscrowd (pycocotools' name): one flag per gt, read as uint8 as pycocotools does (None: none
    crowd); a crowd gt divides the intersection by the dt area.
    Masks of different sizes give -1 where their boxes overlap; [] when dt or gt is empty.
    """
    dt_kind, dt_data, m = _iou_operand("dt", dt)
    gt_kind, gt_data, n = _iou_operand("gt", gt)
    if pyiscrowd is None:
        crowd = np.zeros(n, dtype=np.uint8)
    else:
        crowd = np.array(pyiscrowd, dtype=np.uint8).reshape(-1)
        if len(crowd) != n:
            raise ValueError(f"pyiscrowd must have one flag per gt ({n}), got {len(crowd)}")
    if m == 0 or n == 0:
        return []
    if dt_kind != gt_kind:
        raise TypeError(f"dt and gt must both be RLEs or both be boxes, got {dt_kind} and {gt_kind}")
    if dt_kind == "rle":
        return native().rle_iou(dt_data, gt_data, crowd, 0)
    return native().rle_box_iou(dt_data, gt_data, crowd)


def merge(rleObjs: List[RLE], intersect: Any = 0) -> RLE:
    """Union (intersect false) or intersection of RLEs of one size, as one RLE dict."""
    if not isinstance(rleObjs, (list, tuple)):
        raise TypeError(f"rleObjs must be a list of RLE dicts, got {type(rleObjs).__name__}")
    return native().rle_merge(_parse("rleObjs", rleObjs), bool(intersect))


def _boxes(name: str, boxes: Any) -> np.ndarray:
    try:
        array = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (N, 4) boxes [x, y, w, h]") from None
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must be (N, 4) boxes [x, y, w, h], got shape {array.shape}")
    return np.ascontiguousarray(array)


def frPyObjects(pyobj: Any, h: int, w: int) -> Union[RLE, List[RLE]]:
    """RLEs from polygons, boxes or uncompressed RLEs, dispatching as pycocotools does.

    - (N, 4) array or list of [x, y, w, h] boxes -> list; one box [x, y, w, h] -> dict;
    - list of polygons [[x1, y1, x2, y2, ...], ...] (> 4 numbers each) -> list; one polygon -> dict;
    - uncompressed RLE dict (counts a list) or a list of them -> dict / list (their own size is kept).
    Polygons are rasterised exactly as pycocotools' rleFrPoly (5x upsampled boundary).
    h, w: integers, or real numbers truncated toward zero as pycocotools does (annotation files
    often store float heights and widths); ValueError unless 0 <= h, w and h * w < 2^32.
    """
    C = native()
    h, w = C.rle_size(h, w, "h", "w", "(h, w)")  # float sides truncated, as pycocotools does
    if isinstance(pyobj, np.ndarray):
        return C.rle_from_boxes(_boxes("pyobj", pyobj), h, w)
    if isinstance(pyobj, dict):
        if "counts" in pyobj and "size" in pyobj:
            return C.rle_to_dicts(_parse("pyobj", [pyobj]))[0]
        raise ValueError("pyobj as a dict must be an uncompressed RLE with 'size' and 'counts'")
    if not isinstance(pyobj, list) or len(pyobj) == 0:
        raise TypeError(
            "pyobj must be an (N, 4) array, a list of boxes, polygons or RLE dicts, one box, one polygon "
            f"or one RLE dict, got {type(pyobj).__name__ if not isinstance(pyobj, list) else 'an empty list'}"
        )
    first = pyobj[0]
    if isinstance(first, dict):
        return C.rle_to_dicts(_parse("pyobj", pyobj))
    if hasattr(first, "__len__"):
        if len(first) == 4:
            return C.rle_from_boxes(_boxes("pyobj", pyobj), h, w)
        if len(first) > 4:
            return C.rle_from_polygons(pyobj, h, w)
    elif len(pyobj) == 4:
        return C.rle_from_boxes(_boxes("pyobj", [pyobj]), h, w)[0]
    elif len(pyobj) > 4:
        return C.rle_from_polygons([pyobj], h, w)[0]
    raise ValueError(
        "pyobj must hold boxes (4 numbers each) or polygons (more than 4 numbers each), "
        f"got an entry of length {len(first) if hasattr(first, '__len__') else len(pyobj)}"
    )
