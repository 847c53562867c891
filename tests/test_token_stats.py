"""Fused evaluation statistics (ops/token_stats.py): log p of the label, greedy-argmax flag, mean and variance of
log p under the model's distribution, from logits and from hidden states without the [N, V] logits.

Against the float64 full-softmax reference (fastweight/reference/token_stats.py), error-relative to the same
reference computed in the input dtype; argmax flags exactly, ties included (torch.argmax's first index).
"""
from __future__ import annotations

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.ops import _gemm
from fastweight.ops.token_stats import TokenStatsOptions, linear_token_stats, token_stats
from fastweight.reference import token_stats as ref
from helpers import DTYPE_IDS, DTYPES, assert_err_close, make_hidden, make_logits

NAMES = ("logp", "argmax", "mean", "var")


def _with_greedy_labels(z: torch.Tensor, y: torch.Tensor, every: int = 2) -> torch.Tensor:
    """Every ``every``-th row's label is its argmax, so the flag is True on many rows."""
    y = y.clone()
    greedy = z.float().argmax(-1)
    keep = y != IGNORE_INDEX
    rows = torch.arange(0, y.shape[0], every)
    y[rows] = torch.where(keep[rows], greedy[rows], y[rows])
    return y


def check(impl, gt, naive, dtype, *, k=2.0, c=16.0):
    impl_t = tuple(impl)
    for i, name in enumerate(NAMES):
        if name == "argmax":
            assert impl_t[i].dtype == torch.bool
            assert torch.equal(impl_t[i], gt[i]), f"argmax flags differ at {torch.nonzero(impl_t[i] != gt[i])[:5].tolist()}"
            continue
        assert impl_t[i].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_err_close(impl_t[i], gt[i], naive[i], dtype=dtype, k=k, c=c, name=name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("N,V", [(1, 7), (37, 1013), (129, 4097)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_token_stats_matches_reference(backend, dtype, N, V):
    z, y = make_logits(N, V, dtype, seed=N + V, ignore_rows=list(range(1, N, 5)), confident_rows=[0])
    y = _with_greedy_labels(z, y)
    check(token_stats(z, y, backend=backend), ref.token_stats(z, y), ref.token_stats(z, y, dtype=dtype), dtype)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_argmax_ties_take_the_first_index(backend):
    """Rows whose maximum appears twice (once in each of two vocabulary tiles on the kernel): the label at the
    first occurrence is the argmax, the one at the second is not, as with torch.argmax."""
    V = 5000
    z = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    z[:, 10] = z[:, 4500] = 50.0
    y = torch.tensor([10, 4500, 10, 4500])
    out = token_stats(z, y, backend=backend)
    assert out.argmax.tolist() == [True, False, True, False]
    assert out.argmax.tolist() == (z.argmax(-1) == y).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("bias,softcap,scale", [(False, None, 1.0), (True, 4.0, 1.0), (False, None, 0.125)],
                         ids=["plain", "bias_softcap", "logit_scale"])
def test_linear_token_stats_matches_reference_and_logits_path(dtype, bias, softcap, scale):
    """From hidden states, three row chunks (chunk_elements): values within the reference bound, argmax flags
    equal to the logits path's on the same model."""
    N, H, V = 150, 24, 1013
    h, W, b, y = make_hidden(N, H, V, dtype, seed=7, bias=bias, ignore_rows=[0, 9, 149])
    z = scale * (h.double() @ W.double().t() + (0 if b is None else b.double()))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    y = _with_greedy_labels(z, y)
    out = linear_token_stats(h, y, lm_head=W, bias=b, softcap=softcap, logit_scale=scale, chunk_elements=60 * V)
    gt = ref.linear_token_stats(h, y, lm_head=W, bias=b, softcap=softcap, logit_scale=scale)
    zn = scale * (h.float() @ W.float().t() + (0 if b is None else b.float()))
    if softcap is not None:
        zn = softcap * torch.tanh(zn / softcap)
    check(out, gt, ref.token_stats(zn.to(dtype), y, dtype=dtype), dtype, c=32.0)
    logits_path = token_stats(zn, y)
    assert torch.equal(out.argmax, logits_path.argmax)


def test_shapes_non_contiguous_and_float64():
    z, y = make_logits(2 * 9, 301, torch.float64, seed=5, ignore_rows=[3])
    z3 = z.reshape(2, 9, 301).transpose(0, 1)  # [9, 2, V] non-contiguous
    y3 = y.reshape(2, 9).t()
    out = token_stats(z3, y3)
    assert all(t.shape == (9, 2) for t in out) and out.logp.dtype == torch.float64
    gt = ref.token_stats(z3, y3)
    for a, g in zip(out, gt):
        if a.dtype == torch.bool:
            assert torch.equal(a, g)
        else:
            torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-10)


def test_all_rows_ignored_and_empty():
    z, y = make_logits(5, 50, torch.float32, ignore_rows=range(5))
    out = token_stats(z, y)
    assert all(float(t.float().abs().sum()) == 0 for t in out)
    empty = token_stats(torch.zeros(0, 50), torch.zeros(0, dtype=torch.long))
    assert all(t.shape == (0,) for t in empty)


def test_linear_path_never_forms_all_logits(monkeypatch):
    """Every product the fused path asks for is at most chunk_elements // V rows: no [N, V] block."""
    N, H, V = 400, 16, 1000
    h, W, _, y = make_hidden(N, H, V, torch.float32, seed=2)
    rows = []
    real = _gemm.linear

    def spy(x, w, b=None, *, out=None):
        rows.append(x.shape[0])
        return real(x, w, b, out=out)

    import fastweight.ops.token_stats as ts

    monkeypatch.setattr(ts, "linear", spy)
    linear_token_stats(h, y, lm_head=W, chunk_elements=100 * V)
    assert rows and max(rows) == 100 and sum(rows) == N


@pytest.mark.parametrize("call,exc,match", [
    (lambda: token_stats(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long)), TypeError, "logits"),
    (lambda: token_stats(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long)), ValueError, "labels"),
    (lambda: token_stats(torch.zeros(3, 4), torch.full((3,), 4)), ValueError, "label"),
    (lambda: linear_token_stats(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), lm_head=torch.zeros(5, 3)),
     ValueError, "lm_head"),
    (lambda: TokenStatsOptions(chunk_elements=0), ValueError, "chunk_elements"),
    (lambda: TokenStatsOptions(softcap=-1.0), ValueError, "softcap"),
])
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
