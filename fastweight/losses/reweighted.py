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

from fastweight._constants import IGNORE_INDEX
from fastweight.losses._input import weighted_logprobs

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
        shift: apply the causal shift of Hugging Face labels (token t is scored against labels[t + 1]).
        ignore_index: label value excluded everywhere.
        backend: "auto" (Triton on CUDA, torch otherwise), "triton" or "torch".
        inplace_backward: with reduction "mean"/"sum", write the gradient into the logits buffer during
            the forward (Liger's trick, saves one [N, V] buffer; the logits values are destroyed).
        check_finite: raise ValueError on NaN/inf logits (one extra pass).
    Returns:
        float32 0-d tensor (or per-token tensor for reduction "none").
"""


def _reweighted(logits, labels, beta1, beta2, weighted, **kw) -> torch.Tensor:
    loss, _ = weighted_logprobs(logits, labels, beta1=beta1, beta2=beta2, weighted=weighted, **kw)
    return loss





def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, *, beta1: float = 5.0, beta2: float = 0.1,
                lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                softcap: float | None = None, reduction: str = "mean", shift: bool = False,
                ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", inplace_backward: bool = False,
                check_finite: bool = False) -> torch.Tensor:
    """SatImp forget loss ``-tokmean(sg[p**beta1 * (1 - p)**beta2] * ell)`` (Yang et al., ICML 2025)."""
    return _reweighted(logits, labels, beta1, beta2, True, lm_head=lm_head, bias=bias, softcap=softcap,
                       reduction=reduction, shift=shift, ignore_index=ignore_index, backend=backend,
                       inplace_backward=inplace_backward, check_finite=check_finite)


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, *, beta: float = 5.0,
             lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
             reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX,
             backend: str | None = "auto", inplace_backward: bool = False, check_finite: bool = False,
             ) -> torch.Tensor:
    """Weighted gradient ascent ``-tokmean(sg[p**beta] * ell)`` (G-effect, Wang et al., ICLR 2025)."""
    return _reweighted(logits, labels, beta, 0.0, True, lm_head=lm_head, bias=bias, softcap=softcap,
                       reduction=reduction, shift=shift, ignore_index=ignore_index, backend=backend,
                       inplace_backward=inplace_backward, check_finite=check_finite)


def simimp_loss(logits: torch.Tensor, labels: torch.Tensor, *, beta: float = 1.0,
                lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                softcap: float | None = None, reduction: str = "mean", shift: bool = False,
                ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", inplace_backward: bool = False,
                check_finite: bool = False) -> torch.Tensor:
    """Importance-only reweighting ``-tokmean(sg[(1 - p)**beta] * ell)`` (SatImp paper)."""
    return _reweighted(logits, labels, 0.0, beta, True, lm_head=lm_head, bias=bias, softcap=softcap,
                       reduction=reduction, shift=shift, ignore_index=ignore_index, backend=backend,
                       inplace_backward=inplace_backward, check_finite=check_finite)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, softcap: float | None = None, reduction: str = "mean",
            shift: bool = False, ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
            inplace_backward: bool = False, check_finite: bool = False) -> torch.Tensor:
    """Gradient ascent ``-tokmean(ell)``: the forget NLL, negated."""
    return _reweighted(logits, labels, 0.0, 0.0, False, lm_head=lm_head, bias=bias, softcap=softcap,
                       reduction=reduction, shift=shift, ignore_index=ignore_index, backend=backend,
                       inplace_backward=inplace_backward, check_finite=check_finite)


for _f in (satimp_loss, wga_loss, simimp_loss, ga_loss):
    _f.__doc__ = (_f.__doc__ or "") + "\n" + _ARGS_DOC
