"""Caller-supplied per-token weights (``token_weights=``) for the token-level losses: validation and shift.

``token_weights`` is a float tensor shaped like ``labels`` ([..., T]), detached, non-negative and finite. It
multiplies each token's term of a loss (``w_t * ell_t`` becomes ``tw_t * w_t * ell_t``); denominators (valid
token counts, sequence counts) are unchanged, so weights of ones give the unweighted loss. With ``shift=True``
it is shifted like the labels (position t takes ``token_weights[..., t + 1]``; the last position, which has no
next token, takes 1). No ``[N, V]`` tensor is added: the weighted token-level losses pass them to the op's
per-row coefficient (``fastweight.ops`` ``token_weights``), the others multiply per-token values in their O(N)
heads, so the fused backward's per-row ``g_t`` carries them.
"""
from __future__ import annotations

from typing import Any

import torch


def shift_weights(token_weights: torch.Tensor) -> torch.Tensor:
    """Causal shift of [..., T] weights like ``shift_labels``: position t takes t + 1, the last takes 1."""
    return torch.cat([token_weights[..., 1:], torch.ones_like(token_weights[..., :1])], dim=-1)


def check_token_weights(token_weights: Any, labels: torch.Tensor, shift: bool,
                        name: str = "token_weights") -> torch.Tensor | None:
    """Validated, detached (and shifted when ``shift``) weights shaped like ``labels``; None when the caller
    gave None or weights that are exactly 1 everywhere (the unweighted loss is then computed as before, bit for
    bit). One host sync checks finiteness, sign and the all-ones case together."""
    if token_weights is None:
        return None
    if not isinstance(token_weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(token_weights).__name__}")
    if not token_weights.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32/bfloat16/float16/float64), got "
                        f"{token_weights.dtype}")
    if tuple(token_weights.shape) != tuple(labels.shape):
        raise ValueError(f"{name} must have the shape of labels {tuple(labels.shape)}, got "
                         f"{tuple(token_weights.shape)}")
    if token_weights.device != labels.device:
        raise ValueError(f"{name} is on {token_weights.device} but labels are on {labels.device}")
    tw = token_weights.detach()
    finite, non_negative, ones = torch.stack(
        [torch.isfinite(tw).all(), (tw >= 0).all(), (tw == 1).all()]).tolist() if tw.numel() else (True, True, True)
    if not finite:
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    if not non_negative:
        raise ValueError(f"{name} must be non-negative (found a value < 0)")
    if ones:
        return None
    return shift_weights(tw) if shift else tw


def weigh(per_token: torch.Tensor, tw: torch.Tensor | None) -> torch.Tensor:
    """``per_token * tw`` in per_token's dtype (identity when tw is None)."""
    return per_token if tw is None else per_token * tw.to(per_token.dtype)
