"""The torch path's GEMM helpers (fastweight/ops/_gemm.py): oneDNN for float32 CPU operands, torch.mm otherwise.

Values against float64 products (error-relative to torch.mm in float32), the dispatch rules (which operands
go to oneDNN, which fall back), and the fused-linear ops with oneDNN switched off, since on this machine the
rest of the suite runs them through oneDNN.
"""
from __future__ import annotations

import pytest
import torch

from fastweight.ops import _gemm
from fastweight.ops.linear_kl_div import linear_kl_div
from fastweight.ops.linear_logprobs import LinearLogprobsOptions, linear_weighted_logprobs_2d
from fastweight.reference import linear_kl_div as ref_kl
from fastweight.reference import linear_logprobs as ref
from helpers import assert_err_close, compare_with_reference, make_hidden

HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
needs_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason="this PyTorch build has no oneDNN linear op")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Count the products that went through oneDNN."""
    calls = []
    real = _gemm._onednn_linear

    def spy(x, w, b):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b)

    monkeypatch.setattr(_gemm, "_onednn_linear", spy)
    return calls


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@needs_onednn
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 5, 3), (33, 13, 1013), (256, 64, 4097)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("layout", ["w", "w_t", "x_t"])
def test_linear_matches_float64(M, K, N, bias, layout, onednn_calls):
    x, w = _randn(M, K, seed=1), _randn(N, K, seed=2)
    b = _randn(N, seed=3) if bias else None
    if layout == "w_t":  # a dense transposed weight view, as d hidden = E @ W passes W.t()
        w = _randn(K, N, seed=2).t()
    if layout == "x_t":  # a transposed input view, as the d lm_head blocks pass
        x = _randn(K, M, seed=1).t()
    out = _gemm.linear(x, w, b)
    gt = x.double() @ w.double().t() + (0 if b is None else b.double())
    naive = x @ w.t() + (0 if b is None else b)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert_err_close(out, gt, naive, dtype=torch.float32, k=4.0, name=f"linear {layout}")
    assert len(onednn_calls) == 1, "a float32 CPU product with a dense weight must go through oneDNN"


@needs_onednn
@pytest.mark.parametrize("V,block", [(1, 1024), (1013, 7), (4097, 1024)])
def test_add_linear_t_accumulates_in_vocab_blocks(V, block, monkeypatch, onednn_calls):
    monkeypatch.setenv("FASTWEIGHT_ONEDNN", "all")  # the blocked oneDNN update is opt-in (contended cores)
    monkeypatch.setattr(_gemm, "DW_BLOCK", block)
    c, H = 37, 11
    a, h = _randn(c, V, seed=4), _randn(c, H, seed=5)
    acc0 = _randn(V, H, seed=6)
    out = _gemm.add_linear_t_(acc0.clone(), a, h)
    gt = acc0.double() + a.double().t() @ h.double()
    naive = acc0.clone().addmm_(a.t(), h)
    assert_err_close(out, gt, naive, dtype=torch.float32, k=4.0, name="d lm_head")
    assert len(onednn_calls) == -(-V // block)


def test_falls_back_to_torch_mm(monkeypatch, onednn_calls):
    x, w = _randn(5, 4, seed=1), _randn(6, 4, seed=2)
    strided_w = _randn(6, 8, seed=2)[:, ::2]  # neither w nor w.t() dense: oneDNN may take a very slow path
    for args in [(x.double(), w.double()), (x, strided_w)]:
        out = _gemm.linear(*args)
        torch.testing.assert_close(out, args[0] @ args[1].t(), rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    out = _gemm.linear(xg, w)  # grad mode on and an operand that wants a gradient: stay differentiable
    out.sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(5, 4))
    monkeypatch.setenv("FASTWEIGHT_ONEDNN", "0")
    assert not _gemm.use_onednn(x, w)
    buf = torch.empty(5, 6)
    assert _gemm.linear(x, w, out=buf) is buf  # torch.mm writes into the caller's buffer
    acc = torch.zeros(4, 4)
    _gemm.add_linear_t_(acc, x, x)
    torch.testing.assert_close(acc, x.t() @ x, rtol=0, atol=0)
    assert onednn_calls == []


@needs_onednn
def test_fused_linear_ops_use_onednn_on_cpu(onednn_calls):
    hidden, w, _, y = make_hidden(40, 16, 1030, torch.float32, seed=3)
    hidden.requires_grad_(), w.requires_grad_()
    opts = LinearLogprobsOptions(beta1=1.0, beta2=1.0, weighted=True, reduction="mean", chunk_elements=20 * 1030)
    linear_weighted_logprobs_2d(hidden, w, None, y, opts)[0].backward()
    # 2 chunks x (logits + d hidden); d lm_head goes to MKL's addmm_ (robust when cores are contended)
    assert len(onednn_calls) == 2 * 2


@needs_onednn
def test_d_lm_head_update_defaults_to_one_addmm(onednn_calls):
    """One in-place addmm_ per chunk, not DW_BLOCK-row oneDNN blocks (one OpenMP barrier each: 2x slower
    than addmm_ with a busy process on one of two cores, docs/performance.md); FASTWEIGHT_ONEDNN=all opts in."""
    a, h, acc = _randn(9, 2050, seed=1), _randn(9, 7, seed=2), _randn(2050, 7, seed=3)
    out = _gemm.add_linear_t_(acc.clone(), a, h)
    torch.testing.assert_close(out, acc.clone().addmm_(a.t(), h), rtol=0, atol=0)
    assert onednn_calls == []


@pytest.mark.parametrize("onednn", ["1", "all", "0"], ids=["onednn", "onednn_all", "torch_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linear_satimp_both_gemm_paths(onednn, dtype, monkeypatch):
    """V = 1030 crosses the 1024-row d lm_head block; chunk_elements gives 3 row chunks."""
    monkeypatch.setenv("FASTWEIGHT_ONEDNN", onednn)
    hidden, w, b, y = make_hidden(50, 24, 1030, dtype, seed=11, bias=True, ignore_rows=[0, 7, 8, 49])
    opts = LinearLogprobsOptions(beta1=1.0, beta2=1.0, weighted=True, reduction="sum", chunk_elements=20 * 1030)

    def impl(h, w_, b_):
        return linear_weighted_logprobs_2d(h, w_, b_, y, opts)[0]

    def naive(h, w_, b_):
        return ref.linear_weighted_logprobs(h, w_, y, b_, None, beta1=1.0, beta2=1.0, reduction="sum")

    compare_with_reference(impl, naive, [hidden, w, b], dtype=dtype, c=16.0, names=["hidden", "lm_head", "bias"])


@pytest.mark.parametrize("onednn", ["1", "all", "0"], ids=["onednn", "onednn_all", "torch_mm"])
def test_fused_linear_kl_both_gemm_paths(onednn, monkeypatch):
    monkeypatch.setenv("FASTWEIGHT_ONEDNN", onednn)
    hidden, w, _, y = make_hidden(30, 12, 1030, torch.float32, seed=5, ignore_rows=[2, 3])
    ref_h, ref_w, _, _ = make_hidden(30, 12, 1030, torch.float32, seed=6)

    def impl(h, w_):
        return linear_kl_div(h, w_, ref_h, ref_w, y, backend="torch", chunk_elements=10 * 1030)

    def naive(h, w_):
        return ref_kl.linear_kl_div(h, w_, ref_h.to(h.dtype), ref_w.to(h.dtype), y)

    compare_with_reference(impl, naive, [hidden, w], dtype=torch.float32, c=16.0, names=["hidden", "lm_head"])


@pytest.fixture
def tensor_cores_on_cpu(monkeypatch):
    """Run the 16-bit tensor-core route on CPU: the operands stay 16-bit, the chunk products cast their float32
    side (float16: scaled by its max) and multiply with float32 results (torch.mm of the upcast operands here;
    ``out_dtype`` products on CUDA). Records the dtypes each product saw."""
    seen = []
    real = _gemm._mm_f32

    def spy(a, b):
        seen.append((a.dtype, b.dtype))
        return real(a, b)

    monkeypatch.setattr(_gemm, "tensor_cores", lambda w: w.dtype in _gemm.HALF)
    monkeypatch.setattr(_gemm, "_mm_f32", spy)
    monkeypatch.setitem(_gemm._MM_OUT_DTYPE, "mm", True)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_linear_satimp_tensor_core_route(dtype, tensor_cores_on_cpu):
    """SatImp from hidden states with 16-bit operands kept 16-bit: values and all three gradients within the
    error-relative bound of the float64 reference, every product fed 16-bit operands on both sides."""
    hidden, w, b, y = make_hidden(50, 24, 1030, dtype, seed=11, bias=True, ignore_rows=[0, 7, 8, 49])
    opts = LinearLogprobsOptions(beta1=1.0, beta2=1.0, weighted=True, reduction="sum", chunk_elements=20 * 1030)

    def impl(h, w_, b_):
        return linear_weighted_logprobs_2d(h, w_, b_, y, opts)[0]

    def naive(h, w_, b_):
        return ref.linear_weighted_logprobs(h, w_, y, b_, None, beta1=1.0, beta2=1.0, reduction="sum")

    compare_with_reference(impl, naive, [hidden, w, b], dtype=dtype, c=16.0, names=["hidden", "lm_head", "bias"])
    assert tensor_cores_on_cpu and all(a == dtype and b_ == dtype for a, b_ in tensor_cores_on_cpu)


def test_fused_linear_kl_tensor_core_route(tensor_cores_on_cpu):
    hidden, w, _, y = make_hidden(30, 12, 1030, torch.bfloat16, seed=5, ignore_rows=[2, 3])
    ref_h, ref_w, _, _ = make_hidden(30, 12, 1030, torch.bfloat16, seed=6)

    def impl(h, w_):
        return linear_kl_div(h, w_, ref_h, ref_w, y, backend="torch", chunk_elements=10 * 1030)

    def naive(h, w_):
        return ref_kl.linear_kl_div(h, w_, ref_h.to(h.dtype), ref_w.to(h.dtype), y)

    compare_with_reference(impl, naive, [hidden, w], dtype=torch.bfloat16, c=16.0, names=["hidden", "lm_head"])
    assert tensor_cores_on_cpu and all(a == torch.bfloat16 == b_ for a, b_ in tensor_cores_on_cpu)


def test_half_scaling_keeps_float16_in_range():
    x = torch.tensor([[1e6, -3.0], [2e-3, 0.0]])
    x16, scale = _gemm._half(x, torch.float16)
    assert x16.dtype == torch.float16 and torch.isfinite(x16).all() and scale == 1e6
    assert torch.allclose(x16.float() * scale, x, rtol=1e-3, atol=1e-3 * 1e6 * 2 ** -10)
    xb, sb = _gemm._half(x, torch.bfloat16)
    assert xb.dtype == torch.bfloat16 and sb == 1.0


def test_auto_backend_runs_fused_linear_ops_on_the_chunk_loops():
    from fastweight.ops._common import resolve_backend

    class FakeCuda:  # resolve_backend reads only .is_cuda / .is_floating_point() / .dtype / .device
        is_cuda, dtype, device = True, torch.bfloat16, torch.device("cuda")

        def is_floating_point(self):
            return True

    assert resolve_backend("auto", FakeCuda(), fused_linear=True) == "torch"
    assert resolve_backend("auto", FakeCuda()) == "triton"
    assert resolve_backend("triton", FakeCuda(), fused_linear=True) == "triton"
