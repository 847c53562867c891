"""The fused-linear ops' torch path: chunks of valid rows, float32 accumulation (float64 for float64 inputs).

Used by ``fastweight.ops.linear_logprobs`` (the public ops, options and autograd) on CPU and wherever Triton is
not used; same contract as its Triton path.

Rows are taken in chunks of ``c`` valid rows; per chunk one GEMM writes float32 logits into a ``[c, V]`` buffer
(a reused one for ``torch.mm``; a fresh one per chunk from oneDNN, which ``fastweight.ops._gemm`` uses for
float32 CPU operands), the buffer is exponentiated in place and summed (``lse``), and in the fused case two more
GEMMs give ``dh_c = da_c @ W`` and ``dW += da_c^T @ h_c``. The softmax normalisation and ``g_t`` are per-row
scalars, so they are applied to the ``[c, H]`` operands instead of the ``[c, V]`` buffer, and the one-hot term
is written into the target column of the buffer (``c`` elements): no ``[N, V]`` tensor and no extra pass over
the buffer. Ignored rows are skipped entirely (no GEMM work, ``lse`` = 0 there). Inputs in bf16/fp16 are
computed in float32 (the torch path holds a float32 copy of ``lm_head``).
"""
from __future__ import annotations

import torch

from fastweight.ops._common import (
    acc_dtype, compact_live_rows_, flush_subnormal_, flush_tiny_rows_, importance_weight_torch,
)
from fastweight.ops._gemm import add_linear_t_, gemm_operand, linear, new_products

# Tuning (torch): 12 Mi float32 (48 MiB) per [c, V] chunk buffer, c = 256 rows at V = 49152. The buffer is
# written by the GEMM and read by exp_/sum and the two gradient GEMMs while it is still (mostly) cached.
# c is also the inner dimension K of the dW += da_c^T @ h_c update, which reads and writes the whole [V, H]
# float32 accumulator once per chunk: with MKL's sgemm small chunks made that update and the M = c logits
# GEMM inefficient (N=1024, H=576, V=49152 on the 2-core CI CPU: c = 64 / 128 / 256 / 512 gave 1.71 / 1.57 /
# 1.34 / 1.08 x the 3-GEMM floor under load); large ones raise peak memory by c * V * 4 bytes. With oneDNN's
# GEMMs (ops/_gemm.py) c = 128 / 170 / 256 / 341 / 512 all ran the reference size (N=4096, H=576, V=49152
# SatImp) in 3.15-3.45 s, within that machine's noise; c = 256 peaks at 170 MiB extra (fresh-process RSS,
# d lm_head's 113 MiB included), inside the 200 MB budget (docs/performance.md).
TORCH_CHUNK_ELEMENTS = 3 << 22
# CUDA: 32 Mi float32 (128 MiB) per chunk buffer when chunk_elements is left at its default. Every chunk's
# d lm_head update reads and writes the whole float32 [V, H] accumulator (1 GB per chunk at Llama-2-7B's head),
# so on a GPU few large chunks matter more than cache residency (c = 1048 rows at V = 32000).
CUDA_CHUNK_ELEMENTS = 1 << 25


# Rows of a chunk whose gradient factor is 0 are left out of its two gradient GEMMs when they are at least
# 1/8 of it: moving the live rows costs up to one pass over the buffer, one dead row in 8 saves 1/8 of two
# GEMMs, about 10x more.
LIVE_MIN_DEAD_FRACTION = 8


