"""Token log-likelihoods from a logits matrix, with fused detached importance weights.

Two public ops share one Triton kernel pair (``fastweight.kernels.token_logprobs``) and one torch path:

* ``token_logprobs(logits, labels)`` -> ``logp [N]`` float32, differentiable; backward forms
  ``g_t * (onehot - softmax)`` row by row from the saved ``lse``.
* ``weighted_logprobs(logits, labels, beta1, beta2, reduction)`` -> ``reduce(sg[w_t] * logp_t)`` with
  ``w_t = p_t**beta1 * (1 - p_t)**beta2``. For "mean"/"sum" the per-row coefficient is known in the
  forward, so the gradient is written during the forward (optionally into the logits buffer) and the
  backward only rescales it by the upstream scalar.

Neither path ever holds a full ``[N, V]`` float32 probability tensor: Triton works tile by tile, the
torch path chunk by chunk over rows (``TORCH_CHUNK_ELEMENTS`` float32 elements at a time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastweight._constants import IGNORE_INDEX, Reduction
from fastweight.ops._common import (
    acc_dtype, check_finite, check_labels, check_token_weights, check_weight_options, flush_subnormal_,
    flush_subnormal_rows_, importance_weight_torch, resolve_backend, row_chunks, signature_of,
)

# ---------------------------------------------------------------------------------------------------------
# Tuning. BLOCK_V: 4096 fp32 / 8192 16-bit elements per tile keeps 16 KiB of a row in registers across
# 8 warps (16 values per thread) — large enough to saturate HBM, small enough not to spill on sm_80/sm_90.
# TORCH_CHUNK_ELEMENTS: 4 Mi float32 (16 MiB) per row chunk on the torch path fits in L2/L3-sized working
# sets on CPUs and bounds the extra memory to a few chunk copies whatever N * V is.
BLOCK_V_MAX = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}
NUM_WARPS = 8
TORCH_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TokenLogprobsOptions:
    """Every non-tensor option of the token-logprob ops.

    ignore_index: label value of rows excluded everywhere (logp 0, weight 0, gradient 0).
    beta1, beta2: exponents of the detached weight ``p**beta1 * (1 - p)**beta2``; (0, 0) means w = 1.
    weighted: compute weights at all (False for plain ``token_logprobs``).
    reduction: "none" | "mean" | "sum" of ``w * logp``; "mean" divides by the number of valid rows.
    inplace_backward: allow the gradient to be written into the caller's logits buffer (the logits
        values are destroyed; only use when nothing else reads them afterwards). Saves one [N, V] buffer.
    backend: "auto" | "triton" | "torch".
    check_finite: scan the logits for NaN/inf first (one extra pass and a host sync).
    """

    ignore_index: int = IGNORE_INDEX
    beta1: float = 0.0
    beta2: float = 0.0
    weighted: bool = False
    reduction: Reduction = "none"
    inplace_backward: bool = False
    backend: str | None = "auto"
    check_finite: bool = False

    def __post_init__(self) -> None:
        check_weight_options(self.beta1, self.beta2, self.reduction, self.ignore_index)


def validate(logits: torch.Tensor, labels: torch.Tensor, opts: TokenLogprobsOptions) -> None:
    """logits [N, V] float, labels [N] int on the same device with values in range."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V] here, got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    check_labels(labels, logits.shape[:1], logits.device, logits.shape[1], opts.ignore_index)
    if opts.check_finite:
        check_finite("logits", logits)


