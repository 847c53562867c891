"""CE-U and PDU (fastweight.losses.ce_u, fused from hidden states) and UNDIAL's form="ce" against the float64
references in fastweight.reference (values and gradients), plus NPO's empty_rows."""
from __future__ import annotations

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.losses import LOSSES, ce_u_loss, npo_loss, pdu_loss, undial_loss
from fastweight.reference import ce_u as ref
from fastweight.reference import retain as ref_retain

B, T, H, V = 3, 7, 8, 41


def _inputs(dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    return [t if t is None else t.to(dtype) for t in (h, W, b)], labels


def _value_grads(fn, tensors, labels, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(leaves[0], labels, lm_head=leaves[1], bias=leaves[2], **kw)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None])
    return out.detach(), grads


CASES = [(ce_u_loss, ref.ce_u_loss, dict(shift=True)), (ce_u_loss, ref.ce_u_loss, dict(shift=True, ignore_first_n=0)),
         (ce_u_loss, ref.ce_u_loss, dict(shift=True, ignore_first_n=3, softcap=4.0)),
         (pdu_loss, ref.pdu_loss, {}), (pdu_loss, ref.pdu_loss, dict(shift=True, softcap=4.0))]


@pytest.mark.parametrize("fn,naive,kw", CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_reference(fn, naive, kw, dtype):
    tensors, labels = _inputs(dtype)
    got, got_g = _value_grads(fn, tensors, labels, **kw)
    want, want_g = _value_grads(naive, [t.double() for t in tensors], labels, **kw)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    assert abs(float(want)) > 1e-2
    torch.testing.assert_close(got.double(), want, **tol)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("fn,naive,kw", CASES[:1] + CASES[3:4])
def test_logits_input_and_reductions(fn, naive, kw):
    (h, W, b), labels = _inputs(torch.float64)
    z = h @ W.T + b
    full = naive(z, labels, **kw)
    torch.testing.assert_close(fn(z, labels, **kw), full)
    per = fn(h, labels, lm_head=W, bias=b, reduction="none", **kw)
    assert per.shape == labels.shape
    counted = (per != 0).sum()
    torch.testing.assert_close(fn(h, labels, lm_head=W, bias=b, reduction="sum", **kw), per.sum())
    torch.testing.assert_close(per.sum() / counted, full)


def test_chunked_op_equals_one_chunk(monkeypatch):
    import fastweight.ops.linear_row_stats as op

    tensors, labels = _inputs(torch.float64)
    one = _value_grads(ce_u_loss, tensors, labels, shift=True)
    monkeypatch.setattr(op, "TORCH_CHUNK_ELEMENTS", 2 * V)  # 2 rows per chunk
    two = _value_grads(ce_u_loss, tensors, labels, shift=True)
    torch.testing.assert_close(two[0], one[0])
    for a, b in zip(two[1], one[1]):
        torch.testing.assert_close(a, b)


def test_nothing_counted_is_zero_not_nan():
    (h, W, b), labels = _inputs(torch.float32)
    labels[:] = IGNORE_INDEX
    for fn in (ce_u_loss, pdu_loss):
        hh = h.clone().requires_grad_()
        out = fn(hh, labels, lm_head=W, bias=b)
        out.backward()
        assert float(out.detach()) == 0.0 and bool((hh.grad == 0).all())


def test_errors_name_the_argument():
    (h, W, b), labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="ignore_first_n"):
        ce_u_loss(h, labels, lm_head=W, ignore_first_n=-1)
    with pytest.raises(ValueError, match="labels shape"):
        pdu_loss(h, labels[:, 1:], lm_head=W)
    with pytest.raises(ValueError, match="lm_head"):
        pdu_loss(h, labels, lm_head=W[:, 1:])


