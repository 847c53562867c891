"""Turn a loss's user input (logits, or hidden states + lm_head, any leading shape) into the token-logprob ops.

The one place where losses meet the ops: every loss calls ``weighted_logprobs`` or ``token_logprobs``
from here, so shapes, the causal shift, the two input forms and backend choice are handled identically.

Input forms:
    logits path:       ``x`` = logits [..., V], ``lm_head`` None.
    fused-linear path: ``x`` = hidden [..., H], ``lm_head`` = W [V, H], optional ``bias`` [V] and
                       ``softcap`` and ``logit_scale`` s (logits = softcap * tanh(s (x @ W.T + b) / softcap);
                       soft-capping as in Gemma-2, s as Cohere's logit_scale or Granite's 1 / logits_scaling);
                       ``fastweight.ops.linear_logprobs`` computes it without building the logits.
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.losses._weights import check_token_weights
from fastweight.ops._common import check_float_tensor, flatten_rows, shift_labels
from fastweight.ops.linear_logprobs import (
    LinearLogprobsOptions, linear_token_logprobs_2d, linear_weighted_logprobs_2d,
)
from fastweight.ops.token_logprobs import TokenLogprobsOptions, token_logprobs_2d, weighted_logprobs_2d


def _check_lm_head(hidden: torch.Tensor, lm_head: torch.Tensor) -> None:
    check_float_tensor("lm_head", lm_head, min_dim=2)
    if lm_head.dim() != 2 or lm_head.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head must be [V, H] with H = {hidden.shape[-1]}, got shape {tuple(lm_head.shape)}")


def _check_linear_args(lm_head, bias, softcap, logit_scale=1.0) -> None:
    if lm_head is None and (bias is not None or softcap is not None or logit_scale != 1.0):
        raise ValueError("bias, softcap and logit_scale are only meaningful with lm_head (hidden-state input)")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")


def weighted_logprobs(x: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, softcap: float | None = None, logit_scale: float = 1.0,
                      beta1: float = 0.0, beta2: float = 0.0, weighted: bool = True, reduction: str = "mean",
                      shift: bool = False, ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
                      inplace_backward: bool = False, check_finite: bool = False,
                      num_items: torch.Tensor | float | None = None, token_weights: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """reduce(sg[p**beta1 (1-p)**beta2] * log p) over valid tokens, and the weights shaped like labels.

    With reduction "none" the first output is shaped like ``labels``. ``num_items`` (Hugging Face
    ``num_items_in_batch``, needs reduction "sum") divides the summed value: ``sum / num_items``.
    ``inplace_backward`` only concerns the logits path (the fused-linear path never has logits).
    ``token_weights`` ([..., T] like labels; validated and shifted by ``fastweight.losses._weights``) multiply
    each token's term; the op takes them into its per-row coefficient ``g_t`` (no ``[N, V]`` tensor). The
    returned weights are then the products.
    """
    _check_linear_args(lm_head, bias, softcap, logit_scale)
    if num_items is not None and reduction != "sum":
        raise ValueError(f"num_items needs reduction='sum', got reduction={reduction!r}")
    tw = check_token_weights(token_weights, labels, shift)
    flat_tw = None if tw is None else tw.reshape(-1)
    name = "logits" if lm_head is None else "hidden"
    rows, flat_labels = flatten_rows(x, labels, name, ignore_index, shift)
    if lm_head is not None:
        _check_lm_head(rows, lm_head)
        lopts = LinearLogprobsOptions(ignore_index=ignore_index, beta1=beta1, beta2=beta2, weighted=weighted,
                                      reduction=reduction, softcap=softcap, logit_scale=logit_scale,
                                      backend=backend,
                                      check_finite=check_finite)
        out, w = linear_weighted_logprobs_2d(rows, lm_head, bias, flat_labels, lopts, divisor=num_items,
                                             token_weights=flat_tw)
    else:
        opts = TokenLogprobsOptions(ignore_index=ignore_index, beta1=beta1, beta2=beta2, weighted=weighted,
                                    reduction=reduction, inplace_backward=inplace_backward, backend=backend,
                                    check_finite=check_finite)
        out, w = weighted_logprobs_2d(rows, flat_labels, opts, flat_tw)
        if num_items is not None:
            out = out / torch.as_tensor(num_items, device=out.device).to(out.dtype)
    if reduction == "none":
        out = out.reshape(labels.shape)
    if flat_tw is not None:
        w = w * flat_tw.to(w.dtype)
    return out, w.reshape(labels.shape)


def token_logprobs(x: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, softcap: float | None = None,
                   logit_scale: float = 1.0, shift: bool = False,
                   ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", check_finite: bool = False,
                   token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """log p_t shaped like ``labels`` (float32; float64 for float64 input), differentiable; 0 where ignored.

    ``token_weights``: optional float tensor shaped like ``labels`` (weight of each label token; detached).
    Returns ``c_t * log p_t`` and back-propagates ``g_t * c_t`` inside the op (O(N), no [N, V] tensor); with
    ``shift=True`` the weight moves with its label (entry t scores labels[..., t + 1] with its weight).
    Weights of ones give the unweighted result bit for bit; rows of weight 0 cost no GEMM on the fused path.
    """
    _check_linear_args(lm_head, bias, softcap, logit_scale)
    name = "logits" if lm_head is None else "hidden"
    rows, flat_labels = flatten_rows(x, labels, name, ignore_index, shift)
    flat_weights = None
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or token_weights.shape != labels.shape:
            raise ValueError(f"token_weights must be a tensor shaped like labels {tuple(labels.shape)}, got "
                             f"{tuple(getattr(token_weights, 'shape', ())) or type(token_weights).__name__}")
        flat_weights = (shift_labels(token_weights, 0) if shift else token_weights).reshape(-1)
    if lm_head is not None:
        _check_lm_head(rows, lm_head)
        lopts = LinearLogprobsOptions(ignore_index=ignore_index, softcap=softcap,
                                      logit_scale=logit_scale, backend=backend,
                                      check_finite=check_finite)
        logp, _ = linear_token_logprobs_2d(rows, lm_head, bias, flat_labels, lopts, flat_weights)
    else:
        opts = TokenLogprobsOptions(ignore_index=ignore_index, backend=backend, check_finite=check_finite)
        logp, _ = token_logprobs_2d(rows, flat_labels, opts, flat_weights)
    return logp.reshape(labels.shape)
