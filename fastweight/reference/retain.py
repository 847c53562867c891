"""Naive references for ``fastweight.losses.retain``: NLL, KL to reference, UNDIAL (``shared/spec/LOSSES.md``).

    nll    = tokmean(ell_r)
    kl     = batchmean over positions of KL(p_ref || p_theta); unmasked (default, TOFU / G-effect /
             open-unlearning): every position; masked: positions with a valid (shifted) label
    undial = mean over positions of KL(softmax(z_ref - beta onehot(y)) || p_theta); masked: valid labels;
             unmasked (default, open-unlearning): every position with a next token, an ignored label
             standing for token (ignore_index mod V) as open-unlearning's -100 indexing does
Full softmax, autograd only.
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.reference.token_logprobs import logits_from_hidden, shift_labels, token_logprobs


def nll_loss(x, labels, *, lm_head=None, bias=None, softcap=None, shift=False, ignore_index=IGNORE_INDEX):
    logp = token_logprobs(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, shift=shift,
                          ignore_index=ignore_index)
    valid = (shift_labels(labels, ignore_index) if shift else labels) != ignore_index
    return -logp.sum() / valid.sum().clamp(min=1)


def _per_position_kl(x, ref, labels, beta, lm_head, ref_lm_head, shift, ignore_index, wrap=False):
    z = x if lm_head is None else logits_from_hidden(x, lm_head)
    r = (ref if ref_lm_head is None else logits_from_hidden(ref, ref_lm_head)).detach().to(z.dtype)
    valid = None
    if labels is not None:
        y = shift_labels(labels, ignore_index) if shift else labels
        valid = y != ignore_index
        if wrap:
            y = torch.where(valid, y, ignore_index % r.shape[-1])
            valid = torch.ones_like(valid)
            if shift:
                valid[..., -1] = False
        if beta:
            onehot = torch.nn.functional.one_hot(torch.where(valid, y, 0).long(), r.shape[-1]).to(r.dtype)
            r = r - beta * onehot * valid[..., None].to(r.dtype)
    log_q = torch.log_softmax(r, -1)
    kl = (log_q.exp() * (log_q - torch.log_softmax(z, -1))).sum(-1)
    return kl, valid


def kl_loss(x, ref, labels=None, *, masked=False, lm_head=None, ref_lm_head=None, shift=False,
            ignore_index=IGNORE_INDEX):
    kl, valid = _per_position_kl(x, ref, labels if masked else None, 0.0, lm_head, ref_lm_head, shift,
                                 ignore_index)
    if not masked:
        return kl.mean()
    return torch.where(valid, kl, torch.zeros_like(kl)).sum() / valid.sum().clamp(min=1)


def undial_loss(x, ref, labels, *, beta=10.0, masked=False, lm_head=None, ref_lm_head=None, shift=False,
                ignore_index=IGNORE_INDEX):
    kl, valid = _per_position_kl(x, ref, labels, beta, lm_head, ref_lm_head, shift, ignore_index, wrap=not masked)
    return torch.where(valid, kl, torch.zeros_like(kl)).sum() / valid.sum().clamp(min=1)
