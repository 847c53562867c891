"""Turn a loss's user input (logits or hidden states, any leading shape) into the token-logprob ops.

The one place where losses meet the ops: every loss calls ``weighted_logprobs`` or ``token_logprobs``
from here, so shapes, the causal shift and backend choice are handled identically everywhere.
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.ops._common import flatten_rows
from fastweight.ops.token_logprobs import TokenLogprobsOptions, weighted_logprobs_2d


def weighted_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, beta1: float = 0.0, beta2: float = 0.0,
                      weighted: bool = True, reduction: str = "mean", shift: bool = False,
                      ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
                      inplace_backward: bool = False, check_finite: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """reduce(sg[p**beta1 (1-p)**beta2] * log p) over valid tokens, and the weights shaped like labels.

    With reduction "none" the first output is shaped like ``labels``.
    """
    opts = TokenLogprobsOptions(ignore_index=ignore_index, beta1=beta1, beta2=beta2, weighted=weighted,
                                reduction=reduction, inplace_backward=inplace_backward, backend=backend,
                                check_finite=check_finite)
    rows, flat_labels = flatten_rows(logits, labels, "logits", ignore_index, shift)
    out, w = weighted_logprobs_2d(rows, flat_labels, opts)
    if reduction == "none":
        out = out.reshape(labels.shape)
    return out, w.reshape(labels.shape)
