"""Naive references for ``fastweight.losses.ce_u`` (CE-U, PDU forget term), full [B, T, V] logits, autograd only.

Written from open-unlearning's definitions (commit d3d7cf9, ``src/trainer/unlearn/ceu.py``, ``pdu.py``):
    ce_u = mean over counted positions of  -sum_v q_v log p_v,  q = softmax(z with z_y = -inf) (detached),
           counted = shifted label valid, the first ``ignore_first_n`` valid (unshifted) labels per row removed
    pdu  = mean over positions t with labels[t] valid (unshifted) of (max_v z_t,v - mean_v z_t,v)^2
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.reference.token_logprobs import logits_from_hidden, shift_labels


def ce_u_loss(x, labels, *, ignore_first_n=1, lm_head=None, bias=None, softcap=None, shift=False,
              ignore_index=IGNORE_INDEX):
    z = x if lm_head is None else logits_from_hidden(x, lm_head, bias, softcap)
    valid = labels != ignore_index
    drop = (valid.long().cumsum(-1) <= ignore_first_n) & valid
    y = labels.masked_fill(drop, ignore_index)
    y = shift_labels(y, ignore_index) if shift else y
    counted = y != ignore_index
    target = z.detach().clone()
    target[counted] = target[counted].scatter(-1, y[counted][:, None], float("-inf"))
    q = torch.softmax(target, -1)
    ce = -(q * torch.log_softmax(z, -1)).nan_to_num(0.0).sum(-1)
    return torch.where(counted, ce, 0.0).sum() / counted.sum().clamp(min=1)


def pdu_loss(x, labels, *, lm_head=None, bias=None, softcap=None, shift=False, ignore_index=IGNORE_INDEX):
    z = x if lm_head is None else logits_from_hidden(x, lm_head, bias, softcap)
    y = shift_labels(labels, ignore_index) if shift else labels
    counted = y != ignore_index
    d = (z.max(-1).values - z.mean(-1)) ** 2
    return torch.where(counted, d, 0.0).sum() / counted.sum().clamp(min=1)
