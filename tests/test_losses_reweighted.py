"""GA / WGA / SimImp / SatImp losses: values and gradients vs the float64 naive reference.

Normal run: torch backend. Tests marked ``interpret`` repeat the core cases with backend="triton" under
TRITON_INTERPRET=1 (run by tests/test_interpret.py).
"""
from __future__ import annotations

import pytest
import torch

import fastweight
from fastweight._constants import IGNORE_INDEX
from fastweight.reference import reweighted as ref
from fastweight.reference.token_logprobs import token_logprobs as ref_logp
from helpers import (DTYPE_IDS, DTYPES, compare_with_reference, make_hidden, make_logits, upstream_like,
                     value_and_grads)

ALL_DTYPES = (*DTYPES, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
LOSS_CASES = [
    ("satimp", {}), ("satimp", {"beta1": 0.0, "beta2": 0.0}), ("satimp", {"beta1": 2.0, "beta2": 1.0}),
    ("satimp", {"beta1": 0.0, "beta2": 0.5}), ("wga", {}), ("wga", {"beta": 0.0}), ("wga", {"beta": 1.0}),
    ("simimp", {}), ("simimp", {"beta": 0.0}), ("simimp", {"beta": 2.5}), ("ga", {}),
]
SHAPES = [(1, 1), (3, 7), (257, 7), (1, 1000), (257, 1000), (3, 32013)]


def ids(x):
    if isinstance(x, torch.dtype):
        return DTYPE_IDS[x]
    if isinstance(x, dict):
        return "-".join(f"{k}{v:g}" for k, v in x.items()) or "default"
    return str(x)


def impl_fn(name):
    return getattr(fastweight, f"{name}_loss")


def ref_fn(name):
    return getattr(ref, f"{name}_loss")


def check_loss(backend, name, kw, dtype, reduction, N, V, *, seed=0, confident=True, **extra):
    ignore = list(range(1, N, 5))
    conf = [r for r in (0, 2) if r < N and r not in ignore] if confident else []
    z, y = make_logits(N, V, dtype, seed=seed + 7 * N + V, ignore_rows=ignore, confident_rows=conf)
    up = upstream_like((N,), dtype) if reduction == "none" else None
    # Per-row coefficient |g_t| <= max w * |upstream| (/ n for "mean"): the scale of every gradient entry.
    n = max(1, int((y != IGNORE_INDEX).sum()))
    g_scale = (float(up.abs().max()) if up is not None else 1.0) / (n if reduction == "mean" else 1)
    out, (g,) = compare_with_reference(
        lambda x: impl_fn(name)(x, y, reduction=reduction, backend=backend, **kw, **extra),
        lambda x: ref_fn(name)(x, y, reduction=reduction, **kw),
        [z], dtype=dtype, upstream=up, grad_scale=g_scale, names=["logits"])
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (y.shape if reduction == "none" else ())
    assert bool((g[y == IGNORE_INDEX] == 0).all())
    return out, g


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
@pytest.mark.parametrize("name,kw", LOSS_CASES, ids=ids)
def test_loss_values_and_grad(name, kw, dtype, reduction):
    check_loss("torch", name, kw, dtype, reduction, 37, 129)


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_satimp_shapes(dtype, N, V):
    check_loss("torch", "satimp", {}, dtype, "mean", N, V)
    check_loss("torch", "simimp", {"beta": 1.0}, dtype, "none", N, V)


def test_large_shape():
    # N = 257 rows of V = 32013 (8.2 M logits): chunking over rows, the fused mean gradient at scale.
    check_loss("torch", "satimp", {"beta1": 1.0, "beta2": 0.1}, torch.float32, "mean", 257, 32013)


def test_defaults_match_spec():
    z, y = make_logits(20, 50, torch.float64, seed=1, confident_rows=[3, 4])
    assert torch.equal(fastweight.satimp_loss(z, y), fastweight.satimp_loss(z, y, beta1=5.0, beta2=0.1))
    assert torch.equal(fastweight.wga_loss(z, y), fastweight.wga_loss(z, y, beta=5.0))
    assert torch.equal(fastweight.simimp_loss(z, y), fastweight.simimp_loss(z, y, beta=1.0))
    # GA = -tokmean(ell) = mean log p; WGA/SimImp are the one-sided SatImp cases.
    assert torch.allclose(fastweight.ga_loss(z, y), torch.log_softmax(z, -1).gather(1, y[:, None]).mean())
    assert torch.equal(fastweight.wga_loss(z, y, beta=3.0), fastweight.satimp_loss(z, y, beta1=3.0, beta2=0.0))
    assert torch.equal(fastweight.simimp_loss(z, y, beta=0.7),
                       fastweight.satimp_loss(z, y, beta1=0.0, beta2=0.7))


def check_all_ignored(backend, name, dtype, reduction):
    z = (torch.randn(4, 9) * 3).to(dtype)
    y = torch.full((4,), IGNORE_INDEX)
    up = torch.randn(4) if reduction == "none" else None
    out, (g,) = value_and_grads(lambda x: impl_fn(name)(x, y, reduction=reduction, backend=backend), [z], up)
    assert not bool(out.isnan().any()) and bool((out == 0).all()), out
    assert torch.equal(g, torch.zeros_like(z)), "all-ignored batch must give exactly zero gradient"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["satimp", "wga", "simimp", "ga"])
