"""The extension imports on any machine and reports how it was built."""
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

import lens_fast
from lens_fast import _backend

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_native_module_imports_without_gpu():
    C = _backend.native()
    assert isinstance(C.with_cuda, bool)
    assert isinstance(C.cpu_has_avx2(), bool)


def test_num_threads_round_trip():
    before = lens_fast.get_num_threads()
    try:
        lens_fast.set_num_threads(3)
        assert lens_fast.get_num_threads() == 3
    finally:
        lens_fast.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_num_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="num_threads"):
        lens_fast.set_num_threads(bad)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="no aarch64 cross compiler")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cpp")))
def test_cpp_sources_compile_for_aarch64(source):
    """The C++ sources carry no x86-only code outside run-time-dispatched paths."""
    import pybind11

    cmd = [
        "aarch64-linux-gnu-g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror",
        f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
        str(CSRC / source),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
