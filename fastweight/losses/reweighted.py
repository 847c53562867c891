"""Per-token reweighted forget losses: GA, WGA, SimImp, SatImp (``shared/spec/LOSSES.md``, SatImp family).

All four are ``L = -tokmean(sg[w_t] * ell_t) = tokmean(sg[w_t] * log p_t)`` with
``w_t = p_t**beta1 * (1 - p_t)**beta2``:

=========  ==================  =====================================================================
loss       weight              source / default
=========  ==================  =====================================================================
GA         1                   gradient ascent; L = -tokmean(ell)
WGA        p**beta             G-effect (Wang et al., ICLR 2025): beta = 5 for TOFU 1%/5% (7 for 10%);
                               open-unlearning uses 1. Default 5.0 (the paper's).
SimImp     (1 - p)**beta       SatImp paper (Yang et al., ICML 2025), importance only. Default 1.0.
SatImp     p**b1 * (1-p)**b2   SatImp code README: beta1 = 5, beta2 = 0.1 (default here); the
                               open-unlearning port uses beta2 = 1.
=========  ==================  =====================================================================

The loss is the value to *minimise* to forget: its gradient lowers the likelihood of the forget tokens.
Weights are detached (no gradient flows through them), as in every source.
"""
from __future__ import annotations

import torch

from typing import Literal, get_args

from fastweight._constants import IGNORE_INDEX
from fastweight.losses._input import token_logprobs, weighted_logprobs
from fastweight.losses._weights import check_token_weights, weigh
from fastweight.losses._seq import (
    as_sequences, check_choice, check_int, check_number, reduce_rows, reduce_tokens, valid_mask,
)
from fastweight.ops._common import check_beta, check_reduction, importance_weight_torch

