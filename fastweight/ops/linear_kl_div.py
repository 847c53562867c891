"""Row-wise ``KL(softmax(ref) || softmax(logits))`` from the hidden states of both models (fused linear).

Twin of ``fastweight.ops.kl_div`` for the inputs ``hidden [N, H]`` + ``lm_head [V, H]`` (trained model) and
``ref_hidden [N, H_r]`` + ``ref_lm_head [V, H_r]`` (frozen reference), each with an optional bias [V] and
Gemma-2 ``softcap`` and a ``logit_scale`` multiplying the projection (Cohere; Granite's 1 / logits_scaling):
neither ``[N, V]`` logits tensor exists. With ``labels``, ignored rows give KL 0 and
zero gradient and ``ref_shift`` lowers the reference logit of each row's label (UNDIAL, spec "UNDIAL").

* Triton: ``fastweight.kernels.linear_kl_div`` (split-V forward, finalize, tile-recompute backward with
  float32 atomics; math, grids and bytes moved in its docstring).
* Torch (CPU and anything without Triton): chunks of counted rows; per chunk two GEMMs fill reused float32
  ``[c, V]`` buffers with both models' logits, the forward reduces them to KL / lse / lse_r, the backward
  recomputes them, forms ``da = g (p - q)`` in place and runs ``dh_c = da W`` and ``dW += da^T h_c``.

Gradients flow to ``hidden``, ``lm_head`` and ``bias`` only; the reference tensors must not require grad.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.ops._common import (
    acc_dtype, autocast_cast, check_finite, check_float_tensor, check_ignore_index, check_labels, check_logit_scale,
    check_ref_shift, flush_subnormal_, tiny_factors,
    launch_kernel, no_autocast, resolve_backend, signature_of, triton_interpret,
)
from fastweight.ops._gemm import add_linear_t_, gemm_operand, linear, new_products
from fastweight.ops._linear_chunks import chunk_step
from fastweight.ops.linear_logprobs import FWD_PROGRAMS, TileConfig, triton_cdiv

# ---------------------------------------------------------------------------------------------------------
# Tuning (Triton): two logits tiles (z and r) are live per step, so the float32 tiles have half of
# linear_logprobs' BLOCK_N and the 16-bit ones half its BLOCK_V. Left alone, ptxas settles several of these
# builds at 128 registers (two resident 256-thread blocks) with 8 B of spill; a 255-register ceiling lets it
# use 108-241 and spill nothing. All builds are checked by tests/test_compile_aot.py (docs/performance.md).
_F32 = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=16, num_warps=8, maxnreg=255)
_B16 = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3, maxnreg=255)
TILES = {
    torch.float32: {"fwd": TileConfig(**_F32, num_stages=3), "bwd": TileConfig(**_F32, num_stages=1)},
    torch.bfloat16: {"fwd": TileConfig(**_B16), "bwd": TileConfig(**_B16)},
    torch.float16: {"fwd": TileConfig(**_B16), "bwd": TileConfig(**_B16)},
}
FINALIZE_BLOCK_N = 128
FINALIZE_NUM_WARPS = 4
# Tuning (torch): float32 elements per [c, V] logits buffer (two live, plus one in the backward), 16 MiB each.
TORCH_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LinearKLDivOptions:
    """Every non-tensor option of ``linear_kl_div``.

    ref_shift: subtracted from the reference logit of each counted row's label (needs labels; UNDIAL's beta).
    ignore_index: label value of rows excluded (KL 0, gradient 0) when labels are given.
    softcap, ref_softcap: final-logit soft-capping of the trained / reference model (> 0) or None.
    logit_scale, ref_logit_scale: positive factor s multiplying each model's projection before soft-capping,
        z = cap(s * (hidden @ lm_head.T + bias)); 1.0 for most models.
    backend: "auto" | "triton" | "torch".
    check_finite: scan every input for NaN/inf first (one extra pass and a host sync).
    chunk_elements: torch path, float32 elements per [c, V] logits buffer (c = chunk_elements // V, >= 1).
    """

    ref_shift: float = 0.0
    ignore_index: int = IGNORE_INDEX
    softcap: float | None = None
    ref_softcap: float | None = None
    backend: str | None = "auto"
    check_finite: bool = False
    chunk_elements: int = TORCH_CHUNK_ELEMENTS
    logit_scale: float = 1.0
    ref_logit_scale: float = 1.0

    def __post_init__(self) -> None:
        check_ref_shift(self.ref_shift)
        check_logit_scale("logit_scale", self.logit_scale)
        check_logit_scale("ref_logit_scale", self.ref_logit_scale)
        check_ignore_index(self.ignore_index)
        for name in ("softcap", "ref_softcap"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {v!r}")
        if isinstance(self.chunk_elements, bool) or not isinstance(self.chunk_elements, int) or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {self.chunk_elements!r}")


def validate(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts: LinearKLDivOptions) -> None:
    """Shapes, dtypes (one float dtype for all four matrices), devices, frozen reference, labels in range."""
    for name, t in (("hidden", hidden), ("lm_head", lm_head), ("ref_hidden", ref_hidden),
                    ("ref_lm_head", ref_lm_head)):
        check_float_tensor(name, t, min_dim=2)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must equal hidden's dtype {hidden.dtype} (cast the reference)")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    N, H = hidden.shape
    V = lm_head.shape[0]
    if V == 0 or lm_head.shape[1] != H:
        raise ValueError(f"lm_head must be [V, H] with V > 0 and H = {H}, got shape {tuple(lm_head.shape)}")
    if ref_hidden.shape[0] != N:
        raise ValueError(f"ref_hidden must have N = {N} rows like hidden, got shape {tuple(ref_hidden.shape)}")
    if ref_lm_head.shape != (V, ref_hidden.shape[1]):
        raise ValueError(f"ref_lm_head must be [V, H_ref] = [{V}, {ref_hidden.shape[1]}], "
                         f"got shape {tuple(ref_lm_head.shape)}")
    for name, b in (("bias", bias), ("ref_bias", ref_bias)):
        if b is not None:
            check_float_tensor(name, b)
            if b.shape != (V,) or b.dtype != hidden.dtype or b.device != hidden.device:
                raise ValueError(f"{name} must be [V] = [{V}] with hidden's dtype and device, got "
                                 f"{tuple(b.shape)} {b.dtype} on {b.device}")
    for name, t in (("ref_hidden", ref_hidden), ("ref_lm_head", ref_lm_head), ("ref_bias", ref_bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} requires grad: the reference is a frozen target (pass {name}.detach())")
    if labels is None:
        if opts.ref_shift != 0:
            raise ValueError(f"ref_shift={opts.ref_shift} needs labels (the shift applies to each row's label)")
    else:
        check_labels(labels, hidden.shape[:1], hidden.device, V, opts.ignore_index)
    if opts.check_finite:
        for name, t in (("hidden", hidden), ("lm_head", lm_head), ("bias", bias), ("ref_hidden", ref_hidden),
                        ("ref_lm_head", ref_lm_head), ("ref_bias", ref_bias)):
            if t is not None:
                check_finite(name, t)


# ---------------------------------------------------------------------------------------------------------
# Triton path
def _launch_args(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts: LinearKLDivOptions, *,
                 kernel: str = "fwd", compute_dh: bool = True, compute_dw: bool = True) -> dict[str, Any]:
    """Grid, kernel arguments, constexprs and launch options of one launch; the compile test calls this too.

    ``kernel``: "fwd" | "finalize" | "bwd". Returns {"grid", "args", "constexprs", "num_warps", "num_stages",
    "maxnreg", "outputs", "signature"}; "outputs" holds the float32 buffers the launch writes.
    """
    N, H = hidden.shape
    V = lm_head.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    has_labels = labels is not None
    lab = labels if has_labels else torch.zeros(1, dtype=torch.int64, device=hidden.device)  # never read
    tile = TILES[hidden.dtype]["bwd" if kernel == "bwd" else "fwd"]
    common = dict(HAS_LABELS=has_labels, HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
                  HAS_REF_BIAS=ref_bias is not None, HAS_REF_SOFTCAP=opts.ref_softcap is not None,
                  BLOCK_N=tile.BLOCK_N, BLOCK_V=tile.BLOCK_V, BLOCK_H=tile.BLOCK_H,
                  DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
                  UPCAST_DOT=hidden.dtype == torch.bfloat16 and triton_interpret())
    models = dict(hidden_ptr=hidden, stride_hidden_n=hidden.stride(0), lm_head_ptr=lm_head,
                  stride_lm_head_v=lm_head.stride(0), bias_ptr=bias if bias is not None else lm_head,
                  ref_hidden_ptr=ref_hidden, stride_ref_hidden_n=ref_hidden.stride(0), ref_lm_head_ptr=ref_lm_head,
                  stride_ref_lm_head_v=ref_lm_head.stride(0),
                  ref_bias_ptr=ref_bias if ref_bias is not None else ref_lm_head)
    caps = dict(softcap=float(opts.softcap or 1.0), ref_softcap=float(opts.ref_softcap or 1.0),
                logit_scale=float(opts.logit_scale), ref_logit_scale=float(opts.ref_logit_scale),
                ref_shift=float(opts.ref_shift))
    n_blocks = triton_cdiv(N, tile.BLOCK_N)
    num_warps, num_stages = tile.num_warps, tile.num_stages
    if kernel == "fwd":
        v_tiles = triton_cdiv(V, tile.BLOCK_V)
        splits = max(1, min(v_tiles, FWD_PROGRAMS // max(n_blocks, 1)))
        v_per_split = triton_cdiv(v_tiles, splits) * tile.BLOCK_V
        splits = triton_cdiv(V, v_per_split)  # every split owns >= 1 real column
        part = torch.empty(5, splits, N, **f32)
        args = dict(**models, labels_ptr=lab, part_ptr=part, N=N, V=V, H=H, ignore_index=opts.ignore_index,
                    **caps, v_per_split=v_per_split, num_splits=splits)
        grid, constexprs = (n_blocks, splits), common
        outputs = dict(part=part, splits=splits)
    elif kernel == "finalize":
        part = torch.empty(5, 1, N, **f32)
        kl, lse, lse_r = (torch.empty(N, **f32) for _ in range(3))
        args = dict(part_ptr=part, labels_ptr=lab, kl_ptr=kl, lse_ptr=lse, lse_r_ptr=lse_r, N=N, num_splits=1,
                    ignore_index=opts.ignore_index)
        grid = (triton_cdiv(N, FINALIZE_BLOCK_N),)
        constexprs = dict(HAS_LABELS=has_labels, BLOCK_N=FINALIZE_BLOCK_N)
        num_warps, num_stages = FINALIZE_NUM_WARPS, None
        outputs = dict(kl=kl, lse=lse, lse_r=lse_r)
    elif kernel == "bwd":
        lse, lse_r, g = (torch.empty(N, **f32) for _ in range(3))
        dh = torch.zeros(N, H, **f32) if compute_dh else None
        dw = torch.zeros(V, H, **f32) if compute_dw else None
        db = torch.zeros(V, **f32) if compute_dw and bias is not None else None
        args = dict(**models, labels_ptr=lab, lse_ptr=lse, lse_r_ptr=lse_r, g_ptr=g,
                    dh_ptr=dh if dh is not None else lse, stride_dh_n=H, dw_ptr=dw if dw is not None else lse,
                    stride_dw_v=H, db_ptr=db if db is not None else lse, N=N, V=V, H=H,
                    ignore_index=opts.ignore_index, **caps)
        grid = (n_blocks, triton_cdiv(V, tile.BLOCK_V))
        constexprs = dict(common, COMPUTE_DH=bool(compute_dh), COMPUTE_DW=bool(compute_dw))
        outputs = dict(lse=lse, lse_r=lse_r, g=g, dh=dh, dw=dw, db=db)
    else:
        raise ValueError(f"kernel must be 'fwd', 'finalize' or 'bwd', got {kernel!r}")
    return dict(grid=grid, args=args, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                maxnreg=tile.maxnreg if kernel != "finalize" else None, outputs=outputs,
                signature=signature_of(args, constexprs))


def aot_cases() -> list[dict[str, Any]]:
    """Compile cases on 'meta' tensors with odd sizes (H = 5, V = 7): per dtype, fwd and bwd without labels,
    bias or softcap (also built at odd sizes) and with all of them (aligned only); the bwd's single-gradient
    COMPUTE_DH / COMPUTE_DW builds with all flags; finalize with and without labels."""
    from fastweight.kernels import linear_kl_div as k

    cases = []
    meta = dict(device="meta")

    def case(name, fn, la, odd=True):
        cases.append(dict(name=name, fn=fn, signature=la["signature"], constexprs=la["constexprs"],
                          num_warps=la["num_warps"], num_stages=la["num_stages"], maxnreg=la["maxnreg"], odd=odd))

    labels = torch.zeros(3, dtype=torch.int64, **meta)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).replace("torch.", "")
        h, W, b = (torch.zeros(*s, dtype=dtype, **meta) for s in ((3, 5), (7, 5), (7,)))
        plain = (h, W, None, h, W, None, None, LinearKLDivOptions())
        full = (h, W, b, h, W, b, labels, LinearKLDivOptions(ref_shift=1.0, softcap=30.0, ref_softcap=20.0))
        for kernel, fn in (("fwd", k._linear_kl_fwd), ("bwd", k._linear_kl_bwd)):
            case(f"linear_kl_{kernel}_{tag}_plain", fn, _launch_args(*plain, kernel=kernel))
            case(f"linear_kl_{kernel}_{tag}_full", fn, _launch_args(*full, kernel=kernel), False)
        for dh, dw in ((True, False), (False, True)):
            case(f"linear_kl_bwd_{tag}_full_dh{int(dh)}_dw{int(dw)}", k._linear_kl_bwd,
                 _launch_args(*full, kernel="bwd", compute_dh=dh, compute_dw=dw), False)
    h, W = torch.zeros(3, 5, **meta), torch.zeros(7, 5, **meta)
    for lab in (None, labels):
        case(f"linear_kl_finalize_labels{int(lab is not None)}", k._linear_kl_finalize,
             _launch_args(h, W, None, h, W, None, lab, LinearKLDivOptions(), kernel="finalize"))
    return cases


def linear_kl_forward_triton(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts):
    """Triton forward: (kl [N], lse [N], lse_r [N]) float32."""
    from fastweight.kernels.linear_kl_div import _linear_kl_finalize, _linear_kl_fwd

    tensors = (hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels)
    fo = _launch_args(*tensors, opts, kernel="finalize")
    if hidden.shape[0] > 0:
        la = _launch_args(*tensors, opts, kernel="fwd")
        launch_kernel(_linear_kl_fwd, la)
        launch_kernel(_linear_kl_finalize, fo, part_ptr=la["outputs"]["part"], num_splits=la["outputs"]["splits"])
    out = fo["outputs"]
    return out["kl"], out["lse"], out["lse_r"]


def linear_kl_backward_triton(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, lse, lse_r, g,
                              opts, *, needs=(True, True, True)):
    """(d hidden, d lm_head, d bias) in the input dtypes (None where not needed) for per-row upstream g [N]."""
    from fastweight.kernels.linear_kl_div import _linear_kl_bwd

    need_dw = bool(needs[1] or (bias is not None and needs[2]))
    la = _launch_args(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts, kernel="bwd",
                      compute_dh=bool(needs[0]), compute_dw=need_dw)
    if hidden.shape[0] > 0 and (needs[0] or need_dw):
        launch_kernel(_linear_kl_bwd, la, lse_ptr=lse.contiguous(), lse_r_ptr=lse_r.contiguous(),
                      g_ptr=g.float().contiguous())
    out = la["outputs"]
    grads = (out["dh"] if needs[0] else None, out["dw"] if needs[1] else None,
             out["db"] if bias is not None and needs[2] else None)
    return _cast(grads, hidden, lm_head, bias)


def _cast(grads, *like):
    return tuple(None if t is None else t.to(ref.dtype) for t, ref in zip(grads, like))


# ---------------------------------------------------------------------------------------------------------
# Torch path: chunks of counted rows, float32 accumulation (float64 for float64 inputs).
def _rows(hidden, labels, opts):
    if labels is None:
        return None
    return (labels != opts.ignore_index).nonzero().squeeze(1)


def _chunks(N, rows, step):
    n = N if rows is None else rows.numel()
    for s in range(0, n, step):
        e = min(n, s + step)
        yield slice(s, e) if rows is None else rows[s:e]


def _logits(out, h, W, b, cap, scale=1.0):
    """cap(scale * (h @ W.T + b)), into ``out`` when given (torch.mm; oneDNN allocates): (logits, softcap
    derivative or None). Float32 (64) chunks are scaled on the [c, H] side (and b), not the [c, V] products;
    16-bit tensor-core operands get their float32 products scaled (s h in 16 bits would round again)."""
    if scale == 1.0:
        z = linear(h, W, b, out=out)
    elif h.dtype in (torch.float32, torch.float64):
        z = linear(h * scale, W, None if b is None else b * scale, out=out)
    else:
        z = linear(h, W, b, out=out).mul_(scale)
    if cap is None:
        return z, None
    t = z.mul_(1.0 / cap).tanh_()
    deriv = 1.0 - t * t
    t.mul_(cap)
    return z, deriv


class _Both:
    """Float32 (float64) operands of both models, reused [c, V] buffers and the shifted reference logits."""

    def __init__(self, hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts):
        self.acc = acc_dtype(hidden.dtype)
        cast = (lambda t: None if t is None else t.to(self.acc))
        self.h, self.W, self.b = hidden, gemm_operand(lm_head, self.acc), cast(bias)
        self.hr, self.Wr, self.br = ref_hidden, gemm_operand(ref_lm_head, self.acc), cast(ref_bias)
        # logit scales s, s_r: z = s (h W^T + b) (``_logits``); the backward folds s into its per-row coefficient
        # and multiplies the unscaled chunk (s = 1: untouched).
        self.s, self.sr = float(opts.logit_scale), float(opts.ref_logit_scale)
        self.labels, self.opts = labels, opts
        self.rows = _rows(hidden, labels, opts)
        V = lm_head.shape[0]
        self.step = chunk_step(opts.chunk_elements, V, hidden.device, TORCH_CHUNK_ELEMENTS)
        n = hidden.shape[0] if self.rows is None else self.rows.numel()
        c = max(1, min(self.step, n))
        # oneDNN returns each chunk's logits as new tensors; torch.mm writes into two reused buffers.
        self.z = self.r = None
        if not (new_products(self.W) and new_products(self.Wr)):
            self.z = torch.empty(c, V, dtype=self.acc, device=hidden.device)
            self.r = torch.empty(c, V, dtype=self.acc, device=hidden.device)

    def __iter__(self):
        return _chunks(self.h.shape[0], self.rows, self.step)

    def logits(self, idx):
        """(h_c unscaled, z view, r view, softcap derivative of z or None) for the rows idx."""
        sel = (lambda t: t[idx]) if isinstance(idx, slice) else (lambda t: t.index_select(0, idx))
        h = gemm_operand(sel(self.h), self.acc, self.W)
        n = h.shape[0]
        z, deriv = _logits(None if self.z is None else self.z[:n], h, self.W, self.b, self.opts.softcap, self.s)
        r, _ = _logits(None if self.r is None else self.r[:n], gemm_operand(sel(self.hr), self.acc, self.Wr),
                       self.Wr, self.br, self.opts.ref_softcap, self.sr)
        if self.labels is not None and self.opts.ref_shift != 0:
            r.scatter_add_(1, sel(self.labels).long()[:, None],
                           torch.full((n, 1), -float(self.opts.ref_shift), dtype=self.acc, device=r.device))
        return h, z, r, deriv


def _lse(x):
    m = x.amax(1)
    return m + (x - m[:, None]).exp_().sum(1).log_()


def linear_kl_forward_torch(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts):
    """Same contract as ``linear_kl_forward_triton`` (float64 outputs for float64 inputs; lse 0 on ignored rows)."""
    both = _Both(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts)
    N = hidden.shape[0]
    kl, lse, lse_r = (torch.zeros(N, dtype=both.acc, device=hidden.device) for _ in range(3))
    for idx in both:
        _, z, r, _ = both.logits(idx)
        lz, lr = _lse(z), _lse(r)
        # log q - log p elementwise (no reliance on sum q = 1 in float32), then q * that, summed.
        r.sub_(lr[:, None])
        z.sub_(lz[:, None]).neg_().add_(r)
        kl[idx] = z.mul_(r.exp_()).sum(1)
        lse[idx], lse_r[idx] = lz, lr
        del z, r  # free this chunk's logits before the next chunk's are formed (oneDNN allocates them)
    return kl, lse, lse_r


def linear_kl_backward_torch(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, lse, lse_r, g,
                             opts, *, needs=(True, True, True)):
    """Same contract as ``linear_kl_backward_triton``: recompute both chunks' logits, da = g (p - q)."""
    both = _Both(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts)
    acc, dev = both.acc, hidden.device
    N, H = hidden.shape
    V = lm_head.shape[0]
    dh = torch.zeros(N, H, dtype=acc, device=dev) if needs[0] else None
    dW = torch.zeros(V, H, dtype=acc, device=dev) if needs[1] else None
    db = torch.zeros(V, dtype=acc, device=dev) if bias is not None and needs[2] else None
    for idx in both:
        h, z, r, deriv = both.logits(idx)
        gc = flush_subnormal_(g[idx].to(acc)[:, None] * both.s)  # d z / d (h W^T + b) = s; no subnormal factor
        z.sub_(lse[idx].to(acc)[:, None]).exp_().sub_(r.sub_(lse_r[idx].to(acc)[:, None]).exp_()).mul_(gc)
        if deriv is not None:
            z.mul_(deriv)
        if dh is not None:
            dh_c = linear(z, both.W.t())
            dh[idx] = flush_subnormal_(dh_c) if tiny_factors(gc) else dh_c
        if dW is not None:
            add_linear_t_(dW, z, h, operands=both.W.dtype)
        if db is not None:
            db += z.sum(0)
        del z, r, deriv  # free this chunk's logits before the next chunk's are formed (oneDNN allocates them)
    return _cast((dh, dW, db), hidden, lm_head, bias)


_FORWARD = {"triton": linear_kl_forward_triton, "torch": linear_kl_forward_torch}
_BACKWARD = {"triton": linear_kl_backward_triton, "torch": linear_kl_backward_torch}


# ---------------------------------------------------------------------------------------------------------
# Autograd
class LinearKLDivFunction(torch.autograd.Function):
    """(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels) -> kl [N] (gradient to the first three)."""

    @staticmethod
    def forward(ctx, hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels,
                opts: LinearKLDivOptions, backend: str):
        kl, lse, lse_r = _FORWARD[backend](hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts)
        ctx.save_for_backward(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, lse, lse_r)
        ctx.opts, ctx.backend = opts, backend
        return kl

    @staticmethod
    def backward(ctx, g_kl):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if g_kl is None or not any(needs):
            return (None,) * 9
        with no_autocast(saved[0].device):
            grads = _BACKWARD[ctx.backend](*saved, g_kl, ctx.opts, needs=needs)
        return (*grads, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# Public function (2-D inputs; the loss layer flattens [B, T, H] and applies the causal shift).
def linear_kl_div(hidden: torch.Tensor, lm_head: torch.Tensor, ref_hidden: torch.Tensor,
                  ref_lm_head: torch.Tensor, labels: torch.Tensor | None = None, *,
                  bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None,
                  softcap: float | None = None, ref_softcap: float | None = None, ref_shift: float = 0.0,
                  ignore_index: int = IGNORE_INDEX, backend: str | None = "auto", check_finite: bool = False,
                  chunk_elements: int = TORCH_CHUNK_ELEMENTS, logit_scale: float = 1.0,
                  ref_logit_scale: float = 1.0) -> torch.Tensor:
    """Per-row ``KL(softmax(r_t) || softmax(z_t))`` [N] float32 (float64 for float64 input), no logits tensor.

    hidden [N, H], lm_head [V, H] (+ bias [V], softcap, logit_scale s): the trained model,
        z = cap(s * (hidden @ lm_head.T + bias)); differentiable (gradients in their own dtypes).
    ref_hidden [N, H_r], ref_lm_head [V, H_r] (+ ref_bias [V], ref_softcap, ref_logit_scale): the frozen
        reference; must not require grad. All four matrices share one dtype: fp32 / bf16 / fp16 (fp64 on the
        torch backend); the Triton backend needs H_r = H.
    labels: optional [N] int: rows with ``ignore_index`` give 0 and zero gradient, and ``ref_shift`` lowers
        the reference logit of each counted row's label (UNDIAL); without labels every row counts.
    Gradient w.r.t. the trained logits: ``g_t * (softmax(z_t) - softmax(r_t))`` (softcap derivative applied).
    Spec: ``shared/spec/LOSSES.md`` (KL retain regulariser, UNDIAL). Under autocast the inputs are cast as
    ``F.linear`` would cast them and the op runs with autocast off.
    """
    opts = LinearKLDivOptions(ref_shift=ref_shift, ignore_index=ignore_index, softcap=softcap,
                              ref_softcap=ref_softcap, backend=backend, check_finite=check_finite,
                              chunk_elements=chunk_elements, logit_scale=logit_scale,
                              ref_logit_scale=ref_logit_scale)
    hidden, lm_head, bias = autocast_cast(hidden, lm_head, bias)
    ref_hidden, ref_lm_head, ref_bias = autocast_cast(ref_hidden, ref_lm_head, ref_bias)
    validate(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts)
    # The kernels and GEMMs read unit-stride rows; other row strides are kept.
    hidden, lm_head, ref_hidden, ref_lm_head = (t if t.stride(-1) == 1 else t.contiguous()
                                                for t in (hidden, lm_head, ref_hidden, ref_lm_head))
    tensors = [t for t in (hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels) if t is not None]
    backend = resolve_backend(opts.backend, *tensors, fused_linear=True)
    if backend == "triton" and ref_hidden.shape[1] != hidden.shape[1]:
        raise ValueError(f"ref_hidden has H_r = {ref_hidden.shape[1]} but hidden has H = {hidden.shape[1]}: the "
                         "Triton backend needs equal hidden sizes (use backend='torch')")
    with no_autocast(hidden.device):
        return LinearKLDivFunction.apply(hidden, lm_head, bias, ref_hidden, ref_lm_head, ref_bias, labels, opts,
                                         backend)
