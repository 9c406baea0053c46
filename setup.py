"""Build lens_fast: the Python package plus the pybind11 extension ``lens_fast._C`` built by CMake.

The C++ sources in ``csrc/`` are always built. The CUDA sources are built whenever CMake finds nvcc
(``LENS_FAST_CUDA=0`` or ``OFF`` skips them, ``1``/``ON`` requires them; ``LENS_FAST_CUDA_ARCHS`` to change the architecture list).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = os.environ.get("LENS_FAST_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DLENS_FAST_CUDA={os.environ.get('LENS_FAST_CUDA', 'AUTO')}",
        ]
        if "LENS_FAST_CUDA_ARCHS" in os.environ:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['LENS_FAST_CUDA_ARCHS']}")
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    name="lens_fast",
    version="0.1.0",
    description="Fast, trustworthy RL fine-tuning of referring-segmentation models (LENS-style): "
    "fused reward ops, COCO RLE in C++/CUDA, a GRPO trainer.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lens_fast", "lens_fast.ops", "lens_fast.kernels", "lens_fast.configs", "lens_fast.rewards",
              "lens_fast.data", "lens_fast.model", "lens_fast.training"],
    package_dir={"lens_fast": "lens_fast", "lens_fast.kernels": "kernels", "lens_fast.configs": "configs"},
    package_data={"lens_fast.configs": ["*.yaml", "architectures/*.json"]},
    ext_modules=[CMakeExtension("lens_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17,<6",
        "segment-anything>=1.0",
        "pycocotools>=2.0.8",
        "numpy>=1.24",
        "pillow>=10",
        "scipy>=1.11",
        "tqdm>=4.60",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tokenizers>=0.20",
    ],
    extras_require={
        "dev": [
            "pybind11>=2.12",  # tests/test_build.py cross-compiles the sources
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "rlemasklib>=0.8",
            "faster-coco-eval>=1.6",
            "torchmetrics>=1.4",
            "trl>=1.0",
            "matplotlib>=3.7",  # the trainer's curves.png
            "bitsandbytes>=0.45",  # optimizer_states=8bit (tests/test_optim.py)
            "datasets>=3.0",  # the Hugging Face forms of RefCOCO (tests/test_data_hf.py)
            "pyarrow>=15",
        ],
        "flash": ["flash-attn>=2.6"],
        "lean": ["bitsandbytes>=0.45"],  # optimizer_states=8bit
        "data": ["datasets>=3.0", "pyarrow>=15"],  # --data hf: RefCOCO/+/g in Hugging Face forms (lens_fast.data.hf)
    },
    zip_safe=False,
)
