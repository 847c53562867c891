"""Fused-linear token log-likelihoods (hidden [N, H] + lm_head [V, H], no logits) vs float64 naive references.

Normal run: torch backend (CPU), small chunk sizes so chunk boundaries are crossed. Tests marked
``interpret`` repeat the core cases with backend="triton" through the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastweight
from fastweight._constants import IGNORE_INDEX
from fastweight.ops.linear_logprobs import (
    LinearLogprobsOptions, aot_cases, linear_token_logprobs_2d, linear_weighted_logprobs_2d,
)
from fastweight.reference import linear_logprobs as ref
from helpers import DTYPE_IDS, DTYPES, compare_with_reference, make_hidden, upstream_like

SHAPES = [(1, 1, 1), (7, 5, 3), (37, 13, 101), (66, 33, 257)]  # N = 1, V = 1, odd H, ragged V
# Gradients are V-term (d hidden) / N-term (d lm_head) sums computed by GEMMs whose blocking differs from the
# naive one, so the ulp term of the error-relative bound is 16 eps * max|gt| (helpers' default is 8).
REDUCTIONS = ("mean", "sum", "none")
# logit_scale: Granite-like 1/8 alone, and 1.5 with bias and soft-capping (the scale multiplies the bias and
# sits inside the tanh, so each gradient carries it once).
VARIANTS = [dict(bias=False, softcap=None), dict(bias=True, softcap=None), dict(bias=True, softcap=4.0),
            dict(bias=False, softcap=None, logit_scale=0.125), dict(bias=True, softcap=4.0, logit_scale=1.5)]
VARIANT_IDS = ["plain", "bias", "bias_softcap", "scale", "bias_softcap_scale"]


def ids(dtype):
    return DTYPE_IDS[dtype]


def _inputs(N, H, V, dtype, *, bias, seed=0):
    return make_hidden(N, H, V, dtype, seed=seed + 7 * N + V, bias=bias, ignore_rows=list(range(1, N, 3)))


def check_weighted(backend, dtype, N, H, V, reduction, *, bias, softcap, chunk_elements=300, beta=(2.0, 0.5),
                   c=16.0, logit_scale=None):
    hidden, w, b, y = _inputs(N, H, V, dtype, bias=bias)
    up = upstream_like((N,) if reduction == "none" else (), dtype)
    opts = LinearLogprobsOptions(beta1=beta[0], beta2=beta[1], weighted=True, reduction=reduction, softcap=softcap,
                                 backend=backend, chunk_elements=chunk_elements, logit_scale=logit_scale or 1.0)
    tensors = [hidden, w] + ([b] if bias else [])

    def impl(h, w_, b_=None):
        return linear_weighted_logprobs_2d(h, w_, b_, y, opts)[0]

    def naive(h, w_, b_=None):
        return ref.linear_weighted_logprobs(h, w_, y, b_, softcap, beta1=beta[0], beta2=beta[1], reduction=reduction,
                                            logit_scale=logit_scale)

    out, grads = compare_with_reference(impl, naive, tensors, dtype=dtype, upstream=up, c=c,
                                        names=["hidden", "lm_head", "bias"][: len(tensors)])
    ignored = y == IGNORE_INDEX
    assert bool((grads[0][ignored] == 0).all()), "ignored rows must get exactly zero d hidden"
    if reduction == "none":
        assert bool((out[ignored] == 0).all())
    return out, grads


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,H,V", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_weighted_values_and_grads(dtype, N, H, V, reduction, variant):
    check_weighted("torch", dtype, N, H, V, reduction, **variant)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_weighted_float64(variant):
    # In float64 naive == gt, so only the ulp term bounds the error; gradients are sums of V (d hidden) or N
    # (d lm_head) mixed-sign terms whose order differs from the naive one: allow sqrt(V) ulps of the largest.
    check_weighted("torch", torch.float64, 37, 13, 101, "mean", **variant, c=16.0 * 101 ** 0.5)


def check_token(backend, dtype, N, H, V, *, bias, softcap, chunk_elements=300, logit_scale=None):
    hidden, w, b, y = _inputs(N, H, V, dtype, bias=bias, seed=1)
    up = upstream_like((N,), dtype)
    opts = LinearLogprobsOptions(softcap=softcap, backend=backend, chunk_elements=chunk_elements,
                                 logit_scale=logit_scale or 1.0)
    tensors = [hidden, w] + ([b] if bias else [])
    out, grads = compare_with_reference(
        lambda h, w_, b_=None: linear_token_logprobs_2d(h, w_, b_, y, opts)[0],
        lambda h, w_, b_=None: ref.linear_token_logprobs(h, w_, y, b_, softcap, logit_scale=logit_scale),
        tensors, dtype=dtype,
        upstream=up, c=16.0, names=["hidden", "lm_head", "bias"][: len(tensors)])
    ignored = y == IGNORE_INDEX
    assert bool((out[ignored] == 0).all()) and bool((grads[0][ignored] == 0).all())


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("N,H,V", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_token_values_and_grads(dtype, N, H, V, variant):
    check_token("torch", dtype, N, H, V, **variant)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_matches_logits_path(dtype):
    # The same loss through the public API, fused vs logits built by the caller.
    hidden, w, b, y = _inputs(40, 16, 77, torch.float32, bias=True)
    hidden, w, b = hidden.to(dtype), w.to(dtype), b.to(dtype)

    def fused(h, w_, b_):
        return fastweight.satimp_loss(h, y, lm_head=w_, bias=b_, softcap=5.0)

    def logits(h, w_, b_):
        z = torch.nn.functional.linear(h, w_, b_).float()
        return fastweight.satimp_loss(5.0 * torch.tanh(z / 5.0), y)

    compare_with_reference(fused, lambda h, w_, b_: ref.linear_weighted_logprobs(h, w_, y, b_, 5.0, beta1=5.0,
                                                                                beta2=0.1),
                           [hidden, w, b], dtype=dtype, names=["hidden", "lm_head", "bias"])
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, w, b)]
    leaves2 = [t.detach().clone().requires_grad_() for t in (hidden, w, b)]
    l1, l2 = fused(*leaves), logits(*leaves2)
    l1.backward(), l2.backward()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(l1, l2, **tol)
    for a, c in zip(leaves, leaves2):
        torch.testing.assert_close(a.grad.float(), c.grad.float(), **tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=ids)
def test_all_ignored(dtype, reduction):
    hidden, w, b, _ = _inputs(5, 6, 11, dtype, bias=True)
    y = torch.full((5,), IGNORE_INDEX)
    leaves = [t.clone().requires_grad_() for t in (hidden, w, b)]
    out, wts = linear_weighted_logprobs_2d(*leaves, y, LinearLogprobsOptions(weighted=True, beta1=5.0,
                                                                              reduction=reduction))
    out.backward(torch.randn(out.shape))
    assert bool((out == 0).all()) and bool((wts == 0).all())
    for t in leaves:
        assert torch.equal(t.grad, torch.zeros_like(t)), "all-ignored input must give exactly zero gradients"


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_shift_3d_and_noncontiguous(dtype):
    B, T, H, V = 2, 6, 9, 50
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(B, H, T, generator=gen).to(dtype)
    hidden = base.transpose(1, 2)  # [B, T, H], last dim not unit-stride
    assert not hidden.is_contiguous()
    w = (torch.randn(V, H, generator=gen) * 0.6).to(dtype)
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, :2] = IGNORE_INDEX
    shifted = torch.cat([y[:, 1:], torch.full((B, 1), IGNORE_INDEX)], dim=1).reshape(-1)

    def impl(h, w_):
        return fastweight.satimp_loss(h, y, lm_head=w_, shift=True, backend="torch")

    def naive(h, w_):
        return ref.linear_weighted_logprobs(h.reshape(-1, H), w_, shifted, beta1=5.0, beta2=0.1)

    compare_with_reference(impl, naive, [hidden, w], dtype=dtype, names=["hidden", "lm_head"])
    up = upstream_like((B, T), dtype)
    out, (g, _) = compare_with_reference(
        lambda h, w_: fastweight.token_logprobs(h, y, lm_head=w_, shift=True),
        lambda h, w_: ref.linear_token_logprobs(h.reshape(-1, H), w_, shifted).reshape(B, T),
        [hidden, w], dtype=dtype, upstream=up, names=["hidden", "lm_head"])
    assert out.shape == (B, T) and bool((out[:, -1] == 0).all()) and bool((g[:, -1] == 0).all())


@pytest.mark.parametrize("offset", [120.0, -150.0])
def test_large_logits_fallback(offset):
    # A bias of +-offset pushes every exp(z) out of float32 range: the chunk must fall back to the max-shift.
    hidden, w, b, y = _inputs(9, 7, 31, torch.float32, bias=True)
    b = b + offset
    scale = abs(offset)
    compare_with_reference(
        lambda h, w_, b_: fastweight.satimp_loss(h, y, lm_head=w_, bias=b_, beta1=1.0, beta2=1.0),
        lambda h, w_, b_: ref.linear_weighted_logprobs(h, w_, y, b_, beta1=1.0, beta2=1.0),
        [hidden, w, b], dtype=torch.float32, value_scale=scale, grad_scale=scale * 0.1,
        names=["hidden", "lm_head", "bias"])


def test_confident_rows():
    # Rows whose target logit dominates (p ~ 1): 1 - p must come from expm1 for the SimImp weight.
    hidden, w, _, y = _inputs(6, 8, 40, torch.float32, bias=False)
    for r in (0, 2):
        y[r] = r
        w[r] = hidden[r] * (25.0 / hidden[r].pow(2).sum())
    compare_with_reference(
        lambda h, w_: fastweight.simimp_loss(h, y, lm_head=w_, beta=1.0, reduction="none"),
        lambda h, w_: ref.linear_weighted_logprobs(h, w_, y, beta2=1.0, reduction="none"),
        [hidden, w], dtype=torch.float32, upstream=upstream_like((6,), torch.float32),
        names=["hidden", "lm_head"])


def test_num_items_divides_sum():
    hidden, w, _, y = _inputs(12, 8, 30, torch.float32, bias=False)
    compare_with_reference(
        lambda h, w_: linear_weighted_logprobs_2d(h, w_, None, y, LinearLogprobsOptions(
            weighted=True, beta1=1.0, reduction="sum"), divisor=torch.tensor(7))[0],
        lambda h, w_: ref.linear_weighted_logprobs(h, w_, y, beta1=1.0, reduction="sum", divisor=7.0),
        [hidden, w], dtype=torch.float32, upstream=torch.tensor(1.5), names=["hidden", "lm_head"])


def test_frozen_lm_head_and_no_grad():
    hidden, w, _, y = _inputs(10, 8, 30, torch.float32, bias=False)
    h = hidden.clone().requires_grad_()
    fastweight.satimp_loss(h, y, lm_head=w).backward()  # lm_head frozen (PEFT): only d hidden
    h2, w2 = hidden.clone().requires_grad_(), w.clone().requires_grad_()
    fastweight.satimp_loss(h2, y, lm_head=w2).backward()
    assert w.grad is None and torch.equal(h.grad, h2.grad)
    out = fastweight.satimp_loss(hidden, y, lm_head=w)
    assert out.grad_fn is None
    with torch.no_grad():  # leaves that require grad, but no graph: same value, nothing accumulated
        out_ng = fastweight.satimp_loss(h2, y, lm_head=w2)
    assert out_ng.grad_fn is None and torch.equal(out_ng, out)


def test_backward_twice_raises():
    hidden, w, _, y = _inputs(6, 5, 9, torch.float32, bias=False)
    h = hidden.clone().requires_grad_()
    loss = fastweight.satimp_loss(h, y, lm_head=w)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice"):
        loss.backward()


class _SizeProbe(TorchDispatchMode):
    """Records the element count of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 10.0])
