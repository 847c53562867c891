"""More losses as the seeds' code releases them (``shared/spec/LOSSES.md``, "More released methods").

From tmlr-group/SatImp at 51314c0:

* ``positions_mean_nll``: ``dataloader/dataloader_imp.py`` (``gd_imp``) averages ``mask * CE`` over *every*
  shifted position of the batch, padding and prompt included (``.mean()`` over B * (T - 1) values).
* ``npo_batch_loss``: ``npo_imp`` / ``npo_gd_imp`` / ``npo_kl_imp`` (``dataloader_imp.py``) and the hard-sampling
  ``npo_*`` (``dataloader_hardsampling.py``) take NPO on ONE log-ratio per batch: the masked NLL summed over the
  whole flattened batch, minus the reference's under the same mask.
* ``npo_hard_loss``: that NPO with the mask chosen by SatImp hard sampling on the current model's detached NLLs
  (the reference reuses the mask), ``dataloader_hardsampling.py`` ``npo_topk`` / ``npo_bottomk`` / ``npo_rand``.
* ``kto_loss``: ``dataloader/dataloader_base.py`` ``kto_sigmoid`` / ``kto_logsigmoid``:
  ``1 - (2/beta) mean_b act(z - beta * r_b)``, ``r_b = S_b^ref - S_b`` (the policy/reference log-ratio of the
  forget answer), ``z = mean_b((S^ref_idk,b - S_idk,b))`` the no-grad batch mean of the refusal answers'
  log-ratio (not scaled by beta, not clamped); act = sigmoid or log-sigmoid.

From UCSC-REAL/FLAT at bf2ef07 (``dataloader.py``, ``loss_type == 'LLMU'``):

* ``llmu_loss``: ``ga_weight * (-tokmean(ell_f)) + mismatch_weight * tokmean(ell_m)`` (gradient ascent on the
  forget answers, gradient descent on mismatched answers); the released KL to the original model on retain
  data (``batchmean`` over every position, weight 1) is the method's retain term (``kl_loss``).

Every function is one fused token-logprob pass per input plus O(N) work; reference quantities come in as tensors.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX
from fastweight.losses._input import token_logprobs
from fastweight.losses._seq import check_choice, check_number, check_ref, reduce_rows, valid_mask
from fastweight.losses._weights import check_token_weights, weigh
from fastweight.losses.preference import sequence_nll
from fastweight.losses.retain import nll_loss
from fastweight.losses.reweighted import COUNTS, SAMPLINGS, ga_loss, hard_sampling_mask
from fastweight.ops._common import check_reduction

KTOForm = Literal["sigmoid", "logsigmoid"]
KTO_FORMS: tuple[str, ...] = get_args(KTOForm)


def positions_mean_nll(x: torch.Tensor, labels: torch.Tensor, *, sign: float = 1.0, shift: bool = False,
                       token_weights: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """``sign * sum_t tw_t ell_t / P`` with P the number of scored positions (every position; with ``shift``
    the last of each sequence has no next token and is not one): SatImp ``gd_imp``'s ``.mean()`` over the
    flattened B * (T - 1) values. ``sign=-1`` is the forget (ascent) term. Other keywords as ``nll_loss``."""
    total = nll_loss(x, labels, reduction="sum", shift=shift, token_weights=token_weights, **kw)
    positions = labels.numel() - (labels.numel() // max(labels.shape[-1], 1) if shift else 0)
    return sign * total / max(positions, 1)


def npo_batch_loss(x: torch.Tensor, labels: torch.Tensor, ref_logp: torch.Tensor, *, beta: float = 0.2,
                   token_weights: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, softcap: float | None = None, logit_scale: float = 1.0,
                   shift: bool = False, ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
                   check_finite: bool = False) -> torch.Tensor:
    """``-(2/beta) log sigmoid(beta (S - S_ref))`` on ONE batch-level log-ratio (SatImp ``npo_imp``).

    x / labels as in ``npo_loss`` ([B, T] labels). ref_logp: the reference's per-token log-probabilities
    shaped like labels (same ``shift``; ignored positions unused). ``S = -sum_{b,t} tw_t log p_t`` over valid
    tokens (tw = ``token_weights``, e.g. an importance mask; 1 when None), ``S_ref`` likewise. 0-d float32.
    """
    check_number("beta", beta, low=0.0, low_open=True)
    logp = token_logprobs(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, logit_scale=logit_scale,
                          shift=shift, ignore_index=ignore_index, backend=backend, check_finite=check_finite)
    tw = check_token_weights(token_weights, labels, shift)
    return _npo_batch(logp, valid_mask(labels, shift, ignore_index), ref_logp, tw, beta)


def _npo_batch(logp, valid, ref_logp, tw, beta):
    ref = check_ref("ref_logp", ref_logp, logp.shape, logp.device).to(logp.dtype)
    S = -torch.where(valid, weigh(logp, tw), 0.0).sum()
    S_ref = -torch.where(valid, weigh(ref, tw), 0.0).sum()
    return -(2.0 / beta) * F.logsigmoid(beta * (S - S_ref))


def npo_hard_loss(x: torch.Tensor, labels: torch.Tensor, ref_logp: torch.Tensor, *, beta: float = 0.2,
                  k: float = 0.3, sampling: str = "topk", counts: str = "released", seed: int = 0,
                  generator: torch.Generator | None = None, lm_head: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, softcap: float | None = None, logit_scale: float = 1.0,
                  shift: bool = False, ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
                  check_finite: bool = False, return_weights: bool = False):
    """NPO on hard-sampled tokens (SatImp ``npo_topk`` / ``npo_bottomk`` / ``npo_rand``).

    The 0/1 mask is chosen per sequence by ``hard_sampling_loss``'s rule (``k``, ``sampling``, ``counts``,
    ``seed`` / ``generator``) on the current model's detached NLLs and reused for the reference; the loss is
    ``npo_batch_loss`` with that mask. ``return_weights`` also returns the mask like labels.
    """
    check_number("k", k, low=0.0, high=1.0, low_open=True)
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("counts", counts, COUNTS)
    check_number("beta", beta, low=0.0, low_open=True)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T] for npo_hard_loss, got shape {tuple(labels.shape)}")
    logp = token_logprobs(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, logit_scale=logit_scale,
                          shift=shift, ignore_index=ignore_index, backend=backend, check_finite=check_finite)
    valid = valid_mask(labels, shift, ignore_index)
    keep = hard_sampling_mask(logp.detach(), valid, k, sampling, counts=counts, seed=seed, generator=generator)
    mask = keep.to(logp.dtype)
    loss = _npo_batch(logp, valid, ref_logp, mask, beta)
    return (loss, mask) if return_weights else loss


def kto_loss(x: torch.Tensor, labels: torch.Tensor, ref_nll: torch.Tensor, idk_nll: torch.Tensor,
             ref_idk_nll: torch.Tensor, *, beta: float = 2.5, form: KTOForm = "sigmoid",
             token_weights: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, softcap: float | None = None, logit_scale: float = 1.0,
             reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX,
             backend: str | None = "auto", check_finite: bool = False) -> torch.Tensor:
    """KTO as released by SatImp: ``1 - (2/beta) mean_b act(z - beta * (S_b^ref - S_b))`` (see module doc).

    x / labels: the forget answers (grad). ref_nll: [B] reference sequence NLLs of the same answers.
    idk_nll / ref_idk_nll: [B'] sequence NLLs of the refusal answers under the current model and the reference,
    both detached (the released code computes the current model's under ``torch.no_grad``); z is their batch
    mean ``mean(ref_idk_nll - idk_nll)``. form "sigmoid" (``kto_sigmoid``) or "logsigmoid" (``kto_logsigmoid``).
    beta 2.5 (SatImp ``config/forget_base.yaml``). "mean" averages over sequences with a valid token (the
    constant 1 is added once); "sum" / "none" return ``-(2/beta) act(...)`` summed / per sequence, without it.
    """
    check_number("beta", beta, low=0.0, low_open=True)
    check_choice("form", form, KTO_FORMS)
    check_reduction(reduction)
    S, n = sequence_nll(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, logit_scale=logit_scale,
                        shift=shift, ignore_index=ignore_index, backend=backend, check_finite=check_finite,
                        token_weights=token_weights)
    ref = check_ref("ref_nll", ref_nll, S.shape, S.device).to(S.dtype)
    for name, t in (("idk_nll", idk_nll), ("ref_idk_nll", ref_idk_nll)):
        check_ref(name, t, idk_nll.shape, S.device)
    z = (ref_idk_nll.detach().to(S.dtype) - idk_nll.detach().to(S.dtype)).mean()
    arg = z - beta * (ref - S)
    act = torch.sigmoid(arg) if form == "sigmoid" else F.logsigmoid(arg)
    out = reduce_rows(-(2.0 / beta) * act, n > 0, reduction)
    return 1.0 + out if reduction == "mean" else out


def llmu_loss(forget: torch.Tensor, forget_labels: torch.Tensor, mismatch: torch.Tensor,
              mismatch_labels: torch.Tensor, *, ga_weight: float = 0.5, mismatch_weight: float = 1.0,
              forget_token_weights: torch.Tensor | None = None, mismatch_token_weights: torch.Tensor | None = None,
              **kw) -> torch.Tensor:
    """LLMU's forget side as FLAT releases it: ``ga_weight * (-tokmean(ell_f)) + mismatch_weight *
    tokmean(ell_m)`` (weights 0.5 and 1, ``dataloader.py`` ``LLMU``). mismatch / mismatch_labels: the
    mismatched (random or refusal) answers, logits or hidden states in the same form as ``forget``. Other
    keywords (lm_head, shift, backend, ...) go to both terms. Add the KL retain term with ``kl_loss``."""
    check_number("ga_weight", ga_weight, low=0.0)
    check_number("mismatch_weight", mismatch_weight, low=0.0)
    ga = ga_loss(forget, forget_labels, token_weights=forget_token_weights, **kw)
    mis = nll_loss(mismatch, mismatch_labels, token_weights=mismatch_token_weights, **kw)
    return ga_weight * ga + mismatch_weight * mis


__all__ = ["KTO_FORMS", "kto_loss", "llmu_loss", "npo_batch_loss", "npo_hard_loss", "positions_mean_nll"]