def test_all_ignored(name, reduction):
    for dtype in ALL_DTYPES:
        check_all_ignored("torch", name, dtype, reduction)


def check_shift_3d(backend, dtype, reduction, B=3, T=6, V=41):
    z, _ = make_logits(B * T, V, dtype, seed=21, confident_rows=[4])
    z = z.reshape(B, T, V)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(22))
    y[:, :2] = IGNORE_INDEX
    up = upstream_like((B, T), dtype) if reduction == "none" else None
    out, (g,) = compare_with_reference(
        lambda x: fastweight.satimp_loss(x, y, shift=True, reduction=reduction, backend=backend),
        lambda x: ref.satimp_loss(x, y, shift=True, reduction=reduction), [z], dtype=dtype, upstream=up,
        names=["logits"])
    assert bool((g[:, -1] == 0).all()) and bool((g[:, 0] == 0).all())  # labels[:, 1] ignored, last shifted out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_shift_3d(dtype, reduction):
    check_shift_3d("torch", dtype, reduction)


def test_mean_over_valid_tokens_of_whole_batch():
    # tokmean is over all valid tokens of the micro-batch, not a mean of per-sequence means.
    z, _ = make_logits(8, 30, torch.float64, seed=23)
    z = z.reshape(2, 4, 30)
    y = torch.randint(0, 30, (2, 4))
    y[0, 1:] = IGNORE_INDEX  # sequence 0 has one valid token, sequence 1 has four
    per_token = fastweight.ga_loss(z, y, reduction="none")
    mean = fastweight.ga_loss(z, y, reduction="mean")
    assert torch.allclose(mean, per_token.sum() / 5)
    assert not torch.allclose(mean, per_token.sum(1).div(torch.tensor([1.0, 4.0], dtype=z.dtype)).mean())


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_noncontiguous_logits(dtype):
    gen = torch.Generator().manual_seed(24)
    base = torch.randn(3, 16, 40, generator=gen).to(dtype)
    for z in (base[:, ::2, 5:37], base.transpose(1, 2)):
        assert not z.is_contiguous()
        y = torch.randint(0, z.shape[-1], z.shape[:-1], generator=gen)
        y[0, :2] = IGNORE_INDEX
        for reduction in REDUCTIONS:
            up = upstream_like(y.shape, dtype) if reduction == "none" else None
            compare_with_reference(lambda x: fastweight.satimp_loss(x, y, beta2=1.0, reduction=reduction),
                                   lambda x: ref.satimp_loss(x, y, beta2=1.0, reduction=reduction),
                                   [z], dtype=dtype, upstream=up, names=["logits"])


