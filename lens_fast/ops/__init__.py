"""Fused, validated mask and box ops; each has Triton (CUDA), C++ (CPU) and PyTorch backends.

See ``lens_fast._backend`` for the ``backend`` argument.
"""
from lens_fast.ops.mask_stats import MaskStats

__all__ = ["MaskStats"]
