"""lens_fast: fast, trustworthy RL fine-tuning of referring-segmentation models (LENS-style).

Public modules: ``lens_fast.ops`` (fused mask/box reward ops, memory-lean log-probs and mask loss),
``lens_fast.rle`` (COCO RLE, a drop-in for ``pycocotools.mask``), ``lens_fast.nn`` (fused SAM decoder
pieces), ``lens_fast.rewards``, ``lens_fast.data``, ``lens_fast.model`` (the LENS model). CLIs:
``python -m lens_fast.train``, ``lens_fast.eval``, ``lens_fast.segment``.
"""

__version__ = "0.1.0"

from lens_fast._backend import get_num_threads, set_num_threads

__all__ = ["__version__", "get_num_threads", "set_num_threads"]