# ---------------------------------------------------------------------------------------------------------
# Triton path
def _launch_args(logits: torch.Tensor, labels: torch.Tensor, opts: TokenLogprobsOptions, *,
                 compute_grad: bool, kernel: str = "fwd", token_weights: torch.Tensor | None = None,
                 ) -> dict[str, Any]:
    """Grid, kernel arguments and constexprs for one launch; the compile test calls this too.

    Returns {"grid", "args", "constexprs", "num_warps", "outputs"}. ``kernel`` is "fwd" or "bwd".
    """
    N, V = logits.shape
    dev = logits.device
    block_v = min(BLOCK_V_MAX[logits.dtype], max(16, 1 << (V - 1).bit_length()))
    if kernel == "fwd":
        logp = torch.empty(N, dtype=torch.float32, device=dev)
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        w = torch.empty(N, dtype=torch.float32, device=dev)
        if compute_grad:
            grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        else:
            grad = logits  # never written: COMPUTE_GRAD is False
        grad_scale = torch.ones(1, dtype=torch.float32, device=dev)
        # No token weights: one 1.0 read with stride 0 (a runtime stride, not a constexpr: one build either way).
        tw = token_weights if token_weights is not None else torch.ones(1, dtype=torch.float32, device=dev)
        args = dict(
            logits_ptr=logits, stride_logits_n=logits.stride(0), labels_ptr=labels,
            logp_ptr=logp, lse_ptr=lse, weight_ptr=w, grad_ptr=grad, stride_grad_n=grad.stride(0),
            grad_scale_ptr=grad_scale, token_weights_ptr=tw, stride_token_weights=int(token_weights is not None),
            V=V, ignore_index=opts.ignore_index,
            beta1=float(opts.beta1), beta2=float(opts.beta2),
        )
        constexprs = dict(HAS_WEIGHTS=opts.weighted, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v)
        outputs = dict(logp=logp, lse=lse, weight=w, grad=grad if compute_grad else None, grad_scale=grad_scale)
    elif kernel == "bwd":
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        g = torch.empty(N, dtype=torch.float32, device=dev)
        grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        args = dict(
            logits_ptr=logits, stride_logits_n=logits.stride(0), labels_ptr=labels, lse_ptr=lse, g_ptr=g,
            grad_ptr=grad, stride_grad_n=grad.stride(0), V=V, ignore_index=opts.ignore_index,
        )
        constexprs = dict(BLOCK_V=block_v)
        outputs = dict(lse=lse, g=g, grad=grad)
    else:
        raise ValueError(f"kernel must be 'fwd' or 'bwd', got {kernel!r}")
    return dict(grid=(N,), args=args, constexprs=constexprs, num_warps=NUM_WARPS, outputs=outputs,
                signature=signature_of(args, constexprs))


def token_logprobs_forward_triton(logits, labels, opts, *, grad_scale=None, token_weights=None):
    """Triton forward. Returns (logp [N] f32, lse [N] f32, w [N] f32, grad [N, V] or None).

    ``grad_scale``: 0-d/1-element float32 tensor; when given, the gradient of ``sum_t grad_scale * w_t *
    c_t * logp_t`` is written during the forward, c = ``token_weights`` [N] float32 (contiguous) or 1.
    """
    from fastweight.kernels.token_logprobs import _token_logprobs_fwd

    compute_grad = grad_scale is not None
    la = _launch_args(logits, labels, opts, compute_grad=compute_grad, kernel="fwd", token_weights=token_weights)
    out = la["outputs"]
    if compute_grad:
        out["grad_scale"].copy_(grad_scale.reshape(1))
    if logits.shape[0] > 0:
        _token_logprobs_fwd[la["grid"]](**la["args"], **la["constexprs"], num_warps=la["num_warps"])
    return out["logp"], out["lse"], out["weight"], out["grad"]


def token_logprobs_backward_triton(logits, labels, lse, g, opts):
    """Triton backward: grad [N, V] (logits dtype) = g_t * (onehot - softmax) with g [N] float32."""
    from fastweight.kernels.token_logprobs import _token_logprobs_bwd

    la = _launch_args(logits, labels, opts, compute_grad=True, kernel="bwd")
    args = dict(la["args"], lse_ptr=lse.contiguous(), g_ptr=g.float().contiguous())
    if logits.shape[0] > 0:
        _token_logprobs_bwd[la["grid"]](**args, **la["constexprs"], num_warps=la["num_warps"])
    return la["outputs"]["grad"]


