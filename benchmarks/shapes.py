"""Problem sizes of the benchmarks: the one place where N, H and V are written down (STYLE.md section 6).

H and V come from real output heads (hidden size and vocabulary of the named model); N is the number of
tokens in one step (batch x sequence). Sets are chosen with ``FASTWEIGHT_BENCH_SIZES`` (or
``pytest benchmarks/ --bench-sizes ...``), a comma-separated list of set or shape names:

=========  ==========================================================================================
set        shapes
=========  ==========================================================================================
quick      (default) small CPU shape(s): the whole ``pytest benchmarks/`` stays well under 3 minutes
reference  N=4096, H=576, V=49152: SmolLM2-135M's head, the issue-8 CPU reference size
ladder     N=1024, 2048, 4096 at SmolLM2-135M's head (smol-1k, smol-2k, reference): how a lead scales with N
llama      N=8192, H=4096, V=32000: Llama-2-7B's head (GPU only: skipped on CPU)
gemma      N=8192, H=2304, V=256000: Gemma-2-2B's head (GPU only; 8 GB of fp32 logits)
gpu        reference + llama + gemma
all        every shape above
(names)    any single shape by name, e.g. smol-2k
=========  ==========================================================================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SIZES_ENV = "FASTWEIGHT_BENCH_SIZES"

# Output heads the shapes are derived from: model -> (hidden size H, vocabulary V), from each model's config.
MODELS: dict[str, tuple[int, int]] = {
    "SmolLM2-135M": (576, 49152),
    "Llama-2-7B": (4096, 32000),
    "Gemma-2-2B": (2304, 256000),
}


@dataclass(frozen=True)
class Shape:
    """One fused-linear problem: hidden [n, h], lm_head [v, h], labels [n]."""

    name: str
    n: int
    h: int
    v: int
    source: str  # the model whose head gives (h, v), or why the shape looks the way it does
    gpu_only: bool = False  # skipped on CPU: hours per case there (and tens of GB for the naive path)

    def __str__(self) -> str:
        return f"{self.name} (N={self.n}, H={self.h}, V={self.v})"

    def logits_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one [N, V] logits tensor in ``dtype``."""
        return self.n * self.v * dtype_bytes(dtype)

    def floor_bytes(self, dtype: torch.dtype, backward: bool) -> int:
        """Memory floor of the step beyond its inputs: the two gradients d hidden and d lm_head, + O(N)."""
        grads = (self.n * self.h + self.v * self.h) * dtype_bytes(dtype) if backward else 0
        return grads + 4 * self.n

    def flops(self, backward: bool) -> int:
        """GEMM FLOPs: 2NHV for the logits, twice that again for d hidden and d lm_head."""
        return (6 if backward else 2) * self.n * self.h * self.v


def _head(model: str, n: int, name: str, gpu_only: bool = False) -> Shape:
    h, v = MODELS[model]
    return Shape(name, n, h, v, f"{model} head", gpu_only)


# quick: large enough that the [N, V] logits (32 MB fp32) dominate memory and the GEMMs dominate time, small
# enough that every provider, torch.compile included, runs in seconds on a 2-core CPU.
QUICK = Shape("quick", 1024, 128, 8192, "CI size (small; V = 8192 so logits dominate)")
REFERENCE = _head("SmolLM2-135M", 4096, "reference")
SMOL_1K = _head("SmolLM2-135M", 1024, "smol-1k")
SMOL_2K = _head("SmolLM2-135M", 2048, "smol-2k")
LLAMA = _head("Llama-2-7B", 8192, "llama", gpu_only=True)
GEMMA = _head("Gemma-2-2B", 8192, "gemma", gpu_only=True)

SETS: dict[str, tuple[Shape, ...]] = {
    "quick": (QUICK,),
    "reference": (REFERENCE,),
    "ladder": (SMOL_1K, SMOL_2K, REFERENCE),
    "llama": (LLAMA,),
    "gemma": (GEMMA,),
}
SETS["gpu"] = (REFERENCE, LLAMA, GEMMA)
SETS["all"] = (QUICK, SMOL_1K, SMOL_2K, REFERENCE, LLAMA, GEMMA)
SETS.update({s.name: (s,) for s in SETS["all"] if s.name not in SETS})
QUICK_SHAPES = frozenset(SETS["quick"])

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def select(spec: str | None = None) -> list[Shape]:
    """Shapes named by ``spec`` (default: ``$FASTWEIGHT_BENCH_SIZES`` or "quick"), in order, no duplicates."""
    spec = spec if spec is not None else os.environ.get(SIZES_ENV, "") or "quick"
    out: list[Shape] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        if word not in SETS:
            raise ValueError(f"{SIZES_ENV}: unknown size set {word!r}; choose from {', '.join(SETS)}")
        out.extend(s for s in SETS[word] if s not in out)
    if not out:
        raise ValueError(f"{SIZES_ENV}={spec!r} selects no shape; choose from {', '.join(SETS)}")
    return out


def by_name(name: str) -> Shape:
    """The shape called ``name`` (used by the memory-probe subprocess)."""
    for shape in SETS["all"]:
        if shape.name == name:
            return shape
    raise ValueError(f"unknown shape {name!r}; known: {', '.join(s.name for s in SETS['all'])}")
