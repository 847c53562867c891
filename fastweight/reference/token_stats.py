"""Naive reference of the evaluation statistics (ops/token_stats.py): a full ``log_softmax`` in float64.

    logp_t = log_softmax(z_t)[y_t];  mean_t = sum_v p_v log p_v;  var_t = sum_v p_v (log p_v - mean_t)**2;
    argmax_t = (argmax_v z[t, v] == y_t)   (torch.argmax on the logits as given: first index of the maximum)
Ignored rows (label == ignore_index) give 0, 0, 0, False.
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX


def token_stats(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                dtype: torch.dtype = torch.float64):
    """(logp, argmax, mean, var) for logits [..., V] and labels [...], computed in ``dtype`` (argmax bool)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    lp = torch.log_softmax(logits.to(dtype), dim=-1)
    p = lp.exp()
    logp = lp.gather(-1, safe[..., None]).squeeze(-1)
    mean = (p * lp).sum(-1)
    var = (p * (lp - mean[..., None]) ** 2).sum(-1)
    argmax = (logits.argmax(-1) == safe) & valid
    zero = torch.zeros_like(logp)
    return (torch.where(valid, logp, zero), argmax, torch.where(valid, mean, zero), torch.where(valid, var, zero))


def linear_token_stats(hidden, labels, *, lm_head, bias=None, softcap=None, logit_scale=1.0,
                       ignore_index: int = IGNORE_INDEX):
    """The same from hidden states: logits = cap(logit_scale * (hidden @ lm_head.T + bias)) in float64 first."""
    z = hidden.double() @ lm_head.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return token_stats(z, labels, ignore_index=ignore_index)
