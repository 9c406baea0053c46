"""Triton kernels of lens_fast (installed as ``lens_fast.kernels``).

Kernels assume valid, contiguous inputs: ``lens_fast.ops`` / ``lens_fast.nn`` check them first.
Every kernel is declared with :func:`lens_fast.kernels.jit.jit`, which compiles for CUDA tensors and
runs Triton's interpreter for CPU tensors, so each kernel is tested on machines without a GPU.
"""
