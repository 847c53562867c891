"""The implementations the benchmarks compare, all solving one problem: the SatImp forget loss of a step.

Problem: hidden [N, H], lm_head W [V, H], labels [N] (some ``IGNORE_INDEX``) ->
``loss = tokmean(sg[p**beta1 (1 - p)**beta2] * log p)`` with ``log p_t = log_softmax(hidden @ W.T)[t, y_t]``
(``shared/spec/LOSSES.md``, SatImp; beta1, beta2 = the registry defaults), a float32 0-d tensor, and for
mode "fwd_bwd" its gradients d hidden and d lm_head. Every provider starts from hidden states, so the
GEMMs are part of every timing.

Providers (``PROVIDERS``; a missing or unsupported one raises ``Unavailable`` with the reason, and the
benchmark skips with that reason):

==========================  =================================================================================
fastweight                  ``fastweight.satimp_loss(hidden, labels, lm_head=W)``: fused linear, no logits
fastweight_triton           the same with ``backend="triton"``: the fused-linear Triton kernels (CUDA only; ``auto``
                            runs fused-linear ops on the chunk loops with cuBLAS products, faster on an H200)
fastweight_logits           ``satimp_loss(hidden @ W.T, labels)``: fastweight's logits path
fastweight_logits_inplace   the same with ``inplace_backward=True`` (gradient written into the logits buffer)
naive                       ``fastweight.reference``: full ``log_softmax`` + ``gather`` + detached weights
compile                     ``torch.compile`` of ``naive``
native                      ``torch.nn.functional.linear_cross_entropy(reduction="none")`` with its chunked
                            ``LinearCrossEntropyOptions()`` (all "auto"), then the weights
cce                         ``cut_cross_entropy.linear_cross_entropy(reduction="none")``, impl "cce" (Triton)
                            on CUDA, "torch_compile" elsewhere, then the weights
liger                       Liger-Kernel ``liger_fused_linear_cross_entropy(reduction="none")`` (Triton; CUDA
                            only), then the weights
==========================  =================================================================================

Variants of ``fastweight`` (the contended-cores study of issue 21; not in the default list): options joined
by ``:``, ``c<rows>`` chunk rows of the torch path (``chunk_elements = rows * V``; default 256 at SmolLM2's
head), ``t<n>`` n threads, ``t-<k>`` k threads fewer than torch's default here, ``omp`` the chunk path's OpenMP ops
instead of the vocabulary blocks on a thread each (``FASTWEIGHT_CPU_BLOCKS=0``). ``fastweight:c1024:t-1`` runs
1024-row chunks on one thread fewer; the benchmark sets the thread count and route for the case's warm-up and
timed rounds and restores them after (``settings_for``).

The per-token cross-entropy providers get ``log p = -ce`` and apply the same O(N) weighting
(``satimp_from_logp``). Also here: the deterministic inputs (``make_inputs``), one step (``run_step``) and
the float64 reference the benchmark checks every provider against (``reference_outputs``).
"""
from __future__ import annotations

import importlib.metadata
import contextlib
import math
import os
import platform
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX
from fastweight.losses import LOSSES
from fastweight.reference.linear_logprobs import linear_weighted_logprobs

from benchmarks.shapes import Shape

BETA1: float = LOSSES["satimp"].defaults["beta1"]
BETA2: float = LOSSES["satimp"].defaults["beta2"]
IGNORED_FRACTION = 1 / 16  # rows labelled IGNORE_INDEX, so every provider's masking is exercised

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden, lm_head, labels) -> loss


class Unavailable(Exception):
    """The provider cannot run here (not installed, no GPU, ...); ``str(exc)`` says why and what to do."""


@dataclass(frozen=True)
class Provider:
    name: str
    what: str
    build: Callable[[torch.device, torch.dtype], LossFn]  # raises Unavailable


@dataclass
class Outputs:
    """One step's results: loss (0-d), and for forward + backward the gradients."""

    loss: torch.Tensor
    d_hidden: torch.Tensor | None = None
    d_lm_head: torch.Tensor | None = None

    def items(self) -> list[tuple[str, torch.Tensor]]:
        pairs = [("loss", self.loss), ("d_hidden", self.d_hidden), ("d_lm_head", self.d_lm_head)]
        return [(k, v) for k, v in pairs if v is not None]


