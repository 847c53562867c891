"""Input validation, backend choice and triton-launch plumbing shared by the ops.

Every user-facing check lives here once, raises ValueError/TypeError naming the argument, and never uses
``assert`` (which vanishes under ``python -O``).
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from fastweight._constants import BACKENDS, IGNORE_INDEX, REDUCTIONS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_interpret() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, *tensors: torch.Tensor, fused_linear: bool = False) -> str:
    """Map ``backend`` ("auto" | "triton" | "torch" | None) to "triton" or "torch".

    auto: Triton for CUDA tensors, torch otherwise; for the fused-linear ops (``fused_linear``) torch on every
    device: their chunk loops run the three GEMMs through cuBLAS (16-bit operands on the tensor cores, float32
    results) and were 4-10x faster than the fused-linear Triton kernels on an H200 (docs/benchmarks.md).
    Explicit "triton" on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (the kernels' CPU
    correctness path).
    """
    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if on_cuda and not fused_linear and all(t.dtype in TRITON_DTYPES for t in tensors if t.is_floating_point()):
            return "triton"
        return "torch"
    # explicit triton
    if not on_cuda and not triton_interpret():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
            f"got tensors on {tensors[0].device}. Use backend='torch' or 'auto'."
        )
    for t in tensors:
        if t.is_floating_point() and t.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports {TRITON_DTYPES}, got {t.dtype}")
    return "triton"


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_ignore_index(ignore_index: Any) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_ref_shift(ref_shift: Any) -> None:
    """UNDIAL's shift of the reference label logit (0 for a plain KL): a finite real number."""
    if isinstance(ref_shift, bool) or not isinstance(ref_shift, (int, float)):
        raise TypeError(f"ref_shift must be a real number, got {type(ref_shift).__name__}")
    if not math.isfinite(ref_shift):
        raise ValueError(f"ref_shift must be finite, got {ref_shift}")


def check_logit_scale(name: str, value: Any) -> None:
    """The factor multiplying a model's projection (Cohere ``logit_scale``, Granite ``1 / logits_scaling``):
    a positive finite real number, checked in float32 too (the kernels read it as float32)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0 and math.isfinite(float(torch.tensor(value, dtype=torch.float32)))
            and float(torch.tensor(value, dtype=torch.float32)) > 0):
        raise ValueError(f"{name} must be a positive finite number (in float32 too), got {value}")


def check_token_weights(token_weights: Any, labels: torch.Tensor, dtype: torch.dtype, ignore_index: int,
                        check_nonfinite: bool = False) -> torch.Tensor | None:
    """Caller-supplied per-token weights c [N] (same layout as ``labels``), returned detached, contiguous, in
    ``dtype`` (the ops' float32 / float64 accumulation dtype) and 0 on ignored rows (whatever they held), or
    None. Any sign is allowed; with ``check_nonfinite`` a NaN/inf weight is a ValueError (one host sync)."""
    if token_weights is None:
        return None
    if not isinstance(token_weights, torch.Tensor):
        raise TypeError(f"token_weights must be a torch.Tensor or None, got {type(token_weights).__name__}")
    if not token_weights.is_floating_point():
        raise TypeError(f"token_weights must be a floating tensor, got {token_weights.dtype}")
    if token_weights.shape != labels.shape:
        raise ValueError(f"token_weights shape {tuple(token_weights.shape)} must equal the labels shape "
                         f"{tuple(labels.shape)}")
    if token_weights.device != labels.device:
        raise ValueError(f"token_weights is on {token_weights.device} but labels are on {labels.device}")
    if check_nonfinite:
        check_finite("token_weights", token_weights)
    return torch.where(labels != ignore_index, token_weights.detach().to(dtype), 0.0).contiguous()


def check_weight_options(beta1: float, beta2: float, reduction: str, ignore_index: int) -> None:
    """The options every token-logprob op shares: weight exponents, reduction and the ignore label."""
    check_beta("beta1", beta1)
    check_beta("beta2", beta2)
    check_reduction(reduction)
    check_ignore_index(ignore_index)


def check_beta(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def check_float_tensor(name: str, x: Any, min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def check_labels(labels: Any, lead_shape: torch.Size, device: torch.device, V: int, ignore_index: int,
                 name: str = "labels") -> None:
    """labels: integer tensor of shape ``lead_shape`` on ``device``, each in [0, V) or == ignore_index."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):  # int16/uint8 (and floats, bools) are refused
        raise TypeError(f"{name} must be an integer tensor (int64/int32), got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"{name} shape {tuple(labels.shape)} does not match the leading dims {tuple(lead_shape)} of the input")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the input is on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        value = int(labels.flatten()[idx])
        raise ValueError(
            f"{name} out of range: {name}.flatten()[{idx}] = {value}, expected 0 <= label < V = {V} "
            f"or ignore_index = {ignore_index}"
        )


def check_token_ids(name: str, ids: Any, vocab: int | None) -> None:
    """``ids``: an int64/int32 tensor of token ids in ``[0, vocab)`` (``vocab`` None: only the dtype and sign are
    checked). A clear error naming the argument instead of the embedding's raw index error (issue 22)."""
    if not isinstance(ids, torch.Tensor):
        return  # the model reports other inputs (inputs_embeds, lists) itself
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (int64/int32), got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"{name} out of range: values from {lo} to {hi}, expected 0 <= id < vocab size {vocab}")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ValueError if ``x`` holds NaN or +-inf (opt-in: it costs one pass and a host sync)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Causal shift for Hugging Face labels [..., T]: position t is scored against labels[..., t + 1].

    Returns labels of the same shape with the last position set to ``ignore_index``, so the inputs need
    no slicing (slicing [B, T, V] logits and flattening would copy them).
    """
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def flatten_rows(x: torch.Tensor, labels: torch.Tensor, name: str, ignore_index: int, shift: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] input and [...] labels -> [N, D] rows and [N] labels (views where possible).

    The last dim must be unit-stride for the kernels; other strides are kept.
    """
    check_float_tensor(name, x, min_dim=2)
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last dimension (shape {tuple(x.shape)}); expected V >= 1 (or H >= 1)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {name} leading dims {tuple(x.shape[:-1])} "
            f"({name} has shape {tuple(x.shape)})"
        )
    if shift:
        labels = shift_labels(labels, ignore_index)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, labels.reshape(-1)