def test_never_allocates_n_by_v(reduction, softcap):
    # issue 4 section 4: N * V = 1.6M elements, every legit tensor (hidden, lm_head, grads, one [c, V] chunk
    # buffer) is <= 256 * 1024 elements.
    N, H, V = 1600, 8, 1024
    hidden, w, b, y = _inputs(N, H, V, torch.float32, bias=True)
    leaves = [t.clone().requires_grad_() for t in (hidden, w, b)]
    opts = LinearLogprobsOptions(weighted=True, beta1=5.0, beta2=0.1, reduction=reduction, softcap=softcap,
                                 chunk_elements=256 * V)
    with _SizeProbe() as probe:
        out = linear_weighted_logprobs_2d(*leaves, y, opts)[0]
        out.backward(torch.ones_like(out))
    assert probe.largest[0] <= 256 * V < N * V, f"largest tensor {probe.largest} vs N * V = {N * V}"
    assert all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in leaves)


def test_probe_sees_the_naive_path():
    # The probe itself must be able to fail: the naive composition allocates [N, V].
    hidden, w, _, y = _inputs(64, 8, 100, torch.float32, bias=False)
    with _SizeProbe() as probe:
        ref.linear_weighted_logprobs(hidden, w, y)
    assert probe.largest[0] >= 64 * 100


