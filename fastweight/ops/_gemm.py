"""The torch path's GEMMs: float32 CPU matrix products through oneDNN where PyTorch ships it.

PyTorch sends a float32 ``torch.mm`` on CPU to MKL's sgemm. On the 2-core AMD EPYC (Zen 5, AVX-512) CI machine
that runs at 140-190 GFLOP/s for the fused-linear shapes, while oneDNN's matmul (the library behind PyTorch's
``mkldnn`` ops; ``torch.ops.mkldnn._linear_pointwise`` is the op inductor's linear fusions call) runs the same
products at 250-350 GFLOP/s, in IEEE float32 (``docs/performance.md`` has the figures). The three products of
a fused-linear chunk are all ``x @ w.T`` shapes:

    logits   z   = h_c @ W.T (+ b)       linear(h_c, W, b)
    d hidden dh  = E @ W                 linear(E, W.t())        (W.t() is a dense transposed view: no copy)
    d lm_head dW += E.T @ h_c            add_linear_t_(dW, E, h_c): MKL's in-place addmm_ (see below)

oneDNN is used only for float32 CPU tensors whose operands are dense in one orientation (a strided weight
view can send it to a very slow path); float64, other devices, a PyTorch without the op, and
``FASTWEIGHT_ONEDNN=0`` use ``torch.mm`` / ``addmm`` exactly as before. oneDNN follows
``torch.backends.mkldnn.matmul.fp32_precision`` like ``torch.mm`` does, so its default is full float32.
oneDNN returns a new tensor (no ``out=``): callers use the returned tensor and drop the previous chunk's
before computing the next, so peak memory is one chunk as with a reused buffer.

On CUDA, bfloat16 / float16 operands stay in their dtype and the products run on the tensor cores with float32
accumulation and float32 results (``torch.mm(..., out_dtype=torch.float32)``): no float32 copy of lm_head, and
the logits carry no 16-bit rounding (the same arithmetic as the Triton kernels' ``tl.dot``). Measured on an H200
(docs/benchmarks.md) the chunk loops with these GEMMs beat the fused-linear Triton kernels, whose float32
atomics dominate, so ``backend="auto"`` sends fused-linear ops on CUDA here. A float32 gradient factor is cast
to the operand dtype for the product (float16: scaled by its max first so nothing overflows), as the kernels
cast their tiles. ``FASTWEIGHT_TENSOR_CORES=0`` keeps the float32 upcast instead.

Contended cores. The d lm_head update goes through oneDNN only in ``DW_BLOCK``-row vocabulary blocks (its
wrapper copies the transposed operand; one [V, H] product per chunk is slower), i.e. 48 OpenMP parallel regions
per chunk at V = 49152, each ending in a barrier. When another process holds one of the cores, every region
waits for the thread the OS has descheduled, and the blocked update ran 2x slower than MKL's single in-place
``addmm_`` (290 vs 158 ms per chunk on a 2-core AMD EPYC with a busy loop beside it; fused-linear SatImp
N=2048: 29.3 s all-oneDNN, 18.2 s all-MKL, 16.9 s with this split). The logits and d hidden products are one
oneDNN call per chunk and keep their lead under load. So the update uses ``addmm_`` unless
``FASTWEIGHT_ONEDNN=all`` (the blocked oneDNN update, ~1.3x faster on a quiet Zen 5, slower on Zen 4).
"""
from __future__ import annotations

import os

import torch

# Vocabulary rows per d lm_head block: the [DW_BLOCK, H] product lands in cache before it is added to the
# accumulator (measured at c = 256, H = 576, V = 49152: 1024 / 4096 / 16384 rows gave 244 / 235 / 160 GFLOP/s;
# MKL's in-place addmm_ 180).
DW_BLOCK = 1024


HALF = (torch.bfloat16, torch.float16)
_MM_OUT_DTYPE = {"mm": True}  # cleared on the first failure (a torch without torch.mm(..., out_dtype=))


def tensor_cores(w: torch.Tensor) -> bool:
    """True when products with this (CUDA, 16-bit) weight run in its own dtype with float32 results."""
    if os.environ.get("FASTWEIGHT_TENSOR_CORES", "1") in ("0", "false", "False", ""):
        return False
    return w.is_cuda and w.dtype in HALF


