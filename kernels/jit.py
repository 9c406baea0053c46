"""``jit``: a ``triton.jit`` that also runs on CPU tensors, through Triton's interpreter.

A kernel launched with CUDA tensors compiles and runs as usual. A kernel launched with only CPU
tensors runs under ``triton.runtime.interpreter`` (numpy, one program at a time; slow, for tests and
machines without a GPU); no ``TRITON_INTERPRET`` variable is needed. Helpers called from kernels
must be declared with this ``jit`` too; Triton's own jit'd library functions (``tl.sum``, ``tl.max``,
``tl.zeros``, ``tl.cdiv``, ...) are interpreted while an interpreted kernel runs. Under the
interpreter, compute in fp32 (bf16 arithmetic there is wrong): load, ``.to(tl.float32)``, compute,
cast on store.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction

_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor_indexable(tensor: type, scope: Any) -> None:
    """Triton's own patch of ``tl.tensor`` for the interpreter, then ``__index__`` as Triton 3.8 has it.

    The interpreter holds a scalar as a 1-element array; Triton 3.6 converts it with ``int(data)``,
    which NumPy >= 2.4 refuses for a 1-d array, so ``range(tl.program_id(0) * ROWS, ...)`` failed
    under Triton 3.6's interpreter. Triton 3.8 squeezes first, as this does (same result there).
    """
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


# ``_patch_lang`` (run at every interpreted launch and helper call) looks this name up in its module.
interpreter._patch_lang_tensor = _patch_lang_tensor_indexable


def _on_cuda(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in (*args, *kwargs.values()))


def _call_device_function(helper: InterpretedFunction, args: tuple, kwargs: dict) -> Any:
    """Run ``helper`` inside an interpreted kernel, with ``triton.language`` patched for it only while it
    runs (``InterpretedFunction.__call__`` leaves it patched, which breaks later GPU compilation)."""
    scope = _patch_lang(helper.fn)
    try:
        return helper.rewrite()(*args, **kwargs)
    finally:
        scope.restore()


_interpreted_library: dict = {}

# Held while a kernel is interpreted: the interpreter patches ``triton.language`` and we patch
# ``JITFunction.__call__``, both process-wide, so interpreted launches from several threads run one at
# a time (reentrant: the save/restore below nests in one thread). Compiled launches never take it.
_interpreter_lock = threading.RLock()


def _call_library_interpreted(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
    """``JITFunction.__call__`` while a kernel is interpreted: run Triton's jit'd library function
    (e.g. ``tl.sum``, ``tl.zeros``), which is a plain JITFunction unless TRITON_INTERPRET was set at
    import, through the interpreter."""
    helper = _interpreted_library.get(self.fn)
    if helper is None:
        helper = _interpreted_library[self.fn] = InterpretedFunction(self.fn)
    return _call_device_function(helper, args, kwargs)


class DualJITFunction(JITFunction):
    """A JITFunction that falls back to the interpreter when no argument lives on a GPU."""

    def __init__(self, fn: Callable, **kwargs: Any) -> None:
        super().__init__(fn, **kwargs)
        self._interpreted = InterpretedFunction(fn, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Only reached when a kernel running under the interpreter calls this function as a helper;
        # compiled kernels inline helpers and never call them from Python.
        return _call_device_function(self._interpreted, args, kwargs)

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if _on_cuda(args, kwargs):
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)
        with _interpreter_lock:
            library_call = JITFunction.__call__
            JITFunction.__call__ = _call_library_interpreted
            try:
                return self._interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)
            finally:
                JITFunction.__call__ = library_call


def jit(fn: Callable | None = None, **kwargs: Any) -> Any:
    """Decorator like ``triton.jit`` (same keyword arguments) returning a :class:`DualJITFunction`."""
    if fn is None:
        return lambda f: DualJITFunction(f, **kwargs)
    return DualJITFunction(fn, **kwargs)
