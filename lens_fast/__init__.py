"""lens_fast: fast, trustworthy RL fine-tuning of referring-segmentation models (LENS-style).

Public modules: ``lens_fast.ops`` (fused mask/box reward ops, memory-lean log-probs and mask loss),
``lens_fast.rle`` (COCO RLE, a drop-in for ``pycocotools.mask``), ``lens_fast.nn`` (fused SAM decoder
pieces), ``lens_fast.rewards``, ``lens_fast.data``, ``lens_fast.model`` (the LENS model). CLIs:
``python -m lens_fast.train``, ``lens_fast.eval``, ``lens_fast.segment``.
"""

__version__ = "0.1.0"

import sys
from importlib.machinery import PathFinder
from importlib.util import module_from_spec
from pathlib import Path


def _bind_root_folders(*names: str) -> None:
    """Bind the repository's top-level ``kernels/`` and ``configs/`` as ``lens_fast.kernels`` /
    ``lens_fast.configs`` in an editable install.

    Those folders have no ``__init__.py`` on purpose: from the repository root (first on ``sys.path``
    for ``python -m`` and ``pytest``) a regular package named ``kernels`` would shadow Hugging Face's
    ``kernels``, which transformers imports; a folder without ``__init__.py`` never shadows a regular
    package installed anywhere. A wheel installs them as ``lens_fast/kernels`` and ``lens_fast/configs``
    (found as usual); setuptools' editable finder cannot find a package without ``__init__.py`` that it
    maps to another folder, so this binds them to their folders as namespace packages.
    """
    package_dir = Path(__file__).resolve().parent
    root = package_dir.parent
    for name in names:
        full_name = f"{__name__}.{name}"
        if full_name in sys.modules or (package_dir / name).is_dir() or not (root / "setup.py").is_file():
            continue
        spec = PathFinder.find_spec(full_name, [str(root)])
        if spec is not None:
            sys.modules[full_name] = globals()[name] = module_from_spec(spec)


_bind_root_folders("kernels", "configs")

from lens_fast._backend import get_num_threads, set_num_threads  # noqa: E402

__all__ = ["__version__", "get_num_threads", "set_num_threads"]
