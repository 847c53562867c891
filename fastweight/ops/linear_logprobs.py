"""Token log-likelihoods straight from hidden states and the output projection (fused linear; no logits).

Twin of ``fastweight.ops.token_logprobs`` for the input ``hidden [N, H]``, ``lm_head [V, H]`` (optional
``bias [V]``, Gemma-2 ``softcap`` and ``logit_scale`` s, as Cohere's ``logit_scale`` or Granite's
``1 / logits_scaling``): ``z = softcap * tanh(s * (hidden @ lm_head.T + bias) / softcap)``.

* ``linear_token_logprobs_2d`` -> ``(logp [N], lse [N])``; backward recomputes the logits block by block.
* ``linear_weighted_logprobs_2d`` -> ``(reduce(sg[w_t] * logp_t), w [N])``. For "mean"/"sum" the per-row
  coefficient ``g_t = scale * w_t`` is known in the forward (weights are detached), so the forward also
  produces d hidden / d lm_head / d bias and the backward only rescales them by the upstream scalar.

Torch path (CPU, and anything without Triton): ``fastweight.ops._linear_chunks``.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from fastweight._constants import IGNORE_INDEX, Reduction
from fastweight.ops._common import (
    acc_dtype, autocast_cast, check_finite, check_float_tensor, check_labels, check_logit_scale,
    check_token_weights, check_weight_options, launch_kernel, no_autocast, resolve_backend, signature_of,
    triton_interpret,
)
from fastweight.ops._linear_blocks import (
    blocked_workers, linear_logprobs_backward_blocked, linear_logprobs_forward_blocked,
)
from fastweight.ops._linear_chunks import (
    TORCH_CHUNK_ELEMENTS, _cast_grads, linear_logprobs_backward_torch, linear_logprobs_forward_torch,
)

# ---------------------------------------------------------------------------------------------------------
# Tuning (Triton): one tile config per (input dtype, kernel), chosen from `cuobjdump -res-usage` of the
# launch-specialised builds for sm_80 and sm_90 (tests/test_compile_aot.py, docs/performance.md), none spills.
# 16-bit: 64 x 128 logits tile (32 float32 values per thread at 8 warps) fed to the tensor cores with 64-wide
# H steps. float32 ("ieee" tl.dot runs on the FMA units, whose operands live in registers): the 64 x 128 /
# BLOCK_H 32 tile needed 255 registers plus 8-48 B (forward) and ~2 KB (backward) of spill per thread; a
# 64 x 64 tile with 16-wide H steps needs <= 184 registers and none in the forward; the backward spilled
# 16-24 B in some bias / softcap variants with 2 pipeline stages (ptxas settles at 128 registers) and none,
# at <= 156 registers, with 1.
@dataclass(frozen=True)
class TileConfig:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int = 8
    num_stages: int = 3
    maxnreg: int | None = None  # ptxas register ceiling (None: ptxas picks, sometimes 128 plus a small spill)


_TILES_16 = {"fwd": TileConfig(64, 128, 64), "bwd": TileConfig(64, 128, 64)}
TILES = {
    torch.float32: {"fwd": TileConfig(64, 64, 16, 8, 3), "bwd": TileConfig(64, 64, 16, 8, 1)},
    torch.bfloat16: _TILES_16,
    torch.float16: _TILES_16,
}
FWD_PROGRAMS = 512
FINALIZE_BLOCK_N = 128
FINALIZE_NUM_WARPS = 4
@dataclass(frozen=True)
class LinearLogprobsOptions:
    """Every non-tensor option of the fused-linear ops.

    ignore_index: label value of rows excluded everywhere (logp 0, weight 0, gradient 0, lse 0 on torch).
    beta1, beta2: exponents of the detached weight ``p**beta1 * (1 - p)**beta2``; (0, 0) means w = 1.
    weighted: compute weights at all (False for plain token log-probs / GA).
    reduction: "none" | "mean" | "sum" of ``w * logp``; "mean" divides by the number of valid rows.
    softcap: final-logit soft-capping constant (> 0) or None.
    logit_scale: positive finite s multiplying the projection before soft-capping (1.0: none). Both paths
        fold it into the per-row gradient coefficient; the torch path scales each [c, H] hidden chunk (the
        float32 products when CUDA operands stay 16-bit).
    backend: "auto" | "triton" | "torch".
    check_finite: scan hidden / lm_head / bias for NaN/inf first (one extra pass and a host sync).
    chunk_elements: torch path, float32 elements of the [c, V] chunk buffer (c = chunk_elements // V, >= 1).
    """

    ignore_index: int = IGNORE_INDEX
    beta1: float = 0.0
    beta2: float = 0.0
    weighted: bool = False
    reduction: Reduction = "none"
    softcap: float | None = None
    backend: str | None = "auto"
    check_finite: bool = False
    chunk_elements: int = TORCH_CHUNK_ELEMENTS
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        check_weight_options(self.beta1, self.beta2, self.reduction, self.ignore_index)
        if self.softcap is not None and (isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float))
                                         or not math.isfinite(self.softcap) or self.softcap <= 0):
            raise ValueError(f"softcap must be a positive finite number or None, got {self.softcap!r}")
        check_logit_scale("logit_scale", self.logit_scale)
        if isinstance(self.chunk_elements, bool) or not isinstance(self.chunk_elements, int) or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {self.chunk_elements!r}")


def validate(hidden, lm_head, bias, labels, opts: LinearLogprobsOptions) -> None:
    """hidden [N, H], lm_head [V, H] of the same float dtype, bias [V] or None, labels [N] in range."""
    check_float_tensor("hidden", hidden, min_dim=2)
    check_float_tensor("lm_head", lm_head, min_dim=2)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H] here, got shape {tuple(hidden.shape)}")
    if lm_head.dim() != 2 or lm_head.shape[1] != hidden.shape[1]:
        raise ValueError(f"lm_head must be [V, H] with H = {hidden.shape[1]}, got shape {tuple(lm_head.shape)}")
    if lm_head.shape[0] == 0:
        raise ValueError("lm_head has an empty vocabulary dimension (V = 0)")
    if lm_head.dtype != hidden.dtype:
        raise TypeError(f"lm_head dtype {lm_head.dtype} must match hidden dtype {hidden.dtype}")
    if lm_head.device != hidden.device:
        raise ValueError(f"lm_head is on {lm_head.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.shape != lm_head.shape[:1]:
            raise ValueError(f"bias must be [V] = [{lm_head.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias must have the dtype and device of hidden ({hidden.dtype}, {hidden.device}), "
                            f"got {bias.dtype} on {bias.device}")
    check_labels(labels, hidden.shape[:1], hidden.device, lm_head.shape[0], opts.ignore_index)
    if opts.check_finite:
        for name, t in (("hidden", hidden), ("lm_head", lm_head), ("bias", bias)):
            if t is not None:
                check_finite(name, t)


# ---------------------------------------------------------------------------------------------------------
# Triton path
def _launch_args(hidden, lm_head, bias, labels, opts: LinearLogprobsOptions, *, kernel: str = "fwd",
                 compute_dh: bool = True, compute_dw: bool = True) -> dict[str, Any]:
    """Grid, kernel arguments and constexprs for one launch; the compile test calls this too.

    ``kernel``: "fwd" | "finalize" | "bwd". Returns {"grid", "args", "constexprs", "num_warps", "num_stages",
    "maxnreg", "outputs", "signature"}; "outputs" holds the buffers the launch writes (float32). Launch with
    ``launch_kernel`` so every launch option comes from here.
    """
    N, H = hidden.shape
    V = lm_head.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    tile = TILES[hidden.dtype]["bwd" if kernel == "bwd" else "fwd"]
    common = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, BLOCK_N=tile.BLOCK_N,
                  BLOCK_V=tile.BLOCK_V, BLOCK_H=tile.BLOCK_H,
                  DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
                  UPCAST_DOT=hidden.dtype == torch.bfloat16 and triton_interpret())
    softcap = float(opts.softcap) if opts.softcap is not None else 1.0
    bias_arg = bias if bias is not None else lm_head  # never read when HAS_BIAS is False
    n_blocks = triton_cdiv(N, tile.BLOCK_N)
    num_warps, num_stages = tile.num_warps, tile.num_stages
    if kernel == "fwd":
        v_tiles = triton_cdiv(V, tile.BLOCK_V)
        splits = max(1, min(v_tiles, FWD_PROGRAMS // max(n_blocks, 1)))
        v_per_split = triton_cdiv(v_tiles, splits) * tile.BLOCK_V
        splits = triton_cdiv(V, v_per_split)  # every split owns >= 1 real column
        part_max = torch.empty(splits, N, **f32)
        part_sum = torch.empty(splits, N, **f32)
        z_y = torch.zeros(N, **f32)
        args = dict(hidden_ptr=hidden, stride_hidden_n=hidden.stride(0), lm_head_ptr=lm_head,
                    stride_lm_head_v=lm_head.stride(0), bias_ptr=bias_arg, labels_ptr=labels,
                    part_max_ptr=part_max, part_sum_ptr=part_sum, z_y_ptr=z_y, N=N, V=V, H=H,
                    ignore_index=opts.ignore_index, softcap=softcap, logit_scale=float(opts.logit_scale),
                    v_per_split=v_per_split)
        grid, constexprs = (n_blocks, splits), common
        outputs = dict(part_max=part_max, part_sum=part_sum, z_y=z_y, splits=splits)
    elif kernel == "finalize":
        splits = 1
        part = torch.empty(splits, N, **f32)
        logp, lse, w = (torch.empty(N, **f32) for _ in range(3))
        args = dict(part_max_ptr=part, part_sum_ptr=part, stride_part_k=N, z_y_ptr=lse, labels_ptr=labels,
                    logp_ptr=logp, lse_ptr=lse, weight_ptr=w, N=N, num_splits=splits,
                    ignore_index=opts.ignore_index, beta1=float(opts.beta1), beta2=float(opts.beta2))
        grid = (triton_cdiv(N, FINALIZE_BLOCK_N),)
        constexprs = dict(HAS_WEIGHTS=opts.weighted, BLOCK_N=FINALIZE_BLOCK_N)
        num_warps, num_stages = FINALIZE_NUM_WARPS, None
        outputs = dict(logp=logp, lse=lse, weight=w)
    elif kernel == "bwd":
        lse, logp, g = torch.empty(N, **f32), torch.empty(N, **f32), torch.empty(N, **f32)
        dh = torch.zeros(N, H, **f32) if compute_dh else None
        dw = torch.zeros(V, H, **f32) if compute_dw else None
        db = torch.zeros(V, **f32) if compute_dw and bias is not None else None
        args = dict(hidden_ptr=hidden, stride_hidden_n=hidden.stride(0), lm_head_ptr=lm_head,
                    stride_lm_head_v=lm_head.stride(0), bias_ptr=bias_arg, labels_ptr=labels, lse_ptr=lse,
                    logp_ptr=logp, g_ptr=g, dh_ptr=dh if dh is not None else lse, stride_dh_n=H,
                    dw_ptr=dw if dw is not None else lse, stride_dw_v=H, db_ptr=db if db is not None else lse,
                    N=N, V=V, H=H, ignore_index=opts.ignore_index, softcap=softcap,
                    logit_scale=float(opts.logit_scale))
        grid = (n_blocks, triton_cdiv(V, tile.BLOCK_V))
        constexprs = dict(common, COMPUTE_DH=bool(compute_dh), COMPUTE_DW=bool(compute_dw))
        outputs = dict(lse=lse, logp=logp, g=g, dh=dh, dw=dw, db=db)
    else:
        raise ValueError(f"kernel must be 'fwd', 'finalize' or 'bwd', got {kernel!r}")
    return dict(grid=grid, args=args, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                maxnreg=tile.maxnreg if kernel != "finalize" else None, outputs=outputs,
                signature=signature_of(args, constexprs))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def aot_cases() -> list[dict[str, Any]]:
    """One compile case per kernel x dtype x constexpr combination ``_launch_args`` can emit.

    Built on 'meta' tensors with odd sizes (H = 5, V = 7). The backward's COMPUTE_DH / COMPUTE_DW pairs
    (1, 0) and (0, 1) drop one of the two gradient loops of the (1, 1) build, so they are compiled for the
    heaviest variant (bias and softcap) only. ``odd=False`` marks cases that differ from an odd-size case only
    in constexpr flags; the compile test builds them at aligned sizes only.
    """
    from fastweight.kernels import linear_logprobs as k

    cases = []
    meta = dict(device="meta")
    labels = torch.zeros(3, dtype=torch.int64, **meta)

    def case(name, fn, la, odd=True):
        cases.append(dict(name=name, fn=fn, signature=la["signature"], constexprs=la["constexprs"],
                          num_warps=la["num_warps"], num_stages=la["num_stages"], odd=odd))

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        hidden, lm_head = torch.zeros(3, 5, dtype=dtype, **meta), torch.zeros(7, 5, dtype=dtype, **meta)
        for has_bias in (False, True):
            bias = torch.zeros(7, dtype=dtype, **meta) if has_bias else None
            for softcap in (None, 30.0):
                opts = LinearLogprobsOptions(softcap=softcap)
                tag = f"{dtype}".replace("torch.", "") + f"_bias{int(has_bias)}_cap{int(softcap is not None)}"
                plain = not has_bias and softcap is None
                case(f"linear_fwd_{tag}", k._linear_logprobs_fwd,
                     _launch_args(hidden, lm_head, bias, labels, opts, kernel="fwd"), plain)
                case(f"linear_bwd_{tag}", k._linear_logprobs_bwd,
                     _launch_args(hidden, lm_head, bias, labels, opts, kernel="bwd"), plain)
                if has_bias and softcap is not None:
                    for dh, dw in ((True, False), (False, True)):
                        la = _launch_args(hidden, lm_head, bias, labels, opts, kernel="bwd", compute_dh=dh,
                                          compute_dw=dw)
                        case(f"linear_bwd_{tag}_dh{int(dh)}_dw{int(dw)}", k._linear_logprobs_bwd, la, False)
    for weighted in (False, True):  # float32 partials whatever the input dtype
        la = _launch_args(torch.zeros(3, 5, **meta), torch.zeros(7, 5, **meta), None, labels,
                          LinearLogprobsOptions(weighted=weighted), kernel="finalize")
        case(f"linear_finalize_w{int(weighted)}", k._linear_logprobs_finalize, la)
    return cases


def linear_logprobs_forward_triton(hidden, lm_head, bias, labels, opts, *, grad_scale=None,
                                   needs=(True, True, True), token_weights=None):
    """Triton forward. Returns (logp [N] f32, lse [N] f32, w [N] f32, grads).

    ``grad_scale``: 0-d float32 tensor or None. When given, ``grads`` = (d hidden, d lm_head, d bias) of
    ``sum_t grad_scale * w_t * c_t * logp_t`` (c = ``token_weights`` [N] or 1; None where ``needs`` is False)
    in float32 (float64 for float64 inputs; the caller scales by the upstream gradient and casts once), else
    ``grads`` is None.
    """
    from fastweight.kernels.linear_logprobs import _linear_logprobs_finalize, _linear_logprobs_fwd

    N = hidden.shape[0]
    la = _launch_args(hidden, lm_head, bias, labels, opts, kernel="fwd")
    fo = _launch_args(hidden, lm_head, bias, labels, opts, kernel="finalize")
    out = fo["outputs"]
    if N > 0:
        launch_kernel(_linear_logprobs_fwd, la)
        p = la["outputs"]
        launch_kernel(_linear_logprobs_finalize, fo, part_max_ptr=p["part_max"], part_sum_ptr=p["part_sum"],
                      z_y_ptr=p["z_y"], num_splits=p["splits"])
    grads = None
    if grad_scale is not None:
        g = grad_scale.to(torch.float32) * out["weight"]
        if token_weights is not None:
            g = g * token_weights.to(torch.float32)
        grads = linear_logprobs_backward_triton(hidden, lm_head, bias, labels, out["lse"], out["logp"], g, opts,
                                                needs=needs, cast=False)
    return out["logp"], out["lse"], out["weight"], grads


def linear_logprobs_backward_triton(hidden, lm_head, bias, labels, lse, logp, g, opts, *, needs=(True, True, True),
                                    cast=True):
    """(d hidden, d lm_head, d bias) in the input dtypes (None where not needed) for per-row coefficient g [N].

    ``lse`` gives the off-target probabilities exp(z - lse); the target column uses 1 - p_y = -expm1(logp)
    from the forward's ``logp`` (rounding lse = z_y - logp to float32 would cost p_y / (1 - p_y) ulps there).
    """
    from fastweight.kernels.linear_logprobs import _linear_logprobs_bwd

    need_dw = bool(needs[1] or (bias is not None and needs[2]))
    la = _launch_args(hidden, lm_head, bias, labels, opts, kernel="bwd", compute_dh=bool(needs[0]),
                      compute_dw=need_dw)
    out = la["outputs"]
    if hidden.shape[0] > 0 and (needs[0] or need_dw):
        launch_kernel(_linear_logprobs_bwd, la, lse_ptr=lse.float().contiguous(),
                      logp_ptr=logp.float().contiguous(), g_ptr=g.float().contiguous())
    grads = (out["dh"] if needs[0] else None, out["dw"] if needs[1] else None,
             out["db"] if bias is not None and needs[2] else None)
    return _cast_grads(grads, hidden, lm_head, bias) if cast else grads


def _forward_torch(hidden, lm_head, bias, labels, opts, **kwargs):
    """The torch path: vocabulary blocks on a thread each on a multi-core CPU (``_linear_blocks``), else
    chunks of rows with PyTorch's own ops (``_linear_chunks``)."""
    workers = blocked_workers(hidden, lm_head)
    if workers:
        return linear_logprobs_forward_blocked(hidden, lm_head, bias, labels, opts, workers=workers, **kwargs)
    return linear_logprobs_forward_torch(hidden, lm_head, bias, labels, opts, **kwargs)


def _backward_torch(hidden, lm_head, bias, labels, lse, logp, g, opts, **kwargs):
    """The torch path's backward, chosen as ``_forward_torch`` chooses."""
    workers = blocked_workers(hidden, lm_head)
    if workers:
        return linear_logprobs_backward_blocked(hidden, lm_head, bias, labels, lse, logp, g, opts,
                                                workers=workers, **kwargs)
    return linear_logprobs_backward_torch(hidden, lm_head, bias, labels, lse, logp, g, opts, **kwargs)


_FORWARD = {"triton": linear_logprobs_forward_triton, "torch": _forward_torch}
_BACKWARD = {"triton": linear_logprobs_backward_triton, "torch": _backward_torch}


# ---------------------------------------------------------------------------------------------------------
# Autograd
class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], lm_head [V, H], bias [V] | None, labels [N] -> (logp [N], lse [N] non-differentiable)."""

    @staticmethod
    def forward(ctx, hidden, lm_head, bias, labels, opts: LinearLogprobsOptions, backend: str):
        logp, lse, _, _ = _FORWARD[backend](hidden, lm_head, bias, labels, opts)
        ctx.save_for_backward(hidden, lm_head, bias, labels, lse, logp)
        ctx.opts, ctx.backend = opts, backend
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, g_logp, _g_lse):
        hidden, lm_head, bias, labels, lse, logp = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if g_logp is None or not any(needs):
            return None, None, None, None, None, None
        with no_autocast(hidden.device):  # backward may run inside the caller's autocast region
            dh, dW, db = _BACKWARD[ctx.backend](hidden, lm_head, bias, labels, lse, logp, g_logp, ctx.opts,
                                                needs=needs)
        return dh, dW, db, None, None, None


class LinearWeightedLogprobsFunction(torch.autograd.Function):
    """hidden, lm_head, bias, labels, token weights c | None -> (reduce(c * sg[w] * logp) / divisor,
    w [N] non-differentiable)."""

    @staticmethod
    def forward(ctx, hidden, lm_head, bias, labels, token_weights, divisor, opts: LinearLogprobsOptions,
                backend: str, grad_enabled: bool):
        ctx.opts, ctx.backend = opts, backend
        # needs_input_grad is True under torch.no_grad() too; do not pay 2 GEMMs for a graph never built.
        needs = tuple(bool(n and grad_enabled) for n in ctx.needs_input_grad[:3])
        valid = labels != opts.ignore_index
        acc = acc_dtype(hidden.dtype)
        scale = torch.ones((), dtype=acc, device=hidden.device)
        if opts.reduction == "mean":
            scale = scale / valid.sum().clamp(min=1).to(acc)
        if divisor is not None:
            scale = scale / divisor.to(acc)
        fused = opts.reduction != "none" and any(needs)
        logp, lse, w, grads = _FORWARD[backend](hidden, lm_head, bias, labels, opts,
                                                grad_scale=scale if fused else None, needs=needs,
                                                token_weights=token_weights)
        cw = w if token_weights is None else w * token_weights  # c_t * w_t: the per-row coefficient
        per_token = cw * logp
        if opts.reduction == "none":
            out = per_token
            ctx.save_for_backward(hidden, lm_head, bias, labels, lse, logp, cw)
        else:
            out = per_token.sum() * scale.to(per_token.dtype)
            ctx.grads = grads  # float32 (float64) accumulators, scaled and cast once in backward
            ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, lm_head, bias))
        ctx.mark_non_differentiable(w)
        return out, w

    @staticmethod
    def backward(ctx, g_out, _g_w):
        needs = ctx.needs_input_grad[:3]
        if g_out is None or not any(needs):
            return None, None, None, None, None, None, None, None, None
        if ctx.opts.reduction == "none":
            hidden, lm_head, bias, labels, lse, logp, w = ctx.saved_tensors
            with no_autocast(hidden.device):  # backward may run inside the caller's autocast region
                grads = _BACKWARD[ctx.backend](hidden, lm_head, bias, labels, lse, logp, g_out.to(w.dtype) * w,
                                               ctx.opts, needs=needs)
        else:
            if ctx.grads is None:
                raise RuntimeError("fused-linear loss: backward called twice on a graph whose gradients were "
                                   "computed in the forward and already handed out; recompute the loss instead")
            grads, ctx.grads = ctx.grads, None  # hand ownership to autograd (no copy, no second reference)
            if not (g_out.numel() == 1 and bool(g_out == 1)):
                grads = tuple(None if t is None else t.mul_(g_out.to(t.dtype)) for t in grads)
            grads = _cast_grads(grads, *ctx.dtypes)
        return (*grads, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# Public 2-D entry points (the loss layer flattens [B, T, H] and applies the causal shift).
def _opaque_to_dynamo(fn):
    """Run ``fn`` outside torch.compile graphs (data-dependent chunking and host syncs).

    ``torch.compiler.disable`` at import would import torch._dynamo (and Triton) for every user, so the
    disabled twin is made on the first call that finds Dynamo loaded; without Dynamo nothing compiles.
    """
    disabled = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


@_opaque_to_dynamo
def linear_token_logprobs_2d(hidden: torch.Tensor, lm_head: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, opts: LinearLogprobsOptions,
                             token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], lm_head [V, H] (fp32/bf16/fp16; fp64 on torch), bias [V] | None, labels [N] int.

    Returns (logp [N], lse [N]), float32 (float64 for float64 input). ``logp`` is differentiable w.r.t.
    hidden, lm_head and bias; ignored rows give logp = 0 and zero gradient (and lse = 0 on the torch path).
    ``token_weights`` [N] float (detached, ``check_token_weights``): returns ``c_t * log p_t`` and the backward
    runs with ``g_t * c_t`` (an O(N) product, no [N, V] tensor). Rows of weight 0 are skipped like ignored
    rows (no GEMM work on the torch path, whole zero row blocks skipped by the Triton backward; lse 0 there on
    the torch path). With weights of ones the result is bit for bit the unweighted one.
    """
    hidden, lm_head, bias = autocast_cast(hidden, lm_head, bias)
    validate(hidden, lm_head, bias, labels, opts)
    token_weights = check_token_weights(token_weights, labels, acc_dtype(hidden.dtype), opts.ignore_index,
                                        opts.check_finite)
    if token_weights is not None:
        labels = torch.where(token_weights == 0, opts.ignore_index, labels)
    backend = resolve_backend(opts.backend, *(t for t in (hidden, lm_head, bias) if t is not None),
                              fused_linear=True)
    with no_autocast(hidden.device):
        logp, lse = LinearTokenLogprobsFunction.apply(hidden, lm_head, bias, labels, opts, backend)
    return (logp if token_weights is None else logp * token_weights), lse


