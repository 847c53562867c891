"""Retain-side regularisers and distillation losses (``shared/spec/LOSSES.md``): NLL, KL to reference, UNDIAL.

``nll_loss`` is one fused token-logprob pass. ``kl_loss`` and ``undial_loss`` run the fused row-wise KL
op (``fastweight.ops.kl_div``) over the trained model's logits and the frozen reference's logits: one
online pass over both rows, never a softmax tensor. With hidden-state input (``lm_head`` and
``ref_lm_head``) they run the fused-linear KL op (``fastweight.ops.linear_kl_div``), which forms neither
model's ``[N, V]`` logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX
from fastweight.losses._input import weighted_logprobs
from fastweight.losses.ce_u import undial_target_entropy
from fastweight.losses._seq import check_number, reduce_tokens
from fastweight.losses._weights import check_token_weights, weigh
from fastweight.ops._common import check_float_tensor, check_logit_scale, check_reduction, flatten_rows
from fastweight.ops.kl_div import kl_div
from fastweight.ops.linear_kl_div import linear_kl_div


def nll_loss(x: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, softcap: float | None = None,
             logit_scale: float = 1.0, reduction: str = "mean",
             shift: bool = False, ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
             check_finite: bool = False, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Retain NLL ``tokmean(ell_r)`` (the GD retain term; Hugging Face cross-entropy on valid tokens).

    x: logits [..., V] or hidden [..., H] with ``lm_head`` [V, H]; labels [...] int. reduction "mean" (over
    valid tokens; 0 when none), "sum" or "none" (per-token ell shaped like labels, 0 where ignored).
    token_weights: optional [..., T] like labels (see ``reweighted``): ``tokmean(tw_t ell_t)``. Returns float32.
    """
    out, _ = weighted_logprobs(x, labels, weighted=False, lm_head=lm_head, bias=bias, softcap=softcap,
                               logit_scale=logit_scale,
                               reduction=reduction, shift=shift, ignore_index=ignore_index, backend=backend,
                               check_finite=check_finite, token_weights=token_weights)
    return -out


def _logit_rows(name: str, x: torch.Tensor, lm_head, bias, softcap, logit_scale=1.0) -> torch.Tensor:
    """[..., V] logits or [..., H] hidden (+ lm_head [V, H]) -> [N, V] logit rows."""
    check_float_tensor(name, x, min_dim=2)
    if lm_head is None:
        if bias is not None or softcap is not None or logit_scale != 1.0:
            raise ValueError(f"bias, softcap and logit_scale for {name} are only meaningful with its lm_head")
        rows = x.reshape(-1, x.shape[-1])
    else:
        check_float_tensor(f"{name} lm_head", lm_head, min_dim=2)
        if lm_head.dim() != 2 or lm_head.shape[1] != x.shape[-1]:
            raise ValueError(f"lm_head for {name} must be [V, H] with H = {x.shape[-1]}, got {tuple(lm_head.shape)}")
        if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
            raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
        rows = F.linear(x.reshape(-1, x.shape[-1]), lm_head, bias)
        if logit_scale != 1.0:
            check_logit_scale("logit_scale", logit_scale)
            rows = rows * logit_scale
        if softcap is not None:
            rows = softcap * torch.tanh(rows / softcap)
    return rows