@pytest.mark.parametrize("bad,match,exc", [
    (dict(lm_head=torch.zeros(5, 4)), "lm_head", ValueError),
    (dict(lm_head=torch.zeros(5, 3, dtype=torch.float64)), "lm_head dtype", TypeError),
    (dict(bias=torch.zeros(4)), "bias", ValueError),
    (dict(softcap=-1.0), "softcap", ValueError),
    (dict(labels=torch.tensor([0, 5])), "labels", ValueError),
    (dict(logit_scale=0.0), "logit_scale", ValueError),
    (dict(logit_scale=float("inf")), "logit_scale", ValueError),
    (dict(logit_scale=1e-50), "logit_scale", ValueError),  # 0 in float32, what the kernels read
    (dict(logit_scale="8"), "logit_scale", TypeError),
])
def test_errors(bad, match, exc):
    args = dict(hidden=torch.zeros(2, 3), lm_head=torch.zeros(5, 3), bias=None, labels=torch.tensor([0, 1]),
                softcap=None, logit_scale=1.0)
    args.update(bad)
    softcap, scale = args.pop("softcap"), args.pop("logit_scale")
    with pytest.raises(exc, match=match):
        linear_token_logprobs_2d(args["hidden"], args["lm_head"], args["bias"], args["labels"],
                                 LinearLogprobsOptions(softcap=softcap, logit_scale=scale))


