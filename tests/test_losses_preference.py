"""NPO, SimNPO, TNPO, WTNPO, DPO/IdkDPO vs the naive float64 reference (reference/preference.py)."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPE_IDS, compare_with_reference

from fastweight import dpo_loss, idk_dpo_loss, npo_loss, sequence_nll, simnpo_loss, tnpo_loss, wtnpo_loss
from fastweight._constants import IGNORE_INDEX
from fastweight.reference import preference as ref

B, T, V, H = 4, 6, 29, 11
DTYPES = [torch.float32, torch.bfloat16]


def _batch(dtype, seed=0, T=T):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX     # an empty sequence: excluded from sequence means
    return logits, labels


def _ref_nll(seed=9):
    return torch.randn(B, generator=torch.Generator().manual_seed(seed)) * 3 + 15


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_sequence_nll(dtype):
    logits, labels = _batch(dtype)
    compare_with_reference(lambda x: sequence_nll(x, labels, shift=True)[0],
                           lambda x: ref.sequence_nll(x, labels, shift=True)[0], [logits], dtype=dtype)
    _, n = sequence_nll(logits, labels, shift=True)
    assert n.tolist() == ref.sequence_nll(logits.double(), labels, shift=True)[1].tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_npo(dtype, beta):
    logits, labels = _batch(dtype)
    r = _ref_nll()
    compare_with_reference(lambda x: npo_loss(x, labels, r, beta=beta, shift=True),
                           lambda x: ref.npo_loss(x, labels, r, beta=beta, shift=True), [logits], dtype=dtype)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_at_reference_is_2_over_beta_log2(beta):
    logits, labels = _batch(torch.float32)
    S, _ = sequence_nll(logits, labels, shift=True)
    loss = npo_loss(logits, labels, S.detach(), beta=beta, shift=True)
    assert math.isclose(loss.item(), 2.0 / beta * math.log(2.0), rel_tol=1e-6)


def test_npo_hidden_input():
    gen = torch.Generator().manual_seed(1)
    hidden, W = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen) * 0.5
    _, labels = _batch(torch.float32)
    r = _ref_nll()
    compare_with_reference(lambda x, w: npo_loss(x, labels, r, lm_head=w),
                           lambda x, w: ref.npo_loss(x, labels, r, lm_head=w), [hidden, W], dtype=torch.float32,
                           names=["hidden", "lm_head"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_simnpo(dtype, gamma):
    logits, labels = _batch(dtype)
    compare_with_reference(lambda x: simnpo_loss(x, labels, beta=0.5, gamma=gamma, shift=True),
                           lambda x: ref.simnpo_loss(x, labels, beta=0.5, gamma=gamma, shift=True), [logits],
                           dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("which", ["tnpo", "wtnpo"])
def test_tnpo_wtnpo(dtype, which):
    logits, labels = _batch(dtype)
    ref_logp = torch.log_softmax(torch.randn(B, T, V, generator=torch.Generator().manual_seed(5)), -1)[..., 0]
    # small beta/alpha keep the weights O(1) so every token matters
    if which == "tnpo":
        impl = lambda x: tnpo_loss(x, labels, ref_logp, beta=0.7)
        naive = lambda x: ref.tnpo_loss(x, labels, ref_logp, beta=0.7)
    else:
        impl = lambda x: wtnpo_loss(x, labels, ref_logp, alpha=0.3, beta=0.7)
        naive = lambda x: ref.wtnpo_loss(x, labels, ref_logp, alpha=0.3, beta=0.7)
    compare_with_reference(impl, naive, [logits], dtype=dtype)


def test_tnpo_weights_detached_and_one_at_reference():
    logits, labels = _batch(torch.float32)
    x = logits.clone().requires_grad_()
    logp = torch.log_softmax(logits.double(), -1)
    valid = labels != IGNORE_INDEX
    ref_logp = torch.where(valid, logp.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1), 0.0).float()
    loss, w = tnpo_loss(x, labels, ref_logp, beta=1.0, return_weights=True)
    assert not w.requires_grad
    # p == p_ref: w = 2 p / (2 p + 1e-5) ~ 1, so TNPO ~ GA
    torch.testing.assert_close(w[valid], 2 * ref_logp.exp()[valid] / (2 * ref_logp.exp()[valid] + 1e-5))
    assert bool((w[~valid] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_dpo_and_idkdpo(dtype):
    win, win_labels = _batch(dtype, seed=1, T=5)
    lose, lose_labels = _batch(dtype, seed=2, T=7)
    rw, rl = _ref_nll(3), _ref_nll(4)
    compare_with_reference(lambda a, b: dpo_loss(a, win_labels, b, lose_labels, rw, rl, beta=0.3, shift=True),
                           lambda a, b: ref.dpo_loss(a, win_labels, b, lose_labels, rw, rl, beta=0.3, shift=True),
                           [win, lose], dtype=dtype, names=["win", "lose"])
    a = dpo_loss(win, win_labels, lose, lose_labels, rw, rl, beta=0.3)
    b = idk_dpo_loss(lose, lose_labels, win, win_labels, rl, rw, beta=0.3)
    assert torch.equal(a, b)


def test_reduction_none_per_sequence():
    logits, labels = _batch(torch.float32)
    per = npo_loss(logits, labels, _ref_nll(), reduction="none")
    assert per.shape == (B,) and per[2].item() == 0.0
    keep = torch.tensor([True, True, False, True])
    torch.testing.assert_close(per[keep].mean(), npo_loss(logits, labels, _ref_nll()))


@pytest.mark.parametrize("call,arg,exc", [
    (lambda x, y: npo_loss(x, y, torch.zeros(B + 1)), "ref_nll", ValueError),
    (lambda x, y: npo_loss(x, y, torch.zeros(B, dtype=torch.long)), "ref_nll", TypeError),
    (lambda x, y: npo_loss(x, y, [0.0] * B), "ref_nll", TypeError),
    (lambda x, y: npo_loss(x, y, torch.zeros(B), beta=0.0), "beta", ValueError),
    (lambda x, y: npo_loss(x[0], y[0], torch.zeros(1)), "labels", ValueError),
    (lambda x, y: tnpo_loss(x, y, torch.zeros(B, T + 1)), "ref_logp", ValueError),
    (lambda x, y: simnpo_loss(x, y, gamma=float("nan")), "gamma", ValueError),
    (lambda x, y: dpo_loss(x, y, x[:2], y[:2], torch.zeros(B), torch.zeros(2)), "batch size", ValueError),
])
def test_bad_inputs(call, arg, exc):
    logits, labels = _batch(torch.float32)
    with pytest.raises(exc, match=arg):
        call(logits, labels)


def test_check_finite_on_every_sequence_loss():
    """check_finite (issue 15): NaN logits or a NaN reference value raise ValueError naming the tensor."""
    from fastweight import dpo_loss, flat_loss, npo_loss, simnpo_loss, tnpo_loss, wtnpo_loss

    gen = torch.Generator().manual_seed(9)
    z = torch.randn(2, 5, 11, generator=gen)
    y = torch.randint(0, 11, (2, 5), generator=gen)
    bad = z.clone()
    bad[1, 2, 3] = float("nan")
    ref_nll, ref_logp = torch.zeros(2), torch.zeros(2, 5)
    calls = {
        "npo": lambda x, r=ref_nll: npo_loss(x, y, r, check_finite=True),
        "simnpo": lambda x, r=None: simnpo_loss(x, y, check_finite=True),
        "tnpo": lambda x, r=ref_logp: tnpo_loss(x, y, r, check_finite=True),
        "wtnpo": lambda x, r=ref_logp: wtnpo_loss(x, y, r, check_finite=True),
        "dpo": lambda x, r=ref_nll: dpo_loss(x, y, x, y, r, ref_nll, check_finite=True),
        "flat": lambda x, r=None: flat_loss(x, y, x, y, check_finite=True),
    }
    for name, fn in calls.items():
        assert torch.isfinite(fn(z)), name
        with pytest.raises(ValueError, match="NaN"):
            fn(bad)
    for name in ("npo", "dpo"):
        with pytest.raises(ValueError, match="ref_"):
            calls[name](z, torch.tensor([0.0, float("nan")]))
    for name in ("tnpo", "wtnpo"):
        with pytest.raises(ValueError, match="ref_logp"):
            calls[name](z, torch.full((2, 5), float("inf")))