def aot_cases() -> list[dict[str, Any]]:
    """Every kernel x dtype x constexpr combination ``_launch_args`` emits, for tests/test_compile_aot.py.

    Built from ``_launch_args`` on 'meta' tensors (no memory, no device), so the signature is the one the
    launchers use. fwd: HAS_WEIGHTS x COMPUTE_GRAD at the dtype's largest BLOCK_V; bwd at the largest
    BLOCK_V; the fused-gradient forward with caller token weights (stride 1) per dtype; plus a small BLOCK_V
    (V = 1000) with int32 labels, the other values a launch can see.
    """
    from fastweight.kernels import token_logprobs as k

    def case(name, fn, logits, labels, opts, **kw):
        la = _launch_args(logits, labels, opts, **kw)
        return dict(name=name, fn=fn, signature=la["signature"], constexprs=la["constexprs"],
                    num_warps=la["num_warps"])

    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).replace("torch.", "")
        V = BLOCK_V_MAX[dtype] * 4 + 1  # several tiles and a ragged last one: BLOCK_V = BLOCK_V_MAX
        logits = torch.empty(2, V, dtype=dtype, device="meta")
        labels = torch.empty(2, dtype=torch.int64, device="meta")
        for weighted in (False, True):
            for compute_grad in (False, True):
                opts = TokenLogprobsOptions(weighted=weighted, reduction="mean" if compute_grad else "none")
                cases.append(case(f"token_logprobs_fwd_{tag}_w{int(weighted)}_g{int(compute_grad)}",
                                  k._token_logprobs_fwd, logits, labels, opts, compute_grad=compute_grad))
        cases.append(case(f"token_logprobs_bwd_{tag}", k._token_logprobs_bwd, logits, labels,
                          TokenLogprobsOptions(), compute_grad=True, kernel="bwd"))
        # Caller token weights: a real [N] vector (stride 1, which the launch binder specialises) instead of the
        # stride-0 one-element 1.0: a separate build of the fused-gradient forward.
        cases.append(case(f"token_logprobs_fwd_{tag}_w1_g1_tokw", k._token_logprobs_fwd, logits, labels,
                          TokenLogprobsOptions(weighted=True, reduction="mean"), compute_grad=True,
                          token_weights=torch.empty(2, dtype=torch.float32, device="meta")))
    # The small-tile / int32-label variants differ only in BLOCK_V and the label pointer type: one dtype.
    small = torch.empty(3, 1000, dtype=torch.bfloat16, device="meta")
    labels32 = torch.empty(3, dtype=torch.int32, device="meta")
    cases.append(case("token_logprobs_fwd_bfloat16_V1000_i32", k._token_logprobs_fwd, small, labels32,
                      TokenLogprobsOptions(weighted=True, reduction="sum"), compute_grad=True))
    cases.append(case("token_logprobs_bwd_bfloat16_V1000_i32", k._token_logprobs_bwd, small, labels32,
                      TokenLogprobsOptions(), compute_grad=True, kernel="bwd"))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Torch path (CPU and anything without Triton): chunks of rows, float32 (float64 for float64 input).
def _row_grad_(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
               g: torch.Tensor, z_min: torch.Tensor) -> torch.Tensor:
    """g * (onehot - softmax) for a chunk; z is a float32 copy that is overwritten. Ignored rows are zero
    whatever their logits (a NaN or all -inf row would otherwise give NaN = 0 * NaN). ``z_min [c]`` is the
    row minimum of z: rows whose smallest ``g * p`` could be subnormal are flushed (``flush_subnormal_rows_``)."""
    p = flush_subnormal_rows_(z.sub_(lse[:, None]).exp_(), -g, z_min - lse)
    idx = torch.where(valid, labels, 0)[:, None]
    p.scatter_add_(1, idx, torch.where(valid, g, 0)[:, None].to(p.dtype))
    p.scatter_(1, idx, flush_subnormal_(p.gather(1, idx)))  # g (1 - p_y): c values
    return p.masked_fill_(~valid[:, None], 0.0)


