"""lens_fast: fast, trustworthy RL fine-tuning of referring-segmentation models (LENS-style).

Public modules: ``lens_fast.ops`` (fused mask/box reward ops), ``lens_fast.rle`` (COCO RLE, a drop-in
for ``pycocotools.mask``), ``lens_fast.nn`` (fused SAM decoder pieces), ``lens_fast.rewards``.
"""

__version__ = "0.1.0"

from lens_fast._backend import get_num_threads, set_num_threads

__all__ = ["__version__", "get_num_threads", "set_num_threads"]