def _kl_rows(x, ref, labels, *, lm_head, bias, softcap, ref_lm_head, ref_bias, ref_softcap, shift,
             ignore_index, masked, ref_shift, backend, check_finite, every_labelled_slot=False, logit_scale=1.0,
             ref_logit_scale=1.0):
    """Per-position KL [...] (like x's leading dims) and the mask of counted positions.

    every_labelled_slot (UNDIAL unmasked): count every position that has a (shifted) label slot, and give
    positions whose label is ``ignore_index`` the label ``ignore_index mod V`` — what open-unlearning's
    ``compute_undial_loss`` does by indexing the vocabulary with -100 (Python wraps it to V - 100)."""
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"ref must be a torch.Tensor, got {type(ref).__name__}")
    if ref.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"ref leading dims {tuple(ref.shape[:-1])} must equal the input's {tuple(x.shape[:-1])}")
    if lm_head is not None and ref_lm_head is None:
        raise ValueError("hidden-state input (lm_head given) needs ref_lm_head for the reference hidden states")
    fused = lm_head is not None
    if fused:  # hidden states of both models: the fused-linear op, neither [N, V] logits tensor is formed
        check_float_tensor("x", x, min_dim=2)
        check_float_tensor("ref", ref, min_dim=2)
        for name, w, h in (("lm_head", lm_head, x), ("ref_lm_head", ref_lm_head, ref)):
            check_float_tensor(name, w, min_dim=2)
            if w.dim() != 2 or w.shape[1] != h.shape[-1]:
                raise ValueError(f"{name} must be [V, H] with H = {h.shape[-1]}, got {tuple(w.shape)}")
        V = lm_head.shape[0]
    else:
        z = _logit_rows("x", x, lm_head, bias, softcap, logit_scale)
        r = _logit_rows("ref", ref.detach(), ref_lm_head, ref_bias, ref_softcap, ref_logit_scale).detach()
        V = z.shape[-1]
    if masked or every_labelled_slot:
        if labels is None:
            raise ValueError("labels are required when masked=True (pass masked=False to count every position)")
        _, flat_labels = flatten_rows(x, labels, "x", ignore_index, shift)
    else:
        flat_labels = None
    op_labels, counted = flat_labels, None
    if every_labelled_slot and not masked:
        slot = torch.ones_like(flat_labels, dtype=torch.bool)
        if shift:  # the last position of each sequence has no next token (open-unlearning drops it)
            slot = slot.view(*labels.shape[:-1], labels.shape[-1])
            slot[..., -1] = False
            slot = slot.reshape(-1)
        wrapped = ignore_index % V
        if wrapped == ignore_index:  # a non-negative ignore_index is itself a token id: never a row to skip
            raise ValueError(f"masked=False needs a negative ignore_index, got {ignore_index}")
        op_labels = torch.where(slot, torch.where(flat_labels == ignore_index, wrapped, flat_labels),
                                torch.full_like(flat_labels, ignore_index))
        counted = slot
    if fused:
        rows = x.reshape(-1, x.shape[-1])
        dtype = rows.dtype  # the op takes one dtype: the frozen reference side is cast to the policy's
        ref_rows = ref.detach().reshape(-1, ref.shape[-1]).to(dtype)
        kl = linear_kl_div(rows, lm_head, ref_rows, ref_lm_head.detach().to(dtype), op_labels, bias=bias,
                           ref_bias=None if ref_bias is None else ref_bias.detach().to(dtype), softcap=softcap,
                           logit_scale=logit_scale, ref_logit_scale=ref_logit_scale,
                           ref_softcap=ref_softcap, ref_shift=ref_shift, ignore_index=ignore_index,
                           backend=backend, check_finite=check_finite)
    else:
        kl = kl_div(z, r, op_labels, ref_shift=ref_shift, ignore_index=ignore_index, backend=backend,
                    check_finite=check_finite)
    if counted is None:
        counted = (flat_labels != ignore_index) if masked else torch.ones_like(kl, dtype=torch.bool)
    return kl.reshape(x.shape[:-1]), counted.reshape(x.shape[:-1])


def kl_loss(x: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None = None, *, masked: bool = False,
            lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
            logit_scale: float = 1.0,
            ref_lm_head: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
            ref_softcap: float | None = None, ref_logit_scale: float = 1.0, reduction: str = "mean",
            shift: bool = False,
            ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", check_finite: bool = False,
            token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL retain regulariser ``KL(p_ref || p_theta)``, "batchmean" over positions (spec, KL retain).

    x: logits [..., V] of the trained model, or hidden [..., H] with ``lm_head`` [V, H].
    ref: the frozen reference's logits [..., V] (or hidden [..., H] with ``ref_lm_head``); detached.
    labels: [...] int, needed when ``masked``.
    masked: False (default) averages over every position, prompt and padding included, as TOFU's, G-effect's
        and open-unlearning's code do (``kl_div(..., reduction="batchmean")`` over the flattened [B*T, V]
        rows; labels then unused). True averages over positions with a valid (shifted) label only.
    reduction: "mean" (over counted positions; 0 when none), "sum", or "none" (per-position KL like
        x's leading dims, 0 at uncounted positions). Returns float32.
    token_weights: optional float tensor shaped like x's leading dims (labels' layout; shifted like labels
        with ``shift``, the last position taking 1) multiplying each position's KL; counts unchanged.
    """
    if not isinstance(masked, bool):
        raise TypeError(f"masked must be a bool, got {type(masked).__name__}")
    check_reduction(reduction)
    tw = _position_weights(token_weights, x, shift)
    kl, counted = _kl_rows(x, ref, labels, lm_head=lm_head, bias=bias, softcap=softcap,
                           logit_scale=logit_scale, ref_lm_head=ref_lm_head, ref_bias=ref_bias,
                           ref_softcap=ref_softcap, ref_logit_scale=ref_logit_scale, shift=shift,
                           ignore_index=ignore_index,
                           masked=masked, ref_shift=0.0, backend=backend, check_finite=check_finite)
    return reduce_tokens(weigh(kl, tw), counted, reduction)


def _position_weights(token_weights, x, shift):
    """token_weights checked against x's leading dims (the KL losses may run without labels)."""
    if token_weights is None:
        return None
    check_float_tensor("x", x, min_dim=2)
    return check_token_weights(token_weights, torch.empty(x.shape[:-1], device=x.device, dtype=torch.bool),
                               shift)


