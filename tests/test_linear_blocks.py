"""The fused-linear torch path's vocabulary blocks on a thread each (``fastweight.ops._linear_blocks``).

Values and gradients against the float64 naive reference (and the chunk path) over the options the ops take;
results that do not depend on which thread ran a block or in what order; the route choice; PyTorch's thread
count restored whatever happens; a forked child that still runs.
"""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from fastweight.ops import _linear_blocks as lb, _linear_chunks as lc, linear_logprobs as ll
from fastweight.reference import linear_logprobs as ref
from helpers import unlearned_inputs

V = 2 * lb.MIN_BLOCKED_VOCAB + 37  # odd, above the route's minimum, several blocks


def _inputs(N=53, H=24, V=V, dtype=torch.float32, seed=0, ignore=True):
    """Hidden rows aimed at their labels with random gains: target probabilities from ~0 to ~1, so SatImp's
    weights p**5 (1 - p) are not all below 16-bit range."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    h = torch.randn(N, H, generator=g, dtype=torch.float64) + W[y] * 14.0 * torch.rand(N, 1, generator=g,
                                                                                      dtype=torch.float64)
    if ignore:
        y[::5] = -100
    return h.to(dtype), W.to(dtype), b.to(dtype), y


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _satimp(h, W, b, y, opts, token_weights=None):
    """(loss, dh, dW, db) of the public op with the caller's grad mode (fused forward)."""
    h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    loss, _ = ll.linear_weighted_logprobs_2d(h, W, b, y, opts, token_weights=token_weights)
    loss.backward()
    return loss.detach(), h.grad, W.grad, None if b is None else b.grad


def _reference(h, W, b, y, softcap=None, scale=None, token_weights=None):
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    per = ref.linear_weighted_logprobs(h64, W64, y, b64, softcap, beta1=5.0, beta2=1.0, reduction="none",
                                       logit_scale=scale)
    if token_weights is not None:
        per = per * token_weights.double()
    loss = per.sum() / (y != -100).sum()
    loss.backward()
    return loss.detach(), h64.grad, W64.grad, None if b64 is None else b64.grad


# error-relative tolerances per input dtype (the ops compute in float32; 16-bit inputs carry their rounding)
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,softcap,scale", [(False, None, 1.0), (True, 30.0, 0.7), (True, None, 1.3)])
def test_blocked_values_and_gradients_match_float64(dtype, bias, softcap, scale, monkeypatch):
    monkeypatch.setenv("FASTWEIGHT_CPU_BLOCKS", "3")
    calls = []
    monkeypatch.setattr(ll, "linear_logprobs_forward_blocked",
                        lambda *a, **k: calls.append(k["workers"]) or lb.linear_logprobs_forward_blocked(*a, **k))
    grad_mode = []
    real = lb.linear
    monkeypatch.setattr(lb, "linear", lambda *a, **k: grad_mode.append(torch.is_grad_enabled()) or real(*a, **k))
    h, W, b, y = _inputs(dtype=dtype)
    b = b if bias else None
    opts = ll.LinearLogprobsOptions(beta1=5.0, beta2=1.0, weighted=True, reduction="mean", softcap=softcap,
                                    logit_scale=scale)
    got = _satimp(h, W, b, y, opts)
    want = _reference(h, W, b, y, softcap, None if scale == 1.0 else scale)
    assert calls == [3]
    # the worker threads' products record no autograd graph (grad mode is per thread; hidden requires grad)
    assert grad_mode and not any(grad_mode)
    for name, a, r in zip(("loss", "dh", "dW", "db"), got, want):
        if r is not None:
            assert a.dtype == (torch.float32 if name == "loss" else dtype)
            assert _rel(a, r) < TOL[dtype], (name, _rel(a, r))