def signature_of(args: dict[str, Any], constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton signature for ``triton.compile(ASTSource(...))`` from concrete launch arguments."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.int64: "i64", torch.int32: "i32", torch.int8: "i8"}
    sig: dict[str, str] = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            sig[k] = "*" + names[v.dtype]
        elif isinstance(v, bool):
            sig[k] = "i1"
        elif isinstance(v, int):
            sig[k] = "i64" if k.startswith("stride") or abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            sig[k] = "fp32"
        else:
            raise TypeError(f"cannot type launch argument {k}={v!r}")
    for k in constexprs:
        sig[k] = "constexpr"
    return sig


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the torch paths: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(N: int, V: int, chunk_elements: int):
    """(start, end) row ranges of at most ``chunk_elements`` elements of width V each (at least one row)."""
    step = max(1, chunk_elements // max(V, 1))
    for s in range(0, N, step):
        yield s, min(N, s + step)


def flush_subnormal_(t: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the entries of ``t`` below its dtype's smallest normal magnitude (``finfo.tiny``).

    The torch paths call it on the small ``[c, H]`` operands that per-row gradient factors scale (SatImp's
    weights ``p**beta`` of unlikely tokens are subnormal float32 numbers): an x86 core without flush-to-zero
    runs every GEMM that reads such an operand at subnormal speed (6x slower fused-linear SatImp on an Intel
    Xeon; docs/performance.md). ``torch.set_flush_denormal`` is no fix there: it sets only the calling
    thread's MXCSR, and the OpenMP workers that run half of each GEMM keep producing subnormals. Values this
    small are below float32 resolution of any gradient they could add to; NaN and inf are left alone.
    """
    return t.masked_fill_(t.abs() < torch.finfo(t.dtype).tiny, 0.0)


def tiny_factors(scale: torch.Tensor) -> bool:
    """True when some nonzero per-row factor is below ``finfo.tiny * 2**24``, i.e. when scaling a ``[c, H]``
    operand by it can give subnormal entries (for entries above 2**-24 relative to 1, all rows at risk).

    A ``[c]``-sized check, so the ``[c, H]`` flush (three OpenMP parallel regions, each a barrier that costs
    a scheduler slice on a contended core) runs only on chunks that hold such rows.
    """
    small = scale.abs() < torch.finfo(scale.dtype).tiny * 2.0 ** 24
    return bool((small & (scale != 0)).any())


def flush_tiny_rows_(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``flush_subnormal_`` on the rows of ``t [c, H]`` (a product scaled row-wise by ``factor [c]``) whose
    factor is nonzero and below ``finfo.tiny * 2**24`` (the rows ``tiny_factors`` flags); other rows are left
    as they are. Returns ``t``.

    Only the flagged rows are gathered, flushed and written back, so in the usual chunk, with a few such rows,
    the three passes run on a few rows on the calling thread instead of three OpenMP parallel regions over the
    whole ``[c, H]`` operand, each a barrier that waits a scheduler slice for a descheduled thread on a busy
    machine (docs/performance.md, "Contended cores").
    """
    mag = factor.abs()
    risky = ((mag < torch.finfo(factor.dtype).tiny * 2.0 ** 24) & (mag != 0)).nonzero().squeeze(1)
    if risky.numel() == t.shape[0]:
        return flush_subnormal_(t)
    if risky.numel():
        t.index_copy_(0, risky, flush_subnormal_(t.index_select(0, risky)))
    return t


def flush_subnormal_rows_(p: torch.Tensor, scale: torch.Tensor, log_min: torch.Tensor) -> torch.Tensor:
    """``p *= scale[:, None]`` for a ``[c, V]`` block of probabilities p in [0, 1], with no subnormal product.

    ``log_min [c]`` bounds ``log p`` from below per row (``log p_min``). Only rows whose smallest product
    ``|scale| * p_min`` can fall below ``finfo.tiny`` are scanned (one pass over those rows); the others,
    normally all of them, cost nothing beyond the multiply. Zeroed entries are below float32's normal range.
    """
    tiny = torch.finfo(p.dtype).tiny
    p.mul_(scale[:, None])
    mag = scale.abs()
    risky = ((mag > 0) & (mag * torch.exp(log_min) < 2 * tiny)).nonzero().squeeze(1)
    if risky.numel():
        p.index_copy_(0, risky, flush_subnormal_(p.index_select(0, risky)))
    return p


def compact_live_rows_(buf: torch.Tensor, coef: torch.Tensor, *, min_dead: int = 1,
                       blocks: int = 8) -> torch.Tensor | None:
    """Move the rows of ``buf [c, V]`` whose per-row factor ``coef [c]`` is nonzero to its front, in place.

    A row whose gradient factor is exactly 0 (SatImp's weight ``p**beta1`` of an unlikely token after
    ``flush_subnormal_``, a zero token weight) adds exactly nothing to ``d hidden`` or ``d lm_head``, so the
    gradient GEMMs can skip it: returns the live rows' indices ``keep`` (ascending; ``buf[:len(keep)]`` then
    holds them in order), or None, moving nothing, when fewer than ``max(1, min_dead)`` rows are dead (the
    moves cost a pass over the rows that shift; a few saved rows do not pay for it).

    The rows shift down (``keep[i] >= i``) in at most ``blocks`` blocks of rows, each copied through a
    temporary of its own size: row ``keep[i]`` is read before any row at or above it is written, and the
    temporary is at most ``1 / blocks`` of the buffer.
    """
    if buf.dim() != 2 or coef.shape != buf.shape[:1] or not buf.is_contiguous():
        raise ValueError(f"compact_live_rows_: buf must be a contiguous [c, V] tensor and coef [c], got "
                         f"{tuple(buf.shape)} / {tuple(coef.shape)}")
    keep = live_rows(coef, min_dead=min_dead)
    if keep is not None:
        move_rows_(buf, keep, blocks=blocks)
    return keep


def live_rows(coef: torch.Tensor, *, min_dead: int = 1) -> torch.Tensor | None:
    """The indices of the nonzero entries of ``coef`` (ascending), or None when fewer than ``max(1, min_dead)``
    entries are 0: the rule by which ``compact_live_rows_`` decides to move rows."""
    live = coef != 0
    if coef.numel() - int(live.sum()) < max(1, min_dead):
        return None
    return live.nonzero().squeeze(1)


def move_rows_(buf: torch.Tensor, keep: torch.Tensor, *, blocks: int = 8) -> None:
    """``buf[:len(keep)] = buf[keep]`` in place for ascending ``keep`` (``compact_live_rows_``'s moves)."""
    k = keep.numel()
    moved = (keep != torch.arange(k, device=keep.device)).nonzero()
    first = int(moved[0]) if moved.numel() else k  # rows before it are already in place
    step = max(1, -(-buf.shape[0] // max(1, blocks)))
    for a in range(first, k, step):
        b = min(k, a + step)
        buf[a:b].copy_(buf.index_select(0, keep[a:b]))


def importance_weight_torch(logp: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """w = p**beta1 * (1 - p)**beta2 from log p, 0**0 == 1, (1 - p) = -expm1(log p)."""
    w = torch.ones_like(logp)
    if beta1 != 0:
        w = w * torch.exp(beta1 * logp)
    if beta2 != 0:
        w = w * torch.exp(beta2 * torch.log(-torch.expm1(logp)))
    return w


def autocast_cast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under ``torch.autocast``, cast floating inputs to the autocast dtype, as ``F.linear`` would.

    The casts are ordinary (differentiable) tensor ops, so autograd returns each gradient in its input's
    dtype. Outside autocast the tensors are returned unchanged.
    """
    ref = next(t for t in tensors if t is not None)
    dev = ref.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def no_autocast(device: torch.device):
    """Context that turns autocast off for the ops' own GEMMs (they accumulate in float32 themselves)."""
    return torch.autocast(device_type=device.type if device.type in ("cpu", "cuda") else "cpu", enabled=False)


def launch_kernel(fn, launch: dict[str, Any], **args: Any) -> None:
    """``fn[grid](...)`` with the grid, arguments, constexprs and launch options of a ``_launch_args`` result.

    ``args`` replace launch arguments (real inputs in place of the placeholders ``_launch_args`` allocated).
    The compile test builds from the same dict, so what it checks is what launches.
    """
    options = {k: launch[k] for k in ("num_warps", "num_stages", "maxnreg") if launch.get(k) is not None}
    fn[launch["grid"]](**{**launch["args"], **args}, **launch["constexprs"], **options)
