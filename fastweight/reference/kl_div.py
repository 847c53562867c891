"""Naive reference for ``fastweight.ops.kl_div``: per-row KL(softmax(ref) || softmax(logits)).

From ``shared/spec/LOSSES.md`` (KL retain regulariser, UNDIAL): ``KL_t = sum_v q_v (log q_v - log p_v)`` with
``q = softmax(r)``, ``p = softmax(z)``; with labels, rows labelled ``ignore_index`` give 0 and ``ref_shift``
is subtracted from the reference logit of the label first. Full log_softmax + autograd, in the input dtype.
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX


def kl_div(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
           ref_shift: float = 0.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[N] KL per row (differentiable w.r.t. logits; the reference is detached)."""
    r = ref_logits.detach().to(logits.dtype)
    if labels is not None:
        valid = labels != ignore_index
        onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0).long(), r.shape[-1]).to(r.dtype)
        r = r - ref_shift * onehot * valid[:, None].to(r.dtype)
    log_q = torch.log_softmax(r, dim=-1)
    log_p = torch.log_softmax(logits, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    if labels is not None:
        kl = torch.where(labels != ignore_index, kl, torch.zeros_like(kl))
    return kl
