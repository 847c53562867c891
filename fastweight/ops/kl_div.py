"""Row-wise ``KL(softmax(ref) || softmax(logits))`` from two logit matrices, never materialising a softmax.

``kl_div(logits [N, V], ref_logits [N, V], labels=None)`` -> ``kl [N]`` float32, differentiable w.r.t.
``logits`` only (the reference is a frozen target). Backward takes a per-row upstream gradient g [N] and
forms ``g_t * (softmax(z_t) - softmax(r_t))`` tile by tile (Triton) or chunk by chunk (torch) from the
two saved log-normalisers. With ``labels`` [N], ignored rows give KL 0 and zero gradient, and
``ref_shift`` is subtracted from the reference logit of the label (UNDIAL's target distribution).

Kernels: ``fastweight.kernels.kl_div`` (math, grid and bytes moved in its docstring).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.ops._common import (
    acc_dtype, check_finite, check_ignore_index, check_labels, check_ref_shift, resolve_backend, row_chunks,
    signature_of,
)

# ---------------------------------------------------------------------------------------------------------
# Tuning. Two rows (logits and reference) are live per tile, so BLOCK_V is half of token_logprobs' tile
# for fp32 (2 x 2048 fp32 = 16 KiB in registers across 8 warps, as there); 16-bit rows are converted to
# fp32 in registers, so 4096 keeps the same footprint. TORCH_CHUNK_ELEMENTS: 2 Mi fp32 elements per
# operand chunk on the torch path (about four chunk-sized temporaries live at once).
BLOCK_V_MAX = {torch.float32: 2048, torch.bfloat16: 4096, torch.float16: 4096}
NUM_WARPS = 8
TORCH_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class KLDivOptions:
    """Every non-tensor option of ``kl_div``.

    ref_shift: subtracted from the reference logit of each row's label before its softmax (needs labels;
        UNDIAL's beta). 0.0 for a plain KL.
    ignore_index: label value of rows excluded (KL 0, gradient 0) when labels are given.
    backend: "auto" | "triton" | "torch".
    check_finite: scan both inputs for NaN/inf first (one extra pass and a host sync).
    """

    ref_shift: float = 0.0
    ignore_index: int = IGNORE_INDEX
    backend: str | None = "auto"
    check_finite: bool = False

    def __post_init__(self) -> None:
        check_ref_shift(self.ref_shift)
        check_ignore_index(self.ignore_index)


def validate(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor | None,
             opts: KLDivOptions) -> None:
    """logits and ref_logits [N, V] float on one device; labels None or [N] int in range."""
    for name, t in (("logits", logits), ("ref_logits", ref_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2 or t.shape[1] == 0:
            raise ValueError(f"{name} must be 2-D [N, V] with V > 0, got shape {tuple(t.shape)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape {tuple(logits.shape)}")
    if ref_logits.device != logits.device:
        raise ValueError(f"ref_logits is on {ref_logits.device} but logits is on {logits.device}")
    if ref_logits.requires_grad:
        raise ValueError("ref_logits requires grad: the reference is a frozen target (compute it under "
                         "torch.no_grad() or pass ref_logits.detach())")
    if labels is None:
        if opts.ref_shift != 0:
            raise ValueError(f"ref_shift={opts.ref_shift} needs labels (the shift applies to each row's label)")
    else:
        check_labels(labels, logits.shape[:1], logits.device, logits.shape[1], opts.ignore_index)
    if opts.check_finite:
        check_finite("logits", logits)
        check_finite("ref_logits", ref_logits)


# ---------------------------------------------------------------------------------------------------------
# Triton path
def _launch_args(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor | None, opts: KLDivOptions,
                 *, kernel: str = "fwd") -> dict[str, Any]:
    """Grid, kernel arguments and constexprs for one launch; the compile test calls this too.

    Returns {"grid", "args", "constexprs", "num_warps", "outputs", "signature"}; ``kernel`` is "fwd" or "bwd".
    Without labels a 1-element dummy int64 tensor stands in for the labels pointer (never read).
    """
    N, V = logits.shape
    dev = logits.device
    block_v = min(BLOCK_V_MAX[logits.dtype], max(16, 1 << (V - 1).bit_length()))
    has_labels = labels is not None
    lab = labels if has_labels else torch.zeros(1, dtype=torch.int64, device=dev)
    common = dict(logits_ptr=logits, stride_logits_n=logits.stride(0), ref_ptr=ref_logits,
                  stride_ref_n=ref_logits.stride(0), labels_ptr=lab)
    scalars = dict(V=V, ignore_index=opts.ignore_index, ref_shift=float(opts.ref_shift))
    stats = torch.empty(N, 4, dtype=torch.float32, device=dev)
    if kernel == "fwd":
        kl = torch.empty(N, dtype=torch.float32, device=dev)
        args = dict(**common, kl_ptr=kl, stats_ptr=stats, **scalars)
        outputs = dict(kl=kl, stats=stats)
    elif kernel == "bwd":
        g = torch.empty(N, dtype=torch.float32, device=dev)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        args = dict(**common, stats_ptr=stats, g_ptr=g, grad_ptr=grad, stride_grad_n=grad.stride(0), **scalars)
        outputs = dict(stats=stats, g=g, grad=grad)
    else:
        raise ValueError(f"kernel must be 'fwd' or 'bwd', got {kernel!r}")
    constexprs = dict(HAS_LABELS=has_labels, BLOCK_V=block_v)
    return dict(grid=(N,), args=args, constexprs=constexprs, num_warps=NUM_WARPS, outputs=outputs,
                signature=signature_of(args, constexprs))


def kl_div_forward_triton(logits, ref_logits, labels, opts):
    """Triton forward: (kl [N] f32, stats [N, 4] f32 = (max z, log sum exp(z - max), same for ref))."""
    from fastweight.kernels.kl_div import _kl_div_fwd

    la = _launch_args(logits, ref_logits, labels, opts, kernel="fwd")
    if logits.shape[0] > 0:
        _kl_div_fwd[la["grid"]](**la["args"], **la["constexprs"], num_warps=la["num_warps"])
    out = la["outputs"]
    return out["kl"], out["stats"]


def kl_div_backward_triton(logits, ref_logits, labels, stats, g, opts):
    """Triton backward: grad [N, V] (logits dtype) = g_t * (softmax(z_t) - softmax(r_t))."""
    from fastweight.kernels.kl_div import _kl_div_bwd

    la = _launch_args(logits, ref_logits, labels, opts, kernel="bwd")
    args = dict(la["args"], stats_ptr=stats.contiguous(), g_ptr=g.float().contiguous())
    if logits.shape[0] > 0:
        _kl_div_bwd[la["grid"]](**args, **la["constexprs"], num_warps=la["num_warps"])
    return la["outputs"]["grad"]


def aot_cases() -> list[dict[str, Any]]:
    """Every kernel x dtype x constexpr combination ``_launch_args`` emits, for tests/test_compile_aot.py.

    Built on 'meta' tensors (no memory, no device): fwd and bwd x HAS_LABELS at the dtype's largest BLOCK_V,
    plus a small BLOCK_V (V = 1000) with labels.
    """
    from fastweight.kernels import kl_div as k

    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).replace("torch.", "")
        for V, label_options in ((BLOCK_V_MAX[dtype] * 4 + 1, (False, True)), (1000, (True,))):
            z = torch.empty(2, V, dtype=dtype, device="meta")
            for has_labels in label_options:
                labels = torch.empty(2, dtype=torch.int64, device="meta") if has_labels else None
                for kernel, fn in (("fwd", k._kl_div_fwd), ("bwd", k._kl_div_bwd)):
                    la = _launch_args(z, z, labels, KLDivOptions(), kernel=kernel)
                    cases.append(dict(name=f"kl_div_{kernel}_{tag}_labels{int(has_labels)}_V{V}", fn=fn,
                                      signature=la["signature"], constexprs=la["constexprs"],
                                      num_warps=la["num_warps"]))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Torch path (CPU and anything without Triton): chunks of rows, float32 (float64 for float64 input).
def _ref_chunk(ref_logits, labels, s, e, acc, opts):
    """Reference logits of rows [s, e) as an ``acc`` copy, label logit lowered by ref_shift; and validity."""
    r = ref_logits[s:e].to(acc, copy=True)
    if labels is None:
        return r, None
    y = labels[s:e]
    valid = y != opts.ignore_index
    if opts.ref_shift != 0:
        shift = torch.where(valid, -float(opts.ref_shift), 0.0).to(acc)[:, None]
        r.scatter_add_(1, torch.where(valid, y, 0)[:, None], shift)
    return r, valid


def _split_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, log sum exp(x - max)) per row: x - max is exact, so large logits keep full precision."""
    m = x.amax(-1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return m, torch.logsumexp(x - m[:, None], -1)


def kl_div_forward_torch(logits, ref_logits, labels, opts):
    """Same contract as ``kl_div_forward_triton`` (float64 outputs for float64 logits)."""
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    kl = torch.empty(N, dtype=acc, device=logits.device)
    stats = torch.empty(N, 4, dtype=acc, device=logits.device)
    for s, e in row_chunks(N, V, TORCH_CHUNK_ELEMENTS):
        z = logits[s:e].to(acc)
        r, valid = _ref_chunk(ref_logits, labels, s, e, acc, opts)
        m, ls = _split_lse(z)
        m_r, ls_r = _split_lse(r)
        log_q = (r - m_r[:, None]) - ls_r[:, None]
        log_p = (z - m[:, None]) - ls[:, None]
        q = log_q.exp()
        # q * (log q - log p), with 0 where q == 0 (no 0 * inf).
        term = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)
        kl[s:e] = term if valid is None else torch.where(valid, term, 0.0)
        stats[s:e] = torch.stack([m, ls, m_r, ls_r], -1)
    return kl, stats


