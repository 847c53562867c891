"""Per-row losses of the logit row ``z = cap(h W^T + b)`` that need the whole row but never store it.

Two row functions, both of which open-unlearning (github.com/locuslab/open-unlearning, commit d3d7cf9) defines
on full ``[B, T, V]`` logits:

* ``"ceu"`` (CE-U, ``src/trainer/unlearn/ceu.py``): cross-entropy of the model to the target
  ``q = softmax(z with z_y = -inf)`` (detached), ``LSE(z) - sum_{v != y} q_v z_v``; gradient ``p - q``.
* ``"pdu"`` (PDU, ``src/trainer/unlearn/pdu.py``): ``(max_v z_v - mean_v z_v)^2``; gradient
  ``2 (max - mean) (onehot(argmax) - 1/V)`` (the max routes to one index, as ``torch.max``'s backward).

Torch path only (CPU and CUDA; no Triton kernel): chunks of counted rows, each chunk's ``[c, V]`` logits formed
in float32 (float64 for float64 input), reduced to per-row statistics, freed; the backward recomputes them
and runs ``dh_c = dz W`` and ``dW += dz^T h_c``. Gradients flow to ``hidden``, ``lm_head`` and ``bias``.
"""
from __future__ import annotations

import torch

from fastweight.ops._common import acc_dtype, check_float_tensor, check_logit_scale, no_autocast
from fastweight.ops._gemm import add_linear_t_, linear

ROW_LOSSES = ("ceu", "pdu")
# float32 elements per [c, V] logits chunk (16 MiB)
TORCH_CHUNK_ELEMENTS = 1 << 22


def _chunk_logits(h, W, b, cap, scale):
    """cap(scale * (h W^T + b)) and its derivative in the product h W^T + b (None when it is 1)."""
    z = linear(h, W, b)
    if scale != 1.0:
        z = z * scale
    if cap is None:
        return z, (None if scale == 1.0 else scale)
    t = torch.tanh(z / cap)
    return cap * t, (1.0 - t * t) * scale


def _row_value_grad(kind: str, z: torch.Tensor, y: torch.Tensor, want_grad: bool):
    """(value [c], dvalue/dz [c, V] or None) of one chunk."""
    if kind == "pdu":
        mx, arg = z.max(1)
        d = mx - z.mean(1)
        if not want_grad:
            return d * d, None
        g = torch.full_like(z, -1.0 / z.shape[1]).mul_((2 * d)[:, None])
        g.scatter_add_(1, arg[:, None], (2 * d)[:, None])
        return d * d, g
    lse = torch.logsumexp(z, 1)
    masked = z.scatter(1, y[:, None], float("-inf"))
    q = torch.softmax(masked, 1)
    value = lse - (q * z).sum(1)  # q_y = 0 exactly
    if not want_grad:
        return value, None
    return value, torch.exp(z - lse[:, None]).sub_(q)


def _run(kind, hidden, lm_head, bias, labels, softcap, scale, g=None, needs=(False, False, False)):
    acc = acc_dtype(hidden.dtype)
    W = lm_head.to(acc)
    b = None if bias is None else bias.to(acc)
    N, H = hidden.shape
    V = W.shape[0]
    step = max(1, TORCH_CHUNK_ELEMENTS // V)
    values = torch.zeros(N, dtype=acc, device=hidden.device)
    dh = torch.zeros(N, H, dtype=acc, device=hidden.device) if needs[0] else None
    dW = torch.zeros(V, H, dtype=acc, device=hidden.device) if needs[1] else None
    db = torch.zeros(V, dtype=acc, device=hidden.device) if bias is not None and needs[2] else None
    for s in range(0, N, step):
        e = min(N, s + step)
        h = hidden[s:e].to(acc)
        z, deriv = _chunk_logits(h, W, b, softcap, scale)
        value, dz = _row_value_grad(kind, z, labels[s:e].long(), g is not None)
        values[s:e] = value
        if dz is None:
            continue
        dz.mul_(g[s:e].to(acc)[:, None])
        if deriv is not None:
            dz.mul_(deriv)
        if dh is not None:
            dh[s:e] = linear(dz, W.t())
        if dW is not None:
            add_linear_t_(dW, dz, h)
        if db is not None:
            db += dz.sum(0)
    return values, (dh, dW, db)


class _RowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, lm_head, bias, labels, kind, softcap, scale):
        with no_autocast(hidden.device):
            values, _ = _run(kind, hidden, lm_head, bias, labels, softcap, scale)
        ctx.save_for_backward(hidden, lm_head, bias, labels)
        ctx.kind, ctx.softcap, ctx.scale = kind, softcap, scale
        return values.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, g):
        hidden, lm_head, bias, labels = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if g is None or not any(needs):
            return (None,) * 7
        with no_autocast(hidden.device):
            _, (dh, dW, db) = _run(ctx.kind, hidden, lm_head, bias, labels, ctx.softcap, ctx.scale, g, needs)
        cast = (lambda t, like: None if t is None else t.to(like.dtype))
        return cast(dh, hidden), cast(dW, lm_head), (None if bias is None else cast(db, bias)), None, None, None, None


def linear_row_loss(hidden: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor, *, kind: str,
                    bias: torch.Tensor | None = None, softcap: float | None = None,
                    logit_scale: float = 1.0) -> torch.Tensor:
    """Per-row ``kind`` loss [N] (float32; float64 for float64 input) of ``hidden`` [N, H] under ``lm_head``
    [V, H] (logits ``softcap(logit_scale * (h W^T + b))``); ``labels`` [N] are the tokens CE-U suppresses (valid ids:
    the caller selects counted rows; PDU ignores them). Differentiable in hidden, lm_head and bias."""
    if kind not in ROW_LOSSES:
        raise ValueError(f"kind must be one of {ROW_LOSSES}, got {kind!r}")
    check_float_tensor("hidden", hidden, min_dim=2)
    check_float_tensor("lm_head", lm_head, min_dim=2)
    if hidden.dim() != 2 or lm_head.dim() != 2 or lm_head.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden must be [N, H] and lm_head [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(lm_head.shape)}")
    if kind == "ceu" and lm_head.shape[0] < 2:
        raise ValueError("CE-U needs a vocabulary of at least 2 tokens (its target excludes the label)")
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be a tensor of shape [{hidden.shape[0]}], "
                         f"got {getattr(labels, 'shape', labels)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= lm_head.shape[0]):
        raise ValueError(f"labels must be token ids in [0, {lm_head.shape[0]}) on the selected rows")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    check_logit_scale("logit_scale", logit_scale)
    return _RowLoss.apply(hidden, lm_head, bias, labels, kind, softcap, float(logit_scale))


__all__ = ["ROW_LOSSES", "linear_row_loss"]