@pytest.mark.parametrize("workers", [2, 3])
def test_blocked_forward_and_backward_match_the_chunk_path(workers):
    """Every output of both entry points (fused forward with token weights, forward-only, recomputing backward)
    within float32 rounding of the chunk path's; ignored rows exactly 0, non-contiguous hidden taken as is."""
    h, W, b, y = _inputs(N=301, H=40)
    h = torch.cat([h, h], 1)[:, ::2]  # non-contiguous, same values
    assert not h.is_contiguous()
    tw = torch.rand(y.shape[0], generator=torch.Generator().manual_seed(3))
    opts = ll.LinearLogprobsOptions(beta1=5.0, beta2=1.0, weighted=True, chunk_elements=64 * V)
    gs = torch.tensor(1.0 / 301)
    for grad_scale in (gs, None):
        a = lc.linear_logprobs_forward_torch(h, W, b, y, opts, grad_scale=grad_scale, token_weights=tw)
        c = lb.linear_logprobs_forward_blocked(h, W, b, y, opts, grad_scale=grad_scale, token_weights=tw,
                                               workers=workers)
        for x, z in zip(a[:3], c[:3]):
            assert _rel(z, x) < 1e-6
        assert torch.all(c[0][y == -100] == 0)
        if grad_scale is not None:
            for x, z in zip(a[3], c[3]):
                assert _rel(z, x) < 1e-5
    logp, lse = a[0], a[1]
    g = torch.randn(y.shape[0], generator=torch.Generator().manual_seed(4))
    for needs in ((True, True, True), (True, False, False), (False, True, False)):
        x = lc.linear_logprobs_backward_torch(h, W, b, y, lse, logp, g, opts, needs=needs)
        z = lb.linear_logprobs_backward_blocked(h, W, b, y, lse, logp, g, opts, needs=needs, workers=workers)
        for xi, zi in zip(x, z):
            assert (xi is None) == (zi is None)
            if xi is not None:
                assert _rel(zi, xi) < 1e-5
        if z[0] is not None:
            assert torch.all(z[0][y == -100] == 0)


def test_unlearned_rows_and_huge_logits_as_float64(monkeypatch):
    """Dead rows (SatImp weights flushed to 0) leave the GEMMs and stay 0; logits beyond the unshifted
    exponentials' range take the max-shifted pass. Both within float32 rounding of float64."""
    h, W, y = unlearned_inputs(N=96, H=64, V=V)
    opts = ll.LinearLogprobsOptions(beta1=5.0, beta2=1.0, weighted=True, reduction="mean")
    in_range = []
    monkeypatch.setattr(lb, "sums_in_range", lambda s: in_range.append(lc.sums_in_range(s)) or in_range[-1])
    for hh, shifted in ((h, False), (h * 40.0, True)):  # the second: logits of hundreds, exp overflows unshifted
        in_range.clear()
        got = lb.linear_logprobs_forward_blocked(hh, W, None, y, opts, grad_scale=torch.tensor(1.0), workers=2)
        chunks = lc.linear_logprobs_forward_torch(hh, W, None, y, opts, grad_scale=torch.tensor(1.0))
        want = lc.linear_logprobs_forward_torch(hh.double(), W.double(), None, y, opts,
                                                grad_scale=torch.tensor(1.0, dtype=torch.float64))
        assert torch.isfinite(got[0]).all()
        assert _rel(got[0], want[0]) < 1e-6 and _rel(got[1], want[1]) < 1e-6
        for x, c, z in zip(got[3][:2], chunks[3][:2], want[3][:2]):  # d hidden, d lm_head
            assert _rel(x, z) < max(1e-5, 2 * _rel(c, z)), (_rel(x, z), _rel(c, z))
        assert in_range and (not all(in_range)) == shifted


