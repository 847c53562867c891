"""Naive reference for ``fastweight.ops.token_logprobs`` (and the loss layer's input handling).

Written from ``shared/spec/LOSSES.md`` (Notation): ``log p_t = z[t, y_t] - logsumexp(z[t])``, 0 where the
label is ``ignore_index``; hidden-state input forms ``z = softcap * tanh((x @ W.T + b) / softcap)``; the
causal shift scores position t against ``labels[t + 1]``. Full ``log_softmax`` + ``gather`` + autograd, in
whatever dtype the inputs have: call it with float64 inputs for ground truth, with the test dtype for the
"naive" error baseline of STYLE.md section 5. Imports nothing from fastweight except ``IGNORE_INDEX``.
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [..., T] -> labels[..., 1:] followed by one ``ignore_index`` (token t predicts t + 1)."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def logits_from_hidden(hidden: torch.Tensor, lm_head: torch.Tensor, bias: torch.Tensor | None = None,
                       softcap: float | None = None) -> torch.Tensor:
    """hidden [..., H], lm_head [V, H], bias [V] -> logits [..., V] (Gemma-2 soft-capping when given)."""
    z = hidden @ lm_head.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def token_logprobs(x: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, softcap: float | None = None, shift: bool = False,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p_t shaped like ``labels``, in the dtype of ``x``; 0 at ignored positions; differentiable."""
    z = x if lm_head is None else logits_from_hidden(x, lm_head, bias, softcap)
    if shift:
        labels = shift_labels(labels, ignore_index)
    valid = labels != ignore_index
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """lse over the last dim (what the ops return beside logp)."""
    return torch.logsumexp(x, dim=-1)