def kl_div_backward_torch(logits, ref_logits, labels, stats, g, opts):
    """Same contract as ``kl_div_backward_triton``."""
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    st = stats.to(acc)
    for s, e in row_chunks(N, V, TORCH_CHUNK_ELEMENTS):
        r, valid = _ref_chunk(ref_logits, labels, s, e, acc, opts)
        gc = g[s:e].to(acc) if valid is None else torch.where(valid, g[s:e].to(acc), 0.0)
        m, ls, m_r, ls_r = (st[s:e, i, None] for i in range(4))
        p = logits[s:e].to(acc, copy=True).sub_(m).sub_(ls).exp_()
        p.sub_(r.sub_(m_r).sub_(ls_r).exp_()).mul_(gc[:, None])
        if valid is not None:  # ignored rows are zero even when their logits hold NaN / inf (0 * NaN = NaN)
            p.masked_fill_(~valid[:, None], 0.0)
        grad[s:e] = p.to(grad.dtype)
    return grad


_FORWARD = {"triton": kl_div_forward_triton, "torch": kl_div_forward_torch}
_BACKWARD = {"triton": kl_div_backward_triton, "torch": kl_div_backward_torch}


# ---------------------------------------------------------------------------------------------------------
# Autograd
class KLDivFunction(torch.autograd.Function):
    """logits [N, V], ref_logits [N, V], labels [N] or None -> kl [N] f32 (gradient to logits only)."""

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, opts: KLDivOptions, backend: str):
        kl, stats = _FORWARD[backend](logits, ref_logits, labels, opts)
        ctx.save_for_backward(logits, ref_logits, labels, stats)
        ctx.opts, ctx.backend = opts, backend
        return kl

    @staticmethod
    def backward(ctx, g_kl):
        logits, ref_logits, labels, stats = ctx.saved_tensors
        if g_kl is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        # The torch path casts g to its accumulation dtype (float64 stays float64); Triton reads float32.
        g = g_kl.float() if ctx.backend == "triton" else g_kl
        grad = _BACKWARD[ctx.backend](logits, ref_logits, labels, stats, g, ctx.opts)
        return grad, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public function (2-D inputs; the loss layer flattens [B, T, V] and applies the causal shift).
