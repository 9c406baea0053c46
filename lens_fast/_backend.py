"""Backend selection and the native extension.

Every mask op takes ``backend`` (the box ops are plain PyTorch): ``None`` picks Triton for CUDA tensors, C++ for CPU tensors and
the PyTorch reference on any other device (meta, mps, ...); ``"triton"`` forces the Triton kernel
(CPU tensors run under Triton's interpreter), ``"cpu"`` the C++ kernel, ``"torch"`` the plain
PyTorch reference.
"""
from __future__ import annotations

import contextlib
from types import ModuleType
from typing import ContextManager, Literal, Optional

import torch

Backend = Literal["triton", "cpu", "torch"]
BACKENDS = ("triton", "cpu", "torch")

try:
    from lens_fast import _C as _native
except ImportError as _error:  # pragma: no cover - only without a build
    _native = None
    _native_error = _error


def native() -> ModuleType:
    """The compiled module ``lens_fast._C``; ImportError with a fix if it was not built."""
    if _native is None:
        raise ImportError(
            "lens_fast._C is not built; install the package with `pip install -e .` "
            f"(original error: {_native_error})"
        )
    return _native


def set_num_threads(n: int) -> None:
    """Default number of threads the C++ ops use across masks (1 until set)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {n!r}")
    native().set_num_threads(n)


def get_num_threads() -> int:
    """Default number of threads the C++ ops use across masks."""
    return native().get_num_threads()


def resolve_backend(backend: Optional[str], device: torch.device, *, has_cpu: bool = True) -> str:
    """The backend to run on ``device``: the rule above, with a ValueError for impossible choices.

    ``has_cpu=False`` marks ops without a C++ twin: ``None`` then maps CPU tensors to "torch".
    Tensors on other devices (meta, mps, ...) get "torch" (the kernels only read CPU or CUDA memory).
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        if device.type == "cuda":
            return "triton"
        return "cpu" if has_cpu and device.type == "cpu" else "torch"
    if backend == "cpu":
        if not has_cpu:
            raise ValueError("backend='cpu': this op has no C++ kernel; use 'triton' or 'torch'")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' needs CUDA (or CPU, interpreted) tensors, got {device}")
    return backend


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """The common device of ``tensors``; ValueError naming them if they differ."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))


def device_guard(device: torch.device) -> ContextManager:
    """Makes ``device`` current for a Triton launch on CUDA (Triton launches on the current device
    and stream, whatever device the tensors live on); does nothing for other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def as_tensor(name: str, x: object) -> torch.Tensor:
    """``x`` as a torch tensor (numpy arrays are shared, not copied); TypeError otherwise."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