def gemm_operand(t: torch.Tensor, acc: torch.dtype, w: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` as the chunk loops keep it: in its own dtype when products with ``w`` (default: ``t`` itself) run
    on the tensor cores and ``t`` has that dtype, else cast to the accumulation dtype ``acc``."""
    w = t if w is None else w
    return t if tensor_cores(w) and t.dtype == w.dtype else t.to(acc)


def new_products(w: torch.Tensor) -> bool:
    """True when ``linear`` with this weight returns a new tensor (oneDNN, tensor cores): no ``out`` buffer."""
    return onednn_weight(w) or tensor_cores(w)


def _half(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(x16, scale) with x ~ scale * x16 in ``dtype``; float16 is scaled by max|x| (its range is 65504)."""
    if x.dtype == dtype:
        return x, 1.0
    if dtype == torch.bfloat16:
        return x.to(dtype), 1.0  # bfloat16 has float32's exponent range
    top = float(x.abs().amax()) if x.numel() else 0.0
    scale = top if 0.0 < top < float("inf") else 1.0
    return (x * (1.0 / scale)).to(dtype), scale


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] of one 16-bit dtype -> float32 [M, N], float32 accumulation."""
    if _MM_OUT_DTYPE["mm"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE["mm"] = False
    return torch.mm(a.float(), b.float())


def _tensor_core_linear(x, w, b):
    x16, scale = _half(x, w.dtype)
    z = _mm_f32(x16, w.t())
    if scale != 1.0:
        z.mul_(scale)
    return z if b is None else z.add_(b)


def _tensor_core_add_t_(acc, a, h, dtype):
    """acc += a.T @ h with 16-bit operands, float32 products added block by block (no aliasing of acc as an
    ``out=`` of its own product; a [4 * DW_BLOCK, H] float32 temporary at a time)."""
    a16, sa = _half(a, dtype)
    h16, sh = _half(h, dtype)
    for v0 in range(0, acc.shape[0], 4 * DW_BLOCK):
        v1 = min(acc.shape[0], v0 + 4 * DW_BLOCK)
        acc[v0:v1].add_(_mm_f32(a16[:, v0:v1].t(), h16), alpha=sa * sh)
    return acc


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _dense(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.is_contiguous() or t.t().is_contiguous())


def _onednn_setting() -> str:
    return os.environ.get("FASTWEIGHT_ONEDNN", "1").strip().lower()


def use_onednn(*tensors: torch.Tensor) -> bool:
    """True when oneDNN runs these float32 CPU operands (checked per call: no probing at import)."""
    if _onednn_setting() in ("0", "false", "off", ""):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the oneDNN op has no autograd formula; the ops call it with grad mode off
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_weight(w: torch.Tensor) -> bool:
    """True when products with this weight go through oneDNN (so ``linear`` returns a new tensor and a caller
    need not keep an ``out`` buffer for it)."""
    return use_onednn(w) and _dense(w)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)``: x [M, K], w [N, K], b [N] -> [M, N] in x's dtype.

    Through oneDNN (a new tensor, ``out`` unused) when ``onednn_weight(w)`` and x, b qualify too; on the tensor
    cores (a new float32 tensor) when ``tensor_cores(w)``; else ``torch.mm`` / ``torch.addmm`` (into ``out``).
    """
    if tensor_cores(w):
        return _tensor_core_linear(x, w, b)
    operands = (x,) if b is None else (x, b)
    if onednn_weight(w) and use_onednn(*operands) and x.dim() == 2 and 1 in x.stride():
        return _onednn_linear(x, w, b)
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


def add_linear_t_(acc: torch.Tensor, a: torch.Tensor, h: torch.Tensor, *,
                  operands: torch.dtype | None = None) -> torch.Tensor:
    """``acc += a.T @ h`` in place: acc [V, H], a [c, V], h [c, H] (the d lm_head update of one chunk).

    ``operands``: a 16-bit dtype when the chunk's products run on CUDA's tensor cores (a and h are cast to it,
    float32 accumulation into acc); else ``addmm_`` (MKL), robust on contended cores; with
    ``FASTWEIGHT_ONEDNN=all``, oneDNN: one ``[DW_BLOCK, H]`` product per vocabulary block, added to its rows of
    acc (see the module docstring).
    """
    if operands in HALF:
        return _tensor_core_add_t_(acc, a, h, operands)
    if not (_onednn_setting() == "all" and use_onednn(acc, a, h) and a.stride(1) == 1):
        return acc.addmm_(a.t(), h)
    hT = h.t().contiguous()  # [H, c]: the product's weight, dense
    V = acc.shape[0]
    for v0 in range(0, V, DW_BLOCK):
        v1 = min(V, v0 + DW_BLOCK)
        acc[v0:v1].add_(_onednn_linear(a[:, v0:v1].t(), hT, None))
    return acc
