"""CE-U and PDU forget losses (open-unlearning's ``CEU`` and ``PDU`` trainers), fused from hidden states.

Definitions as open-unlearning (github.com/locuslab/open-unlearning, commit d3d7cf9):

* **CE-U** (Yang et al., 2025, arXiv:2503.01224; ``src/trainer/unlearn/ceu.py``): at each position t whose
  (shifted) label y_t is valid, the cross-entropy of the model to ``q_t = softmax(z_t with z_t[y_t] = -inf)``
  (q detached): ``ell_t = LSE(z_t) - sum_{v != y_t} q_t,v z_t,v``; mean over counted positions. The first
  ``ignore_first_n`` answer tokens of each sequence (counted on the unshifted labels, before the shift) are
  not counted (their paper's footnote trick; default 1 as their ``configs/trainer/CEU.yaml``).
* **PDU** forget term (Entesari et al., 2025, primal-dual unlearning; ``src/trainer/unlearn/pdu.py``):
  ``(max_v z_t,v - mean_v z_t,v)^2`` averaged over positions t with ``labels[t] != ignore_index`` —
  *unshifted* as their code pairs the logits row t with labels[t] (``shift=False``, the default here;
  ``shift=True`` pairs row t with labels[t+1], the next-token convention).

With hidden states (``lm_head=``) both run ``fastweight.ops.linear_row_stats`` (chunks of rows, no
``[N, V]`` logits kept); with logits they are computed directly. Positions with nothing to count give 0 with
``reduction="mean"`` (open-unlearning's mean over zero positions is NaN).
"""
from __future__ import annotations

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.losses._seq import check_int, reduce_tokens
from fastweight.ops._common import check_float_tensor, check_reduction, flatten_rows
from fastweight.ops.linear_row_stats import linear_row_loss


