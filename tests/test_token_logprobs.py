"""fastweight.token_logprobs: values and gradients vs the float64 full-softmax reference.

Normal run: torch backend (CPU). Tests marked ``interpret`` repeat the core cases with backend="triton"
through the Triton interpreter (tests/test_interpret.py runs them with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import pytest
import torch

import fastweight
from fastweight.reference import token_logprobs as ref
from helpers import (DTYPE_IDS, DTYPES, compare_with_reference, make_hidden, make_logits, upstream_like)
from fastweight._constants import IGNORE_INDEX

ALL_DTYPES = (*DTYPES, torch.float64)
SHAPES = [(1, 1), (3, 7), (257, 7), (1, 1000), (257, 1000), (3, 32013)]
SMALL_SHAPES = [(1, 1), (3, 7), (1, 1000), (5, 1000), (4, 4097)]  # V not a multiple of any BLOCK_V


def ids(dtype):
    return DTYPE_IDS[dtype]


def _ignore_rows(N):
    return list(range(1, N, 4))  # ~ a quarter of the rows; none when N == 1


def check_core(backend, dtype, N, V, *, seed=0):
    z, y = make_logits(N, V, dtype, seed=seed + N * 131 + V, ignore_rows=_ignore_rows(N))
    up = upstream_like((N,), dtype)
    out, (g,) = compare_with_reference(
        lambda x: fastweight.token_logprobs(x, y, backend=backend), lambda x: ref.token_logprobs(x, y),
        [z], dtype=dtype, upstream=up, names=["logits"])
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == y.shape
    ignored = y == IGNORE_INDEX
    assert bool((out[ignored] == 0).all()) and bool((g[ignored] == 0).all())


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_values_and_grad(dtype, N, V):
    check_core("torch", dtype, N, V)


def test_auto_backend_on_cpu_matches_torch():
    z, y = make_logits(6, 50, torch.float32, ignore_rows=[2])
    assert torch.equal(fastweight.token_logprobs(z, y), fastweight.token_logprobs(z, y, backend="torch"))


def check_all_ignored(backend, dtype):
    z = torch.randn(4, 9).to(dtype)
    y = torch.full((4,), IGNORE_INDEX)
    x = z.clone().requires_grad_()
    out = fastweight.token_logprobs(x, y, backend=backend)
    out.backward(torch.randn(4))
    assert torch.equal(out.detach(), torch.zeros(4, dtype=out.dtype))
    assert torch.equal(x.grad, torch.zeros_like(z)), "ignored rows must get exactly zero gradient"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_all_ignored(dtype):
    check_all_ignored("torch", dtype)


def check_shift_3d(backend, dtype, B=2, T=5, V=33):
    z, _ = make_logits(B * T, V, dtype, seed=3)
    z = z.reshape(B, T, V)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    y[0, :2] = IGNORE_INDEX  # a prompt
    up = upstream_like((B, T), dtype)
    out, (g,) = compare_with_reference(
        lambda x: fastweight.token_logprobs(x, y, shift=True, backend=backend),
        lambda x: ref.token_logprobs(x, y, shift=True), [z], dtype=dtype, upstream=up, names=["logits"])
    assert out.shape == (B, T)
    # The causal shift: position t is scored against labels[t + 1]; the last position is ignored.
    assert bool((out[:, -1] == 0).all()) and bool((g[:, -1] == 0).all())
    assert out[0, 0] == 0 and out[0, 1] != 0  # labels[0, 1] ignored, labels[0, 2] valid


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_shift_3d(dtype):
    check_shift_3d("torch", dtype)


def test_shift_matches_manual_slicing():
    z, _ = make_logits(12, 20, torch.float32, seed=5)
    z = z.reshape(2, 6, 20)
    y = torch.randint(0, 20, (2, 6))
    shifted = fastweight.token_logprobs(z, y, shift=True)
    manual = fastweight.token_logprobs(z[:, :-1], y[:, 1:])
    assert torch.equal(shifted[:, :-1], manual)


def check_noncontiguous(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(40, 12, generator=gen).to(dtype)
    views = {
        "transposed": base.t(),                          # [12, 40], stride (1, 12): last dim not unit-stride
        "column_slice": base[:, 3:10],                   # [40, 7], row stride 12
        "row_step": base[::3],                            # [14, 12], row stride 36
        "3d_step": base.reshape(4, 10, 12)[:, ::2, 1:],  # [4, 5, 11]
    }
    for name, z in views.items():
        assert not z.is_contiguous(), name
        V = z.shape[-1]
        y = torch.randint(0, V, z.shape[:-1], generator=gen)
        y.view(-1)[0] = IGNORE_INDEX
        up = upstream_like(y.shape, dtype)
        compare_with_reference(lambda x: fastweight.token_logprobs(x, y, backend=backend),
                               lambda x: ref.token_logprobs(x, y), [z], dtype=dtype, upstream=up,
                               names=["logits"])


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_noncontiguous_logits(dtype):
    check_noncontiguous("torch", dtype)


def check_strided_labels(backend):
    z, _ = make_logits(5, 37, torch.float32, seed=7)
    y = torch.randint(0, 37, (10,), generator=torch.Generator().manual_seed(8))[::2]
    assert not y.is_contiguous()
    got = fastweight.token_logprobs(z, y, backend=backend)
    assert torch.allclose(got, ref.token_logprobs(z.double(), y).float(), rtol=1e-6, atol=1e-6)


def test_strided_labels():
    check_strided_labels("torch")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_int32_labels(dtype):
    z, y = make_logits(9, 30, dtype, seed=9, ignore_rows=[4], label_dtype=torch.int32)
    up = upstream_like((9,), dtype)
    compare_with_reference(lambda x: fastweight.token_logprobs(x, y), lambda x: ref.token_logprobs(x, y),
                           [z], dtype=dtype, upstream=up, names=["logits"])


def check_confident(backend, dtype, V=1000):
    z, y = make_logits(6, V, dtype, seed=10, confident_rows=[0, 2, 3, 5], ignore_rows=[4])
    up = upstream_like((6,), dtype)
    # |dz[t]| <= |g_t|: the ulp term scales with the upstream coefficient, not with max |dz| (which is
    # |g_t| * (1 - p_t) ~ 4.5e-5 * V * |g_t| on the confident rows).
    compare_with_reference(lambda x: fastweight.token_logprobs(x, y, backend=backend),
                           lambda x: ref.token_logprobs(x, y), [z], dtype=dtype, upstream=up,
                           grad_scale=float(up.abs().max()), names=["logits"])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_confident_rows(dtype):
    check_confident("torch", dtype)


def check_large_logits(backend, dtype, V=300):
    # |z| ~ 1000 would overflow exp() without the max subtraction (fp16 max is 65504, float32 exp(89) = inf).
    z, y = make_logits(7, V, dtype, seed=11, std=30.0, offset=1000.0, ignore_rows=[3], confident_rows=[1])
    up = upstream_like((7,), dtype)
    # lse ~ 1000 is stored in float32: any lse-based method carries eps * |lse| absolute error in log p and a
    # relative eps * |lse| error in p; scale the ulp term by |lse| accordingly (naive log_softmax avoids it).
    zmax = float(z.double().abs().max())
    compare_with_reference(lambda x: fastweight.token_logprobs(x, y, backend=backend),
                           lambda x: ref.token_logprobs(x, y), [z], dtype=dtype, upstream=up,
                           value_scale=zmax, grad_scale=zmax * float(up.abs().max()), names=["logits"])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_large_logits(dtype):
    check_large_logits("torch", dtype)


def test_logits_without_requires_grad():
    z, y = make_logits(4, 11, torch.float32, ignore_rows=[1])
    out = fastweight.token_logprobs(z, y)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.allclose(out, ref.token_logprobs(z.double(), y).float(), rtol=1e-6, atol=1e-6)


def test_logits_unchanged():
    # token_logprobs never writes into the caller's logits (there is no in-place option on this op).
    z, y = make_logits(5, 50, torch.float32)
    x = z.clone().requires_grad_()
    fastweight.token_logprobs(x, y).sum().backward()
    assert torch.equal(x.detach(), z)


def test_chunked_torch_path_matches(monkeypatch):
    # Force many small row chunks so the chunk boundaries are exercised.
    from fastweight.ops import token_logprobs as op

    monkeypatch.setattr(op, "TORCH_CHUNK_ELEMENTS", 64)
    check_core("torch", torch.float32, 37, 30, seed=12)


# ---------------------------------------------------------------------------------------------------------
# Hidden-state input: x [..., H] with lm_head [V, H] (+ bias, softcap) vs the naive hidden @ W.T.
def check_hidden(backend, dtype, N, H, V, *, bias, softcap, shift=False):
    hidden, w, b, y = make_hidden(N, H, V, dtype, seed=13, bias=bias, ignore_rows=[0] if N > 2 else [])
    if shift:
        hidden, y = hidden.reshape(2, N // 2, H), y.reshape(2, N // 2)
    up = upstream_like(y.shape, dtype)
    tensors = [hidden, w] + ([b] if bias else [])

    def impl(h, w_, b_=None):
        return fastweight.token_logprobs(h, y, lm_head=w_, bias=b_, softcap=softcap, shift=shift, backend=backend)

    def naive(h, w_, b_=None):
        return ref.token_logprobs(h, y, lm_head=w_, bias=b_, softcap=softcap, shift=shift)

    # The matmul's accumulation order differs between implementations; allow H ulps on the gradients.
    compare_with_reference(impl, naive, tensors, dtype=dtype, upstream=up, c=8.0 + H,
                           names=["hidden", "lm_head", "bias"][: len(tensors)])


@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 5.0), (True, 30.0)])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_hidden_lm_head(dtype, bias, softcap):
    check_hidden("torch", dtype, 7, 13, 101, bias=bias, softcap=softcap)


def test_hidden_lm_head_shift_3d():
    check_hidden("torch", torch.float32, 8, 9, 50, bias=True, softcap=None, shift=True)


def test_hidden_lm_head_no_grad_to_hidden():
    hidden, w, _, y = make_hidden(5, 8, 40, torch.float32)
    w = w.clone().requires_grad_()
    fastweight.token_logprobs(hidden, y, lm_head=w).sum().backward()
    w_ref = w.detach().double().requires_grad_()
    ref.token_logprobs(hidden.double(), y, lm_head=w_ref).sum().backward()
    assert torch.allclose(w.grad.double(), w_ref.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The same core cases through the Triton kernels (interpreter; run by tests/test_interpret.py).
@pytest.mark.interpret
@pytest.mark.parametrize("N,V", SMALL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_values_and_grad(dtype, N, V):
    check_core("triton", dtype, N, V)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_all_ignored(dtype):
    check_all_ignored("triton", dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_shift_3d(dtype):
    check_shift_3d("triton", dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=ids)
def test_triton_noncontiguous(dtype):
    check_noncontiguous("triton", dtype)


@pytest.mark.interpret
def test_triton_strided_labels():
    check_strided_labels("triton")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_confident_rows(dtype):
    check_confident("triton", dtype, V=600)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_large_logits(dtype):
    check_large_logits("triton", dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=ids)
def test_triton_hidden_lm_head(dtype):
    check_hidden("triton", dtype, 6, 11, 70, bias=True, softcap=20.0)


# --------------------------------------------------------------------------------------------------------
# Non-finite values at ignored positions never reach the gradient (issue 15, non-finite policy).
def check_nonfinite_ignored_rows(backend, dtype):
    from fastweight.losses._input import weighted_logprobs

    z, y = make_logits(6, 37, dtype, seed=3, ignore_rows=[1, 4])
    z[1] = float("nan")            # an ignored row full of NaN
    z[4] = float("-inf")           # an ignored all -inf row (a fully masked vocabulary)
    w_scale = torch.linspace(0.5, 2.0, 6)
    for fn in (lambda x: (fastweight.token_logprobs(x, y, backend=backend) * w_scale.to(x.device)).sum(),
               lambda x: weighted_logprobs(x, y, beta1=1.0, beta2=0.5, weighted=True, reduction="mean",
                                           backend=backend)[0]):
        x = z.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        assert torch.isfinite(loss), loss
        assert bool(torch.isfinite(x.grad).all())
        assert bool((x.grad[[1, 4]] == 0).all())
        clean = z.clone()
        clean[[1, 4]] = 0.0
        xc = clean.clone().requires_grad_()
        fn(xc).backward()
        torch.testing.assert_close(x.grad, xc.grad)  # valid rows unaffected


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_nonfinite_ignored_rows_give_finite_zero_gradient(dtype):
    check_nonfinite_ignored_rows("torch", dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_nonfinite_ignored_rows(dtype):
    check_nonfinite_ignored_rows("triton", dtype)
