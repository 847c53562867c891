"""No subnormal float32 numbers reach the torch paths' GEMMs or gradients (issue 21, item 9).

SatImp's weights ``p**5`` of unlikely tokens (the regime unlearning drives into) are subnormal floats; on an
x86 core without flush-to-zero every GEMM that reads an operand scaled by them runs at subnormal speed (6x
slower fused-linear SatImp on an Intel Xeon). Timing is machine-dependent, so these tests check the cause
deterministically: every operand the chunk loops hand to a GEMM and every gradient they return is free of
subnormal values, and the values still match the float64 reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastweight.ops import _common, _linear_chunks as lc, linear_kl_div as lkl, linear_logprobs as ll
from fastweight.ops.token_logprobs import TokenLogprobsOptions, weighted_logprobs_2d
from fastweight.reference import linear_logprobs as ref
from helpers import compare_with_reference

TINY = torch.finfo(torch.float32).tiny


def n_subnormal(t: torch.Tensor) -> int:
    a = t.detach().abs()
    return int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum())


def unlikely_inputs(N=48, H=16, V=96, seed=0):
    """hidden, lm_head, labels with log p_y spread over about [-45, -3]: p**5 is normal, subnormal or 0."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) / math.sqrt(H)
    y = torch.randint(0, V, (N,), generator=g)
    gain = torch.linspace(0.0, 40.0, N)[:, None]
    hidden = 0.3 * torch.randn(N, H, generator=g) - gain * W[y] / W[y].norm(dim=1, keepdim=True)
    return hidden, W, y


def test_inputs_reach_the_subnormal_regime():
    hidden, W, y = unlikely_inputs()
    w = ref.linear_weighted_logprobs(hidden.double(), W.double(), y, beta1=5.0, reduction="none")
    logp = ref.linear_token_logprobs(hidden.double(), W.double(), y)
    weights = torch.exp(5.0 * logp).float()
    assert n_subnormal(weights) >= 3 and float(logp.min()) < -25 and torch.isfinite(w).all()


def test_flush_subnormal_zeroes_only_subnormals():
    t = torch.tensor([TINY / 2, -TINY / 4, TINY, -TINY, 1e-30, 0.0, float("nan"), float("inf"), 5e-45])
    out = _common.flush_subnormal_(t.clone())
    expect = torch.tensor([0.0, 0.0, TINY, -TINY, 1e-30, 0.0, float("nan"), float("inf"), 0.0])
    torch.testing.assert_close(out, expect, equal_nan=True, rtol=0, atol=0)


def test_tiny_factors_flags_only_nonzero_tiny_rows():
    assert not _common.tiny_factors(torch.tensor([0.0, 1.0, -1e-20, 1e-30]))
    assert _common.tiny_factors(torch.tensor([0.0, 1.0, -1e-32]))
    assert _common.tiny_factors(torch.tensor([TINY / 8]))


def test_flush_subnormal_rows_matches_plain_product():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(6, 50, generator=g)
    p[1, :10] = 1e-30  # times 1e-10: subnormal
    scale = torch.tensor([1.0, 1e-10, 0.0, -2.0, 1e-50, 3e-20])
    log_min = p.log().amin(1)
    out = _common.flush_subnormal_rows_(p.clone(), scale, log_min)
    plain = p * scale[:, None]
    assert n_subnormal(out) == 0 and n_subnormal(plain) > 0
    torch.testing.assert_close(out, _common.flush_subnormal_(plain.clone()), rtol=0, atol=0)