# ------------------------------------------------------------------------------------------------ inputs


LIKELIHOODS = ("spread", "low")
# "low": log p_t of the targets uniform in about [LOW_LOGP[0], LOW_LOGP[1]], as on forget tokens after
# unlearning; SatImp's p**5 then spans normal, subnormal (log p in [-20.7, -17.5]) and 0 in float32.
LOW_LOGP = (-25.0, -5.0)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                likelihood: str = "spread"):
    """Deterministic (hidden [N, H], lm_head [V, H], labels [N]).

    W has unit-norm-ish rows (randn / sqrt(H)); each hidden row is noise plus ``gain * W[y]``.
    ``likelihood="spread"``: gain uniform in [0, 2 log V], so the target logit sits from far below to far
    above log V: p_t covers ~0 to ~1 (confident rows included, where 1 - p needs care) and the SatImp
    weights are not all ~0. ``"low"`` (unlearned): the other logits are ~N(0, 1), so lse ~ log V + 1/2, and
    gain = lse + log p with log p uniform in ``LOW_LOGP``: every target is unlikely.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    n, h, v = shape.n, shape.h, shape.v
    lm_head = torch.randn(v, h, generator=g, device=device) / math.sqrt(h)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    gain = torch.rand(n, 1, generator=g, device=device) * (2 * math.log(v))
    if likelihood == "low":
        lo, hi = LOW_LOGP
        gain = gain / (2 * math.log(v)) * (hi - lo) + (lo + math.log(v) + 0.5)
    hidden = torch.randn(n, h, generator=g, device=device).add_(lm_head[labels] * gain)
    ignored = torch.rand(n, generator=g, device=device) < IGNORED_FRACTION
    labels = torch.where(ignored, torch.full_like(labels, IGNORE_INDEX), labels)
    return hidden.to(dtype), lm_head.to(dtype), labels


def run_step(fn: LossFn, hidden: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor,
             backward: bool) -> Outputs:
    """One training step (fresh leaves, so gradients are allocated as in a real step) or one forward."""
    if not backward:
        with torch.no_grad():
            return Outputs(fn(hidden, lm_head, labels))
    h = hidden.detach().requires_grad_()
    w = lm_head.detach().requires_grad_()
    loss = fn(h, w, labels)
    loss.backward()
    return Outputs(loss.detach(), h.grad, w.grad)


def reference_outputs(hidden: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor,
                      chunk_elements: int = 1 << 24) -> Outputs:
    """Float64 ground truth from ``fastweight.reference`` (full log_softmax per chunk of rows, autograd).

    The loss is a sum over rows divided by the number of valid rows, so it is computed in row chunks
    (``chunk_elements`` float64 logits each) to keep memory bounded at the GPU sizes.
    """
    h64 = hidden.detach().to(torch.float64)
    w64 = lm_head.detach().to(torch.float64).requires_grad_()
    n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1).to(torch.float64)
    rows = max(1, chunk_elements // lm_head.shape[0])
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    d_hidden = torch.empty_like(h64)
    for start in range(0, h64.shape[0], rows):
        hc = h64[start:start + rows].clone().requires_grad_()
        part = linear_weighted_logprobs(hc, w64, labels[start:start + rows], beta1=BETA1, beta2=BETA2,
                                        reduction="sum", divisor=n_valid)
        part.backward()
        loss += part.detach()
        d_hidden[start:start + rows] = hc.grad
    return Outputs(loss, d_hidden, w64.grad)


def rel_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """max |value - truth| / max |truth| (absolute when truth is all 0), in float64."""
    diff = (value.detach().to(torch.float64) - truth).abs().max().item()
    scale = truth.abs().max().item()
    return diff / scale if scale > 0 else diff


# ------------------------------------------------------------------------------------------------ providers


def satimp_from_logp(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """tokmean(sg[p**beta1 (1 - p)**beta2] * log p) from per-token log p [N] (0 where ignored)."""
    valid = labels != IGNORE_INDEX
    lp = logp.detach().float()
    w = torch.where(valid, lp.exp().pow(BETA1) * (-torch.expm1(lp)).pow(BETA2), 0.0)
    return (w * logp.float()).sum() / valid.sum().clamp(min=1)


def _naive_fn(hidden, lm_head, labels):
    return linear_weighted_logprobs(hidden, lm_head, labels, beta1=BETA1, beta2=BETA2)


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _needs_compile_backend(device: torch.device, what: str) -> None:
    if device.type == "cpu" and _cxx_compiler() is None:
        raise Unavailable(f"{what} needs a C++ compiler for torch.compile on CPU (none of $CXX, g++, c++, clang++)")
    if device.type == "cuda" and not _installed("triton"):
        raise Unavailable(f"{what} needs triton for torch.compile on CUDA")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _fastweight(device, dtype) -> LossFn:
    import fastweight

    return lambda h, w, y: fastweight.satimp_loss(h, y, lm_head=w, beta1=BETA1, beta2=BETA2)


def _fastweight_triton(device, dtype) -> LossFn:
    import fastweight

    if device.type != "cuda":
        raise Unavailable("the fused-linear Triton kernels need a CUDA GPU")
    return lambda h, w, y: fastweight.satimp_loss(h, y, lm_head=w, beta1=BETA1, beta2=BETA2, backend="triton")


def _fastweight_logits(device, dtype, inplace: bool = False) -> LossFn:
    import fastweight

    def fn(h, w, y):
        return fastweight.satimp_loss(F.linear(h, w), y, beta1=BETA1, beta2=BETA2, inplace_backward=inplace)

    return fn


def _naive(device, dtype) -> LossFn:
    return _naive_fn


def _compile(device, dtype) -> LossFn:
    _needs_compile_backend(device, "compile")
    return torch.compile(_naive_fn)


def _native(device, dtype) -> LossFn:
    if not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)

    def fn(h, w, y):
        # options=None is the unchunked reference path (= naive); the chunked path with its "auto" defaults
        # is the one meant for LLM heads.
        kw = {"options": options_cls()} if options_cls is not None else {}
        ce = F.linear_cross_entropy(h, w, y, reduction="none", ignore_index=IGNORE_INDEX, **kw)
        return satimp_from_logp(-ce, y)

    return fn


def _cce(device, dtype) -> LossFn:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"cut-cross-entropy is not installed (pip install cut-cross-entropy): {exc}") from None
    impl = "cce" if device.type == "cuda" else "torch_compile"
    if impl == "cce" and dtype == torch.float32:
        raise Unavailable("cut-cross-entropy's CUDA backward needs bf16/fp16 embeddings (it asserts so)")
    _needs_compile_backend(device, f"cce impl={impl}")

    def fn(h, w, y):
        ce = linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="none", impl=impl)
        return satimp_from_logp(-ce, y)

    return fn


def _liger(device, dtype) -> LossFn:
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel is Triton-only: needs a CUDA GPU")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"liger-kernel is not installed (pip install liger-kernel): {exc}") from None

    def fn(h, w, y):
        ce = liger_fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="none")
        return satimp_from_logp(-ce, y)

    return fn


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("fastweight", "fastweight fused linear (hidden + lm_head)", _fastweight),
    Provider("fastweight_triton", "fastweight fused linear, backend='triton' (the fused-linear kernels)",
             _fastweight_triton),
    Provider("fastweight_logits", "fastweight logits path (hidden @ W.T, then satimp_loss)", _fastweight_logits),
    Provider("fastweight_logits_inplace", "fastweight logits path, inplace_backward=True",
             lambda device, dtype: _fastweight_logits(device, dtype, inplace=True)),
    Provider("naive", "log_softmax + gather + weights (fastweight.reference)", _naive),
    Provider("compile", "torch.compile(naive)", _compile),
    Provider("native", "torch F.linear_cross_entropy(reduction='none', chunked) + weights", _native),
    Provider("cce", "cut_cross_entropy.linear_cross_entropy(reduction='none') + weights", _cce),
    Provider("liger", "Liger-Kernel fused linear CE (reduction='none') + weights", _liger),
)}


DEFAULT_THREADS = torch.get_num_threads()  # torch's default here, before any case changes it
VARIANT_BASES = ("fastweight",)
OPTIONS = "(c<rows>, t<n>, t-<k>, omp)"


@dataclass(frozen=True)
class Variant:
    """A provider name split into its base and options: ``fastweight:c512:t-1``."""

    base: str
    chunk_rows: int | None = None
    threads: int | None = None  # absolute thread count
    omp: bool = False  # the chunk path's OpenMP ops instead of the vocabulary blocks (FASTWEIGHT_CPU_BLOCKS=0)


def parse_variant(name: str) -> Variant:
    """``Variant`` of a provider name; ValueError naming the bad part for an unknown option or base."""
    base, *parts = name.split(":")
    if not parts:
        return Variant(base)
    if base not in VARIANT_BASES:
        raise ValueError(f"provider {name!r}: only {', '.join(VARIANT_BASES)} takes options {OPTIONS}")
    rows = threads = None
    omp = False
    for part in parts:
        if part == "omp":
            omp = True
        elif re.fullmatch(r"c[1-9][0-9]*", part):
            rows = int(part[1:])
        elif re.fullmatch(r"t-?[1-9][0-9]*", part):
            n = int(part[1:])
            threads = DEFAULT_THREADS + n if n < 0 else n
            if threads < 1:
                raise ValueError(f"provider {name!r}: {part} leaves {threads} threads of {DEFAULT_THREADS}")
        else:
            raise ValueError(f"provider {name!r}: unknown option {part!r} {OPTIONS}")
    return Variant(base, rows, threads, omp)


def known(name: str) -> bool:
    """True for a provider of ``PROVIDERS`` or a valid variant of one."""
    try:
        return parse_variant(name).base in PROVIDERS
    except ValueError:
        return False


@contextlib.contextmanager
def settings_for(name: str):
    """Run the block with the variant's thread count (torch's, which MKL and oneDNN follow) and CPU route,
    both restored after."""
    v = parse_variant(name)
    before, route = torch.get_num_threads(), os.environ.get("FASTWEIGHT_CPU_BLOCKS")
    if v.threads is not None:
        torch.set_num_threads(v.threads)
    if v.omp:
        os.environ["FASTWEIGHT_CPU_BLOCKS"] = "0"
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if route is None:
            os.environ.pop("FASTWEIGHT_CPU_BLOCKS", None)
        else:
            os.environ["FASTWEIGHT_CPU_BLOCKS"] = route


def describe(name: str) -> str:
    """The provider's description, with a variant's options."""
    v = parse_variant(name)
    extra = []
    if v.chunk_rows is not None:
        extra.append(f"{v.chunk_rows}-row chunks")
    if v.threads is not None:
        extra.append(f"{v.threads} threads")
    if v.omp:
        extra.append("OpenMP chunk ops, no vocabulary blocks")
    return PROVIDERS[v.base].what + (f" ({', '.join(extra)})" if extra else "")


def _fastweight_chunked(rows: int) -> LossFn:
    from fastweight.ops import linear_logprobs as ll

    def fn(h, w, y):
        opts = ll.LinearLogprobsOptions(beta1=BETA1, beta2=BETA2, weighted=True, reduction="mean",
                                        chunk_elements=rows * w.shape[0])
        return ll.linear_weighted_logprobs_2d(h, w, None, y, opts)[0]  # tokmean(w log p), as satimp_loss

    return fn


def build(name: str, device: torch.device, dtype: torch.dtype) -> LossFn:
    """The provider's loss function, or Unavailable with the reason."""
    variant = parse_variant(name)
    if variant.base not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    if (variant.chunk_rows is not None or variant.omp) and torch.device(device).type != "cpu":
        raise Unavailable(f"{name}: chunk rows and omp are CPU torch-path options")
    if variant.chunk_rows is not None:
        return _fastweight_chunked(variant.chunk_rows)
    return PROVIDERS[variant.base].build(torch.device(device), dtype)


# ------------------------------------------------------------------------------------------------ environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict:
    """Machine and versions, recorded with every benchmark."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastweight": _version("fastweight"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "liger_kernel": _version("liger-kernel"),
        "cuda": torch.version.cuda,
    }