def undial_loss(x: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, *, beta: float = 10.0,
                masked: bool = False,
                lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
                logit_scale: float = 1.0,
                ref_lm_head: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                ref_softcap: float | None = None, ref_logit_scale: float = 1.0, reduction: str = "mean",
                shift: bool = False,
                ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", check_finite: bool = False,
                token_weights: torch.Tensor | None = None, form: str = "kl") -> torch.Tensor:
    """UNDIAL self-distillation (Dong et al., 2024): match the reference with the forget token's logit lowered.

    Target ``q_t = softmax(z_ref[t] - beta * onehot(y_t))``; loss ``mean_t KL(q_t || p_theta,t)``. This
    differs from the soft-label cross-entropy ``-sum q log p`` (UNDIAL paper, open-unlearning) only by the
    entropy of q, a constant of the frozen reference: same gradient, and the value is 0 when the model
    already matches the target. beta = 10 (the UNDIAL paper's and open-unlearning's default).
    masked: False (default) averages over every position that has a next token (with ``shift``, all but the
        last of each sequence), as open-unlearning's ``compute_undial_loss`` (``loss.mean()``); at a position
        whose label is ``ignore_index`` it lowers token ``ignore_index mod V`` (V - 100 for V >= 100), exactly
        as that code's indexing with -100 does (which fails for V < 100; fastweight keeps the modulo). True averages over valid labels only.
    form: "kl" (default) ``KL(q || p)``; "ce" the soft-label cross-entropy ``-sum q log p`` = KL + H(q), the value
        open-unlearning's ``compute_undial_loss`` reports (same gradient; H(q) from a chunked no-grad pass over
        the reference, ``fastweight.losses.ce_u.undial_target_entropy``).
    Other arguments (``token_weights`` included) as in ``kl_loss`` (labels required).
    """
    check_number("beta", beta, low=0.0)
    if not isinstance(masked, bool):
        raise TypeError(f"masked must be a bool, got {type(masked).__name__}")
    check_reduction(reduction)
    if labels is None:
        raise ValueError("labels are required by undial_loss (the shifted logit is the label's)")
    tw = _position_weights(token_weights, x, shift)
    kl, counted = _kl_rows(x, ref, labels, lm_head=lm_head, bias=bias, softcap=softcap,
                           logit_scale=logit_scale, ref_lm_head=ref_lm_head, ref_bias=ref_bias,
                           ref_softcap=ref_softcap, ref_logit_scale=ref_logit_scale, shift=shift,
                           ignore_index=ignore_index,
                           masked=masked, ref_shift=float(beta), backend=backend, check_finite=check_finite,
                           every_labelled_slot=True)
    if form not in ("kl", "ce"):
        raise ValueError(f"form must be 'kl' or 'ce', got {form!r}")
    if form == "ce":
        kl = kl + undial_target_entropy(ref, labels, counted, beta=beta, ref_lm_head=ref_lm_head, ref_bias=ref_bias,
                                        ref_softcap=ref_softcap, ref_logit_scale=ref_logit_scale, shift=shift,
                                        ignore_index=ignore_index)
    return reduce_tokens(weigh(kl, tw), counted, reduction)


