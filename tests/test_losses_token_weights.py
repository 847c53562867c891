"""``token_weights=`` on every token-level loss: ones are the unweighted loss bit for bit (values and gradients,
logits and hidden-state paths); random weights match the float64 reference (reference/released.py); bad
weights raise errors naming the argument; the Triton interpreter path (``interpret`` marker)."""
from __future__ import annotations

import pytest
import torch
from helpers import DTYPE_IDS, compare_with_reference

import fastweight as fw
from fastweight._constants import IGNORE_INDEX
from fastweight.losses import (
    idk_dpo_loss, kto_loss, npo_batch_loss, flat_loss, hard_sampling_loss, kl_loss, nll_loss, npo_loss, satimp_loss, sequence_nll, simnpo_loss, tnpo_loss,
    undial_loss, wtnpo_loss,
)
from fastweight.reference import released as ref

B, T, V, H = 3, 7, 37, 13


def _labels(seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    return labels


def _weights(seed=1):
    gen = torch.Generator().manual_seed(seed)
    tw = torch.rand(B, T, generator=gen) * 2
    tw[2, 3] = 0.0
    return tw


def _losses(labels, ref_logp, ref_x):
    """name -> fn(x, token_weights=..., **head) for every token-level loss."""
    return {
        "ga": lambda x, **kw: fw.ga_loss(x, labels, shift=True, **kw),
        "wga": lambda x, **kw: fw.wga_loss(x, labels, beta=1.0, shift=True, **kw),
        "simimp": lambda x, **kw: fw.simimp_loss(x, labels, shift=True, **kw),
        "satimp": lambda x, **kw: satimp_loss(x, labels, beta1=1.0, beta2=0.5, shift=True, **kw),
        "satimp_sum": lambda x, **kw: satimp_loss(x, labels, beta1=1.0, beta2=0.5, shift=True, reduction="sum", **kw),
        "satimp_none": lambda x, **kw: satimp_loss(x, labels, beta1=1.0, shift=True, reduction="none", **kw).sum(),
        "satimp_group": lambda x, **kw: satimp_loss(x, labels, granularity="group", group_size=2, shift=True, **kw),
        "satimp_instance": lambda x, **kw: satimp_loss(x, labels, beta1=0.1, granularity="instance", shift=True, **kw),
        "satimp_batch": lambda x, **kw: satimp_loss(x, labels, beta1=0.1, granularity="batch", shift=True, **kw),
        "hard": lambda x, **kw: hard_sampling_loss(x, labels, k=0.5, shift=True, **kw),
        "nll": lambda x, **kw: nll_loss(x, labels, shift=True, **kw),
        "npo": lambda x, **kw: npo_loss(x, labels, -ref_logp.sum(-1), shift=True, **kw),
        "simnpo": lambda x, **kw: simnpo_loss(x, labels, shift=True, **kw),
        "seq_nll": lambda x, **kw: sequence_nll(x, labels, shift=True, **kw)[0].sum(),
        "tnpo": lambda x, **kw: tnpo_loss(x, labels, ref_logp, shift=True, **kw),
        "wtnpo": lambda x, **kw: wtnpo_loss(x, labels, ref_logp, shift=True, **kw),
        "flat": lambda x, **kw: flat_loss(x, labels, x, labels.roll(1, 0), shift=True,
                                          forget_token_weights=kw.pop("token_weights", None), **kw),
        "idkdpo": lambda x, **kw: idk_dpo_loss(x, labels, x, labels.roll(1, 0), ref_logp.sum(-1), ref_logp.sum(0)[:B],
                                               shift=True, forget_token_weights=kw.pop("token_weights", None), **kw),
        "kto": lambda x, **kw: kto_loss(x, labels, -ref_logp.sum(-1), -ref_logp.sum(0)[:B], torch.zeros(B),
                                        shift=True, **kw),
        "npo_batch": lambda x, **kw: npo_batch_loss(x, labels, ref_logp, shift=True, **kw),
        "kl": lambda x, **kw: kl_loss(x, ref_x, labels, shift=True, **kw) if "lm_head" not in kw else
        kl_loss(x, ref_x, labels, shift=True, ref_lm_head=kw["lm_head"].detach(), **kw),
        "undial": lambda x, **kw: undial_loss(x, ref_x, labels, shift=True, **kw) if "lm_head" not in kw else
        undial_loss(x, ref_x, labels, shift=True, ref_lm_head=kw["lm_head"].detach(), **kw),
    }


def _run(fn, x, **kw):
    x = x.clone().requires_grad_()
    head = kw.pop("lm_head", None)
    if head is not None:
        head = head.clone().requires_grad_()
        kw["lm_head"] = head
    loss = fn(x, **kw)
    loss.backward()
    return loss.detach(), x.grad, None if head is None else head.grad


@pytest.mark.parametrize("hidden", [False, True], ids=["logits", "hidden"])
@pytest.mark.parametrize("name", list(_losses(_labels(), torch.zeros(B, T), torch.zeros(B, T, V))))
def test_ones_equal_unweighted_bit_for_bit(name, hidden):
    gen = torch.Generator().manual_seed(2)
    labels = _labels()
    if hidden:
        x, W = torch.randn(B, T, H, generator=gen), 0.3 * torch.randn(V, H, generator=gen)
        ref_x, kw = torch.randn(B, T, H, generator=gen), {"lm_head": W}
    else:
        x, ref_x, kw = 2 * torch.randn(B, T, V, generator=gen), torch.randn(B, T, V, generator=gen), {}
    ref_logp = -torch.rand(B, T, generator=gen)
    fn = _losses(labels, ref_logp, ref_x)[name]
    plain = _run(fn, x, **kw)
    ones = _run(fn, x, token_weights=torch.ones(B, T), **kw)
    for a, b in zip(plain, ones):
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta1,beta2", [(0.0, 0.0), (1.0, 0.5)])
def test_weighted_matches_reference_logits(dtype, reduction, beta1, beta2):
    gen = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(B, T, V, generator=gen)).to(dtype)
    labels, tw = _labels(), _weights()
    kw = dict(beta1=beta1, beta2=beta2, reduction=reduction, shift=True)
    compare_with_reference(lambda x: satimp_loss(x, labels, token_weights=tw, backend="torch", **kw),
                           lambda x: ref.weighted_token_loss(x, labels, tw, **kw), [logits], dtype=dtype,
                           names=["logits"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_weighted_matches_reference_hidden(dtype):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype)
    W = (0.3 * torch.randn(V, H, generator=gen)).to(dtype)
    labels, tw = _labels(1), _weights(2)
    compare_with_reference(lambda x, w: fw.wga_loss(x, labels, beta=1.0, lm_head=w, token_weights=tw, shift=True),
                           lambda x, w: ref.weighted_token_loss(x, labels, tw, beta1=1.0, lm_head=w, shift=True),
                           [hidden, W], dtype=dtype, names=["hidden", "lm_head"])


def test_weights_scale_each_token_in_sequence_losses():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    labels, tw = _labels(), _weights()
    S, n = sequence_nll(logits, labels, shift=True, token_weights=tw.double())
    valid = torch.cat([labels[:, 1:], torch.full((B, 1), IGNORE_INDEX)], 1) != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, torch.where(valid, torch.cat(
        [labels[:, 1:], labels[:, :1]], 1), 0)[..., None])[..., 0]
    expected = -(torch.where(valid, logp, 0.0) * ref.shifted_weights(tw.double())).sum(-1)
    torch.testing.assert_close(S, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(n, valid.sum(-1))


@pytest.mark.parametrize("bad,err,msg", [
    ([1.0] * T, TypeError, "token_weights must be a torch.Tensor"),
    (torch.ones(B, T, dtype=torch.long), TypeError, "token_weights must be a floating tensor"),
    (torch.ones(B, T + 1), ValueError, "token_weights must have the shape of labels"),
    (torch.full((B, T), -0.5), ValueError, "token_weights must be non-negative"),
    (torch.full((B, T), float("nan")), ValueError, "token_weights must be finite"),
    (torch.full((B, T), float("inf")), ValueError, "token_weights must be finite"),
])
def test_bad_token_weights_raise_naming_the_argument(bad, err, msg):
    logits, labels = torch.randn(B, T, V), _labels()
    for fn in (lambda: fw.ga_loss(logits, labels, token_weights=bad),
               lambda: tnpo_loss(logits, labels, torch.zeros(B, T), token_weights=bad),
               lambda: satimp_loss(logits, labels, granularity="instance", token_weights=bad)):
        with pytest.raises(err, match=msg):
            fn()


def test_weights_are_detached():
    logits, labels = torch.randn(B, T, V), _labels()
    tw = _weights().requires_grad_()
    fw.ga_loss(logits.requires_grad_(), labels, token_weights=tw, shift=True).backward()
    assert tw.grad is None


# Triton kernels through the interpreter (run by tests/test_interpret.py).
@pytest.mark.interpret
@pytest.mark.parametrize("hidden", [False, True], ids=["logits", "hidden"])
def test_interpret_token_weights(hidden):
    gen = torch.Generator().manual_seed(6)
    labels, tw = _labels(), _weights()
    if hidden:
        tensors = [torch.randn(B, T, 16, generator=gen), 0.3 * torch.randn(V, 16, generator=gen)]
        impl = lambda x, w: satimp_loss(x, labels, beta1=1.0, beta2=0.5, lm_head=w, token_weights=tw, shift=True,
                                        backend="triton")
        naive = lambda x, w: ref.weighted_token_loss(x, labels, tw, beta1=1.0, beta2=0.5, lm_head=w, shift=True)
        names = ["hidden", "lm_head"]
    else:
        tensors = [2 * torch.randn(B, T, V, generator=gen)]
        impl = lambda x: satimp_loss(x, labels, beta1=1.0, beta2=0.5, token_weights=tw, shift=True, backend="triton")
        naive = lambda x: ref.weighted_token_loss(x, labels, tw, beta1=1.0, beta2=0.5, shift=True)
        names = ["logits"]
    compare_with_reference(impl, naive, tensors, dtype=torch.float32, names=names)


def test_api_worked_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "token_weights=tw" in b)
    scope: dict = {}
    exec(compile(block, "docs/api.md token_weights example", "exec"), scope)
    assert scope["hidden"].grad is not None and torch.isfinite(scope["loss"])


def test_inplace_backward_with_weights_equals_out_of_place():
    gen = torch.Generator().manual_seed(9)
    logits, labels, tw = 2 * torch.randn(B, T, V, generator=gen), _labels(), _weights()
    grads = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        y = x * 1.0  # a non-leaf buffer the in-place path may overwrite
        satimp_loss(y, labels, beta1=1.0, beta2=0.5, shift=True, token_weights=tw, inplace_backward=inplace).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
