"""Fused-linear KL (both models' hidden states + output projections, no logits) vs the float64 naive reference.

Normal run: torch backend with small chunks (chunk boundaries crossed). Tests marked ``interpret`` repeat the
core cases with backend="triton" through the Triton interpreter (tests/test_interpret.py runs them).
"""
from __future__ import annotations

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.ops.linear_kl_div import LinearKLDivOptions, aot_cases, linear_kl_div
from fastweight.reference import linear_kl_div as ref
from helpers import DTYPE_IDS, DTYPES, compare_with_reference, make_hidden, upstream_like

SHAPES = [(1, 1, 1), (7, 5, 3), (37, 13, 101), (66, 33, 257)]  # N = 1, V = 1, odd H, ragged V
VARIANTS = {
    "plain": dict(bias=False, labels=False, kw={}),
    "labels": dict(bias=False, labels=True, kw={}),
    "undial": dict(bias=True, labels=True, kw=dict(ref_shift=10.0)),
    "softcap": dict(bias=True, labels=True, kw=dict(ref_shift=2.0, softcap=4.0, ref_softcap=3.0)),
    # Cohere-like scales on both models (different ones), with bias and soft-capping on top.
    "scale": dict(bias=True, labels=True, kw=dict(ref_shift=2.0, softcap=4.0, ref_softcap=3.0, logit_scale=2.5,
                                                 ref_logit_scale=0.4)),
}


def _inputs(N, H, V, dtype, *, bias, labels, seed=0):
    hidden, w, b, y = make_hidden(N, H, V, dtype, seed=seed + 7 * N + V, bias=bias,
                                  ignore_rows=list(range(1, N, 3)))
    ref_h, ref_w, ref_b, _ = make_hidden(N, H, V, dtype, seed=seed + 1000 + N, bias=bias)
    # The reference model is a perturbed copy (as after a few unlearning steps), so p and q are close.
    ref_h = (hidden.float() + 0.3 * ref_h.float()).to(dtype)
    ref_w = (w.float() + 0.3 * ref_w.float()).to(dtype)
    return hidden, w, b, ref_h, ref_w, ref_b, (y if labels else None)