def _per_position(kind, x, counted_labels, lm_head, bias, softcap, logit_scale=1.0):
    """Per-position values [N] (0 where not counted) of rows ``x`` [N, D] with labels [N] (-1: not counted)."""
    keep = (counted_labels >= 0).nonzero().squeeze(1)
    out = torch.zeros(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    if keep.numel() == 0:
        return out + 0.0 * x.sum()  # keep the graph (zero gradient)
    rows, y = x.index_select(0, keep), counted_labels.index_select(0, keep)
    if lm_head is not None:
        if lm_head.dim() != 2 or lm_head.shape[1] != x.shape[-1]:
            raise ValueError(f"lm_head must be [V, H] with H = {x.shape[-1]}, got {tuple(lm_head.shape)}")
        vals = linear_row_loss(rows, lm_head, y, kind=kind, bias=bias, softcap=softcap, logit_scale=logit_scale)
    else:
        if bias is not None or softcap is not None or logit_scale != 1.0:
            raise ValueError("bias, softcap and logit_scale are only meaningful with lm_head (hidden-state input)")
        z = rows.to(out.dtype)
        if kind == "pdu":
            vals = (z.max(-1).values - z.mean(-1)) ** 2
        else:
            q = torch.softmax(z.detach().scatter(1, y[:, None].long(), float("-inf")), -1)
            vals = torch.logsumexp(z, -1) - (q * z).sum(-1)
    return out.index_put((keep,), vals.to(out.dtype))


def ce_u_loss(x: torch.Tensor, labels: torch.Tensor, *, ignore_first_n: int = 1,
              lm_head: torch.Tensor | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
              logit_scale: float = 1.0, reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX,
              backend: str | None = "auto") -> torch.Tensor:
    """CE-U (module docstring): x logits [B, T, V] or hidden [B, T, H] with ``lm_head`` [V, H]; labels [B, T].

    ignore_first_n: answer tokens at the start of each sequence left out (>= 0). reduction "mean" (over
    counted positions; 0 when none), "sum" or "none" ([B, T], 0 where not counted). ``backend`` is accepted
    for the registry's common signature (the op has a torch path only). Returns float32 (float64 input: float64).
    """
    check_reduction(reduction)
    check_int("ignore_first_n", ignore_first_n, low=0)
    check_float_tensor("x", x, min_dim=2)
    if not isinstance(labels, torch.Tensor) or labels.shape != x.shape[:-1]:
        raise ValueError(f"labels shape {getattr(labels, 'shape', labels)} must equal x's leading dims "
                         f"{tuple(x.shape[:-1])}")
    if ignore_first_n:
        valid = labels != ignore_index
        first = (valid.cumsum(-1) <= ignore_first_n) & valid
        labels = labels.masked_fill(first, ignore_index)
    rows, flat = flatten_rows(x, labels, "x", ignore_index, shift)
    counted = flat != ignore_index
    per = _per_position("ceu", rows, torch.where(counted, flat, -1), lm_head, bias, softcap, logit_scale)
    return reduce_tokens(per.reshape(labels.shape), counted.reshape(labels.shape), reduction)


def pdu_loss(x: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, softcap: float | None = None, logit_scale: float = 1.0,
             reduction: str = "mean", shift: bool = False, ignore_index: int = IGNORE_INDEX,
             backend: str | None = "auto") -> torch.Tensor:
    """PDU forget term (module docstring) ``mean_t (max_v z_t - mean_v z_t)^2`` over positions with a valid
    label (``shift=False``: labels[t], as open-unlearning). Arguments as ``ce_u_loss``."""
    check_reduction(reduction)
    check_float_tensor("x", x, min_dim=2)
    if not isinstance(labels, torch.Tensor) or labels.shape != x.shape[:-1]:
        raise ValueError(f"labels shape {getattr(labels, 'shape', labels)} must equal x's leading dims "
                         f"{tuple(x.shape[:-1])}")
    rows, flat = flatten_rows(x, labels, "x", ignore_index, shift)
    counted = flat != ignore_index
    per = _per_position("pdu", rows, torch.where(counted, 0, -1), lm_head, bias, softcap, logit_scale)
    return reduce_tokens(per.reshape(labels.shape), counted.reshape(labels.shape), reduction)


__all__ = ["ce_u_loss", "pdu_loss"]


@torch.no_grad()
def undial_target_entropy(ref: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor, *, beta: float,
                          ref_lm_head: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                          ref_softcap: float | None = None, ref_logit_scale: float = 1.0, shift: bool = False,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Entropy ``H(q_t)`` [...] (float32; float64 for float64 input; 0 where not ``counted``) of UNDIAL's target
    ``q_t = softmax(z_ref,t - beta onehot(y_t))`` — ``undial_loss(form="ce")`` adds it to ``KL(q || p)`` to
    report open-unlearning's soft-label cross-entropy ``-sum q log p``. An ignored label stands for token
    ``ignore_index mod V`` (their -100 indexing). Rows are formed a chunk at a time (no [N, V] tensor kept)."""
    rows, flat = flatten_rows(ref.detach(), labels, "ref", ignore_index, shift)
    keep = counted.reshape(-1).nonzero().squeeze(1)
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    out = torch.zeros(flat.shape[0], dtype=acc, device=ref.device)
    W = None if ref_lm_head is None else ref_lm_head.detach().to(acc)
    b = None if ref_bias is None else ref_bias.detach().to(acc)
    V = rows.shape[-1] if W is None else W.shape[0]
    step = max(1, (1 << 22) // V)
    for s in range(0, keep.numel(), step):
        idx = keep[s:s + step]
        z = rows.index_select(0, idx).to(acc)
        if W is not None:
            z = torch.nn.functional.linear(z, W, b) * ref_logit_scale
            if ref_softcap is not None:
                z = ref_softcap * torch.tanh(z / ref_softcap)
        y = flat.index_select(0, idx).long() % V
        z = z.scatter_add(1, y[:, None], torch.full_like(z[:, :1], -float(beta)))
        logq = torch.log_softmax(z, -1)
        out[idx] = -(logq.exp() * logq).sum(-1)
    return out.reshape(labels.shape)
