"""Naive reference for ``fastweight.ops.linear_kl_div``: full logits of both models, then log_softmax.

From ``shared/spec/LOSSES.md`` (KL retain regulariser, UNDIAL): ``z = cap(hidden @ lm_head.T + bias)``,
``r = cap_r(ref_hidden @ ref_lm_head.T + ref_bias)``, with labels ``r[t, y_t] -= ref_shift`` on counted rows,
``KL_t = sum_v q_v (log q_v - log p_v)`` with ``q = softmax(r)``, ``p = softmax(z)``; ignored rows give 0.
Autograd only, in the input dtype; the reference side is detached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX


def _logits(h, W, b, cap, scale=1.0):
    z = F.linear(h, W, b)
    if scale != 1.0:  # logit_scale: z = s (h W^T + b) before soft-capping (Cohere, Granite)
        z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def linear_kl_div(hidden, lm_head, ref_hidden, ref_lm_head, labels=None, *, bias=None, ref_bias=None, softcap=None,
                  ref_softcap=None, ref_shift: float = 0.0, ignore_index: int = IGNORE_INDEX, logit_scale=1.0,
                  ref_logit_scale=1.0) -> torch.Tensor:
    """[N] KL per row, differentiable w.r.t. hidden, lm_head and bias."""
    z = _logits(hidden, lm_head, bias, softcap, logit_scale)
    with torch.no_grad():
        r = _logits(ref_hidden.to(z.dtype), ref_lm_head.to(z.dtype),
                    None if ref_bias is None else ref_bias.to(z.dtype), ref_softcap, ref_logit_scale)
        if labels is not None:
            valid = labels != ignore_index
            onehot = F.one_hot(torch.where(valid, labels, 0).long(), r.shape[-1]).to(r.dtype)
            r = r - ref_shift * onehot * valid[:, None].to(r.dtype)
    log_q = torch.log_softmax(r, dim=-1)
    log_p = torch.log_softmax(z, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    if labels is not None:
        kl = torch.where(labels != ignore_index, kl, torch.zeros_like(kl))
    return kl