Granularity = Literal["token", "instance", "group", "batch"]
Sampling = Literal["topk", "bottomk", "random"]
Counts = Literal["released", "paper"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
SAMPLINGS: tuple[str, ...] = get_args(Sampling)
COUNTS: tuple[str, ...] = get_args(Counts)

_ARGS_DOC = """
    Args:
        logits: [N, V] or [B, T, V] logits, float32/bfloat16/float16 (float64 on the torch backend);
            or hidden states [N, H] / [B, T, H] when ``lm_head`` is given.
        labels: [N] or [B, T] int64/int32, values in [0, V) or ``ignore_index``.
        lm_head: optional [V, H] output-projection weight: the loss is computed from hidden states
            (fused-linear path), same dtype as the hidden states.
        bias: optional [V] output bias (with ``lm_head``).
        softcap: optional final-logit soft-capping ``c * tanh(z / c)`` (Gemma-2), with ``lm_head``.
        reduction: "mean" (over valid tokens; 0 with zero gradient when none is valid), "sum" or
            "none" (per-token ``sg[w_t] * log p_t`` shaped like labels, 0 at ignored positions).
        return_weights: also return the detached weights (shaped like labels): ``(loss, weights)``.
        shift: apply the causal shift of Hugging Face labels (token t is scored against labels[t + 1]).
        ignore_index: label value excluded everywhere.
        backend: "auto" (Triton on CUDA, torch otherwise), "triton" or "torch".
        inplace_backward: with reduction "mean"/"sum", write the gradient into the logits buffer during
            the forward (Liger's trick, saves one [N, V] buffer; the logits values are destroyed).
        check_finite: raise ValueError on NaN/inf logits (one extra pass).
        token_weights: optional [..., T] float tensor like labels (detached, finite, >= 0; shifted like the
            labels with ``shift``): multiplies each token's term, denominators unchanged; all ones = the
            unweighted loss exactly. ``return_weights`` then returns the products.
    Returns:
        float32 0-d tensor (or per-token tensor for reduction "none").
"""


def _reweighted(logits, labels, beta1, beta2, weighted, return_weights=False, **kw):
    loss, w = weighted_logprobs(logits, labels, beta1=beta1, beta2=beta2, weighted=weighted, **kw)
    return (loss, w) if return_weights else loss


def _sequence_weights(logp: torch.Tensor, valid: torch.Tensor, beta1: float, beta2: float,
                      granularity: str, group_size: int) -> torch.Tensor:
    """Detached SatImp weights: per token [B, T] (group), per sequence [B] (instance), 0-d (batch)."""
    logp = logp.detach()
    if granularity in ("instance", "batch"):
        # w_b = q_b**beta1 * (1 - q_b)**beta2 with q_b = exp(-S_b), the sequence likelihood (released code:
        # ``(-lm_loss).exp() ** beta`` on the per-sequence summed NLL).
        w = importance_weight_torch(torch.where(valid, logp, 0.0).sum(-1), beta1, beta2)
        if granularity == "instance":
            return w
        keep = valid.any(-1)
        return torch.where(keep, w, 0.0).sum() / keep.sum().clamp(min=1)  # released: weights.mean()
    w = torch.where(valid, importance_weight_torch(logp, beta1, beta2), 0.0)
    return torch.where(valid, group_mean(w, valid, group_size), 0.0)


def group_mean(w: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sort each row's valid weights in DESCENDING order, replace each by the mean of its group of ``group_size``.

    w, valid: [B, T]. As the released code's ``group_and_average`` (tmlr-group/SatImp,
    ``dataloader_granu.py``): groups are consecutive in descending order starting from the largest weight,
    so the last (smaller) group of a row holds its smallest weights. Ignored positions sort last and never
    enter a group mean. O(N log T).
    """
    B, T = w.shape
    key = torch.where(valid, -w, torch.full_like(w, float("inf")))
    order = key.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(T, device=w.device).expand(B, T))
    n_groups = -(-T // group_size)
    gid = (ranks // group_size) + torch.arange(B, device=w.device)[:, None] * n_groups
    wv = torch.where(valid, w, 0.0)
    sums = torch.zeros(B * n_groups, dtype=w.dtype, device=w.device).index_add_(0, gid.flatten(), wv.flatten())
    counts = torch.zeros(B * n_groups, dtype=w.dtype, device=w.device).index_add_(
        0, gid.flatten(), valid.flatten().to(w.dtype))
    return (sums / counts.clamp(min=1))[gid]


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, *, beta1: float = 5.0, beta2: float = 0.1,
                granularity: Granularity = "token", group_size: int = 4,
                lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                softcap: float | None = None, logit_scale: float = 1.0, reduction: str = "mean", shift: bool = False,
                ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", inplace_backward: bool = False,
                check_finite: bool = False, return_weights: bool = False,
                token_weights: torch.Tensor | None = None):
    """SatImp forget loss ``-tokmean(sg[p**beta1 * (1 - p)**beta2] * ell)`` (Yang et al., ICML 2025).

    Defaults: beta1 = 5, beta2 = 0.1 from the SatImp code README (the paper's recommended setting); the
    open-unlearning port uses beta2 = 1 (pass ``beta2=1.0`` to reproduce it).

    granularity (SatImp paper, "smoothness and granularity"; each as the released code tmlr-group/SatImp
    ``dataloader/dataloader_granu.py`` computes it, with the weight ``p**beta1 (1-p)**beta2`` in place of its
    ``simsat`` (beta2 = 0) / ``simimp`` (beta1 = 0) weights):
        "token"    the weights above, per token (one fused pass computes logp, weights and the gradient).
        "instance" one weight per sequence ``w_b = sg[q_b**beta1 (1 - q_b)**beta2]`` with ``q_b = exp(-S_b)``
                   the sequence likelihood (S_b the sequence NLL); ``L = -mean_b(w_b * S_b)``.
                   reduction "none" returns [B] per-sequence values.
        "group"    token weights sorted in descending order within each sequence, each replaced by the mean
                   of its group of ``group_size`` sorted neighbours (groups start from the largest weight, the
                   last one may be smaller; ``group_and_average``); then ``-tokmean(w' * ell)``.
                   group_size = 1 is exactly token level. The released code has no default group size (its
                   ``hyper_param``): 4 is fastweight's choice.
        "batch"    one scalar weight ``w_bar = mean_b w_b`` of the sequence-level weights above, applied to
                   the sequence sums: ``L = -w_bar * mean_b S_b`` (reduction "none": [B] values
                   ``-w_bar * S_b``).
    Sequences without a valid token are left out of every sequence mean (the released code counts them,
    with S_b = 0, in its denominators; its group level also treats a token whose NLL is exactly 0 as
    padding). Non-token granularities need the sequence structure: labels [B, T] ([T] is one sequence).
    ``return_weights=True`` returns ``(loss, weights)`` with the detached weights shaped like labels
    (instance: [B]; batch: the 0-d weight).
    """
    check_choice("granularity", granularity, GRANULARITIES)
    check_int("group_size", group_size, low=1)
    kw = dict(lm_head=lm_head, bias=bias, softcap=softcap,
              logit_scale=logit_scale, shift=shift, ignore_index=ignore_index,
              backend=backend, check_finite=check_finite)
    if granularity == "token":
        return _reweighted(logits, labels, beta1, beta2, True, return_weights=return_weights,
                           reduction=reduction, inplace_backward=inplace_backward, token_weights=token_weights,
                           **kw)
    check_beta("beta1", beta1)
    check_beta("beta2", beta2)
    check_reduction(reduction)
    tw = check_token_weights(token_weights, labels, shift)
    logp = as_sequences(token_logprobs(logits, labels, **kw))
    valid = as_sequences(valid_mask(labels, shift, ignore_index))
    # token weights enter the sequence sums (S_b = sum_t tw_t ell_t, and so q_b) and the group level's
    # per-token terms (its group weights come from the unweighted p_t)
    logp_tw = weigh(logp, None if tw is None else as_sequences(tw))
    w = _sequence_weights(logp if granularity == "group" else logp_tw, valid, beta1, beta2, granularity, group_size)
    logp = logp_tw
    if granularity in ("instance", "batch"):
        seq_logp = torch.where(valid, logp, 0.0).sum(-1)
        loss = reduce_rows(w * seq_logp, valid.any(-1), reduction)
    else:
        loss = reduce_tokens(w * logp, valid, reduction).reshape(labels.shape if reduction == "none" else ())
        w = w.reshape(labels.shape)
    return (loss, w) if return_weights else loss


def hard_sampling_loss(logits: torch.Tensor, labels: torch.Tensor, *, k: float = 0.3,
                       sampling: Sampling = "topk", counts: Counts = "released", seed: int = 0,
                       generator: torch.Generator | None = None,
                       lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       softcap: float | None = None,
                       logit_scale: float = 1.0, reduction: str = "sum", shift: bool = False,
                       ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
                       check_finite: bool = False, return_weights: bool = False,
                       token_weights: torch.Tensor | None = None):
    """SatImp hard sampling (Yang et al., ICML 2025): gradient ascent on a subset of each sequence's tokens.

    Tokens are chosen per sequence on detached NLLs ``ell`` (n_b valid tokens) and kept with weight 1:
    counts="released" (default; tmlr-group/SatImp ``dataloader/dataloader_hardsampling.py``, ``ga_topk`` /
    ``ga_bottomk`` / ``ga_rand``), with ``thr = torch.quantile(ell_b, 1 - k)`` (linear interpolation):
        "topk"    tokens with ``ell > thr`` (the hardest, about k n_b of them);
        "bottomk" tokens with ``ell < thr`` (the easiest, about (1 - k) n_b of them — not k n_b);
        "random"  ``s_b = floor(k n_b)`` tokens uniformly at random; every valid token when s_b = 0 (the
                  released code then leaves its mask at 1). Its ``soft_p`` must be 1 for this reading (the
                  mask is an int tensor: chosen -> soft_p, others -> 1 - soft_p).
    counts="paper" (Algorithm 1): ``s_b = ceil(k n_b)`` tokens (ceil, so every non-empty sequence keeps one):
    topk the s_b lowest-likelihood, bottomk the s_b highest-likelihood, random s_b uniform; ties by position.
    Random draws come from ``generator`` (a torch.Generator on the input's device or the CPU; advanced by each
    call) or, when None, a fresh one seeded with ``seed`` (the released code uses the global RNG).
    ``L = -reduce(w_t * ell_t)``: reduction "sum" (default, what the released code does), "mean" over the kept
    tokens, or "none". k must be in (0, 1]; the released code's defaults are 0.15 (topk) and 0.5 (bottomk,
    random), its README runs 0.3, the default here. Labels [B, T] ([T] is one sequence). The released code
    selects among tokens whose NLL is > 0 (fastweight: tokens with a valid label).
    ``return_weights=True`` also returns the 0/1 mask like labels. ``token_weights`` multiply the kept tokens'
    terms (the choice of tokens is made on the unweighted NLLs).
    """
    check_number("k", k, low=0.0, high=1.0, low_open=True)
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("counts", counts, COUNTS)
    check_reduction(reduction)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    logp = as_sequences(token_logprobs(logits, labels, lm_head=lm_head, bias=bias, softcap=softcap,
                                       logit_scale=logit_scale, shift=shift,
                                       ignore_index=ignore_index, backend=backend, check_finite=check_finite))
    valid = as_sequences(valid_mask(labels, shift, ignore_index))
    keep = hard_sampling_mask(logp.detach(), valid, k, sampling, counts=counts, seed=seed, generator=generator)
    tw = check_token_weights(token_weights, labels, shift)
    w = weigh(keep.to(logp.dtype), None if tw is None else as_sequences(tw))
    loss = reduce_tokens(w * logp, keep, reduction)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    w = w.reshape(labels.shape)
    return (loss, w) if return_weights else loss


def _random_keys(B: int, T: int, device, seed: int, generator: torch.Generator | None) -> torch.Tensor:
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.rand((B, T), generator=gen, device=gen.device, dtype=torch.float64).to(device)


def _lowest(key: torch.Tensor, valid: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the s[b] valid positions of row b with the smallest key (ties by position)."""
    B, T = key.shape
    key = torch.where(valid, key, torch.full_like(key, float("inf")))
    order = key.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(T, device=key.device).expand(B, T))
    return (ranks < s[:, None]) & valid


def hard_sampling_mask(logp: torch.Tensor, valid: torch.Tensor, k: float, sampling: str, *,
                       counts: str = "released", seed: int = 0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B, T]: the tokens of each row chosen by ``sampling`` and ``counts`` (see hard_sampling_loss)."""
    B, T = logp.shape
    n = valid.sum(-1)
    ell = -logp.to(torch.float64)
    if counts == "paper":
        s = torch.ceil(k * n.double()).long().clamp(max=n)
        if sampling == "random":
            return _lowest(_random_keys(B, T, logp.device, seed, generator), valid, s)
        return _lowest(-ell if sampling == "topk" else ell, valid, s)
    if sampling == "random":
        s = torch.floor(k * n.double()).long()
        s = torch.where(s > 0, s, n)  # released: nothing drawn -> the mask keeps every valid token
        return _lowest(_random_keys(B, T, logp.device, seed, generator), valid, s)
    keep = torch.zeros_like(valid)
    for b in range(B):  # one quantile per sequence (B is a micro-batch size)
        if bool(valid[b].any()):
            thr = torch.quantile(ell[b][valid[b]], 1.0 - k)
            keep[b] = valid[b] & ((ell[b] > thr) if sampling == "topk" else (ell[b] < thr))
    return keep


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, *, beta: float = 5.0,
             lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
             logit_scale: float = 1.0,
             reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX,
             backend: str | None = "auto", inplace_backward: bool = False, check_finite: bool = False,
             return_weights: bool = False, token_weights: torch.Tensor | None = None):
    """Weighted gradient ascent ``-tokmean(sg[p**beta] * ell)`` (G-effect, Wang et al., ICLR 2025)."""
    check_beta("beta", beta)
    return _reweighted(logits, labels, beta, 0.0, True, lm_head=lm_head, bias=bias, softcap=softcap,
                       logit_scale=logit_scale,
                       reduction=reduction, shift=shift, ignore_index=ignore_index, backend=backend,
                       inplace_backward=inplace_backward, check_finite=check_finite, return_weights=return_weights,
                       token_weights=token_weights)


def simimp_loss(logits: torch.Tensor, labels: torch.Tensor, *, beta: float = 1.0,
                lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                softcap: float | None = None, logit_scale: float = 1.0, reduction: str = "mean", shift: bool = False,
                ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", inplace_backward: bool = False,
                check_finite: bool = False, return_weights: bool = False,
                token_weights: torch.Tensor | None = None):
    """Importance-only reweighting ``-tokmean(sg[(1 - p)**beta] * ell)`` (SatImp paper)."""
    check_beta("beta", beta)
    return _reweighted(logits, labels, 0.0, beta, True, lm_head=lm_head, bias=bias, softcap=softcap,
                       logit_scale=logit_scale,
                       reduction=reduction, shift=shift, ignore_index=ignore_index, backend=backend,
                       inplace_backward=inplace_backward, check_finite=check_finite, return_weights=return_weights,
                       token_weights=token_weights)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, softcap: float | None = None,
            logit_scale: float = 1.0, reduction: str = "mean",
            shift: bool = False, ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
            inplace_backward: bool = False, check_finite: bool = False, return_weights: bool = False,
            token_weights: torch.Tensor | None = None):
    """Gradient ascent ``-tokmean(ell)``: the forget NLL, negated."""
    return _reweighted(logits, labels, 0.0, 0.0, False, lm_head=lm_head, bias=bias, softcap=softcap,
                       logit_scale=logit_scale,
                       reduction=reduction, shift=shift, ignore_index=ignore_index, backend=backend,
                       inplace_backward=inplace_backward, check_finite=check_finite, return_weights=return_weights,
                       token_weights=token_weights)


for _f in (satimp_loss, hard_sampling_loss, wga_loss, simimp_loss, ga_loss):
    _f.__doc__ = (_f.__doc__ or "") + "\n" + _ARGS_DOC
