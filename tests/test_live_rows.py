"""Rows whose gradient factor is exactly 0 skip the fused-linear gradient GEMMs (issue 21, item 9).

In the unlearned regime most forget tokens' SatImp weights ``p**5`` are 0 after the subnormal flush; such a
row adds exactly nothing to d hidden or d lm_head, so the torch path moves the live rows of a chunk to the
front of its buffer (``_common.compact_live_rows_``) and runs the two gradient GEMMs on them only. Checked:
the compaction against indexing, the GEMMs' row counts, and values and gradients against the float64
reference and against the same op with skipping switched off.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastweight.ops import _common, _linear_chunks as lc, linear_logprobs as ll
from fastweight.reference import linear_logprobs as ref
from helpers import compare_with_reference


@pytest.mark.parametrize("blocks", [1, 3, 8, 100])
@pytest.mark.parametrize("pattern", ["mixed", "dead_first", "dead_last", "all_dead", "one_dead"])
def test_compact_live_rows_moves_live_rows_in_order(pattern, blocks):
    g = torch.Generator().manual_seed(0)
    c, V = 37, 11
    buf = torch.randn(c, V, generator=g)
    coef = torch.randn(c, generator=g)
    if pattern == "mixed":
        coef[torch.rand(c, generator=g) < 0.5] = 0.0
    elif pattern == "dead_first":
        coef[:20] = 0.0
    elif pattern == "dead_last":
        coef[-5:] = 0.0
    elif pattern == "all_dead":
        coef.zero_()
    else:
        coef[17] = 0.0
    expect_keep = (coef != 0).nonzero().squeeze(1)
    expect = buf[expect_keep].clone()
    keep = _common.compact_live_rows_(buf, coef, blocks=blocks)
    assert keep is not None and torch.equal(keep, expect_keep)
    assert torch.equal(buf[: keep.numel()], expect)


def test_compact_live_rows_leaves_buffer_when_few_dead():
    buf = torch.randn(16, 5)
    coef = torch.ones(16)
    before = buf.clone()
    assert _common.compact_live_rows_(buf, coef) is None  # nothing dead
    coef[3] = 0.0
    assert _common.compact_live_rows_(buf, coef, min_dead=2) is None  # one dead row, two required
    assert torch.equal(buf, before)
    with pytest.raises(ValueError, match="contiguous"):
        _common.compact_live_rows_(buf.t(), torch.ones(5))


def half_dead_inputs(N=64, H=24, V=80, seed=3):
    """Every other row very unlikely (log p ~ -60: SatImp's weight flushes to 0), the others likely."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) / math.sqrt(H)
    y = torch.randint(0, V, (N,), generator=g)
    unit = W[y] / W[y].norm(dim=1, keepdim=True)
    gain = torch.where(torch.arange(N) % 2 == 0, -60.0, 4.0)[:, None]
    hidden = 0.3 * torch.randn(N, H, generator=g) + gain * unit
    y[5] = -100  # an ignored row too
    return hidden, W, y


@pytest.fixture
def gradient_rows(monkeypatch):
    """Rows of every d hidden GEMM operand and of every d lm_head update the chunk loop runs."""
    rows = {"linear": [], "add": []}
    real_linear, real_add = lc.linear, lc.add_linear_t_

    def spy_linear(x, w, b=None, *, out=None):
        rows["linear"].append(x.shape[0])
        return real_linear(x, w, b, out=out)

    def spy_add(acc, a, h, **kw):
        rows["add"].append(a.shape[0])
        return real_add(acc, a, h, **kw)

    monkeypatch.setattr(lc, "linear", spy_linear)
    monkeypatch.setattr(lc, "add_linear_t_", spy_add)
    return rows


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_dead_rows_skip_gradient_gemms_with_equal_results(reduction, bias, gradient_rows, monkeypatch):
    hidden, W, y = half_dead_inputs()
    b = 0.1 * torch.randn(W.shape[0], generator=torch.Generator().manual_seed(9)) if bias else None
    chunk_rows = 16
    opts = ll.LinearLogprobsOptions(beta1=5.0, beta2=0.1, weighted=True, reduction=reduction, backend="torch",
                                    chunk_elements=chunk_rows * W.shape[0])
    upstream = None if reduction == "mean" else torch.rand(y.shape[0], generator=torch.Generator().manual_seed(2))

    def impl(h, w, *rest):
        return ll.linear_weighted_logprobs_2d(h, w, rest[0] if rest else None, y, opts)[0]

    def naive(h, w, *rest):
        return ref.linear_weighted_logprobs(h, w, y, bias=rest[0] if rest else None, beta1=5.0, beta2=0.1,
                                            reduction=reduction)

    leaves = [hidden, W] + ([b] if bias else [])
    names = ["hidden", "lm_head"] + (["bias"] if bias else [])
    out, grads = compare_with_reference(impl, naive, leaves, dtype=torch.float32, upstream=upstream, names=names)
    valid = int((y != -100).sum())
    logits_rows = sum(gradient_rows["linear"]) - sum(gradient_rows["add"])
    # every valid row's logits once in the forward ("none": and once more in the recomputing backward)
    assert logits_rows == valid * (1 if reduction == "mean" else 2)
    assert sum(gradient_rows["add"]) <= valid // 2 + 1  # the dead half never reaches the gradient GEMMs

    monkeypatch.setattr(lc, "LIVE_MIN_DEAD_FRACTION", 10 ** 9)  # never compact: every row in every GEMM
    monkeypatch.setattr(_common, "compact_live_rows_", lambda *a, **k: None)
    monkeypatch.setattr(lc, "compact_live_rows_", lambda *a, **k: None)
    out2, grads2 = compare_with_reference(impl, naive, leaves, dtype=torch.float32, upstream=upstream, names=names)
    torch.testing.assert_close(out, out2, rtol=1e-6, atol=0)
    for a, c in zip(grads, grads2):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
