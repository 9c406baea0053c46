"""Shared test setup: CUDA tests skip without a GPU; every test starts from a fresh, logged seed."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from LENS_FAST_SEED (default: fresh) and reported on failure."""
    import numpy as np

    seed = int(os.environ.get("LENS_FAST_SEED", np.random.SeedSequence().entropy % 2**32))
    request.node.user_properties.append(("seed", seed))
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section(call.when, "seed", f"LENS_FAST_SEED={value} reproduces this run")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of model tests: on a small shared machine, two threads make each of
    the tiny model's small matmuls ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compile_for_sm90(monkeypatch, tmp_path):
    """``compile(kernel, types, constexprs)``: a Triton kernel compiled for sm_90 (no GPU needed) in a fresh
    cache; ``types`` maps argument names to Triton types (default ``i32``), ``constexprs`` names to values."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget

    def compile_kernel(fn, types, constexprs):
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
        return compiler.compile(compiler.ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))

    return compile_kernel
