"""Naive reference for ``fastweight.losses.flat`` (``shared/spec/LOSSES.md``, FLAT).

``P`` = per-sequence mean token probability; ``L = mean_b[-g(P_e) + f*(g(P_f))]`` with (g, f* o g):
KL (x, exp(x - 1)); Pearson (x, x + x^2/4); TV (tanh(x)/2, tanh(x)/2); JS (log 2 - log(1 + e^-x),
-(log 2 - log(1 + e^x))); Jeffrey (x, W(e^(1-x)) + 1/W(e^(1-x)) + x - 2), f-GAN's conjugate of
f(u) = (u - 1) log u, with the Lambert W by plain Newton steps that autograd differentiates through.
"""
from __future__ import annotations

import math

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.reference.token_logprobs import shift_labels, token_logprobs


def lambertw_newton(z: torch.Tensor, steps: int = 40) -> torch.Tensor:
    w = torch.ones_like(z)
    for _ in range(steps):
        w = w - (w * torch.exp(w) - z) / (torch.exp(w) * (w + 1))
    return w


def mean_token_prob(x, labels, *, lm_head=None, shift=False, ignore_index=IGNORE_INDEX):
    logp = token_logprobs(x, labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    valid = (shift_labels(labels, ignore_index) if shift else labels) != ignore_index
    return (logp.exp() * valid).sum(-1) / valid.sum(-1).clamp(min=1), valid.sum(-1)


def g_and_conj(divergence: str, x: torch.Tensor):
    """(g(x), f*(g(x)))."""
    log2 = math.log(2.0)
    if divergence == "kl":
        return x, torch.exp(x - 1)
    if divergence == "pearson":
        return x, x + x ** 2 / 4
    if divergence == "tv":
        return torch.tanh(x) / 2, torch.tanh(x) / 2
    if divergence == "js":
        return log2 - torch.log(1 + torch.exp(-x)), -(log2 - torch.log(1 + torch.exp(x)))
    if divergence == "jeffrey":
        w = lambertw_newton(torch.exp(1 - x))
        return x, w + 1 / w + x - 2
    # FLAT bf2ef07 get_contrastive_loss as released (reverse_kl / hellinger push the wrong way; neyman's
    # conjugate is taken of x), and the f-GAN (Nowozin et al. 2016) forms
    if divergence == "reverse_kl":
        return -torch.exp(x), -1 - x
    if divergence == "hellinger":
        return 1 - torch.exp(x), (1 - torch.exp(x)) / torch.exp(x)
    if divergence == "neyman":
        return 1 - torch.exp(x), 2 - 2 * torch.sqrt(1 - x)
    if divergence == "reverse_kl_fgan":
        g = -torch.exp(-x)
        return g, -1 - torch.log(-g)
    if divergence in ("hellinger_fgan", "neyman_fgan"):
        g = 1 - torch.exp(-x)
        return g, (g / (1 - g) if divergence == "hellinger_fgan" else 2 - 2 * torch.sqrt(1 - g))
    raise ValueError(divergence)


def flat_loss(forget, forget_labels, idk, idk_labels, *, divergence="tv", lm_head=None, shift=False,
              ignore_index=IGNORE_INDEX):
    P_f, n_f = mean_token_prob(forget, forget_labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    P_e, n_e = mean_token_prob(idk, idk_labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    g_e, _ = g_and_conj(divergence, P_e)
    _, conj_f = g_and_conj(divergence, P_f)
    per = -g_e + conj_f
    keep = (n_f > 0) & (n_e > 0)
    return per[keep].mean() if bool(keep.any()) else per.sum() * 0
