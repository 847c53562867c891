"""SatImp granularity variants and hard sampling vs the naive float64 reference (reference/reweighted_variants.py)."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPE_IDS, compare_with_reference

from fastweight import hard_sampling_loss, satimp_loss
from fastweight._constants import IGNORE_INDEX
from fastweight.reference import reweighted_variants as ref

B, T, V, H = 3, 7, 37, 15


def _batch(dtype, seed=0, std=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * std).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = IGNORE_INDEX       # a prompt
    labels[1, 5:] = IGNORE_INDEX       # padding
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("granularity,group_size", [("token", 4), ("group", 1), ("group", 2),
                                                    ("group", 3), ("group", 50), ("batch", 4)])
def test_satimp_granularity_matches_reference(dtype, granularity, group_size):
    # beta1 = 1 keeps the weights away from 0 so every term matters.
    logits, labels = _batch(dtype)
    # batch level weighs sequences by exp(-beta1 S_b): a small beta1 keeps it well conditioned (see instance)
    kw = dict(beta1=0.05 if granularity == "batch" else 1.0, beta2=0.5, granularity=granularity,
              group_size=group_size, shift=True)
    compare_with_reference(
        lambda x: satimp_loss(x, labels, backend="torch", **kw),
        lambda x: ref.satimp_granular(x, labels, **kw), [logits], dtype=dtype, names=["logits"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_satimp_instance_uses_sequence_likelihood(dtype):
    # Short sequences so q_b = exp(-S_b) is not negligible; hidden-state input. The weight
    # exp(beta1 log q) has relative condition number beta1 |log q| (~ 5 here) over the ulp of log q, so the
    # ulp allowance is c = 8 * 8 instead of 8.
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 3, H, generator=gen).to(dtype)
    lm_head = (torch.randn(V, H, generator=gen) * 0.2).to(dtype)
    labels = torch.randint(0, V, (4, 3), generator=gen)
    labels[2] = IGNORE_INDEX  # an empty sequence is left out of the mean
    kw = dict(beta1=0.5, beta2=1.0, granularity="instance")
    compare_with_reference(
        lambda x, w: satimp_loss(x, labels, lm_head=w, **kw),
        lambda x, w: ref.satimp_granular(x, labels, lm_head=w, **kw), [hidden, lm_head], dtype=dtype,
        names=["hidden", "lm_head"], c=64.0)


def test_group_size_one_is_token_level():
    logits, labels = _batch(torch.float32, seed=1)
    outs = []
    for kw in (dict(granularity="token"), dict(granularity="group", group_size=1)):
        x = logits.clone().requires_grad_()
        loss = satimp_loss(x, labels, beta1=1.0, beta2=0.5, shift=True, **kw)
        loss.backward()
        outs.append((loss.detach(), x.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-9)


def test_group_weights_are_group_means_and_detached():
    logits, labels = _batch(torch.float32, seed=2)
    x = logits.clone().requires_grad_()
    _, w_tok = satimp_loss(x, labels, beta1=1.0, beta2=0.5, shift=True, return_weights=True)
    loss, w = satimp_loss(x, labels, beta1=1.0, beta2=0.5, granularity="group", group_size=2, shift=True,
                          return_weights=True)
    assert not w.requires_grad
    valid = torch.cat([labels[:, 1:], torch.full((B, 1), IGNORE_INDEX)], 1) != IGNORE_INDEX
    for b in range(B):
        tok = w_tok[b][valid[b]].sort(descending=True).values  # released code: descending groups
        grp = w[b][valid[b]].sort(descending=True).values
        expected = torch.cat([c.mean().expand(len(c)) for c in tok.split(2)])
        torch.testing.assert_close(grp, expected)
    # gradient = that of sg[w] * logp: differs from the gradient through undetached weights
    loss.backward()
    x2 = logits.clone().requires_grad_()
    ref.satimp_granular(x2, labels, beta1=1.0, beta2=0.5, granularity="group", group_size=2, shift=True).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-8)


def test_batch_weight_is_one_scalar_of_sequence_weights():
    logits, labels = _batch(torch.float32, seed=4)
    _, w = satimp_loss(logits, labels, beta1=0.05, beta2=0.5, granularity="batch", shift=True, return_weights=True)
    _, w_seq = satimp_loss(logits, labels, beta1=0.05, beta2=0.5, granularity="instance", shift=True,
                           return_weights=True)
    assert w.dim() == 0 and torch.allclose(w, w_seq.mean())


@pytest.mark.parametrize("granularity", ["token", "instance", "group", "batch"])
def test_all_ignored_gives_zero_loss_and_gradient(granularity):
    logits, labels = _batch(torch.float32)
    labels = torch.full_like(labels, IGNORE_INDEX)
    x = logits.clone().requires_grad_()
    loss = satimp_loss(x, labels, granularity=granularity)
    loss.backward()
    assert loss.item() == 0.0 and bool((x.grad == 0).all())


# ---------------------------------------------------------------------------------------------------------
# Hard sampling
@pytest.mark.parametrize("sampling", ["topk", "bottomk"])
@pytest.mark.parametrize("k", [0.15, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("counts", ["released", "paper"])
def test_hard_sampling_picks_the_right_tokens(sampling, k, counts):
    logits, labels = _batch(torch.float32, seed=5)
    _, mask = hard_sampling_loss(logits, labels, k=k, sampling=sampling, counts=counts, shift=True,
                                 return_weights=True)
    logp64 = torch.log_softmax(logits.double(), -1)
    y = torch.cat([labels[:, 1:], torch.full((B, 1), IGNORE_INDEX)], 1)
    valid = y != IGNORE_INDEX
    logp64 = torch.where(valid, logp64.gather(-1, torch.where(valid, y, 0)[..., None]).squeeze(-1), 0.0)
    for b in range(B):
        n = int(valid[b].sum())
        if counts == "paper":
            assert int(mask[b].sum()) == math.ceil(k * n)
        else:  # distinct values: strictly above / below the linear-interpolation quantile at 1 - k
            pos = (1 - k) * (n - 1)
            above = n - 1 - math.floor(pos)
            want = above if sampling == "topk" else n - above - (1 if pos == math.floor(pos) else 0)
            assert int(mask[b].sum()) == want
        assert not bool(mask[b][~valid[b]].any())
    torch.testing.assert_close(mask.bool(), ref.hard_sampling_mask(logp64, valid, k, sampling, counts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hard_sampling_loss_matches_reference(dtype, reduction):
    logits, labels = _batch(dtype, seed=6)
    _, mask = hard_sampling_loss(logits, labels, k=0.45, shift=True, return_weights=True)
    compare_with_reference(
        lambda x: hard_sampling_loss(x, labels, k=0.45, shift=True, reduction=reduction),
        lambda x: ref.hard_sampling_loss(x, labels, mask=mask.bool(), shift=True, reduction=reduction),
        [logits], dtype=dtype, names=["logits"])


def test_hard_sampling_random_is_seeded_and_exact():
    logits, labels = _batch(torch.float32, seed=7)
    masks = [hard_sampling_loss(logits, labels, k=0.5, sampling="random", seed=s, return_weights=True)[1]
             for s in (0, 0, 1)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])
    valid = labels != IGNORE_INDEX
    for m in masks:  # released: floor(k n) tokens
        assert torch.equal(m.sum(-1).long(), torch.floor(0.5 * valid.sum(-1).double()).long())
    paper = hard_sampling_loss(logits, labels, k=0.5, sampling="random", counts="paper", return_weights=True)[1]
    assert torch.equal(paper.sum(-1).long(), torch.ceil(0.5 * valid.sum(-1).double()).long())
    # floor(k n) = 0: the released code keeps every valid token
    small = hard_sampling_loss(logits, labels, k=0.1, sampling="random", return_weights=True)[1]
    assert torch.equal(small.bool(), valid)
    gen = torch.Generator().manual_seed(0)
    first = hard_sampling_loss(logits, labels, k=0.5, sampling="random", generator=gen, return_weights=True)[1]
    second = hard_sampling_loss(logits, labels, k=0.5, sampling="random", generator=gen, return_weights=True)[1]
    assert torch.equal(first, masks[0]) and not torch.equal(first, second)  # the generator advances


@pytest.mark.parametrize("kw,arg", [
    (dict(k=0.0), "k"), (dict(k=1.5), "k"), (dict(k=-0.1), "k"), (dict(sampling="middle"), "sampling"),
    (dict(counts="exact"), "counts"),
])
def test_hard_sampling_bad_config(kw, arg):
    logits, labels = _batch(torch.float32)
    with pytest.raises(ValueError, match=arg):
        hard_sampling_loss(logits, labels, **kw)


@pytest.mark.parametrize("kw,arg,exc", [
    (dict(granularity="sentence"), "granularity", ValueError), (dict(group_size=0), "group_size", ValueError),
    (dict(group_size=2.0), "group_size", TypeError), (dict(granularity="group", beta1=-1.0), "beta1", ValueError),
])
def test_satimp_bad_config(kw, arg, exc):
    logits, labels = _batch(torch.float32)
    with pytest.raises(exc, match=arg):
        satimp_loss(logits, labels, **kw)


# ---------------------------------------------------------------------------------------------------------
# Transcriptions of the released code (tmlr-group/SatImp, dataloader_granu.py / dataloader_hardsampling.py) on
# padded [B, T] batches with uneven lengths (not multiples of G; k n not an integer), float64.
def _released_ce(z, labels):
    """Per-position CE of the shifted labels, 0 at ignored positions (CrossEntropyLoss(reduction='none'))."""
    logits, y = z[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, z.shape[-1]), y.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="none").view(y.shape), y


def _released_group_and_average(a, b, group_size):
    """group_and_average: rows of weights a, mask from b != 0, descending sort, consecutive group means."""
    mask = (b != 0.0).double()
    valid_a = a * mask
    sorted_a, sorted_idx = valid_a.sort(dim=-1, descending=True)
    n_valid = mask.sum(-1).long()
    n_groups = (n_valid + group_size - 1) // group_size
    out = torch.zeros_like(valid_a)
    for i in range(valid_a.shape[0]):
        start = 0
        for _ in range(int(n_groups[i])):
            end = min(start + group_size, int(n_valid[i]))
            out[i, sorted_idx[i, start:end]] = sorted_a[i, start:end].mean().item()
            start = end
    return out


def _released_granular(z, labels, granularity, beta, group_size=3):
    """The ``*_simsat_ga`` losses (weight p**beta) of dataloader_granu.py."""
    ce, y = _released_ce(z, labels)
    if granularity == "group":
        w = (-ce).exp().detach() ** beta
        gw = _released_group_and_average(w, ce.detach(), group_size)
        return -(gw * ce)[y != IGNORE_INDEX].mean()
    seq = ce.sum(-1)
    w = (-seq).exp().detach() ** beta
    if granularity == "instance":
        return -(w * seq).mean()
    return -(w.mean().item() * seq).mean()


def _released_mask(z, labels, k, sampling):
    """ga_topk / ga_bottomk masks: threshold = torch.quantile(nonzero ce, 1 - k); > (topk) or < (bottomk)."""
    ce, _ = _released_ce(z, labels)
    w = ce.detach()
    rows = []
    for r in w:
        nz = r[r > 0]
        thr = torch.quantile(nz, 1 - k) if len(nz) > 0 else float("inf")
        rows.append((r > thr).int() if sampling == "topk" else (r < thr).int())
    return torch.stack(rows), ce


def _uneven_batch(seed=11):
    gen = torch.Generator().manual_seed(seed)
    Bq, Tq, Vq = 4, 13, 29
    z = torch.randn(Bq, Tq, Vq, generator=gen, dtype=torch.float64) * 0.7
    labels = torch.randint(0, Vq, (Bq, Tq), generator=gen)
    for b, (prompt, length) in enumerate([(2, 13), (3, 11), (1, 8), (4, 12)]):  # 11, 7, 7, 8 answer tokens
        labels[b, :prompt] = IGNORE_INDEX
        labels[b, length:] = IGNORE_INDEX
    return z, labels


@pytest.mark.parametrize("granularity", ["instance", "group", "batch"])
def test_granularity_equals_released_code(granularity):
    z, labels = _uneven_batch()
    beta = 0.3 if granularity != "group" else 2.0
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = satimp_loss(x1, labels, beta1=beta, beta2=0.0, granularity=granularity, group_size=3, shift=True)
    want = _released_granular(x2, labels, granularity, beta, group_size=3)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-15)


def test_group_order_matters_on_uneven_lengths():
    """Ascending groups (the old behaviour) give another value when a length is not a multiple of G."""
    z, labels = _uneven_batch()
    got = satimp_loss(z, labels, beta1=2.0, beta2=0.0, granularity="group", group_size=3, shift=True)
    ce, y = _released_ce(z, labels)
    w = (-ce).exp() ** 2.0
    valid = y != IGNORE_INDEX
    asc = torch.zeros_like(w)
    for b in range(w.shape[0]):
        idx = valid[b].nonzero().flatten()
        vals, order = w[b, idx].sort()
        for g0 in range(0, len(idx), 3):
            asc[b, idx[order[g0:g0 + 3]]] = vals[g0:g0 + 3].mean()
    ascending = -(asc * ce)[valid].mean()
    assert abs(float(got - ascending)) > 1e-3 * abs(float(got))


@pytest.mark.parametrize("sampling", ["topk", "bottomk"])
@pytest.mark.parametrize("k", [0.15, 0.3, 0.5])
def test_hard_sampling_equals_released_code(sampling, k):
    z, labels = _uneven_batch(seed=12)
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss, mask = hard_sampling_loss(x1, labels, k=k, sampling=sampling, shift=True, return_weights=True)
    rmask, ce = _released_mask(x2, labels, k, sampling)
    want = (-1 * rmask * ce).sum()
    valid = labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(mask[:, :-1].bool(), rmask.bool() & valid)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-15)
    if sampling == "bottomk":  # the released bottomk keeps about (1 - k) n tokens, not k n
        n = valid.sum(-1).double()
        assert bool((mask.sum(-1) >= torch.floor((1 - k) * (n - 1))).all())
