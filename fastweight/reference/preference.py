"""Naive references for ``fastweight.losses.preference`` (``shared/spec/LOSSES.md``, G-effect family).

    S_b    = sum_t ell_t over valid tokens,  n_b = number of valid tokens
    NPO    = -(2/beta) mean_b log sigmoid(beta (S_b - S_b^ref))
    SimNPO = -(2/beta) mean_b log sigmoid(beta (S_b / n_b - gamma))
    TNPO   = -tokmean(sg[2 p^beta / (p^beta + p_ref^beta + 1e-5)] ell);  WTNPO adds sg[p^alpha]
    DPO    = -(2/beta) mean_b log sigmoid(beta ((S_lose - S_lose^ref) - (S_win - S_win^ref)))
Means over sequences skip sequences (pairs) without a valid token. Full softmax, autograd only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX
from fastweight.reference.token_logprobs import shift_labels, token_logprobs


def _valid(labels, shift, ignore_index):
    return (shift_labels(labels, ignore_index) if shift else labels) != ignore_index


def sequence_nll(x, labels, *, lm_head=None, shift=False, ignore_index=IGNORE_INDEX):
    """(S [B], n [B])."""
    logp = token_logprobs(x, labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    valid = _valid(labels, shift, ignore_index)
    return -(logp * valid).sum(-1), valid.sum(-1)


def _mean_over(values, keep):
    return torch.stack([v for v, k in zip(values, keep) if k]).mean() if bool(keep.any()) else values.sum() * 0


def npo_loss(x, labels, ref_nll, *, beta=0.1, lm_head=None, shift=False, ignore_index=IGNORE_INDEX):
    S, n = sequence_nll(x, labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    per = -(2.0 / beta) * F.logsigmoid(beta * (S - ref_nll.detach().to(S.dtype)))
    return _mean_over(per, n > 0)


def simnpo_loss(x, labels, *, beta=2.5, gamma=0.0, lm_head=None, shift=False, ignore_index=IGNORE_INDEX):
    S, n = sequence_nll(x, labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    per = -(2.0 / beta) * F.logsigmoid(beta * (S / n.clamp(min=1) - gamma))
    return _mean_over(per, n > 0)


def tnpo_loss(x, labels, ref_logp, *, beta=4.0, alpha=0.0, lm_head=None, shift=False, ignore_index=IGNORE_INDEX):
    logp = token_logprobs(x, labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    valid = _valid(labels, shift, ignore_index)
    p = logp.detach().exp()
    p_ref = ref_logp.detach().to(logp.dtype).exp()
    w = 2 * p ** beta / (p ** beta + p_ref ** beta + 1e-5) * p ** alpha
    return (w * logp)[valid].sum() / valid.sum().clamp(min=1)


def wtnpo_loss(x, labels, ref_logp, *, alpha=1.5, beta=5.0, **kw):
    return tnpo_loss(x, labels, ref_logp, beta=beta, alpha=alpha, **kw)


def dpo_loss(win, win_labels, lose, lose_labels, ref_win_nll, ref_lose_nll, *, beta=0.1, lm_head=None,
             shift=False, ignore_index=IGNORE_INDEX):
    S_w, n_w = sequence_nll(win, win_labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    S_l, n_l = sequence_nll(lose, lose_labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    margin = (S_l - ref_lose_nll.detach().to(S_l.dtype)) - (S_w - ref_win_nll.detach().to(S_w.dtype))
    return _mean_over(-(2.0 / beta) * F.logsigmoid(beta * margin), (n_w > 0) & (n_l > 0))
