"""NLL, KL-to-reference, UNDIAL and RMU vs the naive float64 references (reference/retain.py, reference/rmu.py)."""
from __future__ import annotations

import pytest
import torch
from helpers import DTYPE_IDS, compare_with_reference

from fastweight import kl_loss, nll_loss, rmu_control_vector, rmu_loss, undial_loss
from fastweight._constants import IGNORE_INDEX
from fastweight.reference import retain as ref
from fastweight.reference import rmu as rmu_ref

B, T, V, H = 3, 6, 31, 13
DTYPES = [torch.float32, torch.bfloat16]


def _batch(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=gen) * 2).to(dtype)
    r = (torch.randn(B, T, V, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    return z, r, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_nll(dtype):
    z, _, labels = _batch(dtype)
    compare_with_reference(lambda x: nll_loss(x, labels, shift=True), lambda x: ref.nll_loss(x, labels, shift=True),
                           [z], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("masked", [True, False])
def test_kl_logits(dtype, masked):
    z, r, labels = _batch(dtype)
    compare_with_reference(lambda x: kl_loss(x, r, labels, masked=masked, shift=True),
                           lambda x: ref.kl_loss(x, r, labels, masked=masked, shift=True), [z], dtype=dtype)


def test_kl_masked_and_unmasked_differ_and_unmasked_ignores_labels():
    z, r, labels = _batch(torch.float32)
    a, b = kl_loss(z, r, labels, masked=True), kl_loss(z, r, labels, masked=False)
    assert abs(a.item() - b.item()) > 1e-4
    assert torch.equal(b, kl_loss(z, r, masked=False))


def test_kl_hidden_input():
    gen = torch.Generator().manual_seed(1)
    h, h_ref = torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen)
    W, W_ref = torch.randn(V, H, generator=gen) * 0.5, torch.randn(V, H, generator=gen) * 0.5
    _, _, labels = _batch(torch.float32)
    compare_with_reference(lambda x, w: kl_loss(x, h_ref, labels, lm_head=w, ref_lm_head=W_ref),
                           lambda x, w: ref.kl_loss(x, h_ref, labels, lm_head=w, ref_lm_head=W_ref), [h, W],
                           dtype=torch.float32, names=["hidden", "lm_head"])


@pytest.mark.parametrize("loss", ["kl_masked", "kl", "undial"])
def test_kl_undial_hidden_input_never_forms_logits(monkeypatch, loss):
    """Hidden states of both models go through the fused-linear KL op: the logits helper and the logits KL op
    must not run, and values and gradients still equal the float64 reference (UNDIAL unmasked included)."""
    import fastweight.losses.retain as retain_mod

    def _forbidden(*args, **kwargs):
        raise AssertionError("an [N, V] logits tensor was formed on the hidden-state path")

    monkeypatch.setattr(retain_mod, "_logit_rows", _forbidden)
    monkeypatch.setattr(retain_mod, "kl_div", _forbidden)
    gen = torch.Generator().manual_seed(2)
    h, h_ref = torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen)
    W, W_ref = torch.randn(V, H, generator=gen) * 0.5, torch.randn(V, H, generator=gen) * 0.5
    _, _, labels = _batch(torch.float32)
    impl, naive, opts = {"kl_masked": (kl_loss, ref.kl_loss, dict(masked=True)),
                         "kl": (kl_loss, ref.kl_loss, {}),
                         "undial": (undial_loss, ref.undial_loss, dict(beta=3.0))}[loss]
    compare_with_reference(lambda x, w: impl(x, h_ref, labels, lm_head=w, ref_lm_head=W_ref, shift=True, **opts),
                           lambda x, w: naive(x, h_ref, labels, lm_head=w, ref_lm_head=W_ref, shift=True, **opts),
                           [h, W], dtype=torch.float32, names=["hidden", "lm_head"])


def test_kl_of_identical_models_is_zero():
    z, _, labels = _batch(torch.float32)
    x = z.clone().requires_grad_()
    loss = kl_loss(x, z, labels)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and x.grad.abs().max() < 1e-7


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("beta", [0.0, 10.0])
@pytest.mark.parametrize("masked", [False, True])
def test_undial(dtype, beta, masked):
    z, r, labels = _batch(dtype)
    compare_with_reference(lambda x: undial_loss(x, r, labels, beta=beta, masked=masked, shift=True),
                           lambda x: ref.undial_loss(x, r, labels, beta=beta, masked=masked, shift=True), [z],
                           dtype=dtype)


def test_kl_default_equals_tofu_and_open_unlearning_code():
    """TOFU / open-unlearning compute_kl_divergence: kl_div(log_softmax rows, batchmean, log_target) over
    every position of the flattened [B*T, V] logits (prompt and padding included)."""
    z, r, labels = _batch(torch.float64, seed=3)
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = kl_loss(x1, r, labels, shift=True)
    want = torch.nn.functional.kl_div(torch.log_softmax(x2, -1).view(-1, V), torch.log_softmax(r, -1).view(-1, V),
                                      reduction="batchmean", log_target=True)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-16)


