"""Caller-supplied per-token weights (``token_weights=``) on the token-logprob ops, both input forms.

The op returns ``c_t * log p_t`` (or reduces ``c_t * sg[w_t] * log p_t``) and back-propagates ``g_t * c_t``.
References: the float64 full-softmax composition written here (c times the naive log p), with the
error-relative helper. Weights of ones must reproduce the unweighted op bit for bit (values and gradients).
Tests marked ``interpret`` repeat the core cases on the Triton kernels (tests/test_interpret.py).
"""
from __future__ import annotations

import pytest
import torch

import fastweight
from fastweight._constants import IGNORE_INDEX
from fastweight.ops.linear_logprobs import LinearLogprobsOptions, linear_token_logprobs_2d, linear_weighted_logprobs_2d
from fastweight.ops.token_logprobs import TokenLogprobsOptions, token_logprobs_2d, weighted_logprobs_2d
from helpers import DTYPE_IDS, DTYPES, compare_with_reference, make_hidden, upstream_like

FORMS = ("logits", "linear")
REDUCTIONS = ("mean", "sum", "none")
# Exact in bf16 / fp16, mixed signs, zeros (skipped rows on the fused path).
WEIGHT_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.25, 2.0, 0.75, 0.0, 3.0])


def _weights(N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return WEIGHT_VALUES[torch.randint(0, len(WEIGHT_VALUES), (N,), generator=gen)]


def _inputs(form, N, H, V, dtype, seed=0):
    hidden, W, _, y = make_hidden(N, H, V, dtype, seed=seed, ignore_rows=list(range(2, N, 5)))
    if form == "logits":
        return [torch.nn.functional.linear(hidden.float(), W.float()).to(dtype)], y
    return [hidden, W], y


def _naive_logp(tensors, y):
    z = tensors[0] if len(tensors) == 1 else torch.nn.functional.linear(tensors[0], tensors[1])
    valid = y != IGNORE_INDEX
    logp = torch.log_softmax(z, -1).gather(-1, torch.where(valid, y, 0)[:, None]).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp)), valid


def _naive(tensors, y, c, *, beta=None, reduction="none"):
    logp, valid = _naive_logp(tensors, y)
    c = c.to(logp.dtype)
    if beta is None:
        return c * logp
    p = logp.detach().exp()
    w = torch.where(valid, p ** beta[0] * (1 - p) ** beta[1], torch.zeros_like(p))
    per = c * w * logp
    if reduction == "none":
        return per
    return per.sum() / (valid.sum().clamp(min=1) if reduction == "mean" else 1)


def _op(form, tensors, y, c, *, backend, beta=None, reduction="none"):
    if beta is None:
        if form == "logits":
            return token_logprobs_2d(tensors[0], y, TokenLogprobsOptions(backend=backend), c)[0]
        return linear_token_logprobs_2d(tensors[0], tensors[1], None, y,
                                        LinearLogprobsOptions(backend=backend, chunk_elements=300), c)[0]
    kw = dict(weighted=True, beta1=beta[0], beta2=beta[1], reduction=reduction, backend=backend)
    if form == "logits":
        return weighted_logprobs_2d(tensors[0], y, TokenLogprobsOptions(**kw), c)[0]
    return linear_weighted_logprobs_2d(tensors[0], tensors[1], None, y,
                                       LinearLogprobsOptions(**kw, chunk_elements=300), token_weights=c)[0]


def _value_and_grads(fn, tensors, up):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(leaves)
    out.backward(up)
    return out.detach(), [t.grad for t in leaves]


def check_reference(form, dtype, backend, *, beta=None, reduction="none", N=37, H=13, V=101):
    tensors, y = _inputs(form, N, H, V, dtype)
    c = _weights(N)
    up = upstream_like((N,) if reduction == "none" else (), dtype)
    names = ["logits"] if form == "logits" else ["hidden", "lm_head"]
    out, grads = compare_with_reference(
        lambda *t: _op(form, list(t), y, c, backend=backend, beta=beta, reduction=reduction),
        lambda *t: _naive(list(t), y, c, beta=beta, reduction=reduction), tensors, dtype=dtype, upstream=up,
        c=16.0, names=names)
    zero = (c == 0) | (y == IGNORE_INDEX)
    if reduction == "none":
        assert bool((out[zero] == 0).all())
    assert bool((grads[0][zero] == 0).all()), "rows of weight 0 get exactly zero gradient"


