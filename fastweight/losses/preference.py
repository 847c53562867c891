"""Preference-style forget losses (G-effect family, ``shared/spec/LOSSES.md``): NPO, SimNPO, TNPO, WTNPO, DPO.

Each is one fused token-logprob pass plus O(N) work on ``logp`` [B, T]; reference quantities (sequence
NLLs or per-token log-probabilities of a frozen reference model) are passed in as tensors, so this layer
never sees a model. Compute them with the same functions under ``torch.no_grad()``::

    with torch.no_grad():
        ref_nll, _ = sequence_nll(ref_hidden, labels, lm_head=ref_W, shift=True)
    loss = npo_loss(hidden, labels, ref_nll, lm_head=W, shift=True)

Defaults (where the sources disagree the proposing paper wins, as for WGA and SatImp):
    NPO    beta = 0.1: NPO paper (Zhang et al., 2024) and open-unlearning; the G-effect code uses 0.5.
    SimNPO beta = 2.5, gamma = 0: SimNPO paper's TOFU setting (Fan et al., 2024; it sweeps 2.5-4.5,
           open-unlearning uses 4.5).
    TNPO   beta = 4 (G-effect; 5 for TOFU 10%).      WTNPO alpha = 1.5, beta = 5 (G-effect; beta 7 for 10%).
    DPO / IdkDPO beta = 0.1 (open-unlearning and the NPO paper's IdkDPO baseline).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX
from fastweight.losses._input import token_logprobs
from fastweight.losses._weights import check_token_weights, weigh
from fastweight.losses._seq import check_number, check_ref, reduce_rows, reduce_tokens, require_sequences, valid_mask
from fastweight.ops._common import check_finite as check_finite_tensor
from fastweight.ops._common import check_reduction

# Added to the TNPO denominator so two vanishing probabilities give a finite weight (G-effect code).
TNPO_EPS = 1e-5

_ARGS_DOC = """
    Shared args:
        x: logits [B, T, V] (float32/bfloat16/float16; float64 on the torch backend), or hidden states
            [B, T, H] when ``lm_head`` [V, H] is given (with optional ``bias`` [V] and ``softcap``).
        labels: [B, T] int, values in [0, V) or ``ignore_index``.
        shift: apply the Hugging Face causal shift (token t scored against labels[t + 1]).
        reduction: "mean" (over sequences / valid tokens as stated), "sum", or "none".
        backend: "auto" | "triton" | "torch".
        check_finite: raise ValueError on NaN/inf inputs (logits or hidden states, and the reference
            tensors) before computing (one extra pass).
        token_weights (sequence_nll, NPO, SimNPO, TNPO, WTNPO): optional [B, T] float tensor like labels
            (detached, finite, >= 0; shifted like the labels with ``shift``) multiplying each token's term:
            ``S_b = sum_t tw_t ell_t``, TNPO ``tw_t w_t ell_t``; counts unchanged; ones = unweighted exactly.
            Compute the reference NLLs with the same weights.
    Returns a float32 0-d tensor (per-sequence [B] or per-token [B, T] with reduction "none").
"""


def _logp(x, labels, lm_head, bias, softcap, shift, ignore_index, backend, check_finite=False,
          logit_scale=1.0):
    logp = token_logprobs(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, logit_scale=logit_scale, shift=shift,
                          ignore_index=ignore_index, backend=backend, check_finite=check_finite)
    return logp, valid_mask(labels, shift, ignore_index)


def sequence_nll(x: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, softcap: float | None = None,
                 logit_scale: float = 1.0, shift: bool = False,
                 ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", check_finite: bool = False,
                 token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence NLL ``S_b = sum_t ell_t`` [B] float32 (differentiable) and valid-token counts ``n_b`` [B] int64.

    Sequences with no valid token get S_b = 0, n_b = 0. With ``token_weights``: ``S_b = sum_t tw_t ell_t``.
    """
    require_sequences("labels", labels)
    tw = check_token_weights(token_weights, labels, shift)
    logp, valid = _logp(x, labels, lm_head, bias, softcap, shift, ignore_index, backend, check_finite,
                        logit_scale)
    return -weigh(logp, tw).sum(-1), valid.sum(-1)


def _finite_ref(name: str, ref: torch.Tensor, check: bool) -> torch.Tensor:
    if check and isinstance(ref, torch.Tensor) and ref.is_floating_point():
        check_finite_tensor(name, ref)
    return ref


