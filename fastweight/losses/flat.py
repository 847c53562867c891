"""FLAT: loss adjustment with only forget data (Wang et al., ICLR 2025; spec ``LOSSES.md``, FLAT).

For each forget item b, its forget answer y_f and a template (refusal) answer y_e:
    P(y) = mean over y's valid answer tokens of p_t              (per sequence, differentiable)
    L    = mean_b [ -g(P_e,b) + f*(g(P_f,b)) ]                    (minimised)
with the variational form of an f-divergence (activation g, conjugate f*, f-GAN, Nowozin et al. 2016):

=========  =============================  =========================================================
name       g(x)                           f*(g(x))
=========  =============================  =========================================================
"kl"       x                              exp(x - 1)
"pearson"  x                              x + x**2 / 4
"tv"       0.5 tanh(x)                    0.5 tanh(x)                 (FLAT's default)
"js"       log 2 - log(1 + exp(-x))       -(log 2 - log(1 + exp(x)))
"jeffrey"  x                              W(e^(1-x)) + 1 / W(e^(1-x)) + x - 2   (W: Lambert W, exact)
=========  =============================  =========================================================

Three more divergences exactly as released (UCSC-REAL/FLAT bf2ef07, ``dataloader.py``,
``get_contrastive_loss``: 'Reverse-KL', 'Squared-Hellinger', 'Neyman'), and their f-GAN forms (Nowozin et al.,
2016, table 6):

===================  ==================  ===================  ==============================================
name                 g(x)                f*(g(x))             note
===================  ==================  ===================  ==============================================
"reverse_kl"         -exp(x)             -1 - x               released; pushes the WRONG way on both terms
"hellinger"          1 - exp(x)          exp(-x) - 1          released; pushes the WRONG way on both terms
"neyman"             1 - exp(x)          2 - 2 sqrt(1 - x)    released; conjugate taken of x, not g(x); the
                                                              template term pushes the wrong way
"reverse_kl_fgan"    -exp(-x)            x - 1                f-GAN (corrected)
"hellinger_fgan"     1 - exp(-x)         exp(x) - 1           f-GAN (corrected)
"neyman_fgan"        1 - exp(-x)         2 - 2 exp(-x / 2)    f-GAN (corrected)
===================  ==================  ===================  ==============================================

"Wrong way": minimising the released reverse_kl / hellinger raises the forget answer's P_f (dL/dP_f = -1 and
-exp(-P_f), -0.67 at P_f = 0.4) and lowers the template's P_e; the released neyman lowers P_f as intended but
also lowers P_e. They are kept under their names so results can be compared with the released code.

Difference from the released code: it pools P over the whole batch with a fixed padding denominator;
the paper (and fastweight) define P per sequence as the mean token probability of that answer.
One fused token-logprob pass per answer batch plus O(N) work; no reference model, no retain set.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX
from fastweight.losses._input import token_logprobs
from fastweight.losses._weights import check_token_weights, weigh
from fastweight.losses._seq import check_choice, reduce_rows, require_sequences, valid_mask
from fastweight.ops._common import check_reduction

Divergence = Literal["kl", "pearson", "tv", "js", "jeffrey", "reverse_kl", "hellinger", "neyman",
                     "reverse_kl_fgan", "hellinger_fgan", "neyman_fgan"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

_LOG2 = math.log(2.0)
# Halley steps for the Lambert W of z in [1, e] (P in [0, 1]) from w0 = log1p(z): converges to float64
# precision in 4; 8 leaves a wide margin for any real z > 0 that a user's P could produce.
_LAMBERTW_STEPS = 8


def lambertw(z: torch.Tensor) -> torch.Tensor:
    """Principal-branch Lambert W for z > 0 (float64 Halley iterations, returned in z's dtype; no gradient)."""
    zz = z.detach().double()
    w = torch.log1p(zz)
    for _ in range(_LAMBERTW_STEPS):
        ew = torch.exp(w)
        f = w * ew - zz
        w = w - f / (ew * (w + 1) - (w + 2) * f / (2 * w + 2))
    return w.to(z.dtype)


class _JeffreyConjugate(torch.autograd.Function):
    """f*(t) = W(e^(1-t)) + 1/W(e^(1-t)) + t - 2 with d f*/dt = 1 / W(e^(1-t))."""

    @staticmethod
    def forward(ctx, t):
        w = lambertw(torch.exp(1.0 - t))
        ctx.save_for_backward(w)
        return w + 1.0 / w + t - 2.0

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g / w


def _activation(divergence: str, x: torch.Tensor) -> torch.Tensor:
    if divergence == "reverse_kl":
        return -torch.exp(x)
    if divergence in ("hellinger", "neyman"):
        return 1.0 - torch.exp(x)
    if divergence == "reverse_kl_fgan":
        return -torch.exp(-x)
    if divergence in ("hellinger_fgan", "neyman_fgan"):
        return -torch.expm1(-x)
    if divergence == "tv":
        return 0.5 * torch.tanh(x)
    if divergence == "js":
        return _LOG2 - F.softplus(-x)
    return x


def _conjugate_of_activation(divergence: str, x: torch.Tensor) -> torch.Tensor:
    """f*(g(x)), composed (the spec's second column), not f*(x) (except the released "neyman", see above)."""
    released_or_fgan = {
        "reverse_kl": lambda: -1.0 - x,
        "hellinger": lambda: torch.expm1(-x),
        "neyman": lambda: 2.0 - 2.0 * torch.sqrt(1.0 - x),
        "reverse_kl_fgan": lambda: x - 1.0,
        "hellinger_fgan": lambda: torch.expm1(x),
        "neyman_fgan": lambda: 2.0 - 2.0 * torch.exp(-0.5 * x),
    }
    if divergence in released_or_fgan:
        return released_or_fgan[divergence]()
    if divergence == "kl":
        return torch.exp(x - 1.0)
    if divergence == "pearson":
        return x + x * x / 4.0
    if divergence == "tv":
        return 0.5 * torch.tanh(x)
    if divergence == "js":
        return -(_LOG2 - F.softplus(x))
    return _JeffreyConjugate.apply(x)


def mean_token_prob(x: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, softcap: float | None = None,
                    logit_scale: float = 1.0, shift: bool = False,
                    ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", check_finite: bool = False,
                    token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean token probability P [B] float32 (differentiable) and valid-token counts n [B].

    Sequences with no valid token give P = 0, n = 0. ``token_weights`` (like labels, shifted like them):
    ``P = sum_t tw_t p_t / n``.
    """
    require_sequences("labels", labels)
    tw = check_token_weights(token_weights, labels, shift)
    logp = token_logprobs(x, labels, lm_head=lm_head, bias=bias, softcap=softcap, logit_scale=logit_scale, shift=shift,
                          ignore_index=ignore_index, backend=backend, check_finite=check_finite)
    valid = valid_mask(labels, shift, ignore_index)
    n = valid.sum(-1)
    return torch.where(valid, weigh(logp.exp(), tw), 0.0).sum(-1) / n.clamp(min=1), n


def flat_loss(forget: torch.Tensor, forget_labels: torch.Tensor, idk: torch.Tensor, idk_labels: torch.Tensor, *,
              divergence: Divergence = "tv", lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              softcap: float | None = None, logit_scale: float = 1.0, reduction: str = "mean", shift: bool = False,
              ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
              check_finite: bool = False, forget_token_weights: torch.Tensor | None = None,
              idk_token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """FLAT ``mean_b[-g(P_e) + f*(g(P_f))]`` (see the module docstring for g and f*).

    forget / idk: logits [B, T_f, V] / [B, T_e, V] of the forget answers and of their template answers
        (same B, item b paired with template b), or hidden states [B, T, H] with ``lm_head`` [V, H].
    forget_labels / idk_labels: [B, T_f] / [B, T_e] int (answer tokens; prompt and padding ignore_index).
    divergence: one of ``DIVERGENCES``; "tv" (Total Variation) is FLAT's default.
    reduction: "mean" over pairs where both answers have a valid token (0 when none), "sum", or "none" [B].
    check_finite: raise ValueError on NaN/inf inputs first (one extra pass).
    forget_token_weights / idk_token_weights: optional per-token weights like forget_labels / idk_labels
        (see ``mean_token_prob``): ``P = sum_t tw_t p_t / n``.
    Returns float32. Nothing is detached: both terms carry gradient.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_reduction(reduction)
    kw = dict(lm_head=lm_head, bias=bias, softcap=softcap,
              logit_scale=logit_scale, shift=shift, ignore_index=ignore_index, backend=backend,
              check_finite=check_finite)
    P_f, n_f = mean_token_prob(forget, forget_labels, token_weights=forget_token_weights, **kw)
    P_e, n_e = mean_token_prob(idk, idk_labels, token_weights=idk_token_weights, **kw)
    if P_f.shape != P_e.shape:
        raise ValueError(f"forget_labels and idk_labels must have the same batch size, got "
                         f"{tuple(forget_labels.shape)} and {tuple(idk_labels.shape)}")
    per_pair = -_activation(divergence, P_e) + _conjugate_of_activation(divergence, P_f)
    return reduce_rows(per_pair, (n_f > 0) & (n_e > 0), reduction)