def test_results_do_not_depend_on_which_thread_ran_a_block(monkeypatch):
    """Blocks run in reverse order on one thread give the same bits as the pool (every block writes its own
    outputs; partial sums are added in block order)."""
    h, W, b, y = _inputs(N=130, H=32)
    opts = ll.LinearLogprobsOptions(beta1=5.0, beta2=1.0, weighted=True, softcap=20.0)
    g = torch.randn(130, generator=torch.Generator().manual_seed(5))

    def both():
        fwd = lb.linear_logprobs_forward_blocked(h, W, b, y, opts, grad_scale=torch.tensor(0.5), workers=3)
        bwd = lb.linear_logprobs_backward_blocked(h, W, b, y, fwd[1], fwd[0], g, opts, workers=3)
        return [*fwd[:3], *fwd[3], *bwd]

    pooled = both()
    assert all(torch.equal(a, b) for a, b in zip(pooled, both()))

    def reversed_run(pool, fn, items):
        out = [fn(*item) for item in reversed(items)]
        return out[::-1]

    monkeypatch.setattr(lb, "_run", reversed_run)
    assert all(torch.equal(a, b) for a, b in zip(pooled, both()))


def test_block_bounds_cover_the_vocabulary():
    for Vx, workers in [(49152, 2), (49152, 16), (32000, 2), (4133, 3), (128256, 8), (2048, 2)]:
        bounds = lb.block_bounds(Vx, workers)
        assert bounds[0][0] == 0 and bounds[-1][1] == Vx
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        widths = [v1 - v0 for v0, v1 in bounds]
        assert all(w % 16 == 0 for w in widths[:-1]) and max(widths) <= lb.BLOCK_COLUMNS
        assert len(bounds) >= min(lb.BLOCKS_PER_THREAD * workers, Vx // 16)
    assert len(lb.block_bounds(49152, 2)) == 12


def test_route_choice(monkeypatch):
    h, W, _, _ = _inputs(N=4, H=8)
    small = W[: lb.MIN_BLOCKED_VOCAB - 1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.delenv("FASTWEIGHT_CPU_BLOCKS", raising=False)
    assert lb.blocked_workers(h, W) == (4 if lb.parallel_backend_is_openmp() else 0)
    assert lb.blocked_workers(h, small) == 0
    monkeypatch.setenv("FASTWEIGHT_CPU_BLOCKS", "0")
    assert lb.blocked_workers(h, W) == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setenv("FASTWEIGHT_CPU_BLOCKS", "auto")
    assert lb.blocked_workers(h, W) == 0  # one thread: nothing to share
    monkeypatch.setenv("FASTWEIGHT_CPU_BLOCKS", "lots")
    with pytest.raises(ValueError, match="FASTWEIGHT_CPU_BLOCKS must be 'auto', 0 or a number of threads"):
        lb.blocked_workers(h, W)


def test_thread_count_restored_after_an_error(monkeypatch):
    h, W, b, y = _inputs(N=20, H=8)
    opts = ll.LinearLogprobsOptions()
    before = torch.get_num_threads()
    real = lb.linear

    def failing(x, w, *args, **kwargs):
        if w.shape[0] < W.shape[0] and w.data_ptr() != W.data_ptr():  # a later block's product
            raise RuntimeError("block failed")
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(lb, "linear", failing)
    with pytest.raises(RuntimeError, match="block failed"):
        lb.linear_logprobs_forward_blocked(h, W, b, y, opts, workers=2)
    assert torch.get_num_threads() == before
    monkeypatch.setattr(lb, "linear", real)
    out = lb.linear_logprobs_forward_blocked(h, W, b, y, opts, workers=2)  # the pool still works
    assert torch.isfinite(out[0]).all() and torch.get_num_threads() == before


def _child(q):
    torch.set_num_threads(1)  # as DataLoader workers do: GNU OpenMP's pool does not survive a fork
    h, W, b, y = _inputs(N=16, H=8)
    out = lb.linear_logprobs_forward_blocked(h, W, b, y, ll.LinearLogprobsOptions(), workers=2)
    q.put(float(out[0].sum()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_made_before_fork_is_not_reused_in_the_child():
    """The parent's pool threads do not exist in a forked child: the child's op makes its own pool (submitting
    to the inherited one would wait forever)."""
    h, W, b, y = _inputs(N=16, H=8)
    want = float(lb.linear_logprobs_forward_blocked(h, W, b, y, ll.LinearLogprobsOptions(), workers=2)[0].sum())
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(60)
    assert p.exitcode == 0, "the forked child hung or failed"
    assert q.get(timeout=5) == want