@pytest.mark.parametrize("masked", [False, True])
def test_undial_ce_form_is_the_soft_label_cross_entropy(masked):
    """form="ce" = -sum q log p (open-unlearning's reported value) = KL + H(q), on hidden states of both models."""
    (h, W, b), labels = _inputs(torch.float64, bias=False)
    (hr, Wr, _), _ = _inputs(torch.float64, seed=1, bias=False)
    # unmasked: every slot counts and an ignored label stands for token -100 % V (their -100 indexing)
    kw = dict(beta=2.0, shift=True, masked=masked)
    hh = h.clone().requires_grad_()
    ce = undial_loss(hh, hr, labels, lm_head=W, ref_lm_head=Wr, form="ce", **kw)
    g_ce, = torch.autograd.grad(ce, hh)
    hh2 = h.clone().requires_grad_()
    kl = undial_loss(hh2, hr, labels, lm_head=W, ref_lm_head=Wr, **kw)
    g_kl, = torch.autograd.grad(kl, hh2)
    torch.testing.assert_close(g_ce, g_kl)  # same gradient
    # reference: -sum q log p from full logits
    z, r = h @ W.T, hr @ Wr.T
    y = labels[:, 1:]
    slot = torch.ones_like(y, dtype=torch.bool) if not masked else y != IGNORE_INDEX
    yi = torch.where(y == IGNORE_INDEX, IGNORE_INDEX % V, y)
    q = torch.softmax(r[:, :-1] - 2.0 * torch.nn.functional.one_hot(yi, V), -1)
    per = -(q * torch.log_softmax(z[:, :-1], -1)).sum(-1)
    want = per[slot].mean()
    torch.testing.assert_close(ce, want, rtol=1e-10, atol=1e-12)
    kl_ref = ref_retain.undial_loss(h, hr, labels, lm_head=W, ref_lm_head=Wr, **kw)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-10, atol=1e-12)
    assert float((ce - kl).detach()) > 0.1  # the entropy of q: the two forms really differ
    with pytest.raises(ValueError, match="form"):
        undial_loss(h, hr, labels, lm_head=W, ref_lm_head=Wr, form="x", **kw)


def test_npo_empty_rows_keep_counts_every_row():
    (h, W, b), labels = _inputs(torch.float64)
    labels[2] = IGNORE_INDEX
    ref_nll = torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)
    drop = npo_loss(h, labels, ref_nll, beta=0.5, lm_head=W, bias=b, shift=True, reduction="none")
    keep = npo_loss(h, labels, ref_nll, beta=0.5, lm_head=W, bias=b, shift=True, empty_rows="keep")
    torch.testing.assert_close(keep, (drop[:2].sum() + (2 / 0.5) * torch.log(torch.tensor(2.0, dtype=keep.dtype)))
                               / 3)
    torch.testing.assert_close(npo_loss(h, labels, ref_nll, beta=0.5, lm_head=W, bias=b, shift=True),
                               drop[:2].mean())


def test_registered():
    assert LOSSES["ceu"].defaults["ignore_first_n"] == 1 and LOSSES["ceu"].defaults["retain_loss"] == "none"
    assert LOSSES["pdu"].needs_retain and LOSSES["pdu"].defaults["retain_eps"] == 0.0
    assert LOSSES["undial"].defaults["form"] == "kl" and LOSSES["npo"].defaults["empty_rows"] == "drop"


@pytest.mark.parametrize("fn", [ce_u_loss, pdu_loss])
def test_logit_scale(fn):
    """logits = softcap(logit_scale * (h W^T + b)) (Cohere/Granite scale via output_head): fused = logits input."""
    (h, W, b), labels = _inputs(torch.float64)
    hh = h.clone().requires_grad_()
    got = fn(hh, labels, lm_head=W, bias=b, softcap=5.0, logit_scale=0.37, shift=True)
    g_got, = torch.autograd.grad(got, hh)
    hh2 = h.clone().requires_grad_()
    want = fn(5.0 * torch.tanh(0.37 * (hh2 @ W.T + b) / 5.0), labels, shift=True)
    g_want, = torch.autograd.grad(want, hh2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