def check_ones_bit_for_bit(form, dtype, backend, *, beta=None, reduction="none"):
    tensors, y = _inputs(form, 40, 12, 77, dtype, seed=3)
    ones = torch.ones(40)
    up = upstream_like((40,) if reduction == "none" else (), torch.float32)
    base = _value_and_grads(lambda t: _op(form, t, y, None, backend=backend, beta=beta, reduction=reduction),
                            tensors, up)
    weighted = _value_and_grads(lambda t: _op(form, t, y, ones, backend=backend, beta=beta, reduction=reduction),
                                tensors, up)
    assert torch.equal(base[0], weighted[0])
    for a, b in zip(base[1], weighted[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_token_logprobs_vs_reference(form, dtype):
    check_reference(form, dtype, "torch")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_weighted_ops_vs_reference(form, dtype, reduction):
    check_reference(form, dtype, "torch", beta=(2.0, 0.5), reduction=reduction)


@pytest.mark.parametrize("reduction", [None, *REDUCTIONS])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ones_equal_unweighted_bit_for_bit(form, dtype, reduction):
    beta = None if reduction is None else (2.0, 0.5)
    check_ones_bit_for_bit(form, dtype, "torch", beta=beta, reduction=reduction or "none")


def test_zero_weight_rows_skip_the_fused_gemms():
    """Rows of weight 0 never reach the fused path's GEMMs: NaN hidden states there leave every output and
    gradient finite (they would poison d lm_head if the rows were computed and multiplied by 0)."""
    tensors, y = _inputs("linear", 20, 8, 30, torch.float32)
    c = torch.ones(20)
    c[[0, 7, 13]] = 0.0
    hidden = tensors[0].clone()
    hidden[[0, 7, 13]] = float("nan")
    out, (dh, dw) = _value_and_grads(lambda t: _op("linear", t, y, c, backend="torch"), [hidden, tensors[1]],
                                     torch.ones(20))
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(dw).all())
    assert bool((dh[[0, 7, 13]] == 0).all()) and bool(torch.isfinite(dh).all())


@pytest.mark.parametrize("form", FORMS)
def test_public_token_logprobs_shift_moves_weights_with_labels(form):
    B, T, H, V = 2, 7, 6, 23
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, H, generator=gen)
    W = torch.randn(V, H, generator=gen) * 0.5
    x = hidden if form == "linear" else torch.nn.functional.linear(hidden, W)
    head = dict(lm_head=W) if form == "linear" else {}
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, :2] = IGNORE_INDEX
    c = _weights(B * T, seed=2).reshape(B, T)
    got = fastweight.token_logprobs(x, y, shift=True, token_weights=c, **head)
    plain = fastweight.token_logprobs(x, y, shift=True, **head)
    shifted_c = torch.cat([c[:, 1:], torch.zeros(B, 1)], dim=1)
    torch.testing.assert_close(got, plain * shifted_c, rtol=0, atol=0)


@pytest.mark.parametrize("bad,exc", [
    (torch.ones(5), ValueError),            # wrong shape
    (torch.ones(2, 3, dtype=torch.long), TypeError),  # not floating
    ([1.0] * 6, ValueError),                # not a tensor (public entry)
])
def test_errors_name_token_weights(bad, exc):
    x, y = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(exc, match="token_weights"):
        fastweight.token_logprobs(x, y, token_weights=bad)


def test_op_level_errors():
    logits, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="token_weights shape"):
        token_logprobs_2d(logits, y, TokenLogprobsOptions(), torch.ones(3))
    with pytest.raises(TypeError, match="token_weights must be a floating"):
        linear_token_logprobs_2d(torch.randn(4, 3), torch.randn(5, 3), None, y, LinearLogprobsOptions(),
                                 torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="token_weights contains NaN"):
        token_logprobs_2d(logits, y, TokenLogprobsOptions(check_finite=True), torch.tensor([1.0, float("nan"), 1, 1]))


# ---------------------------------------------------------------------------------------------------------
# Triton kernels through the interpreter (run by tests/test_interpret.py with TRITON_INTERPRET=1).
@pytest.mark.interpret
@pytest.mark.parametrize("reduction", [None, "mean", "none"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_triton(form, dtype, reduction):
    beta = None if reduction is None else (2.0, 0.5)
    check_reference(form, dtype, "triton", beta=beta, reduction=reduction or "none", N=70, H=40, V=300)
    check_ones_bit_for_bit(form, dtype, "triton", beta=beta, reduction=reduction or "none")
