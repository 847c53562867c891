"""The Triton kernels on a real GPU (``cuda`` marker: skipped without a CUDA device, run them on a GPU box
with ``python -m pytest tests/test_cuda.py``). Same float64 references and error-relative tolerances as the
CPU suites; the interpreter and AOT-compile suites cover the kernels where no GPU is present."""
from __future__ import annotations

import pytest
import torch

import fastweight
from fastweight._constants import IGNORE_INDEX
from fastweight.ops.kl_div import kl_div
from fastweight.reference import linear_logprobs as lref
from fastweight.reference import reweighted as rref
from fastweight.reference import token_logprobs as tref
from fastweight.reference.kl_div import kl_div as kl_ref
from helpers import DTYPE_IDS, DTYPES, compare_with_reference, make_hidden, make_logits, upstream_like

pytestmark = pytest.mark.cuda
SHAPES = [(1, 7), (3, 1000), (257, 4097), (64, 32013)]


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_token_logprobs_triton(dtype, N, V):
    z, y = _cuda(*make_logits(N, V, dtype, seed=N + V, ignore_rows=list(range(1, N, 4))))
    up = upstream_like((N,), dtype).cuda()
    compare_with_reference(lambda x: fastweight.token_logprobs(x, y, backend="triton"),
                           lambda x: tref.token_logprobs(x, y), [z], dtype=dtype, upstream=up, names=["logits"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_satimp_logits_triton(dtype, reduction):
    z, y = _cuda(*make_logits(129, 4097, dtype, seed=3, ignore_rows=[0, 5]))
    up = upstream_like((129,), dtype).cuda() if reduction == "none" else None
    compare_with_reference(
        lambda x: fastweight.satimp_loss(x, y, beta1=1.0, beta2=0.5, reduction=reduction, backend="triton"),
        lambda x: rref.weighted_loss(x, y, beta1=1.0, beta2=0.5, reduction=reduction),
        [z], dtype=dtype, upstream=up, names=["logits"])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_satimp_fused_linear_triton(dtype, reduction):
    h, W, b, y = _cuda(*make_hidden(130, 96, 2051, dtype, seed=4, bias=True, ignore_rows=[1, 7]))
    up = upstream_like((130,), dtype).cuda() if reduction == "none" else None
    compare_with_reference(
        lambda h_, W_, b_: fastweight.satimp_loss(h_, y, lm_head=W_, bias=b_, beta1=1.0, beta2=0.5,
                                                  reduction=reduction,
                                                  backend="triton"),
        lambda h_, W_, b_: lref.linear_weighted_logprobs(h_, W_, y, b_, beta1=1.0, beta2=0.5, reduction=reduction),
        [h, W, b], dtype=dtype, upstream=up, names=["hidden", "lm_head", "bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_kl_div_triton(dtype):
    z, y = _cuda(*make_logits(65, 4097, dtype, seed=5, ignore_rows=[2]))
    r, _ = _cuda(*make_logits(65, 4097, dtype, seed=6))
    up = upstream_like((65,), dtype).cuda()
    compare_with_reference(lambda x: kl_div(x, r, y, backend="triton"), lambda x: kl_ref(x, r, y),
                           [z], dtype=dtype, upstream=up, names=["logits"])


def test_auto_backend_picks_triton_on_cuda():
    z, y = _cuda(*make_logits(4, 100, torch.float32, seed=7))
    assert y.max() < 100 and IGNORE_INDEX < 0
    torch.testing.assert_close(fastweight.token_logprobs(z, y), fastweight.token_logprobs(z, y, backend="triton"))


@pytest.mark.parametrize("variant", ["plain", "undial_softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_linear_kl_div_triton(dtype, variant):
    from fastweight.ops.linear_kl_div import linear_kl_div
    from fastweight.reference.linear_kl_div import linear_kl_div as lkl_ref

    full = variant != "plain"
    h, W, b, y = _cuda(*make_hidden(130, 96, 2051, dtype, seed=8, bias=full, ignore_rows=[1, 7]))
    rh, rW, rb, _ = _cuda(*make_hidden(130, 96, 2051, dtype, seed=9, bias=full))
    rh, rW = (h.float() + 0.3 * rh.float()).to(dtype), (W.float() + 0.3 * rW.float()).to(dtype)
    kw = dict(ref_shift=10.0, softcap=4.0, ref_softcap=3.0) if full else {}
    y = y if full else None
    up = upstream_like((130,), dtype).cuda()
    # ulp scales as in tests/test_linear_kl_div.py: eps * |lse| for values, 2 |lse| |g| max(|W|, |h|) for grads.
    lse = max(float(torch.logsumexp(torch.nn.functional.linear(x.double(), m.double()), -1).abs().max())
              for x, m in ((h, W), (rh, rW)))
    gscale = 2 * lse * float(up.abs().max()) * max(1.0, float(W.abs().max()), float(h.abs().max()))
    tensors = [h, W] + ([b] if full else [])
    compare_with_reference(
        lambda x, w, bb=None: linear_kl_div(x, w, rh, rW, y, bias=bb, ref_bias=rb, backend="triton", **kw),
        lambda x, w, bb=None: lkl_ref(x, w, rh, rW, y, bias=bb, ref_bias=rb, **kw),
        tensors, dtype=dtype, upstream=up, c=16.0, value_scale=max(1.0, lse), grad_scale=gscale,
        names=["hidden", "lm_head", "bias"][: len(tensors)])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_satimp_fused_linear_auto_cuda(dtype, reduction):
    """backend="auto" on CUDA runs the fused-linear loss on the chunk loops with cuBLAS products (16-bit operands
    on the tensor cores with float32 results, no float32 copy of lm_head), within the same error bound."""
    from fastweight.ops import _gemm

    h, W, b, y = _cuda(*make_hidden(1031, 96, 4099, dtype, seed=21, bias=True, ignore_rows=[0, 9, 10]))
    up = upstream_like((1031,), dtype).cuda() if reduction == "none" else None
    compare_with_reference(
        lambda h_, W_, b_: fastweight.satimp_loss(h_, y, lm_head=W_, bias=b_, beta1=1.0, beta2=0.5,
                                                  reduction=reduction),
        lambda h_, W_, b_: lref.linear_weighted_logprobs(h_, W_, y, b_, beta1=1.0, beta2=0.5, reduction=reduction),
        [h, W, b], dtype=dtype, upstream=up, names=["hidden", "lm_head", "bias"])
    if dtype != torch.float32:  # the out_dtype products ran (a torch without them falls back to an upcast)
        assert _gemm._MM_OUT_DTYPE == {"mm": True}, _gemm._MM_OUT_DTYPE


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_logit_scale_and_token_weights_cuda(dtype, backend):
    """logit_scale (Cohere / Granite) and caller token weights on both CUDA routes: the Triton kernels and the
    cuBLAS chunk loops ("auto"; 16-bit operands scale their float32 products, not the 16-bit hidden states)."""
    from fastweight.ops.token_logprobs import TokenLogprobsOptions, weighted_logprobs_2d

    h, W, b, y = _cuda(*make_hidden(1031, 96, 4099, dtype, seed=22, bias=True, ignore_rows=[0, 9, 10]))
    names = ["hidden", "lm_head", "bias"]
    compare_with_reference(
        lambda h_, W_, b_: fastweight.satimp_loss(h_, y, lm_head=W_, bias=b_, beta1=1.0, beta2=0.5, softcap=4.0,
                                                  logit_scale=1.5, backend=backend),
        lambda h_, W_, b_: lref.linear_weighted_logprobs(h_, W_, y, b_, 4.0, beta1=1.0, beta2=0.5, logit_scale=1.5),
        [h, W, b], dtype=dtype, c=16.0, names=names)
    gen = torch.Generator().manual_seed(3)
    c = torch.tensor([0.0, 0.5, 1.0, 2.0, -0.25])[torch.randint(0, 5, (1031,), generator=gen)].cuda()
    up = upstream_like((1031,), dtype).cuda()
    compare_with_reference(
        lambda h_, W_, b_: fastweight.token_logprobs(h_, y, lm_head=W_, bias=b_, logit_scale=0.125, token_weights=c,
                                                     backend=backend),
        lambda h_, W_, b_: c.to(h_.dtype) * lref.linear_token_logprobs(h_, W_, y, b_, logit_scale=0.125),
        [h, W, b], dtype=dtype, upstream=up, c=16.0, names=names)
    z, yz = _cuda(*make_logits(129, 4097, dtype, seed=23, ignore_rows=[0, 5]))
    cz = c[:129]
    opts = TokenLogprobsOptions(weighted=True, beta1=1.0, beta2=0.5, reduction="mean", backend="triton")
    compare_with_reference(
        lambda x: weighted_logprobs_2d(x, yz, opts, cz)[0],
        lambda x: (cz.to(x.dtype) * rref.weighted_loss(x, yz, beta1=1.0, beta2=0.5, reduction="none")).sum()
        / (yz != IGNORE_INDEX).sum(),
        [z], dtype=dtype, names=["logits"])
