"""Teacher-forced evaluation statistics per token, from logits or from hidden states without the logits.

For each row t with label y_t (``kernels/token_stats.py`` has the math):

* ``logp``   log p(y_t) = z[t, y_t] - logsumexp(z[t]), float32;
* ``argmax`` whether y_t is the greedy prediction (``torch.argmax``'s rule: the first index of the maximum);
* ``mean``, ``var``: mean and variance of log p_v under the model's own distribution p = softmax(z[t]), the
  moments Min-K%++ normalises with (Zhang et al., 2024, "Min-K%++"; ``fastweight.eval.attacks``).

``token_stats(logits, labels)`` reads a logits matrix once (Triton on CUDA, chunks of rows on the torch
path). ``linear_token_stats(hidden, labels, lm_head=W)`` forms the logits chunk by chunk (``c`` rows at a time,
the GEMM through ``ops/_gemm.py``: oneDNN on CPU, 16-bit tensor cores on CUDA) and applies the same statistics
to each chunk, so at most a ``[c, V]`` float32 block exists, never ``[N, V]``. Evaluation only: nothing here
is differentiable (inputs are read under ``torch.no_grad``). Ignored rows give 0, 0, 0 and False.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.ops._common import (
    acc_dtype, check_labels, check_logit_scale, launch_kernel, resolve_backend, row_chunks, signature_of,
)
from fastweight.ops._gemm import gemm_operand, linear

# Tuning: BLOCK_V as token_logprobs (16 KiB of a row in registers across 8 warps). TORCH_CHUNK_ELEMENTS: the
# float32 working block of the torch path and of every fused-linear chunk, 8 Mi elements (32 MiB; two such
# blocks live at once). At V = 128256 on the 2-core CPU (N = 512, H = 576, loaded machine) 32 / 65 / 130-row
# chunks took 10.4 / 5.7 / 4.4 s against the logits path's 17.9 s: GEMMs of a few dozen rows run far below
# the CPU's rate, so the block is as large as the memory target (<= 0.25x the [N, V] logits) allows.
BLOCK_V_MAX = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}
NUM_WARPS = 8
TORCH_CHUNK_ELEMENTS = 1 << 23


class TokenStats(NamedTuple):
    """Per-token statistics, each ``[N]``: float32 ``logp``, ``mean``, ``var`` and bool ``argmax``."""

    logp: torch.Tensor
    argmax: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


@dataclass(frozen=True)
class TokenStatsOptions:
    """ignore_index: label of rows that are not scored. softcap: Gemma-2's final-logit soft-capping (fused-linear
    only). backend: "auto" | "triton" | "torch". chunk_elements: float32 elements per working block."""

    ignore_index: int = IGNORE_INDEX
    softcap: float | None = None
    backend: str | None = "auto"
    chunk_elements: int = TORCH_CHUNK_ELEMENTS

    def __post_init__(self) -> None:
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if self.softcap is not None and not (isinstance(self.softcap, (int, float)) and self.softcap > 0):
            raise ValueError(f"softcap must be a positive number or None, got {self.softcap!r}")
        if isinstance(self.chunk_elements, bool) or not isinstance(self.chunk_elements, int) or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {self.chunk_elements!r}")


# ---------------------------------------------------------------------------------------------------------
# Triton path
def _launch_args(logits: torch.Tensor, labels: torch.Tensor, opts: TokenStatsOptions) -> dict[str, Any]:
    """Grid, arguments, constexprs and outputs of one launch (the compile test builds from this too)."""
    N, V = logits.shape
    dev = logits.device
    outputs = dict(logp=torch.empty(N, dtype=torch.float32, device=dev),
                   mean=torch.empty(N, dtype=torch.float32, device=dev),
                   var=torch.empty(N, dtype=torch.float32, device=dev),
                   argmax=torch.empty(N, dtype=torch.int8, device=dev))
    args = dict(logits_ptr=logits, stride_logits_n=logits.stride(0), labels_ptr=labels,
                logp_ptr=outputs["logp"], mean_ptr=outputs["mean"], var_ptr=outputs["var"],
                argmax_ptr=outputs["argmax"], V=V, ignore_index=opts.ignore_index)
    constexprs = dict(BLOCK_V=min(BLOCK_V_MAX[logits.dtype], max(16, 1 << (V - 1).bit_length())))
    return dict(grid=(N,), args=args, constexprs=constexprs, num_warps=NUM_WARPS, outputs=outputs,
                signature=signature_of(args, constexprs))


def token_stats_triton(logits: torch.Tensor, labels: torch.Tensor, opts: TokenStatsOptions) -> TokenStats:
    from fastweight.kernels.token_stats import _token_stats_fwd

    if logits.stride(1) != 1:
        logits = logits.contiguous()
    la = _launch_args(logits, labels, opts)
    out = la["outputs"]
    if logits.shape[0] > 0:
        launch_kernel(_token_stats_fwd, la)
    return TokenStats(out["logp"], out["argmax"].bool(), out["mean"], out["var"])


def aot_cases() -> list[dict[str, Any]]:
    """Each dtype at its largest BLOCK_V, plus a small tile with int32 labels (tests/test_compile_aot.py)."""
    from fastweight.kernels import token_stats as k

    cases = []
    shapes = [(dt, BLOCK_V_MAX[dt] * 3 + 1, torch.int64) for dt in BLOCK_V_MAX] + [(torch.bfloat16, 1000, torch.int32)]
    for dtype, V, label_dtype in shapes:
        la = _launch_args(torch.empty(2, V, dtype=dtype, device="meta"),
                          torch.empty(2, dtype=label_dtype, device="meta"), TokenStatsOptions())
        name = f"token_stats_fwd_{str(dtype).replace('torch.', '')}_V{V}_{str(label_dtype).replace('torch.', '')}"
        cases.append(dict(name=name, fn=k._token_stats_fwd, signature=la["signature"], constexprs=la["constexprs"],
                          num_warps=la["num_warps"]))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Torch path
def _block_stats(z: torch.Tensor, y: torch.Tensor, ignore_index: int) -> TokenStats:
    """Statistics of a float32 (float64) block z [c, V] that may be overwritten."""
    valid = y != ignore_index
    safe = torch.where(valid, y, 0).long()
    argmax = (z.argmax(1) == safe) & valid
    m = z.amax(1, keepdim=True)
    z_y = z.gather(1, safe[:, None]).squeeze(1)
    d = z.sub_(m)
    e = d.exp()
    s0 = e.sum(1)
    e.mul_(d)
    s1 = e.sum(1)
    s2 = e.mul_(d).sum(1)
    log_s0 = s0.log()
    mean_d = s1 / s0
    zero = torch.zeros_like(s0)
    return TokenStats(torch.where(valid, z_y - m.squeeze(1) - log_s0, zero), argmax,
                      torch.where(valid, mean_d - log_s0, zero),
                      torch.where(valid, (s2 / s0 - mean_d * mean_d).clamp_(min=0.0), zero))


def _gather_stats(parts: list[TokenStats], N: int, device, acc) -> TokenStats:
    if not parts:
        z = torch.zeros(N, dtype=acc, device=device)
        return TokenStats(z, torch.zeros(N, dtype=torch.bool, device=device), z.clone(), z.clone())
    return TokenStats(*(torch.cat(t) for t in zip(*parts)))


def token_stats_torch(logits: torch.Tensor, labels: torch.Tensor, opts: TokenStatsOptions) -> TokenStats:
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    parts = [_block_stats(logits[s:e].to(acc, copy=True), labels[s:e], opts.ignore_index)
             for s, e in row_chunks(N, V, opts.chunk_elements)]
    return _gather_stats(parts, N, logits.device, acc)


_BACKENDS = {"triton": token_stats_triton, "torch": token_stats_torch}


# ---------------------------------------------------------------------------------------------------------
# Public
def _flat(x: torch.Tensor, labels: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(labels, torch.Tensor) or x.dim() < 2 or labels.shape != x.shape[:-1]:
        raise ValueError(f"labels must have the shape of {what} without its last dimension: {what} "
                         f"{tuple(x.shape)}, labels {tuple(getattr(labels, 'shape', ()))}")
    return x.reshape(-1, x.shape[-1]), labels.reshape(-1)


def _shaped(stats: TokenStats, shape: torch.Size) -> TokenStats:
    return TokenStats(*(t.reshape(shape) for t in stats))


@torch.no_grad()
def token_stats(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                backend: str | None = "auto") -> TokenStats:
    """Per-token (logp, argmax, mean, var) of ``logits`` [..., V] (fp32/bf16/fp16; fp64 on torch) for integer
    ``labels`` [...]; each output has the shape of ``labels`` (float32, bool; float64 for float64 logits on the
    torch path). No shift is applied: pass logits and labels already aligned. Not differentiable."""
    opts = TokenStatsOptions(ignore_index=ignore_index, backend=backend)
    z, y = _flat(logits, labels, "logits")
    if z.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    check_labels(y, z.shape[:1], z.device, z.shape[1], ignore_index)
    return _shaped(_BACKENDS[resolve_backend(backend, z)](z, y, opts), labels.shape)


@torch.no_grad()
def linear_token_stats(hidden: torch.Tensor, labels: torch.Tensor, *, lm_head: torch.Tensor,
                       bias: torch.Tensor | None = None, softcap: float | None = None,
                       logit_scale: float = 1.0, ignore_index: int = IGNORE_INDEX, backend: str | None = "auto",
                       chunk_elements: int = TORCH_CHUNK_ELEMENTS) -> TokenStats:
    """``token_stats(cap(logit_scale * (hidden @ lm_head.T + bias)), labels)`` without the ``[N, V]`` logits.

    hidden [..., H] and lm_head [V, H] of one floating dtype, bias [V] or None, labels [...] integer. The logits
    are formed ``chunk_elements // V`` rows at a time in float32 (the float32 GEMM results of 16-bit operands on
    CUDA; the upcast operands elsewhere), then each chunk goes through ``token_stats``'s backend ("triton": the
    statistics kernel on the chunk; "torch": the chunked torch twin). Not differentiable.
    """
    opts = TokenStatsOptions(ignore_index=ignore_index, softcap=softcap, backend=backend,
                             chunk_elements=chunk_elements)
    check_logit_scale("logit_scale", logit_scale)
    h, y = _flat(hidden, labels, "hidden")
    if not isinstance(lm_head, torch.Tensor) or lm_head.dim() != 2 or lm_head.shape[1] != h.shape[1]:
        raise ValueError(f"lm_head must be [V, H] with H = {h.shape[1]} (hidden's last dimension), got "
                         f"{tuple(getattr(lm_head, 'shape', ()))}")
    if bias is not None and tuple(bias.shape) != (lm_head.shape[0],):
        raise ValueError(f"bias must be [V] = [{lm_head.shape[0]}], got {tuple(bias.shape)}")
    V = lm_head.shape[0]
    check_labels(y, h.shape[:1], h.device, V, ignore_index)
    run = _BACKENDS[resolve_backend(backend, h, lm_head)]
    acc = acc_dtype(h.dtype)
    W = gemm_operand(lm_head, acc)
    b = None if bias is None else bias.to(acc)
    parts = []
    for s, e in row_chunks(h.shape[0], V, opts.chunk_elements):
        z = linear(gemm_operand(h[s:e], acc, W), W, b)
        if logit_scale != 1.0:  # Granite's 1 / logits_scaling, Cohere's logit_scale
            z.mul_(logit_scale)
        if softcap is not None:
            z = z.mul_(1.0 / softcap).tanh_().mul_(softcap)
        parts.append(run(z, y[s:e], opts))
        del z
    return _shaped(_gather_stats(parts, h.shape[0], h.device, acc), labels.shape)


__all__ = ["TokenStats", "TokenStatsOptions", "linear_token_stats", "token_stats"]