def token_logprobs_forward_torch(logits, labels, opts, *, grad_scale=None, token_weights=None):
    """Same contract as ``token_logprobs_forward_triton`` (float64 outputs for float64 logits)."""
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    logp = torch.empty(N, dtype=acc, device=logits.device)
    lse = torch.empty(N, dtype=acc, device=logits.device)
    grad = None
    if grad_scale is not None:
        grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
    w_all = torch.empty(N, dtype=acc, device=logits.device)
    for s, e in row_chunks(N, V, TORCH_CHUNK_ELEMENTS):
        z = logits[s:e].to(acc, copy=True)
        y = labels[s:e]
        valid = y != opts.ignore_index
        idx = torch.where(valid, y, 0)[:, None]
        # Same numerics as the kernel (tl_row_lse_logp): shift by the row max, and for p > 1/2 form
        # log p = -log1p(sum_{v != y} exp(z_v - z_y)) so confident rows keep relative precision
        # (z_y - lse has eps * |lse| absolute error, all of log p when p -> 1).
        z_min, m = torch.aminmax(z, dim=-1, keepdim=True)  # one pass; z_min bounds the gradient's entries
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf row: lse = -inf, not NaN
        z.sub_(m)
        z_y = z.gather(1, idx)
        z.scatter_(1, idx, float("-inf"))
        log_s_rest = torch.logsumexp(z, dim=-1)
        z.scatter_(1, idx, z_y)  # restore: z is reused for the gradient below
        z_y = z_y.squeeze(1)
        log_s = torch.logaddexp(log_s_rest, z_y)
        lse_c = m.squeeze(1) + log_s
        log_ratio = log_s_rest - z_y  # log((1 - p) / p)
        logp_c = torch.where(log_ratio < 0, -torch.log1p(torch.exp(log_ratio.clamp(max=0))), z_y - log_s)
        logp_c = torch.where(valid, logp_c, 0.0)
        if opts.weighted:
            w = torch.where(valid, importance_weight_torch(logp_c, opts.beta1, opts.beta2), 0.0)
        else:
            w = valid.to(acc)
        logp[s:e], lse[s:e], w_all[s:e] = logp_c, lse_c, w
        if grad is not None:
            g = (grad_scale.to(acc) * w)
            if token_weights is not None:
                g = g * token_weights[s:e].to(acc)
            grad[s:e] = _row_grad_(z, log_s, y, valid, g, (z_min - m).squeeze(1)).to(grad.dtype)  # z is z - m
    return logp, lse, w_all, grad


def token_logprobs_backward_torch(logits, labels, lse, g, opts):
    """Same contract as ``token_logprobs_backward_triton``."""
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
    for s, e in row_chunks(N, V, TORCH_CHUNK_ELEMENTS):
        y = labels[s:e]
        valid = y != opts.ignore_index
        z = logits[s:e].to(acc, copy=True)
        gc = torch.where(valid, g[s:e].to(acc), 0.0)
        grad[s:e] = _row_grad_(z, lse[s:e].to(acc), y, valid, gc, z.amin(1)).to(grad.dtype)
    return grad


_FORWARD = {"triton": token_logprobs_forward_triton, "torch": token_logprobs_forward_torch}
_BACKWARD = {"triton": token_logprobs_backward_triton, "torch": token_logprobs_backward_torch}


# ---------------------------------------------------------------------------------------------------------
# Autograd
class TokenLogprobsFunction(torch.autograd.Function):
    """logits [N, V], labels [N] -> (logp [N] f32, lse [N] f32); lse is not differentiable."""

    @staticmethod
    def forward(ctx, logits, labels, opts: TokenLogprobsOptions, backend: str):
        logp, lse, _, _ = _FORWARD[backend](logits, labels, opts)
        ctx.save_for_backward(logits, labels, lse)
        ctx.opts, ctx.backend = opts, backend
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, g_logp, _g_lse):
        logits, labels, lse = ctx.saved_tensors
        if g_logp is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad = _BACKWARD[ctx.backend](logits, labels, lse, g_logp.to(lse.dtype), ctx.opts)
        return grad, None, None, None