def check(backend, dtype, N, H, V, variant, *, chunk_elements=300, c=16.0):
    v = VARIANTS[variant]
    hidden, w, b, ref_h, ref_w, ref_b, y = _inputs(N, H, V, dtype, bias=v["bias"], labels=v["labels"])
    up = upstream_like((N,), dtype)
    tensors = [hidden, w] + ([b] if v["bias"] else [])

    def impl(h, w_, b_=None):
        return linear_kl_div(h, w_, ref_h, ref_w, y, bias=b_, ref_bias=ref_b, backend=backend,
                             chunk_elements=chunk_elements, **v["kw"])

    def naive(h, w_, b_=None):
        return ref.linear_kl_div(h, w_, ref_h, ref_w, y, bias=b_, ref_bias=ref_b, **v["kw"])

    # log p = z - lse carries ~eps * |lse| absolute error in any float32 evaluation (the naive one too, where
    # it may cancel by luck), so the ulp term of the value bound is scaled by max |lse| rather than max KL;
    # likewise p and q each carry ~eps * |lse| relative error while the gradient g (p - q) @ W is small when
    # the models are close, so the gradients' ulp term is 2 * max |lse| * max |g| * max(|W|, |h|) (sum(p + q) = 2).
    lin = (lambda x, m, bb: torch.nn.functional.linear(x.double(), m.double(), None if bb is None else bb.double()))
    s, s_r = v["kw"].get("logit_scale", 1.0), v["kw"].get("ref_logit_scale", 1.0)
    lse_scale = max(1.0, float(torch.logsumexp(s * lin(hidden, w, b), -1).abs().max()),
                    float(torch.logsumexp(s_r * lin(ref_h, ref_w, ref_b), -1).abs().max()))
    grad_scale = 2 * s * lse_scale * float(up.abs().max()) * max(1.0, float(w.abs().max()),
                                                                 float(hidden.abs().max()))
    out, grads = compare_with_reference(impl, naive, tensors, dtype=dtype, upstream=up, c=c, value_scale=lse_scale,
                                        grad_scale=grad_scale, names=["hidden", "lm_head", "bias"][: len(tensors)])
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if y is not None:
        ignored = y == IGNORE_INDEX
        assert bool((out[ignored] == 0).all()) and bool((grads[0][ignored] == 0).all())
    assert bool((out >= -1e-5).all()), "KL is non-negative up to rounding"
    return out, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("N,H,V", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_torch(dtype, N, H, V, variant):
    check("torch", dtype, N, H, V, variant)


def test_torch_float64_and_single_chunk():
    for chunk in (300, 1 << 22):
        check("torch", torch.float64, 37, 13, 101, "softcap", chunk_elements=chunk)


def test_matches_logits_kl_div():
    """Same numbers as the logits op on F.linear logits (the path losses/retain.py takes today)."""
    from fastweight.ops.kl_div import kl_div

    hidden, w, b, ref_h, ref_w, ref_b, y = _inputs(20, 9, 50, torch.float32, bias=True, labels=True)
    a = linear_kl_div(hidden, w, ref_h, ref_w, y, bias=b, ref_bias=ref_b, ref_shift=10.0, backend="torch")
    z = torch.nn.functional.linear(hidden, w, b)
    r = torch.nn.functional.linear(ref_h, ref_w, ref_b)
    torch.testing.assert_close(a, kl_div(z, r, y, ref_shift=10.0, backend="torch"), rtol=1e-5, atol=1e-6)


def test_non_contiguous_and_different_ref_width():
    hidden, w, b, _, _, _, y = _inputs(12, 8, 40, torch.float32, bias=True, labels=True)
    big = torch.randn(12, 16)
    h_nc = big[:, ::2]  # unit stride broken
    w_nc = torch.randn(8, 40).t()  # [V, H] view of a transposed tensor
    ref_h, ref_w = torch.randn(12, 5), torch.randn(40, 5) * 0.5  # reference with another hidden size
    out, grads = compare_with_reference(
        lambda h, w_: linear_kl_div(h, w_, ref_h, ref_w, y, ref_shift=1.0, backend="torch", chunk_elements=100),
        lambda h, w_: ref.linear_kl_div(h, w_, ref_h, ref_w, y, ref_shift=1.0),
        [h_nc, w_nc], dtype=torch.float32, upstream=upstream_like((12,), torch.float32), c=16.0)
    assert grads[0].shape == h_nc.shape and grads[1].shape == w_nc.shape


def test_all_ignored_gives_zero():
    hidden, w, b, ref_h, ref_w, ref_b, _ = _inputs(5, 6, 11, torch.float32, bias=True, labels=True)
    y = torch.full((5,), IGNORE_INDEX)
    leaves = [t.clone().requires_grad_() for t in (hidden, w, b)]
    out = linear_kl_div(leaves[0], leaves[1], ref_h, ref_w, y, bias=leaves[2], ref_bias=ref_b, backend="torch")
    out.sum().backward()
    assert torch.equal(out, torch.zeros(5)) and all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


def test_identical_models_give_zero_kl_and_gradient():
    hidden, w, _, _, _, _, y = _inputs(9, 7, 33, torch.float32, bias=False, labels=True)
    h = hidden.clone().requires_grad_()
    out = linear_kl_div(h, w, hidden, w, y, backend="torch")
    out.sum().backward()
    assert float(out.detach().abs().max()) < 1e-6 and float(h.grad.abs().max()) < 1e-6


@pytest.mark.parametrize("bad,match,exc", [
    (dict(ref_requires_grad=True), "ref_hidden requires grad", ValueError),
    (dict(ref_dtype=torch.float64), "ref_hidden dtype", TypeError),
    (dict(ref_rows=3), "ref_hidden must have N", ValueError),
    (dict(ref_vocab=9), "ref_lm_head must be", ValueError),
    (dict(shift_no_labels=True), "ref_shift", ValueError),
    (dict(softcap=-1.0), "softcap", ValueError),
    (dict(ref_softcap=float("inf")), "ref_softcap", ValueError),
    (dict(bias_shape=3), "bias must be", ValueError),
    (dict(label=99), "label", ValueError),
    (dict(logit_scale=0.0), "logit_scale", ValueError),
    (dict(ref_logit_scale=-2.0), "ref_logit_scale", ValueError),
    (dict(logit_scale=True), "logit_scale", TypeError),
])
def test_errors(bad, match, exc):
    N, H, V = 4, 5, 10
    h, w = torch.randn(N, H), torch.randn(V, H)
    rh = torch.randn(bad.get("ref_rows", N), H, dtype=bad.get("ref_dtype", torch.float32))
    rw = torch.randn(bad.get("ref_vocab", V), H)
    rh.requires_grad_(bad.get("ref_requires_grad", False))
    y = torch.randint(0, V, (N,))
    if "label" in bad:
        y[0] = bad["label"]
    kw = dict(softcap=bad.get("softcap"), ref_softcap=bad.get("ref_softcap"),
              bias=torch.randn(bad["bias_shape"]) if "bias_shape" in bad else None,
              logit_scale=bad.get("logit_scale", 1.0), ref_logit_scale=bad.get("ref_logit_scale", 1.0))
    with pytest.raises(exc, match=match):
        linear_kl_div(h, w, rh, rw, None if bad.get("shift_no_labels") else y,
                      ref_shift=1.0 if bad.get("shift_no_labels") else 0.0, backend="torch", **kw)


def test_options_validation():
    with pytest.raises(ValueError, match="chunk_elements"):
        LinearKLDivOptions(chunk_elements=0)
    with pytest.raises(TypeError, match="ref_shift"):
        LinearKLDivOptions(ref_shift="1")


def test_aot_cases_cover_flags():
    cases = aot_cases()
    for kind in ("fwd", "bwd"):
        got = {(c["signature"]["hidden_ptr"], c["constexprs"]["HAS_LABELS"], c["constexprs"]["HAS_SOFTCAP"])
               for c in cases if c["name"].startswith(f"linear_kl_{kind}_")}
        assert {(f"*{d}", f, f) for d in ("fp32", "bf16", "fp16") for f in (False, True)} <= got, kind
    assert {c["constexprs"]["HAS_LABELS"] for c in cases if "finalize" in c["name"]} == {False, True}
    assert not any(c["constexprs"].get("UPCAST_DOT", False) for c in cases)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels through the interpreter (run by tests/test_interpret.py with TRITON_INTERPRET=1).
@pytest.mark.interpret
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("N,H,V", [(1, 5, 3), (37, 13, 101), (70, 40, 300)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_triton(dtype, N, H, V, variant):
    check("triton", dtype, N, H, V, variant)


@pytest.mark.interpret
def test_triton_all_ignored_and_non_contiguous():
    hidden, w, b, ref_h, ref_w, ref_b, _ = _inputs(5, 6, 11, torch.float32, bias=True, labels=True)
    y = torch.full((5,), IGNORE_INDEX)
    h = hidden.clone().requires_grad_()
    out = linear_kl_div(h, w, ref_h, ref_w, y, bias=b, ref_bias=ref_b, backend="triton")
    out.sum().backward()
    assert torch.equal(out, torch.zeros(5)) and torch.equal(h.grad, torch.zeros_like(h))
    big = torch.randn(5, 12)
    a = linear_kl_div(big[:, ::2], w, ref_h, ref_w, backend="triton")
    b_ = linear_kl_div(big[:, ::2].contiguous(), w, ref_h, ref_w, backend="torch")
    torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