def _neg_logsigmoid_loss(margin: torch.Tensor, beta: float, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    return reduce_rows(-(2.0 / beta) * F.logsigmoid(beta * margin), keep, reduction)


def npo_loss(x: torch.Tensor, labels: torch.Tensor, ref_nll: torch.Tensor, *, beta: float = 0.1,
             lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
             logit_scale: float = 1.0,
             reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX,
             backend: str | None = "auto", check_finite: bool = False,
             token_weights: torch.Tensor | None = None, empty_rows: str = "drop") -> torch.Tensor:
    """NPO ``-(2/beta) mean_b log sigmoid(beta * (S_b - S_b^ref))`` (Zhang et al., 2024; spec NPO).

    ref_nll: [B] sequence NLLs of the reference model on the same batch (detached; e.g. ``sequence_nll``
    under ``torch.no_grad``). "mean" averages over sequences with at least one valid token
    (``empty_rows="drop"``) or over every sequence (``"keep"``: a sequence without one has S = S_ref = 0 and
    contributes (2/beta) log 2, as open-unlearning's ``compute_dpo_loss``).
    With S == S_ref every sequence contributes ``(2/beta) log 2``.
    """
    check_number("beta", beta, low=0.0, low_open=True)
    check_reduction(reduction)
    _finite_ref("ref_nll", ref_nll, check_finite)
    S, n = sequence_nll(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, logit_scale=logit_scale, shift=shift,
                        ignore_index=ignore_index, backend=backend, check_finite=check_finite,
                        token_weights=token_weights)
    ref = check_ref("ref_nll", ref_nll, S.shape, S.device).to(S.dtype)
    if empty_rows not in ("drop", "keep"):
        raise ValueError(f"empty_rows must be 'drop' or 'keep', got {empty_rows!r}")
    return _neg_logsigmoid_loss(S - ref, beta, (n > 0) | (empty_rows == "keep"), reduction)


def simnpo_loss(x: torch.Tensor, labels: torch.Tensor, *, beta: float = 2.5, gamma: float = 0.0,
                lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                softcap: float | None = None, logit_scale: float = 1.0, reduction: str = "mean", shift: bool = False,
                ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
                check_finite: bool = False, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """SimNPO ``-(2/beta) mean_b log sigmoid(beta * (S_b / n_b - gamma))`` (Fan et al., 2024); no reference.

    "mean" averages over sequences with at least one valid token.
    """
    check_number("beta", beta, low=0.0, low_open=True)
    check_number("gamma", gamma)
    check_reduction(reduction)
    S, n = sequence_nll(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, logit_scale=logit_scale, shift=shift,
                        ignore_index=ignore_index, backend=backend, check_finite=check_finite,
                        token_weights=token_weights)
    return _neg_logsigmoid_loss(S / n.clamp(min=1) - gamma, beta, n > 0, reduction)


def tnpo_weights(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float, alpha: float = 0.0) -> torch.Tensor:
    """Detached ``2 p**beta / (p**beta + p_ref**beta + 1e-5) * p**alpha`` from log-probabilities."""
    logp = logp.detach()
    pb = torch.exp(beta * logp)
    w = 2.0 * pb / (pb + torch.exp(beta * ref_logp.detach()) + TNPO_EPS)
    if alpha != 0:
        w = w * torch.exp(alpha * logp)
    return w


def tnpo_loss(x: torch.Tensor, labels: torch.Tensor, ref_logp: torch.Tensor, *, beta: float = 4.0,
              lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
              logit_scale: float = 1.0,
              reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX,
              backend: str | None = "auto", return_weights: bool = False, check_finite: bool = False,
              token_weights: torch.Tensor | None = None):
    """Token-wise NPO ``-tokmean(sg[2 p**beta / (p**beta + p_ref**beta + 1e-5)] * ell)`` (G-effect).

    ref_logp: reference per-token log-probabilities shaped like labels (e.g. ``token_logprobs`` of the
    reference model with the same ``shift``), detached; values at ignored positions are not used.
    ``return_weights=True`` also returns the detached weights shaped like labels (0 where ignored).
    """
    return _tnpo(x, labels, ref_logp, beta, 0.0, lm_head, bias, softcap, reduction, shift, ignore_index, backend,
                 return_weights, check_finite, logit_scale, token_weights)


def wtnpo_loss(x: torch.Tensor, labels: torch.Tensor, ref_logp: torch.Tensor, *, alpha: float = 1.5,
               beta: float = 5.0, lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               softcap: float | None = None, logit_scale: float = 1.0, reduction: str = "mean", shift: bool = False,
               ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", return_weights: bool = False,
               check_finite: bool = False, token_weights: torch.Tensor | None = None):
    """Weighted TNPO: the TNPO weight times ``sg[p**alpha]`` (G-effect); ref_logp as in ``tnpo_loss``."""
    check_number("alpha", alpha, low=0.0)
    return _tnpo(x, labels, ref_logp, beta, alpha, lm_head, bias, softcap, reduction, shift, ignore_index, backend,
                 return_weights, check_finite, logit_scale, token_weights)


def _tnpo(x, labels, ref_logp, beta, alpha, lm_head, bias, softcap, reduction, shift, ignore_index, backend,
          return_weights, check_finite=False, logit_scale=1.0, token_weights=None):
    check_number("beta", beta, low=0.0)
    check_reduction(reduction)
    tw = check_token_weights(token_weights, labels, shift)
    logp, valid = _logp(x, labels, lm_head, bias, softcap, shift, ignore_index, backend, check_finite,
                        logit_scale)
    ref = check_ref("ref_logp", ref_logp, logp.shape, logp.device).to(logp.dtype)
    if check_finite:  # only valid positions are read; ignored ones may hold anything
        _finite_ref("ref_logp", torch.where(valid, ref, 0.0), True)
    w = weigh(torch.where(valid, tnpo_weights(logp, torch.where(valid, ref, 0.0), beta, alpha), 0.0), tw)
    loss = reduce_tokens(w * logp, valid, reduction)
    return (loss, w) if return_weights else loss


def dpo_loss(win: torch.Tensor, win_labels: torch.Tensor, lose: torch.Tensor, lose_labels: torch.Tensor,
             ref_win_nll: torch.Tensor, ref_lose_nll: torch.Tensor, *, beta: float = 0.1,
             lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
             logit_scale: float = 1.0,
             reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX,
             backend: str | None = "auto", check_finite: bool = False, win_token_weights: torch.Tensor | None = None,
             lose_token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """DPO ``-(2/beta) mean_b log sigmoid(beta * ((S_lose - S_lose^ref) - (S_win - S_win^ref)))`` (spec).

    win / lose: inputs (logits or hidden states, same form for both) of the preferred and dispreferred
    answers to the same B prompts, with labels [B, T_win] / [B, T_lose]; ref_win_nll / ref_lose_nll: [B]
    reference sequence NLLs. The same ``lm_head`` serves both. "mean" averages over pairs where both
    answers have at least one valid token. win_token_weights / lose_token_weights: optional per-token weights
    like win_labels / lose_labels entering each sequence NLL (``sequence_nll``).
    """
    check_number("beta", beta, low=0.0, low_open=True)
    check_reduction(reduction)
    _finite_ref("ref_win_nll", ref_win_nll, check_finite)
    _finite_ref("ref_lose_nll", ref_lose_nll, check_finite)
    kw = dict(lm_head=lm_head, bias=bias, softcap=softcap,
              logit_scale=logit_scale, shift=shift, ignore_index=ignore_index, backend=backend,
              check_finite=check_finite)
    S_w, n_w = sequence_nll(win, win_labels, token_weights=win_token_weights, **kw)
    S_l, n_l = sequence_nll(lose, lose_labels, token_weights=lose_token_weights, **kw)
    if S_w.shape != S_l.shape:
        raise ValueError(f"win_labels and lose_labels must have the same batch size, got {tuple(win_labels.shape)} "
                         f"and {tuple(lose_labels.shape)}")
    ref_w = check_ref("ref_win_nll", ref_win_nll, S_w.shape, S_w.device).to(S_w.dtype)
    ref_l = check_ref("ref_lose_nll", ref_lose_nll, S_l.shape, S_l.device).to(S_l.dtype)
    margin = (S_l - ref_l) - (S_w - ref_w)
    return _neg_logsigmoid_loss(margin, beta, (n_w > 0) & (n_l > 0), reduction)


def idk_dpo_loss(forget: torch.Tensor, forget_labels: torch.Tensor, idk: torch.Tensor, idk_labels: torch.Tensor,
                 ref_forget_nll: torch.Tensor, ref_idk_nll: torch.Tensor, *, beta: float = 0.1,
                 forget_token_weights: torch.Tensor | None = None, idk_token_weights: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
    """IdkDPO: DPO with the refusal ("I don't know") answer preferred and the forget answer dispreferred.

    Same arguments as ``dpo_loss`` (keyword options passed through), named for the forget setting
    (``forget_token_weights`` / ``idk_token_weights`` are its lose / win token weights).
    """
    return dpo_loss(idk, idk_labels, forget, forget_labels, ref_idk_nll, ref_forget_nll, beta=beta,
                    win_token_weights=idk_token_weights, lose_token_weights=forget_token_weights, **kwargs)


for _f in (sequence_nll, npo_loss, simnpo_loss, tnpo_loss, wtnpo_loss, dpo_loss, idk_dpo_loss):
    _f.__doc__ = (_f.__doc__ or "") + "\n" + _ARGS_DOC