@pytest.fixture
def gemm_operands(monkeypatch):
    """Subnormal count of every operand the fused-linear chunk loops pass to a GEMM."""
    counts = []
    for mod in (lc, lkl):
        real_linear, real_add = mod.linear, mod.add_linear_t_

        def spy_linear(x, w, b=None, *, out=None, _real=real_linear):
            counts.append(("linear", n_subnormal(x)))
            return _real(x, w, b, out=out)

        def spy_add(acc, a, h, _real=real_add, **kw):
            counts.append(("add_linear_t_", n_subnormal(a) + n_subnormal(h)))
            return _real(acc, a, h, **kw)

        monkeypatch.setattr(mod, "linear", spy_linear)
        monkeypatch.setattr(mod, "add_linear_t_", spy_add)
    return counts


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_satimp_feeds_no_subnormal_to_gemms(reduction, gemm_operands):
    """The fused forward ("mean": gradients in the forward) and the recomputing backward ("none")."""
    hidden, W, y = unlikely_inputs()
    opts = ll.LinearLogprobsOptions(beta1=5.0, beta2=0.1, weighted=True, reduction=reduction, backend="torch",
                                    chunk_elements=16 * 96)

    def impl(h, w):
        return ll.linear_weighted_logprobs_2d(h, w, None, y, opts)[0]

    def naive(h, w):
        return ref.linear_weighted_logprobs(h, w, y, beta1=5.0, beta2=0.1, reduction=reduction)

    upstream = None if reduction == "mean" else torch.ones(y.shape[0])
    _, grads = compare_with_reference(impl, naive, [hidden, W], dtype=torch.float32, upstream=upstream,
                                      names=["hidden", "lm_head"])
    # 3 chunks' logits; the gradient GEMMs only for chunks with a live row (test_live_rows.py)
    assert sum(name == "linear" for name, _ in gemm_operands) >= 3 and len(gemm_operands) > 3
    assert [c for c in gemm_operands if c[1]] == []
    assert [n_subnormal(g) for g in grads] == [0, 0]


def test_fused_linear_kl_tiny_upstream_gives_no_subnormal():
    g = torch.Generator().manual_seed(2)
    hidden, W = torch.randn(20, 8, generator=g), torch.randn(40, 8, generator=g)
    ref_h, ref_W = torch.randn(20, 8, generator=g), torch.randn(40, 8, generator=g)
    h, w = hidden.requires_grad_(), W.requires_grad_()
    kl = lkl.linear_kl_div(h, w, ref_h, ref_W, backend="torch")
    (kl * torch.logspace(-30, -44, 20)).sum().backward()
    assert n_subnormal(h.grad) == 0 and n_subnormal(w.grad) == 0
    assert h.grad.abs().max() > 0  # the rows with a normal factor still have gradients


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_path_gradient_has_no_subnormal(reduction):
    hidden, W, y = unlikely_inputs()
    logits = (hidden @ W.t()).requires_grad_()
    opts = TokenLogprobsOptions(beta1=5.0, beta2=0.1, weighted=True, reduction=reduction, backend="torch")
    out = weighted_logprobs_2d(logits, y, opts)[0]
    out.backward(None if reduction == "mean" else torch.ones_like(out))
    gt = logits.detach().double().requires_grad_()
    gt_out = ref.linear_weighted_logprobs(gt, torch.eye(gt.shape[1], dtype=torch.float64), y, beta1=5.0,
                                          beta2=0.1, reduction=reduction)
    gt_out.backward(None if reduction == "mean" else torch.ones_like(gt_out))
    assert n_subnormal(logits.grad) == 0
    torch.testing.assert_close(logits.grad.double(), gt.grad, rtol=1e-4, atol=1e-6 * float(gt.grad.abs().max()))


def test_flush_tiny_rows_flushes_only_rows_with_tiny_factors():
    g = torch.Generator().manual_seed(4)
    factor = torch.tensor([1.0, 1e-37, 0.0, -5e-38, 2.0, 1e-20])
    t = torch.randn(6, 40, generator=g) * factor[:, None]
    t[4, 3] = TINY / 4  # a subnormal in a row whose factor is not tiny: left alone (the GEMM operands' rows
    # are products with their factor; only tiny factors make them subnormal)
    flagged = torch.tensor([1, 3])
    assert n_subnormal(t[flagged]) > 0
    expect = t.clone()
    expect[flagged] = _common.flush_subnormal_(expect[flagged].clone())
    out = _common.flush_tiny_rows_(t.clone(), factor)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    assert n_subnormal(out[flagged]) == 0 and float(out[4, 3]) == TINY / 4
    every = torch.full((6,), 1e-35)  # every row flagged: the whole operand at once
    u = torch.randn(6, 40, generator=g) * 1e-5
    torch.testing.assert_close(_common.flush_tiny_rows_(u.clone() * 1e-35, every),
                               _common.flush_subnormal_(u.clone() * 1e-35), rtol=0, atol=0)
