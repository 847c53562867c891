"""Naive references for the SatImp variants in ``fastweight.losses.reweighted`` (``shared/spec/LOSSES.md``).

Granularity (weights w_t = sg[p^beta1 (1-p)^beta2]; the released code tmlr-group/SatImp defines each):
    instance: w_b = sg[q^beta1 (1-q)^beta2], q = exp(-S_b); L = -mean_b(w_b S_b) over non-empty sequences
    group:    per sequence, sort the token weights in descending order, split into consecutive groups of G,
              replace each weight by its group's mean; L = -tokmean(w' ell)
    batch:    w_bar = mean_b of the instance weights; L = -w_bar * mean_b S_b over non-empty sequences
Hard sampling, released counts: thr = quantile(ell_b, 1 - k) (linear interpolation); topk keeps ell > thr,
    bottomk keeps ell < thr. Paper counts (Algorithm 1): s = ceil(k n_b) tokens, topk the lowest logp, bottomk
    the highest. L = -sum (or mean) over kept tokens of ell. Python loops, autograd only.
"""
from __future__ import annotations

import math

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.reference.token_logprobs import shift_labels, token_logprobs


def _logp_valid(x, labels, lm_head, shift, ignore_index):
    logp = token_logprobs(x, labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    valid = (shift_labels(labels, ignore_index) if shift else labels) != ignore_index
    return logp, valid


def _w(logp, beta1, beta2):
    lp = logp.detach()
    return torch.exp(lp) ** beta1 * (-torch.expm1(lp)) ** beta2


def satimp_granular(x, labels, *, beta1=5.0, beta2=0.1, granularity="token", group_size=4, lm_head=None,
                    shift=False, ignore_index=IGNORE_INDEX):
    logp, valid = _logp_valid(x, labels, lm_head, shift, ignore_index)
    B, T = labels.shape
    if granularity in ("instance", "batch"):
        seqs, weights = [], []
        for b in range(B):
            if not bool(valid[b].any()):
                continue
            seq_logp = logp[b][valid[b]].sum()
            q = seq_logp.detach().exp()
            seqs.append(seq_logp)
            weights.append(q ** beta1 * (1 - q) ** beta2 if beta2 else q ** beta1)
        if not seqs:
            return logp.sum() * 0
        if granularity == "batch":
            return sum(weights) / len(weights) * torch.stack(seqs).mean()
        return torch.stack([w * s for w, s in zip(weights, seqs)]).mean()
    w = torch.zeros_like(logp)
    if granularity == "token":
        w = torch.where(valid, _w(logp, beta1, beta2), w)
    elif granularity == "group":
        for b in range(B):
            idx = [t for t in range(T) if bool(valid[b, t])]
            ws = {t: float(_w(logp[b, t], beta1, beta2)) for t in idx}
            order = sorted(idx, key=lambda t: (-ws[t], t))
            for g0 in range(0, len(order), group_size):
                grp = order[g0:g0 + group_size]
                m = sum(ws[t] for t in grp) / len(grp)
                for t in grp:
                    w[b, t] = m
    else:
        raise ValueError(granularity)
    return (w * logp)[valid].sum() / valid.sum().clamp(min=1)


def _quantile(values, q):
    """Linear-interpolation quantile (numpy / torch.quantile's default) of a Python list."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def hard_sampling_mask(logp, valid, k, sampling, counts="released"):
    """0/1 mask of the kept tokens per row (topk / bottomk; random needs an explicit ``mask``)."""
    mask = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        idx = [t for t in range(valid.shape[1]) if bool(valid[b, t])]
        if not idx:
            continue
        ell = {t: -float(logp[b, t]) for t in idx}
        if counts == "released":
            thr = _quantile(list(ell.values()), 1 - k)
            for t in idx:
                mask[b, t] = ell[t] > thr if sampling == "topk" else ell[t] < thr
        else:
            s = math.ceil(k * len(idx))
            sign = -1.0 if sampling == "topk" else 1.0
            for t in sorted(idx, key=lambda t: (sign * ell[t], t))[:s]:
                mask[b, t] = True
    return mask


def hard_sampling_loss(x, labels, *, k=0.3, sampling="topk", counts="released", mask=None, lm_head=None,
                       shift=False, ignore_index=IGNORE_INDEX, reduction="sum"):
    logp, valid = _logp_valid(x, labels, lm_head, shift, ignore_index)
    if mask is None:
        mask = hard_sampling_mask(logp.detach(), valid, k, sampling, counts)
    total = logp[mask].sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)