def check_confident_relative(backend, dtype, V=129):
    """On confident rows (p -> 1) the weight (1 - p)**beta2 and the per-token loss must keep *relative*
    precision: 1 - p = -expm1(log p) with log p itself accurate to a few ulps relative. A global ulp scale
    would hide a 1 - exp(log p) or a z_y - lse (both ~1e-3 relative off here), so compare per element
    against the float64 reference, at float32 precision (the accumulation dtype of every input dtype)."""
    from fastweight.losses._input import weighted_logprobs

    z, y = make_logits(8, V, dtype, seed=40, confident_rows=range(8), ignore_rows=[6])
    valid = y != IGNORE_INDEX
    for beta1, beta2 in [(0.0, 1.0), (5.0, 0.1), (1.0, 2.0), (5.0, 0.0)]:
        out, w = weighted_logprobs(z, y, beta1=beta1, beta2=beta2, reduction="none", backend=backend)
        gt = ref.satimp_loss(z.double(), y, beta1=beta1, beta2=beta2, reduction="none")
        lp = ref_logp(z.double(), y)
        w_gt = torch.where(valid, ref.importance_weight(lp, beta1, beta2), 0.0)
        tol = 16 * torch.finfo(torch.float32).eps
        for name, a, b in [("per-token loss", out, gt), ("weight", w, w_gt)]:
            rel = ((a.double() - b).abs() / b.abs().clamp(min=1e-30))[valid]
            assert float(rel.max()) <= tol, f"{name} (beta1={beta1}, beta2={beta2}): max rel err {float(rel.max()):.3g}"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_confident_rows_relative_precision(dtype):
    check_confident_relative("torch", dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_large_logits(dtype):
    z, y = make_logits(9, 200, dtype, seed=25, std=30.0, offset=1000.0, ignore_rows=[2], confident_rows=[0])
    zmax = float(z.double().abs().max())  # lse-based log p carries eps * |lse| absolute error (see token tests)
    for name, kw in [("satimp", {"beta1": 0.5, "beta2": 0.5}), ("ga", {})]:
        compare_with_reference(lambda x: impl_fn(name)(x, y, **kw), lambda x: ref_fn(name)(x, y, **kw),
                               [z], dtype=dtype, value_scale=zmax, grad_scale=zmax / 8, names=["logits"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scaled_upstream(reduction):
    # The mean/sum gradient is formed in the forward; the backward must still apply the upstream scalar.
    z, y = make_logits(11, 60, torch.float32, seed=26, ignore_rows=[3])
    for scale in (3.5, -0.25, 0.0):
        compare_with_reference(
            lambda x: scale * fastweight.satimp_loss(x, y, beta1=1.0, reduction=reduction).sum(),
            lambda x: scale * ref.satimp_loss(x, y, beta1=1.0, reduction=reduction).sum(),
            [z], dtype=torch.float32, names=["logits"])


def test_weights_are_detached():
    # sg[w]: the gradient is w * dlogp only. The non-detached variant differs measurably on these inputs.
    z, y = make_logits(16, 20, torch.float64, seed=27, std=1.0)
    _, (g,) = value_and_grads(lambda x: fastweight.satimp_loss(x, y, beta1=2.0, beta2=1.0), [z])
    _, (g_sg,) = value_and_grads(lambda x: ref.satimp_loss(x, y, beta1=2.0, beta2=1.0), [z])
    _, (g_no_sg,) = value_and_grads(lambda x: ref.satimp_loss(x, y, beta1=2.0, beta2=1.0, detach_weights=False), [z])
    assert torch.allclose(g, g_sg, rtol=1e-10, atol=1e-14)
    assert (g_sg - g_no_sg).abs().max() > 1e-3 * g_sg.abs().max()
    from fastweight.losses._input import weighted_logprobs

    x = z.clone().requires_grad_()
    loss, w = weighted_logprobs(x, y, beta1=2.0, beta2=1.0)
    assert loss.requires_grad and not w.requires_grad and w.grad_fn is None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_inplace_backward(dtype, reduction):
    """inplace_backward=True: same gradient, and the caller's logits buffer is overwritten (documented)."""
    z, y = make_logits(12, 70, dtype, seed=28, ignore_rows=[5], confident_rows=[1])
    up = upstream_like((12,), dtype) if reduction == "none" else None
    _, (g_ref,) = value_and_grads(lambda x: fastweight.satimp_loss(x, y, reduction=reduction), [z], up)
    x = z.clone().requires_grad_()
    buf = x.detach()
    out = fastweight.satimp_loss(x, y, reduction=reduction, inplace_backward=True)
    out.backward(up if up is not None else None)
    assert torch.equal(x.grad, g_ref)
    # The logits values are gone: the buffer now holds the gradient.
    assert not torch.equal(buf, z)
    assert torch.equal(buf, g_ref)


def test_inplace_backward_without_grad_keeps_logits():
    z, y = make_logits(6, 30, torch.float32, seed=29)
    x = z.clone()
    out = fastweight.satimp_loss(x, y, inplace_backward=True)
    assert torch.equal(x, z) and not out.requires_grad
    x.requires_grad_()
    with torch.no_grad():
        fastweight.satimp_loss(x, y, inplace_backward=True)
    assert torch.equal(x.detach(), z)


def test_logits_without_requires_grad():
    z, y = make_logits(7, 25, torch.float32, seed=30, ignore_rows=[0])
    for reduction in REDUCTIONS:
        out = fastweight.satimp_loss(z, y, reduction=reduction)
        assert out.grad_fn is None and not out.requires_grad
        gt = ref.satimp_loss(z.double(), y, reduction=reduction)
        assert torch.allclose(out.double(), gt, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Hidden states + lm_head (must hold for the unfused composition and for the fused-linear op).
def check_hidden(backend, name, kw, dtype, reduction, *, bias, softcap, N=9, H=11, V=97, shift=False,
                 inplace=False):
    hidden, w, b, y = make_hidden(N, H, V, dtype, seed=31, bias=bias, ignore_rows=[2])
    if shift:
        hidden, y = hidden.reshape(3, N // 3, H), y.reshape(3, N // 3)
    up = upstream_like(y.shape, dtype) if reduction == "none" else None
    tensors = [hidden, w] + ([b] if bias else [])

    def impl(h, w_, b_=None):
        return impl_fn(name)(h, y, lm_head=w_, bias=b_, softcap=softcap, reduction=reduction, shift=shift,
                             backend=backend, inplace_backward=inplace, **kw)

    def naive(h, w_, b_=None):
        return ref_fn(name)(h, y, lm_head=w_, bias=b_, softcap=softcap, reduction=reduction, shift=shift, **kw)

    compare_with_reference(impl, naive, tensors, dtype=dtype, upstream=up, c=8.0 + H,
                           names=["hidden", "lm_head", "bias"][: len(tensors)])


@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (True, 10.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ids)
def test_hidden_lm_head(dtype, reduction, bias, softcap):
    check_hidden("torch", "satimp", {"beta1": 1.0, "beta2": 0.5}, dtype, reduction, bias=bias, softcap=softcap)


@pytest.mark.parametrize("name,kw", [("wga", {}), ("simimp", {}), ("ga", {})], ids=ids)
def test_hidden_lm_head_other_losses(name, kw):
    check_hidden("torch", name, kw, torch.float32, "mean", bias=True, softcap=None, shift=True)
    check_hidden("torch", name, kw, torch.bfloat16, "none", bias=False, softcap=15.0, inplace=True)


def test_hidden_lm_head_frozen_head():
    # Only the hidden states need a gradient (frozen lm_head, e.g. LoRA): the loss must still backpropagate.
    hidden, w, _, y = make_hidden(6, 10, 40, torch.float32, seed=32, ignore_rows=[1])
    h = hidden.clone().requires_grad_()
    fastweight.satimp_loss(h, y, lm_head=w, beta1=1.0).backward()
    h_ref = hidden.double().requires_grad_()
    ref.satimp_loss(h_ref, y, lm_head=w.double(), beta1=1.0).backward()
    assert torch.allclose(h.grad.double(), h_ref.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels through the interpreter (run by tests/test_interpret.py).
INTERPRET_CASES = [("satimp", {}), ("satimp", {"beta1": 0.0, "beta2": 0.0}), ("wga", {}), ("simimp", {}),
                   ("simimp", {"beta": 0.0}), ("ga", {})]


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("name,kw", INTERPRET_CASES, ids=ids)
def test_triton_loss_values_and_grad(name, kw, dtype, reduction):
    check_loss("triton", name, kw, dtype, reduction, 11, 1000)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_triton_confident_rows_relative_precision(dtype):
    check_confident_relative("triton", dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("N,V", [(1, 1), (1, 7), (3, 4097)])
def test_triton_loss_shapes(N, V):
    check_loss("triton", "satimp", {"beta2": 1.0}, torch.bfloat16, "mean", N, V)
    check_loss("triton", "satimp", {}, torch.float16, "none", N, V)


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_all_ignored(reduction):
    for dtype in DTYPES:
        check_all_ignored("triton", "satimp", dtype, reduction)


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_shift_3d(reduction):
    check_shift_3d("triton", torch.bfloat16, reduction)


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_inplace_backward(reduction):
    z, y = make_logits(5, 300, torch.float16, seed=33, ignore_rows=[1], confident_rows=[0])
    up = upstream_like((5,), torch.float16) if reduction == "none" else None
    _, (g_ref,) = value_and_grads(lambda x: fastweight.satimp_loss(x, y, reduction=reduction, backend="triton"),
                                  [z], up)
    check_loss("triton", "satimp", {}, torch.float16, reduction, 5, 300, inplace_backward=True)
    x = z.clone().requires_grad_()
    out = fastweight.satimp_loss(x, y, reduction=reduction, backend="triton", inplace_backward=True)
    out.backward(up)
    assert torch.equal(x.grad, g_ref) and torch.equal(x.detach(), g_ref)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=ids)
def test_triton_hidden_lm_head(dtype):
    check_hidden("triton", "satimp", {"beta1": 1.0, "beta2": 0.5}, dtype, "mean", bias=True, softcap=10.0)
    check_hidden("triton", "wga", {}, dtype, "none", bias=False, softcap=None, shift=True)
