"""lens_fast.kernels.jit: kernels on CPU tensors run under Triton's interpreter, library functions included."""
import torch
import triton.language as tl

from lens_fast.kernels.jit import jit


@jit
def _scaled(x):
    return 2.0 * x


@jit
def _library_functions_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0) + tl.zeros((BLOCK,), dtype=tl.float32)
    total = tl.sum(x, axis=0)
    largest = tl.max(x, axis=0)
    blocks = tl.cdiv(n, 4)
    tl.store(out_ptr + offs, _scaled(x) + total + largest + blocks + tl.sigmoid(x), mask=offs < n)


def test_triton_library_functions_run_under_the_interpreter():
    x = torch.tensor([1.0, -2.0, 3.5, 0.25, 5.0])
    out = torch.empty_like(x)
    _library_functions_kernel[(1,)](x, out, 5, BLOCK=8)
    want = 2 * x + x.sum() + x.max() + 2 + torch.sigmoid(x)
    torch.testing.assert_close(out, want)


@jit
def _rows_kernel(out_ptr, n_rows, ROWS: tl.constexpr):
    row_tile = tl.program_id(0)
    for row in range(row_tile * ROWS, tl.minimum(row_tile * ROWS + ROWS, n_rows)):
        tl.store(out_ptr + row, row_tile * 100 + row)


def test_loop_bounds_from_the_program_id_run_under_the_interpreter():
    """range() over program-id expressions, as the row-tiled kernels loop: the interpreter's scalars are
    1-element arrays, which Triton 3.6 could not turn into an index under NumPy >= 2.4."""
    out = torch.full((7,), -1, dtype=torch.int32)
    _rows_kernel[(3,)](out, 7, ROWS=3)
    assert out.tolist() == [0, 1, 2, 103, 104, 105, 206]


def test_interpreted_launch_restores_tensor_index():
    """The patched ``tl.tensor.__index__`` is Triton's own restored after a launch: it only lives while
    a kernel is interpreted."""
    before = getattr(tl.tensor, "__index__", None)
    _rows_kernel[(1,)](torch.zeros(3, dtype=torch.int32), 3, ROWS=3)
    assert getattr(tl.tensor, "__index__", None) is before


def test_interpreting_leaves_triton_language_unpatched():
    """After an interpreted launch (helpers included) a kernel still compiles for a GPU target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    x = torch.ones(4)
    _library_functions_kernel[(1,)](x, torch.empty_like(x), 4, BLOCK=4)
    kernel = _library_functions_kernel
    signature = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(kernel.arg_names.index("BLOCK"),): 8})
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def test_interpreted_launches_from_several_threads_agree_and_restore_jit_call():
    """Concurrent interpreted launches each see the interpreter's library functions, and afterwards
    ``JITFunction.__call__`` is Triton's own again (not left patched by an interleaved save/restore)."""
    import threading

    from triton.runtime.jit import JITFunction

    original_call = JITFunction.__call__
    x = torch.tensor([1.0, -2.0, 3.5, 0.25, 5.0])
    want = 2 * x + x.sum() + x.max() + 2 + torch.sigmoid(x)
    errors = []

    def launch_many():
        try:
            for _ in range(5):
                out = torch.empty_like(x)
                _library_functions_kernel[(1,)](x, out, 5, BLOCK=8)
                torch.testing.assert_close(out, want)
        except Exception as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=launch_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert JITFunction.__call__ is original_call


def test_an_exception_inside_an_interpreted_kernel_restores_jit_call():
    from triton.runtime.jit import JITFunction

    original_call = JITFunction.__call__
    try:
        _library_functions_kernel[(1,)](torch.ones(4), torch.empty(4), 4)  # BLOCK missing
    except Exception:
        pass
    else:
        raise AssertionError("a launch without its constexpr BLOCK should fail")
    assert JITFunction.__call__ is original_call
