"""The torch path's GEMMs: float32 CPU matrix products through oneDNN where PyTorch ships it.

PyTorch sends a float32 ``torch.mm`` on CPU to MKL's sgemm. On the 2-core AMD EPYC (Zen 5, AVX-512) CI machine
that runs at 140-190 GFLOP/s for the fused-linear shapes, while oneDNN's matmul (the library behind PyTorch's
``mkldnn`` ops; ``torch.ops.mkldnn._linear_pointwise`` is the op inductor's linear fusions call) runs the same
products at 250-350 GFLOP/s, in IEEE float32 (``docs/performance.md`` has the figures). The three products of
a fused-linear chunk are all ``x @ w.T`` shapes:

    logits   z   = h_c @ W.T (+ b)       linear(h_c, W, b)
    d hidden dh  = E @ W                 linear(E, W.t())        (W.t() is a dense transposed view: no copy)
    d lm_head dW += E.T @ h_c            add_linear_t_(dW, E, h_c), in vocabulary blocks of DW_BLOCK rows

oneDNN is used only for float32 CPU tensors whose operands are dense in one orientation (a strided weight
view can send it to a very slow path); float64, other devices, a PyTorch without the op, and
``FASTWEIGHT_ONEDNN=0`` use ``torch.mm`` / ``addmm`` exactly as before. oneDNN follows
``torch.backends.mkldnn.matmul.fp32_precision`` like ``torch.mm`` does, so its default is full float32.
oneDNN returns a new tensor (no ``out=``): callers use the returned tensor and drop the previous chunk's
before computing the next, so peak memory is one chunk as with a reused buffer.
"""
from __future__ import annotations

import os

import torch

# Vocabulary rows per d lm_head block: the [DW_BLOCK, H] product lands in cache before it is added to the
# accumulator (measured at c = 256, H = 576, V = 49152: 1024 / 4096 / 16384 rows gave 244 / 235 / 160 GFLOP/s;
# MKL's in-place addmm_ 180).
DW_BLOCK = 1024


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _dense(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.is_contiguous() or t.t().is_contiguous())


def use_onednn(*tensors: torch.Tensor) -> bool:
    """True when oneDNN runs these float32 CPU operands (checked per call: no probing at import)."""
    if os.environ.get("FASTWEIGHT_ONEDNN", "1") in ("0", "false", "False", ""):
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

    Through oneDNN (a new tensor, ``out`` unused) when ``onednn_weight(w)`` and x, b qualify too; else
    ``torch.mm`` / ``torch.addmm`` (into ``out`` when given).
    """
    operands = (x,) if b is None else (x, b)
    if onednn_weight(w) and use_onednn(*operands) and x.dim() == 2 and 1 in x.stride():
        return _onednn_linear(x, w, b)
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


def add_linear_t_(acc: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``acc += a.T @ h`` in place: acc [V, H], a [c, V], h [c, H] (the d lm_head update of one chunk).

    oneDNN: one ``[DW_BLOCK, H]`` product per vocabulary block, added to its rows of acc; else ``addmm_``.
    """
    if not (use_onednn(acc, a, h) and a.stride(1) == 1):
        return acc.addmm_(a.t(), h)
    hT = h.t().contiguous()  # [H, c]: the product's weight, dense
    V = acc.shape[0]
    for v0 in range(0, V, DW_BLOCK):
        v1 = min(V, v0 + DW_BLOCK)
        acc[v0:v1].add_(_onednn_linear(a[:, v0:v1].t(), hT, None))
    return acc