def test_divisor_needs_reduction():
    with pytest.raises(ValueError, match="divisor"):
        linear_weighted_logprobs_2d(torch.zeros(2, 3), torch.zeros(5, 3), None, torch.tensor([0, 1]),
                                    LinearLogprobsOptions(reduction="none"), divisor=2.0)
    with pytest.raises(ValueError, match="num_items"):
        fastweight.losses._input.weighted_logprobs(torch.zeros(2, 3), torch.tensor([0, 1]),
                                                   lm_head=torch.zeros(5, 3), num_items=2)


def test_aot_cases_cover_every_constexpr_combination():
    cases = aot_cases()
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names))
    for kind in ("fwd", "bwd"):
        combos = {(c["signature"]["hidden_ptr"], c["constexprs"]["HAS_BIAS"], c["constexprs"]["HAS_SOFTCAP"])
                  for c in cases if c["name"].startswith(f"linear_{kind}_")}
        assert combos == {(f"*{d}", b, s) for d in ("fp32", "bf16", "fp16") for b in (False, True)
                          for s in (False, True)}, kind
    assert {c["constexprs"]["HAS_WEIGHTS"] for c in cases if "finalize" in c["name"]} == {False, True}
    for c in cases:
        assert set(c["constexprs"]) <= {k for k, v in c["signature"].items() if v == "constexpr"}
        assert not c["constexprs"].get("UPCAST_DOT", False), "UPCAST_DOT is an interpreter-only workaround"


# ---------------------------------------------------------------------------------------------------------
# Triton kernels through the interpreter (run by tests/test_interpret.py with TRITON_INTERPRET=1).
INTERPRET_SHAPES = [(1, 5, 3), (37, 13, 101), (70, 40, 300)]  # > BLOCK_N rows, > BLOCK_V columns, H > BLOCK_H


@pytest.mark.interpret
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("N,H,V", INTERPRET_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_weighted(dtype, N, H, V, variant):
    check_weighted("triton", dtype, N, H, V, "mean", **variant)


@pytest.mark.interpret
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_token_and_none(dtype, variant):
    check_token("triton", dtype, 37, 13, 101, **variant)
    check_weighted("triton", dtype, 37, 13, 101, "none", **variant)


@pytest.mark.interpret
def test_triton_all_ignored():
    hidden, w, b, _ = _inputs(5, 6, 11, torch.float32, bias=True)
    y = torch.full((5,), IGNORE_INDEX)
    leaves = [t.clone().requires_grad_() for t in (hidden, w, b)]
    out = fastweight.satimp_loss(leaves[0], y, lm_head=leaves[1], bias=leaves[2], backend="triton")
    out.backward()
    assert out.item() == 0 and all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


def test_autocast_mixed_dtypes_match_explicit_cast():
    """Under CPU bf16 autocast (bf16 hidden, fp32 lm_head, as a decoder under autocast produces), the loss
    equals the one computed on explicitly bf16-rounded inputs and each gradient keeps its input's dtype."""
    torch.manual_seed(0)
    h = torch.randn(6, 16).bfloat16().requires_grad_()
    W = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastweight.satimp_loss(h, y, lm_head=W, beta1=1.0)
        loss.backward()  # backward inside the autocast region too
    assert h.grad.dtype == torch.bfloat16 and W.grad.dtype == torch.float32
    h2 = h.detach().float().requires_grad_()
    W2 = W.detach().bfloat16().float().requires_grad_()  # what autocast's cast feeds the op
    ref = fastweight.satimp_loss(h2, y, lm_head=W2, beta1=1.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(W.grad, W2.grad, rtol=2e-2, atol=1e-3)  # W2.grad before the bf16 round trip
    torch.testing.assert_close(h.grad.float(), h2.grad, rtol=2e-2, atol=1e-3)