def chunk_step(chunk_elements: int, V: int, device: torch.device, default: int = TORCH_CHUNK_ELEMENTS) -> int:
    """Rows per chunk of the torch path: chunk_elements // V (>= 1); an op's ``default`` grows to
    CUDA_CHUNK_ELEMENTS on CUDA."""
    if device.type == "cuda" and chunk_elements == default:
        chunk_elements = CUDA_CHUNK_ELEMENTS
    return max(1, chunk_elements // max(V, 1))


# exp(z) without max-subtraction is exact to fp32 rounding while the row sum stays in [2**-60, 2**100]
# (the largest logit then lies in [-42 - log V, 69]); chunks outside fall back to the max-shifted pass.
_SUM_LO, _SUM_HI = 2.0 ** -60, 2.0 ** 100


class _Chunker:
    """Valid rows of hidden in chunks, a reused [c, V] float32 buffer and the float32 operands."""

    def __init__(self, hidden, lm_head, bias, labels, opts, *, buffer: bool = True):
        self.acc = acc_dtype(hidden.dtype)
        # float32 (float64) operands, except 16-bit CUDA ones that stay as they are for the tensor cores
        self.W = gemm_operand(lm_head, self.acc)  # no copy for float32 / float64 / tensor cores
        self.b = None if bias is None else bias.to(self.acc)
        # logit_scale s: z = s (h W^T + b). Float32 (64) operands: (s h_c) W^T + s b, scaling the [c, H] chunk,
        # not the [c, V] products; 16-bit tensor-core operands: the float32 products are scaled (s h_c in 16
        # bits would round again). Every gradient takes s in its per-row coefficient. s = 1 touches nothing.
        self.scale = float(opts.logit_scale)
        self.b_s = self.b if self.b is None or self.scale == 1.0 else self.b * self.scale
        self.hidden, self.labels, self.cap = hidden, labels.long(), opts.softcap  # gather needs int64
        valid = labels != opts.ignore_index
        self.rows = valid.nonzero().squeeze(1)
        self.all_valid = self.rows.numel() == labels.numel()
        V = lm_head.shape[0]
        self.step = chunk_step(opts.chunk_elements, V, hidden.device)
        self.c = c = min(self.step, self.rows.numel())
        # oneDNN returns each chunk's logits as a new tensor; torch.mm writes into one reused buffer.
        self.buf = None
        if buffer and not new_products(self.W):
            self.buf = torch.empty(c, V, dtype=self.acc, device=hidden.device)
        self.aux = None  # 1 - tanh^2 for the softcap derivative, allocated when a gradient needs it

    def __iter__(self):
        n = self.rows.numel()
        for s in range(0, n, self.step):
            e = min(n, s + self.step)
            if self.all_valid:
                idx = slice(s, e)
                h, y = self.hidden[s:e], self.labels[s:e]
            else:
                idx = self.rows[s:e]
                h, y = self.hidden.index_select(0, idx), self.labels.index_select(0, idx)
            yield idx, gemm_operand(h, self.acc, self.W), y

    def target_logits(self, h, y):
        """``s (h_t . W[y_t] + b[y_t])`` per row, the dot products accumulated in float64, rounded once.

        The float32 GEMM's target column carries its summation error (oneDNN's order: mean 1.6e-6, max 1e-5
        at |z| ~ 10, K = 576, 2.3x MKL's); SatImp's weight p**beta1 multiplies an error in log p by beta1, so
        in the unlearned regime that column set the gradients' error (1.5e-5 vs MKL's 4.9e-6, float64
        reference). c * H multiply-adds per chunk, against the GEMM's c * H * V. Written into the buffer
        before ``lse`` is summed, so log p = z_y - lse stays consistent for confident rows.
        """
        zt = (h.to(torch.float64) * self.W.index_select(0, y)).sum(1)  # W promotes exactly; ~0.1 ms at 256 x 576
        if self.b is not None:
            zt += self.b.index_select(0, y).to(torch.float64)
        if self.scale != 1.0:
            zt *= self.scale
        return zt.to(self.acc)

    def logits_(self, h, y, *, want_deriv: bool, exact_target: bool = True):
        """Write logits of the chunk into the buffer; returns (z view, z[., y] [c], (1 - t^2) view or None).

        ``exact_target=False`` keeps the GEMM's target column, for a caller that overwrites it unread."""
        out = None if self.buf is None else self.buf[: h.shape[0]]
        if self.scale == 1.0:
            z = linear(h, self.W, self.b, out=out)
        elif h.dtype == self.acc:
            z = linear(h * self.scale, self.W, self.b_s, out=out)
        else:
            z = linear(h, self.W, self.b, out=out).mul_(self.scale)
        if exact_target and z.dtype == torch.float32:
            z.scatter_(1, y[:, None], self.target_logits(h, y)[:, None])
        deriv = None
        if self.cap is not None:
            z.mul_(1.0 / self.cap).tanh_()
            if want_deriv:
                if self.aux is None:
                    self.aux = torch.empty(self.c, z.shape[1], dtype=self.acc, device=z.device)
                deriv = torch.mul(z, z, out=self.aux[: h.shape[0]]).neg_().add_(1.0)
            z.mul_(self.cap)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        return z, z_y, deriv

    def exp_sum_(self, h, y, *, want_deriv: bool):
        """Logits, then buffer <- exp(z - shift) in place with the target column zeroed.

        Returns (E, z_y, shift [c], E_y [c], rest [c], deriv) where E_y = exp(z_y - shift) and rest is the
        sum of the other columns: 1 - p_y = rest / (rest + E_y) without cancellation for confident rows.
        """
        z, z_y, deriv = self.logits_(h, y, want_deriv=want_deriv)
        z.exp_()
        shift = torch.zeros_like(z_y)
        E_y = z.gather(1, y[:, None]).squeeze(1)
        z.scatter_(1, y[:, None], 0.0)
        rest = z.sum(1)
        if not sums_in_range(rest + E_y):
            # Rare (logits beyond ~ +-40): redo the chunk with the row max subtracted.
            z, z_y, deriv = self.logits_(h, y, want_deriv=want_deriv)
            shift = z.amax(1)
            z.sub_(shift[:, None]).exp_()
            E_y = z.gather(1, y[:, None]).squeeze(1)
            z.scatter_(1, y[:, None], 0.0)
            rest = z.sum(1)
        return z, z_y, shift, E_y, rest, deriv

    def factor(self, coef):
        """The gradient GEMMs' per-row factor -s * coef, subnormal entries flushed; a new tensor (the caller's
        g is not touched)."""
        return flush_subnormal_(-coef if self.scale == 1.0 else coef * -self.scale)

    def grads_(self, E, h, idx, coef, deriv, dh, dW, db):
        """Accumulate the gradients of a chunk whose buffer holds E with da = -coef * E (* deriv).

        The caller has already put the one-hot term into E's target column (E[t, y_t] = -(1 - p_t) / p-scale),
        so one GEMM each gives every term; coef [c] is a per-row scalar applied to the [c, H] side (times the
        logit scale s, the derivative of z with respect to h W^T + b):
            dh_c = -s coef * (E @ W),   dW += E^T @ (-s coef * h_c),   db += E^T @ (-s coef).
        Rows with tiny factors (SatImp's weights of unlikely tokens) of the scaled [c, H] operands are
        flushed of subnormal values, so no GEMM reads them (``flush_tiny_rows_``: 6x on an Intel Xeon otherwise).
        Rows whose factor is then exactly 0 add nothing: when at least 1 / ``LIVE_MIN_DEAD_FRACTION`` of the
        chunk's rows are such, the live rows are moved to the front of E (``compact_live_rows_``) and only they
        enter the two gradient GEMMs (the unlearned regime: most forget tokens' SatImp weights are 0 there).
        """
        coef = self.factor(coef)
        if deriv is not None:
            E.mul_(deriv)
        keep = compact_live_rows_(E, coef, min_dead=E.shape[0] // LIVE_MIN_DEAD_FRACTION)
        if keep is not None:  # rows with a zero factor add nothing: the two GEMMs take the live rows only
            if keep.numel() == 0:
                return
            E, coef, h = E[: keep.numel()], coef[keep], h.index_select(0, keep)
            idx = keep + idx.start if isinstance(idx, slice) else idx[keep]
        if dh is not None:
            prod = linear(E, self.W.t())
            if isinstance(idx, slice):  # scaled straight into dh's rows: one pass
                flush_tiny_rows_(torch.mul(prod, coef[:, None], out=dh[idx]), coef)
            else:
                dh[idx] = flush_tiny_rows_(prod.mul_(coef[:, None]), coef)
        if dW is not None:
            add_linear_t_(dW, E, flush_tiny_rows_(h * coef[:, None], coef), operands=self.W.dtype)
        if db is not None:
            db.addmv_(E.t(), coef)


def row_logp(z_y, shift, E_y, rest):
    """(log p [c], sum [c]) of a chunk from its target logits z_y, the shift its exponentials were taken at,
    E_y = exp(z_y - shift) and rest, the sum of the other columns' exponentials.

    log p = -log1p(rest / E_y): exact 0 for V = 1, no cancellation for confident rows; z_y - shift - log(sum)
    only where E_y is tiny (p below ~ 1e-18).
    """
    ssum = rest + E_y
    logp = torch.where(E_y >= _SUM_LO, -torch.log1p(rest / E_y.clamp(min=_SUM_LO)), z_y - shift - torch.log(ssum))
    return logp, ssum


def sums_in_range(ssum) -> bool:
    """True when every row sum of exponentials taken without a shift is inside [_SUM_LO, _SUM_HI]."""
    return bool(((ssum >= _SUM_LO) & (ssum <= _SUM_HI)).all())


def row_weights(logp, opts):
    """The importance weights w [c] of the rows (ones for an unweighted op)."""
    return importance_weight_torch(logp, opts.beta1, opts.beta2) if opts.weighted else torch.ones_like(logp)


def grad_factor(grad_scale, w, token_weights, idx):
    """g [c] of the fused forward: grad_scale * w (* the caller's token weights of the chunk's rows)."""
    g = grad_scale.to(w.dtype) * w
    return g if token_weights is None else g * token_weights[idx].to(w.dtype)


def _grad_buffers(hidden, lm_head, bias, needs, acc):
    N, H = hidden.shape
    V = lm_head.shape[0]
    dh = torch.zeros(N, H, dtype=acc, device=hidden.device) if needs[0] else None
    dW = torch.zeros(V, H, dtype=acc, device=hidden.device) if needs[1] else None
    db = torch.zeros(V, dtype=acc, device=hidden.device) if bias is not None and needs[2] else None
    return dh, dW, db


def _cast_grads(grads, *like):
    """Cast (d hidden, d lm_head, d bias) to the dtypes of ``like`` (tensors or dtypes); no copy if equal."""
    return tuple(None if t is None else t.to(getattr(ref, "dtype", ref)) for t, ref in zip(grads, like))


def linear_logprobs_forward_torch(hidden, lm_head, bias, labels, opts, *, grad_scale=None,
                                  needs=(True, True, True), token_weights=None):
    """Same contract as ``linear_logprobs_forward_triton`` (float64 outputs for float64 inputs)."""
    ch = _Chunker(hidden, lm_head, bias, labels, opts)
    N, acc, dev = hidden.shape[0], ch.acc, hidden.device
    logp, lse, w = (torch.zeros(N, dtype=acc, device=dev) for _ in range(3))
    fused = grad_scale is not None
    grads = _grad_buffers(hidden, lm_head, bias, needs, acc) if fused else (None, None, None)
    any_grad = fused and any(t is not None for t in grads)
    for idx, h, y in ch:
        E, z_y, shift, E_y, rest, deriv = ch.exp_sum_(h, y, want_deriv=any_grad)
        logp_c, ssum = row_logp(z_y, shift, E_y, rest)
        w_c = row_weights(logp_c, opts)
        lse[idx], logp[idx], w[idx] = z_y - logp_c, logp_c, w_c
        if any_grad:
            g = grad_factor(grad_scale, w_c, token_weights, idx)
            # da = g * (onehot - p) (* (1 - t^2)) = -(g / sum) * E' with E' = E off the target and
            # E'[t, y_t] = -rest_t, since g * (1 - p_y) = g * rest / sum: no separate one-hot pass or index_add_.
            E.scatter_(1, y[:, None], -rest[:, None])
            ch.grads_(E, h, idx, g / ssum, deriv, *grads)
        del E, deriv  # free this chunk's logits before the next chunk's are formed (oneDNN allocates them)
    return logp, lse, w, (grads if fused else None)


def linear_logprobs_backward_torch(hidden, lm_head, bias, labels, lse, logp, g, opts, *, needs=(True, True, True)):
    """Same contract as ``linear_logprobs_backward_triton``: recompute each chunk's logits, p = exp(z - lse)."""
    ch = _Chunker(hidden, lm_head, bias, labels, opts)
    grads = _grad_buffers(hidden, lm_head, bias, needs, ch.acc)
    if all(t is None for t in grads):
        return grads
    for idx, h, y in ch:
        # the target column is replaced below; without softcap nothing reads it before (its derivative does)
        z, _, deriv = ch.logits_(h, y, want_deriv=True, exact_target=ch.cap is not None)
        lse_c = lse[idx].to(ch.acc)
        z.sub_(lse_c[:, None]).exp_()
        # da = -g * p', p' = p off the target and p'_y = -(1 - p_y) = expm1(log p) from the forward's log p
        # (exp(z_y - lse) would carry lse's float32 rounding times p_y / (1 - p_y)).
        z.scatter_(1, y[:, None], torch.expm1(logp[idx].to(ch.acc))[:, None])
        ch.grads_(z, h, idx, g[idx].to(ch.acc), deriv, *grads)
        del z, deriv  # free this chunk's logits before the next chunk's are formed (oneDNN allocates them)
    return _cast_grads(grads, hidden, lm_head, bias)
