"""Naive references for ``fastweight.losses.reweighted``: GA, WGA, SimImp, SatImp.

From ``shared/spec/LOSSES.md`` (per-token reweighted forget losses):
    w_t = sg[p_t**beta1 * (1 - p_t)**beta2]   with 1 - p_t = -expm1(log p_t)   (0**0 == 1)
    L   = -tokmean(w_t * ell_t) = tokmean(w_t * log p_t)
GA: w = 1; WGA: (beta1, beta2) = (beta, 0); SimImp: (0, beta); SatImp: (beta1, beta2).
Reductions: "mean" over valid tokens (0 when there is none), "sum", "none" (per token, 0 where ignored).
Full-softmax, autograd only; computed in the dtype of the inputs (float64 for ground truth).
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.reference.token_logprobs import shift_labels, token_logprobs


def importance_weight(logp: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """p**beta1 * (1 - p)**beta2 from log p (not detached here)."""
    p = torch.exp(logp)
    return p.pow(beta1) * (-torch.expm1(logp)).pow(beta2)


def weighted_loss(x: torch.Tensor, labels: torch.Tensor, *, beta1: float = 0.0, beta2: float = 0.0,
                  weighted: bool = True, reduction: str = "mean", lm_head: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, softcap: float | None = None, shift: bool = False,
                  ignore_index: int = IGNORE_INDEX, detach_weights: bool = True) -> torch.Tensor:
    """reduce(sg[w] * log p). ``detach_weights=False`` is the wrong variant, for tests that check sg[.]."""
    logp = token_logprobs(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, shift=shift,
                          ignore_index=ignore_index)
    valid = (shift_labels(labels, ignore_index) if shift else labels) != ignore_index
    if weighted:
        w = importance_weight(logp, beta1, beta2)
        if detach_weights:
            w = w.detach()
    else:
        w = torch.ones_like(logp)
    per_token = torch.where(valid, w * logp, torch.zeros_like(logp))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def ga_loss(x, labels, **kw) -> torch.Tensor:
    """-tokmean(ell)."""
    return weighted_loss(x, labels, weighted=False, **kw)


def wga_loss(x, labels, *, beta: float = 5.0, **kw) -> torch.Tensor:
    """-tokmean(sg[p**beta] * ell)."""
    return weighted_loss(x, labels, beta1=beta, beta2=0.0, **kw)


def simimp_loss(x, labels, *, beta: float = 1.0, **kw) -> torch.Tensor:
    """-tokmean(sg[(1 - p)**beta] * ell)."""
    return weighted_loss(x, labels, beta1=0.0, beta2=beta, **kw)


def satimp_loss(x, labels, *, beta1: float = 5.0, beta2: float = 0.1, **kw) -> torch.Tensor:
    """-tokmean(sg[p**beta1 * (1 - p)**beta2] * ell)."""
    return weighted_loss(x, labels, beta1=beta1, beta2=beta2, **kw)