def kl_div(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
           ref_shift: float = 0.0, ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
           check_finite: bool = False) -> torch.Tensor:
    """Per-row ``KL(softmax(ref_logits) || softmax(logits))`` [N] float32 (float64 for float64 input).

    logits: [N, V] fp32/bf16/fp16 (fp64 on the torch backend), differentiable.
    ref_logits: [N, V] same shape and device, must not require grad (a frozen target; any float dtype).
    labels: optional [N] int: rows with ``ignore_index`` give 0 and zero gradient; ``ref_shift`` lowers the
        reference logit of each valid row's label before its softmax (UNDIAL). Without labels every row counts.
    The gradient w.r.t. logits is ``g_t * (softmax(logits_t) - softmax(ref_t))``; no [N, V] probability
    tensor is ever built (Triton: tiles; torch: row chunks of ``TORCH_CHUNK_ELEMENTS``).
    """
    opts = KLDivOptions(ref_shift=ref_shift, ignore_index=ignore_index, backend=backend, check_finite=check_finite)
    validate(logits, ref_logits, labels, opts)
    # The kernels read unit-stride rows; other row strides are kept.
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    ref_logits = ref_logits if ref_logits.stride(-1) == 1 else ref_logits.contiguous()
    tensors = (logits, ref_logits) if labels is None else (logits, ref_logits, labels)
    backend = resolve_backend(opts.backend, *tensors)
    return KLDivFunction.apply(logits, ref_logits, labels, opts, backend)
