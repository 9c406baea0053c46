"""The extension imports on any machine and reports how it was built."""
import pytest

import lens_fast
from lens_fast import _backend


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