def test_undial_default_equals_open_unlearning_code():
    """open-unlearning compute_undial_loss: teacher logits minus beta at shift_labels (-100 indexes V - 100),
    soft-label cross-entropy averaged over every shifted position. Same gradient as fastweight's KL form; the
    values differ by the mean teacher entropy (a constant of the frozen reference)."""
    Vb = 131  # > 100 so that -100 wraps inside the vocabulary, as with a real tokenizer
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(B, T, Vb, generator=gen, dtype=torch.float64) * 2
    r = torch.randn(B, T, Vb, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, Vb, (B, T), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    beta = 10.0
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    sl, sz, st = labels[..., 1:], x2[..., :-1, :], r[..., :-1, :]
    mask = torch.zeros_like(st)
    mask[torch.arange(B).view(-1, 1, 1), torch.arange(T - 1).view(1, -1, 1), sl.unsqueeze(-1)] = 1.0
    soft = torch.softmax(st - mask * beta, -1)
    want = torch.nn.functional.cross_entropy(sz.reshape(-1, Vb), soft.reshape(-1, Vb), reduction="none").mean()
    entropy = -(soft * torch.log(soft)).sum(-1).mean()
    got = undial_loss(x1, r, labels, beta=beta, shift=True)
    got.backward()
    want.backward()
    torch.testing.assert_close(got + entropy, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-11, atol=1e-15)


def test_undial_beta_zero_is_masked_kl_and_beta_lowers_target():
    z, r, labels = _batch(torch.float32)
    torch.testing.assert_close(undial_loss(z, r, labels, beta=0.0), kl_loss(z, r, labels))
    # the model matching the reference is no longer at the optimum once the target logit is lowered
    x = r.clone().requires_grad_()
    undial_loss(x, r, labels, beta=10.0).backward()
    valid = labels != IGNORE_INDEX
    g_label = x.grad.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
    assert bool((g_label[valid] > 0).all())  # descent lowers the label logit


def test_retain_errors():
    z, r, labels = _batch(torch.float32)
    with pytest.raises(ValueError, match="labels are required"):
        kl_loss(z, r, masked=True)
    with pytest.raises(TypeError, match="masked"):
        undial_loss(z, r, labels, masked="yes")
    with pytest.raises(ValueError, match="ignore_index"):
        undial_loss(z, r, torch.where(labels == IGNORE_INDEX, 0, labels), ignore_index=5)
    with pytest.raises(ValueError, match="ref leading dims"):
        kl_loss(z, r[:, :2], labels)
    with pytest.raises(ValueError, match="ref_lm_head"):
        kl_loss(z[..., :H], r[..., :H], labels, lm_head=torch.randn(V, H))
    with pytest.raises(TypeError, match="masked"):
        kl_loss(z, r, labels, masked=1)
    with pytest.raises(ValueError, match="beta"):
        undial_loss(z, r, labels, beta=-1.0)


# ---------------------------------------------------------------------------------------------------------
# RMU
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("masked", [False, True])
def test_rmu(dtype, masked):
    gen = torch.Generator().manual_seed(2)
    hf, hr, href = (torch.randn(B, T, H, generator=gen).to(dtype) for _ in range(3))
    u = rmu_control_vector(H, steering_coef=4.0, seed=3)
    mf = torch.ones(B, T, dtype=torch.long)
    mf[1, 4:] = 0
    masks = dict(forget_mask=mf, retain_mask=mf.flip(0)) if masked else {}
    compare_with_reference(lambda a, b: rmu_loss(a, u, b, href, alpha=3.0, **masks),
                           lambda a, b: rmu_ref.rmu_loss(a, u.to(a.dtype), b, href.to(a.dtype), alpha=3.0, **masks),
                           [hf, hr], dtype=dtype, names=["forget_hidden", "retain_hidden"])


def test_rmu_control_vector():
    u = rmu_control_vector(H, steering_coef=6.5, seed=0)
    assert u.shape == (H,) and abs(u.norm().item() - 6.5) < 1e-5 and bool((u >= 0).all())
    assert torch.equal(u, rmu_control_vector(H, steering_coef=6.5, seed=0))
    assert not torch.equal(u, rmu_control_vector(H, steering_coef=6.5, seed=1))


def test_rmu_errors():
    h = torch.randn(B, T, H)
    with pytest.raises(ValueError, match="control"):
        rmu_loss(h, torch.ones(H + 1))
    with pytest.raises(ValueError, match="together"):
        rmu_loss(h, torch.ones(H), h)
    with pytest.raises(ValueError, match="alpha"):
        rmu_loss(h, torch.ones(H), alpha=-1.0)
    with pytest.raises(ValueError, match="mask"):
        rmu_loss(h, torch.ones(H), forget_mask=torch.ones(B))
