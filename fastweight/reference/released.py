"""Naive float64-able references for ``token_weights`` and ``fastweight.losses.released`` / the added FLAT
divergences, transcribed from the released code (full softmax, ``F.cross_entropy``, autograd only).

Token weights (``shared/spec/LOSSES.md`` notation): each valid token's term times ``tw_t``, denominators
unchanged; with the causal shift, position t takes ``tw[t + 1]`` and the last position 1.

SatImp 51314c0: ``dataloader/dataloader_imp.py`` (``ga_imp``: ``-(mask[:, 1:] * CE).sum()``; ``gd_imp``:
``.mean()`` of the same over all B*(T-1) values, and of the retain CE; ``npo_imp``: masked batch sums),
``dataloader/dataloader_hardsampling.py`` (per-row quantile masks on ``CE > 0``; ``gd_*``: ``sum(-m CE_f) +
sum(CE_r)``; ``npo_*``: masked batch sums, reference under the same mask), ``dataloader/dataloader_base.py``
(``kto_*``). FLAT bf2ef07: ``dataloader.py`` ``get_contrastive_loss`` (activation / conjugate functions,
here applied to per-sequence mean probabilities, fastweight's P) and ``LLMU``. f-GAN (Nowozin et al. 2016)
conjugates for the corrected forms. Imports nothing from fastweight's implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX
from fastweight.reference.token_logprobs import logits_from_hidden, shift_labels, token_logprobs


def shifted_weights(tw: torch.Tensor) -> torch.Tensor:
    return torch.cat([tw[..., 1:], torch.ones_like(tw[..., :1])], dim=-1)


def weighted_token_loss(x, labels, tw, *, beta1=0.0, beta2=0.0, reduction="mean", lm_head=None, shift=False,
                        ignore_index=IGNORE_INDEX):
    """reduce(tw_t * sg[p^beta1 (1-p)^beta2] * log p_t) over valid tokens ("mean" divides by their count)."""
    logp = token_logprobs(x, labels, lm_head=lm_head, shift=shift, ignore_index=ignore_index)
    valid = (shift_labels(labels, ignore_index) if shift else labels) != ignore_index
    tw = (shifted_weights(tw) if shift else tw).to(logp.dtype)
    lp = logp.detach()
    w = torch.exp(lp) ** beta1 * (-torch.expm1(lp)) ** beta2
    per = torch.where(valid, tw * w * logp, torch.zeros_like(logp))
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / valid.sum().clamp(min=1)


def _shifted_ce(x, labels, lm_head=None):
    """Released ``CrossEntropyLoss(reduction='none')`` on ``logits[..., :-1, :]`` vs ``labels[..., 1:]``: [B, T-1]."""
    z = x if lm_head is None else logits_from_hidden(x, lm_head)
    z = z[..., :-1, :]
    y = labels[..., 1:]
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").reshape(y.shape)


def ga_imp(x, labels, mask, lm_head=None):
    return -(mask[..., 1:].to(x.dtype) * _shifted_ce(x, labels, lm_head)).sum()


def gd_imp_terms(x, labels, mask, rx, rlabels, lm_head=None):
    forget = -(mask[..., 1:].to(x.dtype) * _shifted_ce(x, labels, lm_head)).mean()
    return forget, _shifted_ce(rx, rlabels, lm_head).mean()


def _released_quantile_mask(ce, k, sampling):
    """Per row (the released ``torch.split(..., 499)`` = one sequence at T = 500): ``quantile(ce[ce > 0], 1-k)``."""
    mask = torch.zeros_like(ce)
    for b in range(ce.shape[0]):
        nz = ce[b][ce[b] > 0]
        thr = torch.quantile(nz, 1 - k) if len(nz) > 0 else float("inf")
        mask[b] = (ce[b] > thr) if sampling == "topk" else (ce[b] < thr)
    return mask


def npo_masked(x, labels, ref_x, mask_shifted, beta, lm_head=None):
    """``-(2/beta) logsigmoid(beta (sum(m CE) - sum(m CE_ref)))`` on one batch-level log-ratio."""
    ce = _shifted_ce(x, labels, lm_head)
    with torch.no_grad():
        ce_ref = _shifted_ce(ref_x, labels, lm_head)
    m = mask_shifted.to(ce.dtype)
    return -F.logsigmoid(beta * ((m * ce).sum() - (m * ce_ref).sum())) * 2 / beta


def npo_imp(x, labels, ref_x, mask, beta, lm_head=None):
    return npo_masked(x, labels, ref_x, mask[..., 1:], beta, lm_head)


def npo_hard(x, labels, ref_x, k, sampling, beta, lm_head=None):
    mask = _released_quantile_mask(_shifted_ce(x, labels, lm_head).detach(), k, sampling)
    return npo_masked(x, labels, ref_x, mask, beta, lm_head)


def gd_hard(x, labels, rx, rlabels, k, sampling, lm_head=None):
    ce = _shifted_ce(x, labels, lm_head)
    mask = _released_quantile_mask(ce.detach(), k, sampling)
    return (-1 * mask * ce).sum() + _shifted_ce(rx, rlabels, lm_head).sum()


def _batch_loss(x, labels, lm_head=None):
    return _shifted_ce(x, labels, lm_head).sum(-1)


def kto(x, labels, ref_x, idk_x, ref_idk_x, idk_labels, beta, form, lm_head=None):
    """``kto_sigmoid`` / ``kto_logsigmoid`` of dataloader_base.py (the policy's refusal pass under no_grad)."""
    with torch.no_grad():
        idk_log = -_batch_loss(idk_x, idk_labels, lm_head)
        idk_log_ref = -_batch_loss(ref_idk_x, idk_labels, lm_head)
        kl_term = (idk_log - idk_log_ref).mean()
        forget_ref = -_batch_loss(ref_x, labels, lm_head)
    forget = -_batch_loss(x, labels, lm_head)
    log_ratios = forget - forget_ref
    act = torch.sigmoid if form == "sigmoid" else F.logsigmoid
    return 1.0 - act(kl_term - beta * log_ratios).mean() * 2 / beta


def _mean_prob(x, labels, lm_head=None):
    """Per-sequence mean token probability (fastweight's P; the released code pools it over the batch)."""
    logp = token_logprobs(x, labels, lm_head=lm_head, shift=True)
    valid = shift_labels(labels) != IGNORE_INDEX
    return (logp.exp() * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def _released_pair(div):
    """``get_contrastive_loss``'s activation and conjugate (each returns ``-mean(...)``), FLAT bf2ef07."""
    if div == "reverse_kl":
        return (lambda v: -torch.mean(-torch.exp(v))), (lambda v: -torch.mean(-1. - v))
    if div == "hellinger":
        return (lambda v: -torch.mean(1. - torch.exp(v))), (lambda v: -torch.mean((1. - torch.exp(v)) / torch.exp(v)))
    if div == "neyman":
        return (lambda v: -torch.mean(1. - torch.exp(v))), (lambda v: -torch.mean(2. - 2. * torch.sqrt(1. - v)))
    raise ValueError(div)


def _fgan(div):
    """f-GAN output activation g and conjugate f* (Nowozin et al. 2016, table 6)."""
    if div == "reverse_kl_fgan":
        return (lambda v: -torch.exp(-v)), (lambda t: -1. - torch.log(-t))
    if div == "hellinger_fgan":
        return (lambda v: 1. - torch.exp(-v)), (lambda t: t / (1. - t))
    if div == "neyman_fgan":
        return (lambda v: 1. - torch.exp(-v)), (lambda t: 2. - 2. * torch.sqrt(1. - t))
    raise ValueError(div)


def flat_divergence(x, labels, idk_x, idk_labels, div, lm_head=None):
    """FLAT loss with per-sequence P: released ``activation(P_e) - conjugate(P_f)``, or f-GAN
    ``mean(-g(P_e) + f*(g(P_f)))`` for the ``*_fgan`` names."""
    P_f = _mean_prob(x, labels, lm_head)
    P_e = _mean_prob(idk_x, idk_labels, lm_head)
    if div.endswith("_fgan"):
        g, conj = _fgan(div)
        return torch.mean(-g(P_e) + conj(g(P_f)))
    activation, conjugate = _released_pair(div)
    return activation(P_e) - conjugate(P_f)


def llmu(x, labels, mis_x, mis_labels, ga_weight=0.5, mismatch_weight=1.0, lm_head=None):
    """bad_weight * (-forget CE) + random_weight * mismatch CE (Hugging Face token means), FLAT ``LLMU``."""
    def ce_mean(z, y):
        c = _shifted_ce(z, y, lm_head)
        return c.sum() / (y[..., 1:] != IGNORE_INDEX).sum()
    return ga_weight * -ce_mean(x, labels) + mismatch_weight * ce_mean(mis_x, mis_labels)
