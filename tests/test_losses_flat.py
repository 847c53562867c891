"""FLAT with every divergence vs the naive float64 reference (reference/flat.py)."""
from __future__ import annotations

import pytest
import torch
from helpers import DTYPE_IDS, compare_with_reference

from fastweight import DIVERGENCES, flat_loss, mean_token_prob
from fastweight._constants import IGNORE_INDEX
from fastweight.losses.flat import lambertw
from fastweight.reference import flat as ref

B, V, H = 4, 23, 9


def _answers(dtype, T, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 1.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :2] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_flat_matches_reference(dtype, divergence):
    f, fl = _answers(dtype, 7, 0)
    e, el = _answers(dtype, 5, 1)
    compare_with_reference(lambda a, b: flat_loss(a, fl, b, el, divergence=divergence, shift=True),
                           lambda a, b: ref.flat_loss(a, fl, b, el, divergence=divergence, shift=True),
                           [f, e], dtype=dtype, names=["forget", "idk"])


def test_flat_hidden_input_and_empty_pair():
    gen = torch.Generator().manual_seed(2)
    hf, he = torch.randn(B, 6, H, generator=gen), torch.randn(B, 4, H, generator=gen)
    W = torch.randn(V, H, generator=gen) * 0.5
    fl = torch.randint(0, V, (B, 6), generator=gen)
    el = torch.randint(0, V, (B, 4), generator=gen)
    el[1] = IGNORE_INDEX  # pair 1 has no template tokens: left out of the mean
    compare_with_reference(lambda a, b, w: flat_loss(a, fl, b, el, lm_head=w),
                           lambda a, b, w: ref.flat_loss(a, fl, b, el, lm_head=w), [hf, he, W], dtype=torch.float32,
                           names=["forget", "idk", "lm_head"])


def test_tv_with_equal_probabilities_has_zero_gradient():
    f, fl = _answers(torch.float32, 7, 3)
    x = f.clone().requires_grad_()
    loss = flat_loss(x, fl, x, fl, divergence="tv")
    loss.backward()
    assert loss.item() == 0.0
    assert bool((x.grad == 0).all())
    # not true of KL (f* o g = exp(x - 1) has slope != 1): the test above can fail
    y = f.clone().requires_grad_()
    flat_loss(y, fl, y, fl, divergence="kl").backward()
    assert y.grad.abs().max() > 1e-4


def test_mean_token_prob_per_sequence():
    f, fl = _answers(torch.float32, 7, 4)
    P, n = mean_token_prob(f, fl)
    p = torch.softmax(f.double(), -1).gather(-1, fl.clamp(min=0)[..., None]).squeeze(-1)
    expected = torch.stack([p[b][fl[b] != IGNORE_INDEX].mean() for b in range(B)])
    torch.testing.assert_close(P.double(), expected, rtol=1e-6, atol=1e-7)
    assert n.tolist() == [5] * B


def test_lambertw_matches_scipy():
    special = pytest.importorskip("scipy.special")
    z = torch.linspace(0.05, 50.0, 101, dtype=torch.float64)
    w = lambertw(z)
    torch.testing.assert_close(w, torch.from_numpy(special.lambertw(z.numpy()).real), rtol=1e-12, atol=1e-14)


def test_bad_divergence_and_batch():
    f, fl = _answers(torch.float32, 7, 0)
    with pytest.raises(ValueError, match="divergence"):
        flat_loss(f, fl, f, fl, divergence="Squared-Hellinger")  # the released spelling is not a name here
    with pytest.raises(ValueError, match="batch size"):
        flat_loss(f, fl, f[:2], fl[:2])
