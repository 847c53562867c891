"""Losses as the seeds' code releases them vs float64 transcriptions of that code (reference/released.py):
SatImp 51314c0 (``*_imp``, hard-sampling GD / NPO, KTO), FLAT bf2ef07 (Reverse-KL, Squared Hellinger, Neyman as
released and their f-GAN forms; LLMU). Values and gradients, fp32/bf16/fp16, odd sizes, ignored labels."""
from __future__ import annotations

import pytest
import torch
from helpers import DTYPE_IDS, compare_with_reference

from fastweight._constants import IGNORE_INDEX
from fastweight.losses import (
    LOSSES, flat_loss, hard_sampling_loss, kto_loss, llmu_loss, nll_loss, npo_batch_loss, npo_hard_loss,
    positions_mean_nll, sequence_nll, token_logprobs,
)
from fastweight.losses import ga_loss
from fastweight.reference import released as ref

B, T, V, H = 3, 9, 41, 11
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _labels(seed=0, T=T):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :2] = IGNORE_INDEX          # prompt
    labels[1, 6:] = IGNORE_INDEX          # padding
    return labels


def _mask(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, generator=gen) < 0.5).float()


def _logits(dtype, seed, std=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (std * torch.randn(B, T, V, generator=gen)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ga_imp_and_gd_imp(dtype):
    labels, m, rlabels = _labels(), _mask(), _labels(5)
    x, rx = _logits(dtype, 0), _logits(dtype, 1)
    compare_with_reference(lambda z: ga_loss(z, labels, shift=True, reduction="sum", token_weights=m),
                           lambda z: ref.ga_imp(z, labels, m), [x], dtype=dtype, names=["logits"])
    compare_with_reference(
        lambda z, r: positions_mean_nll(z, labels, sign=-1.0, shift=True, token_weights=m)
        + positions_mean_nll(r, rlabels, shift=True),
        lambda z, r: sum(ref.gd_imp_terms(z, labels, m, r, rlabels)), [x, rx], dtype=dtype,
        names=["forget", "retain"])


def _ref_logp(ref_x, labels):
    with torch.no_grad():
        return token_logprobs(ref_x.double(), labels, shift=True, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_npo_imp(dtype):
    labels, m = _labels(), _mask()
    x, rx = _logits(dtype, 0), _logits(torch.float64, 2)
    rl = _ref_logp(rx, labels)
    compare_with_reference(lambda z: npo_batch_loss(z, labels, rl, beta=0.2, shift=True, token_weights=m),
                           lambda z: ref.npo_imp(z, labels, rx.to(z.dtype), m, 0.2), [x], dtype=dtype,
                           names=["logits"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("sampling", ["topk", "bottomk"])
def test_hard_sampling_gd_and_npo(dtype, sampling):
    labels, rlabels = _labels(), _labels(7)
    x, rx, r = _logits(dtype, 3, std=3.0), _logits(torch.float64, 4), _logits(dtype, 5)
    rl = _ref_logp(rx, labels)
    k = 0.4
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for impl, naive in (
        (lambda z, q: hard_sampling_loss(z, labels, k=k, sampling=sampling, shift=True)
         + nll_loss(q, rlabels, shift=True, reduction="sum"),
         lambda z, q: ref.gd_hard(z, labels, q, rlabels, k, sampling)),
        (lambda z, q: npo_hard_loss(z, labels, rl, beta=0.2, k=k, sampling=sampling, shift=True) + 0 * q.sum(),
         lambda z, q: ref.npo_hard(z, labels, rx.to(z.dtype), k, sampling, 0.2) + 0 * q.sum()),
    ):
        a = [t.clone().requires_grad_() for t in (x, r)]
        b = [t.double().clone().requires_grad_() for t in (x, r)]
        va, vb = impl(*a), naive(*b)
        va.backward()
        vb.backward()
        torch.testing.assert_close(va.double(), vb.detach(), **tol)
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga.grad.double(), gb.grad, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("form", ["sigmoid", "logsigmoid"])
def test_kto(dtype, form):
    labels, idk_labels = _labels(), _labels(9)
    x = _logits(dtype, 0)
    rx, ix, rix = (_logits(torch.float64, s) for s in (1, 2, 3))
    with torch.no_grad():
        ref_nll = sequence_nll(rx, labels, shift=True)[0]
        idk_nll = sequence_nll(ix, idk_labels, shift=True)[0]
        ref_idk_nll = sequence_nll(rix, idk_labels, shift=True)[0]
    compare_with_reference(
        lambda z: kto_loss(z, labels, ref_nll, idk_nll, ref_idk_nll, beta=2.5, form=form, shift=True),
        lambda z: ref.kto(z, labels, rx.to(z.dtype), ix.to(z.dtype), rix.to(z.dtype), idk_labels, 2.5, form),
        [x], dtype=dtype, names=["logits"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("div", ["reverse_kl", "hellinger", "neyman", "reverse_kl_fgan", "hellinger_fgan",
                                 "neyman_fgan"])
def test_flat_divergences(dtype, div):
    labels, idk_labels = _labels(), _labels(3)
    x, e = _logits(dtype, 0, std=1.0), _logits(dtype, 1, std=1.0)
    # the loss is a difference of O(1) terms (exp(-P_e) - 1 + P_f): its error scale is theirs, not its value's
    compare_with_reference(lambda a, b: flat_loss(a, labels, b, idk_labels, divergence=div, shift=True),
                           lambda a, b: ref.flat_divergence(a, labels, b, idk_labels, div), [x, e], dtype=dtype,
                           names=["forget", "idk"], value_scale=2.0)


@pytest.mark.parametrize("div,wrong_forget,wrong_idk", [
    ("reverse_kl", True, True), ("hellinger", True, True), ("neyman", False, True),
    ("reverse_kl_fgan", False, False), ("hellinger_fgan", False, False), ("neyman_fgan", False, False)])
def test_flat_released_signs_as_documented(div, wrong_forget, wrong_idk):
    # one gradient step on P: the released forms push P_forget up / P_idk down where flagged
    labels, idk_labels = _labels(), _labels(3)
    x, e = _logits(torch.float64, 0).requires_grad_(), _logits(torch.float64, 1).requires_grad_()
    loss = flat_loss(x, labels, e, idk_labels, divergence=div, shift=True)
    gx, ge = torch.autograd.grad(loss, (x, e))
    lp = lambda z, y, s: token_logprobs(z.detach(), y, shift=True).exp().sum()
    dPf = lp(x - 1e-3 * gx, labels, 0) - lp(x, labels, 0)
    dPe = lp(e - 1e-3 * ge, idk_labels, 0) - lp(e, idk_labels, 0)
    assert (float(dPf) > 0) == wrong_forget
    assert (float(dPe) < 0) == wrong_idk


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_llmu_hidden(dtype):
    gen = torch.Generator().manual_seed(8)
    labels, mlabels = _labels(), _labels(4)
    h, hm = (torch.randn(B, T, H, generator=gen).to(dtype) for _ in range(2))
    W = (0.3 * torch.randn(V, H, generator=gen)).to(dtype)
    compare_with_reference(lambda a, b, w: llmu_loss(a, labels, b, mlabels, lm_head=w, shift=True),
                           lambda a, b, w: ref.llmu(a, labels, b, mlabels, lm_head=w), [h, hm, W], dtype=dtype,
                           names=["forget", "mismatch", "lm_head"])


def test_registry_entries_cite_their_source():
    for name in ("ga_imp", "gd_imp", "npo_imp", "npo_gd_imp", "npo_kl_imp", "gd_topk", "npo_topk", "npo_gd_rand",
                 "kto_sigmoid", "kto_logsigmoid", "kto_logsigmoid_gd", "flat_reverse_kl", "flat_hellinger",
                 "flat_neyman", "llmu"):
        spec = LOSSES[name]
        assert spec.is_method and spec.formula
        assert ("51314c0" in spec.source) or ("bf2ef07" in spec.source), name
    assert LOSSES["npo_kl_imp"].defaults["beta"] == 0.5 and LOSSES["npo_imp"].defaults["beta"] == 0.2
    assert LOSSES["npo_gd_topk"].defaults["forget_coef"] == 0.1
    assert LOSSES["llmu"].defaults["retain_loss"] == "kl" and LOSSES["llmu"].defaults["ga_weight"] == 0.5


def test_bad_options_name_the_argument():
    labels, x = _labels(), _logits(torch.float32, 0)
    z = torch.zeros(B)
    with pytest.raises(ValueError, match="form"):
        kto_loss(x, labels, z, z, z, form="tanh")
    with pytest.raises(ValueError, match="beta"):
        npo_batch_loss(x, labels, torch.zeros(B, T), beta=0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        npo_hard_loss(x, labels, torch.zeros(B, T + 1))
    with pytest.raises(ValueError, match="divergence"):
        flat_loss(x, labels, x, labels, divergence="reverse-kl")
    with pytest.raises(ValueError, match="ga_weight"):
        llmu_loss(x, labels, x, labels, ga_weight=-1.0)


# Triton kernels through the interpreter (run by tests/test_interpret.py).
@pytest.mark.interpret
def test_interpret_released_losses():
    labels, m, idk_labels = _labels(), _mask(), _labels(3)
    x, rx, e = _logits(torch.float32, 0), _logits(torch.float64, 2), _logits(torch.float32, 1, std=1.0)
    rl = _ref_logp(rx, labels)
    compare_with_reference(lambda z: npo_batch_loss(z, labels, rl, beta=0.2, shift=True, token_weights=m,
                                                    backend="triton"),
                           lambda z: ref.npo_imp(z, labels, rx.to(z.dtype), m, 0.2), [x], dtype=torch.float32,
                           names=["logits"])
    compare_with_reference(lambda a, b: flat_loss(a, labels, b, idk_labels, divergence="neyman", shift=True,
                                                  backend="triton"),
                           lambda a, b: ref.flat_divergence(a, labels, b, idk_labels, "neyman"), [x, e],
                           dtype=torch.float32, names=["forget", "idk"], value_scale=2.0)