@_opaque_to_dynamo
def linear_weighted_logprobs_2d(hidden: torch.Tensor, lm_head: torch.Tensor, bias: torch.Tensor | None,
                                labels: torch.Tensor, opts: LinearLogprobsOptions, *,
                                divisor: torch.Tensor | float | None = None,
                                token_weights: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """reduce(c_t * sg[w_t] * logp_t) [/ divisor] and the detached weights w [N] (0 on ignored rows; no c).

    Returns a 0-d float32 tensor for "mean"/"sum" ("mean" over valid rows, 0 when none is valid; rows of token
    weight 0 still count) or [N] float32 for "none". ``divisor`` (e.g. Hugging Face ``num_items_in_batch``)
    divides the reduced value; it is folded into the gradient computed in the forward, so the backward does no
    extra work. ``token_weights`` c [N] float (detached, ``check_token_weights``) or None (c = 1) enters the
    per-row coefficient g_t = scale w_t c_t of that gradient.
    """
    hidden, lm_head, bias = autocast_cast(hidden, lm_head, bias)
    validate(hidden, lm_head, bias, labels, opts)
    token_weights = check_token_weights(token_weights, labels, acc_dtype(hidden.dtype), opts.ignore_index,
                                        opts.check_finite)
    backend = resolve_backend(opts.backend, *(t for t in (hidden, lm_head, bias) if t is not None),
                              fused_linear=True)
    if divisor is not None:
        if opts.reduction == "none":
            raise ValueError("divisor is only meaningful with reduction 'mean' or 'sum'")
        divisor = torch.as_tensor(divisor, device=hidden.device).detach()
    with no_autocast(hidden.device):
        return LinearWeightedLogprobsFunction.apply(hidden, lm_head, bias, labels, token_weights, divisor, opts,
                                                    backend, torch.is_grad_enabled())
