"""Naive fused-linear references (spec formulas, full logits, autograd only; float64-capable).

Imports nothing from fastweight except ``IGNORE_INDEX``.

Mirrors ``fastweight.ops.linear_logprobs``: the logits are materialised as ``hidden @ lm_head.T + bias``
(soft-capped when asked) and the full log-softmax is taken, in the dtype of the inputs.
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX as IGNORE


def linear_logits(hidden, lm_head, bias=None, softcap=None, logit_scale=None):
    """[N, H] x [V, H] -> [N, V] logits in the input dtype: ``z = logit_scale * (hidden @ lm_head.T + bias)``
    (Cohere's logit_scale, Granite's 1 / logits_scaling), then ``softcap * tanh(z / softcap)`` when capped."""
    z = torch.nn.functional.linear(hidden, lm_head, bias)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_token_logprobs(hidden, lm_head, labels, bias=None, softcap=None, ignore_index=IGNORE, logit_scale=None):
    """log p_t [N] (input dtype, differentiable; 0 at ignored rows) from the full log-softmax."""
    z = linear_logits(hidden, lm_head, bias, softcap, logit_scale)
    valid = labels != ignore_index
    logp = torch.log_softmax(z, dim=-1).gather(-1, torch.where(valid, labels, 0).long()[:, None]).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def linear_weighted_logprobs(hidden, lm_head, labels, bias=None, softcap=None, ignore_index=IGNORE, beta1=0.0,
                             beta2=0.0, reduction="mean", divisor=None, logit_scale=None):
    """reduce(sg[p**beta1 (1 - p)**beta2] * log p); "mean" over valid rows (0 when none), "none" per row."""
    logp = linear_token_logprobs(hidden, lm_head, labels, bias, softcap, ignore_index, logit_scale)
    valid = labels != ignore_index
    p = logp.detach().exp()
    w = torch.where(valid, p ** beta1 * (1 - p) ** beta2, torch.zeros_like(p))
    per_token = w * logp
    if reduction == "none":
        return per_token
    out = per_token.sum()
    if reduction == "mean":
        out = out / valid.sum().clamp(min=1)
    if divisor is not None:
        out = out / divisor
    return out
