"""ops.token_logprobs against the naive path ``log_softmax(F.linear(h, W, b).float() / T).gather(target)``.

Both lean backends run on CPU ("cpu": chunked torch; "triton": the same chunks with the row-wise
kernels under Triton's interpreter). fp32 must match to float32 rounding. bf16 shares the naive
path's bf16 logits (same matmul), so log-probs match to float32 rounding too; gradients go through
bf16 matmuls as in the naive path, and the weight gradient is summed over chunks in bf16 (and the
interpreter rounds fp32 -> bf16 differently from torch), so they match to a few bf16 ulps.
"""
import pytest
import torch

from lens_fast import ops
from lens_fast.ops.token_logprobs import default_chunk_size, token_logprobs_torch

BACKENDS = ["cpu", "triton"]


def make(rng_seed_dtype, n, d, v, bias=False):
    dtype = rng_seed_dtype
    hidden = torch.randn(n, d).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) / d**0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(v).to(dtype).requires_grad_() if bias else None
    return hidden, weight, b


def grads(out, params, upstream):
    for p in params:
        p.grad = None
    loss = sum((o * g).sum() for o, g in zip(out, upstream))
    loss.backward()
    return [p.grad.clone() for p in params]


def exact_grads(params, target, temperature, upstream):
    """The gradients of the naive path computed in float64 (params: hidden, weight[, bias])."""
    hidden, weight, *bias = [p.detach().double().requires_grad_() for p in params]
    logp_all = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias[0] if bias else None) / temperature, -1)
    logp = logp_all.gather(-1, target[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return grads((logp, entropy), [hidden, weight, *bias], [u.double() for u in upstream])


def close(dtype):
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=2**-6, atol=2**-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "n, d, v, chunk, bias, temperature",
    [
        (37, 19, 101, 8, True, 0.9),  # odd sizes, V prime, N not a multiple of the chunk
        (5, 64, 333, None, False, 1.0),  # default chunk (one chunk)
        (16, 7, 1, 3, True, 0.5),  # a vocabulary of one token
        (3, 8, 40000, 2, False, 1.3),  # V over 3 interpreter blocks of 16384 (the online log-sum-exp), partial last
    ],
)
def test_values_and_grads_match_naive(rng, backend, dtype, n, d, v, chunk, bias, temperature):
    torch.manual_seed(int(rng.integers(2**31)))  # the inputs follow the reported seed too
    hidden, weight, b = make(dtype, n, d, v, bias)
    params = [p for p in (hidden, weight, b) if p is not None]
    target = torch.from_numpy(rng.integers(0, v, n))
    up = [torch.randn(n), torch.randn(n)]
    logp, entropy = ops.token_logprobs(hidden, weight, target, bias=b, temperature=temperature,
                                       chunk_size=chunk, return_entropy=True, backend=backend)
    assert logp.dtype == torch.float32 and logp.shape == (n,) and entropy.shape == (n,)
    got = grads((logp, entropy), params, up)
    ref_logp, ref_entropy = token_logprobs_torch(hidden, weight, target, b, temperature, return_entropy=True)
    want = grads((ref_logp, ref_entropy), params, up)
    torch.testing.assert_close(logp, ref_logp.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(entropy, ref_entropy.detach(), rtol=1e-5, atol=2e-5)
    exact = exact_grads(params, target, temperature, up) if dtype == torch.float32 else None
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = w.abs().max().clamp_min(1e-3)
        if exact is None:
            torch.testing.assert_close(g / scale, w / scale, **close(dtype))
            continue
        # fp32: as close to the float64 gradient as the naive fp32 path is (within 4x), or within float32
        # rounding of a V-term sum (2 sqrt(V) eps of the scale, at least 1e-5): the hidden gradient sums
        # V terms (p - onehot) W that cancel, so its rounding is relative to the terms, not to the result
        # (V = 40000: worst of 40 seeds 1.8e-5 on both backends, bound 4.8e-5).
        naive_error = ((w.double() - exact[i]).abs().max() / scale).item()
        error = ((g.double() - exact[i]).abs().max() / scale).item()
        assert error <= max(4 * naive_error, 2 * v**0.5 * 2**-23, 1e-5), (i, error, naive_error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_leading_dims_and_views(rng, backend):
    """[B, L, D] hidden, non-contiguous hidden / weight / targets, int32 targets, no entropy."""
    base = torch.randn(3, 2 * 11, 24)
    hidden = base[:, ::2, 2:].transpose(0, 1).requires_grad_()  # [11, 3, 22], non-contiguous
    weight_t = torch.randn(22, 53).requires_grad_()
    weight = weight_t.t()  # [53, 22] non-contiguous
    target = torch.from_numpy(rng.integers(0, 53, (3, 11))).int().t()
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not target.is_contiguous()
    up = torch.randn(11, 3)
    logp = ops.token_logprobs(hidden, weight, target, chunk_size=4, backend=backend)
    assert logp.shape == (11, 3)
    got = grads([logp], [hidden, weight_t], [up])
    ref = token_logprobs_torch(hidden, weight, target)
    want = grads([ref], [hidden, weight_t], [up])
    torch.testing.assert_close(logp, ref.detach(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_frozen_weight_and_no_grad_paths(rng):
    """Only hidden needs a gradient (frozen LM head); no_grad forward; zero tokens."""
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    target = torch.from_numpy(rng.integers(0, 30, 9))
    logp = ops.token_logprobs(hidden, weight, target, chunk_size=2)
    logp.sum().backward()
    ref = token_logprobs_torch(hidden.detach().requires_grad_(), weight, target)
    torch.testing.assert_close(logp, ref)
    with torch.no_grad():
        assert ops.token_logprobs(hidden, weight, target).shape == (9,)
    empty = ops.token_logprobs(torch.zeros(0, 8), weight, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_default_backend_is_lean_on_cpu(monkeypatch, rng):
    import sys

    module = sys.modules["lens_fast.ops.token_logprobs"]
    monkeypatch.setattr(module, "token_logprobs_torch", lambda *a, **k: pytest.fail("naive path ran"))
    out = ops.token_logprobs(torch.randn(4, 8), torch.randn(20, 8), torch.tensor([0, 1, 19, 3]))
    assert out.shape == (4,)
    assert default_chunk_size(151936) == 220


def test_peak_memory_is_one_chunk():
    """Saved tensors of the lean op are its inputs plus [N] vectors, never [N, V] logits."""
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    target = torch.randint(0, 1000, (64,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.token_logprobs(hidden, weight, target, chunk_size=8)
    assert max(saved) == weight.numel() and 64 * 1000 not in saved


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hidden=torch.zeros(4, 8, dtype=torch.float64)), TypeError, "hidden must be float32"),
        (dict(hidden=torch.zeros(4, 0)), ValueError, r"hidden must be \[..., D\]"),
        (dict(lm_head_weight=torch.zeros(20, 8, dtype=torch.bfloat16)), TypeError, "lm_head_weight must have"),
        (dict(lm_head_weight=torch.zeros(20, 7)), ValueError, r"got shape \(20, 7\)"),
        (dict(target_ids=torch.zeros(4)), TypeError, "target_ids must be an integer"),
        (dict(target_ids=torch.zeros(5, dtype=torch.long)), ValueError, r"target_ids must be \[...\] = \(4,\)"),
        (dict(target_ids=torch.tensor([0, 1, 20, 2])), ValueError, r"\[0, 20\), got values in \[0, 20\]"),
        (dict(target_ids=torch.tensor([0, -1, 2, 2])), ValueError, "target_ids must lie in"),
        (dict(bias=torch.zeros(19)), ValueError, r"bias must be \[V\] = \(20,\)"),
        (dict(temperature=0.0), ValueError, "temperature must be a positive"),
        (dict(temperature="1"), TypeError, "temperature must be a positive real"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(chunk_size=2.5), TypeError, "chunk_size must be a positive int"),
        (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
        (dict(target_ids=torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "one device"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_rejects_bad_input(kwargs, error, match):
    args = dict(hidden=torch.zeros(4, 8), lm_head_weight=torch.zeros(20, 8), target_ids=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    hidden, weight, target = args.pop("hidden"), args.pop("lm_head_weight"), args.pop("target_ids")
    with pytest.raises(error, match=match):
        ops.token_logprobs(hidden, weight, target, **args)


def test_kernels_compile_for_gpu(compile_for_sm90):
    """Both row kernels compile to sm_90 (no GPU needed) for bf16 and fp32 logits."""
    from lens_fast.kernels import token_logprobs as kernels

    for dtype in ("bf16", "fp32"):
        for entropy in (True, False):
            common = {"logits_ptr": f"*{dtype}", "target_ptr": "*i64", "lse_ptr": "*fp32", "inv_temperature": "fp32"}
            try:
                compile_for_sm90(
                    kernels.logits_stats_kernel, {**common, "target_x_ptr": "*fp32", "entropy_ptr": "*fp32"},
                    {"WITH_ENTROPY": entropy, "BLOCK_V": 4096},
                )
            except (FileNotFoundError, RuntimeError) as error:  # no ptxas in this Triton install
                pytest.skip(f"cannot compile for CUDA here: {error}")
            compile_for_sm90(
                kernels.logits_grad_kernel,
                {**common, "mean_x_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32"},
                {"WITH_ENTROPY": entropy, "BLOCK_V": 4096},
            )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_naive(dtype):
    torch.manual_seed(0)
    n, d, v = 300, 256, 151936
    hidden = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda") / 16).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda")
    up = [torch.randn(n, device="cuda"), torch.randn(n, device="cuda")]
    out = ops.token_logprobs(hidden, weight, target, temperature=0.9, chunk_size=128, return_entropy=True)
    got = grads(out, [hidden, weight], up)
    ref = token_logprobs_torch(hidden, weight, target, None, 0.9, return_entropy=True)
    want = grads(ref, [hidden, weight], up)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        scale = w.abs().max()
        torch.testing.assert_close(g / scale, w / scale, **close(dtype))