class WeightedLogprobsFunction(torch.autograd.Function):
    """logits [N, V], labels [N], token weights c [N] | None -> (reduce(c * sg[w] * logp), w [N] f32
    non-differentiable)."""

    @staticmethod
    def forward(ctx, logits, labels, token_weights, opts: TokenLogprobsOptions, backend: str, want_grad: bool):
        # want_grad comes from the caller: inside forward grad mode is always off and needs_input_grad is
        # True under torch.no_grad() too, which would compute (and, in place, write) a gradient nobody uses.
        ctx.opts, ctx.backend = opts, backend
        fused = opts.reduction != "none" and want_grad
        grad_scale = None
        if fused:
            n_valid = (labels != opts.ignore_index).sum()
            # float64 logits (torch path) keep a float64 coefficient; the kernels read float32.
            coef_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            if opts.reduction == "mean":
                grad_scale = 1.0 / n_valid.clamp(min=1).to(coef_dtype)
            else:
                grad_scale = torch.ones((), dtype=coef_dtype, device=logits.device)
        logp, lse, w, grad = _FORWARD[backend](logits, labels, opts, grad_scale=grad_scale,
                                                token_weights=token_weights)
        cw = w if token_weights is None else w * token_weights  # c_t * w_t: the per-row coefficient
        per_token = cw * logp
        if opts.reduction == "none":
            out = per_token
            ctx.save_for_backward(logits, labels, lse, cw)
        else:
            out = per_token.sum()
            if opts.reduction == "mean":
                out = out / (labels != opts.ignore_index).sum().clamp(min=1)
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(w)
        return out, w

    @staticmethod
    def backward(ctx, g_out, _g_w):
        opts = ctx.opts
        if g_out is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        if opts.reduction == "none":
            logits, labels, lse, w = ctx.saved_tensors
            grad = _BACKWARD[ctx.backend](logits, labels, lse, g_out.to(w.dtype) * w, opts)
            return grad, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("weighted_logprobs: the gradient was not formed in the forward (grad mode was off "
                               "or logits did not require grad then); recompute the loss with grad enabled")
        if not (g_out.numel() == 1 and torch.equal(g_out, torch.ones_like(g_out))):
            grad = grad * g_out.to(grad.dtype)
        return grad, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public functions (2-D inputs; the loss layer flattens [B, T, V] and applies the causal shift).
def _kernel_layout(logits: torch.Tensor, labels: torch.Tensor, backend: str):
    """The kernels index ``labels_ptr + row`` and ``row_ptr + v``: labels and each logits row must be
    unit-stride (a strided label view such as ``labels[::2]`` would otherwise be read wrongly). Row strides
    of logits are free. A copy is made only for such views; with ``inplace_backward`` the gradient then
    goes to the copy, never to unrelated memory."""
    if backend != "triton":
        return logits, labels
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, labels.contiguous()


def token_logprobs_2d(logits: torch.Tensor, labels: torch.Tensor, opts: TokenLogprobsOptions,
                      token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (fp32/bf16/fp16/fp64), labels [N] int -> (logp [N] f32, lse [N] f32).

    ``logp`` is differentiable w.r.t. ``logits``; ignored rows give logp = 0 and zero gradient.
    ``token_weights`` [N] float (detached; ``check_token_weights``): the op returns ``c_t * log p_t`` and its
    backward forms ``g_t * c_t * (onehot - softmax)`` from the same per-row kernel (an O(N) product, no
    [N, V] tensor). With weights of ones the result is bit for bit the unweighted one.
    """
    validate(logits, labels, opts)
    token_weights = check_token_weights(token_weights, labels, acc_dtype(logits.dtype), opts.ignore_index,
                                        opts.check_finite)
    backend = resolve_backend(opts.backend, logits)
    logits, labels = _kernel_layout(logits, labels, backend)
    logp, lse = TokenLogprobsFunction.apply(logits, labels, opts, backend)
    return (logp if token_weights is None else logp * token_weights), lse


def weighted_logprobs_2d(logits: torch.Tensor, labels: torch.Tensor, opts: TokenLogprobsOptions,
                         token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """reduce(c_t * sg[w_t] * logp_t) and the detached weights w [N] (0 on ignored rows; without c).

    Returns a 0-d float32 tensor for "mean"/"sum" ("mean" over valid rows, 0 when none is valid: rows of
    token weight 0 still count) or [N] float32 for "none". The gradient flows to ``logits`` only through
    ``logp``. ``token_weights`` c [N] float (detached, ``check_token_weights``) or None (c = 1); for
    "mean"/"sum" it enters the per-row coefficient the forward kernel already forms, g_t = scale w_t c_t.
    """
    validate(logits, labels, opts)
    token_weights = check_token_weights(token_weights, labels, acc_dtype(logits.dtype), opts.ignore_index,
                                        opts.check_finite)
    backend = resolve_backend(opts.backend, logits)
    logits, labels = _kernel_layout(logits, labels, backend)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    return WeightedLogprobsFunction.apply(logits, labels, token_weights, opts, backend, want_grad)

