"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Cases come from ``aot_cases()`` of every module of ``fastweight.ops`` that defines it; each case's
signature and constexprs are built by the op's ``_launch_args``, so they cannot drift from the launcher.
"""
from __future__ import annotations

import importlib
import os
import pkgutil

import pytest

# Triton's own ptxas (shipped in the wheel) is used; these keep the compile quiet and CPU-only.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

triton = pytest.importorskip("triton")

import fastweight.ops  # noqa: E402

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)


def _collect():
    cases = []
    for mod in pkgutil.iter_modules(fastweight.ops.__path__):
        module = importlib.import_module(f"fastweight.ops.{mod.name}")
        if hasattr(module, "aot_cases"):
            for case in module.aot_cases():
                cases.append(pytest.param(case, id=f"{mod.name}:{case['name']}"))
    return cases


CASES = _collect()


def test_cases_found():
    names = {c.values[0]["name"] for c in CASES}
    assert any(n.startswith("token_logprobs_fwd") for n in names)
    assert any(n.startswith("token_logprobs_bwd") for n in names)
    assert len(names) == len(CASES), "aot case names must be unique"


def test_token_logprobs_cases_cover_every_constexpr_combination():
    from fastweight.ops.token_logprobs import aot_cases

    fwd = {(c["signature"]["logits_ptr"], c["constexprs"]["HAS_WEIGHTS"], c["constexprs"]["COMPUTE_GRAD"])
           for c in aot_cases() if c["name"].startswith("token_logprobs_fwd")}
    assert fwd == {(f"*{d}", w, g) for d in ("fp32", "bf16", "fp16") for w in (False, True) for g in (False, True)}
    bwd = {c["signature"]["logits_ptr"] for c in aot_cases() if c["name"].startswith("token_logprobs_bwd")}
    assert bwd == {"*fp32", "*bf16", "*fp16"}


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("case", CASES)
def test_compile(case, cc):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=case["fn"], signature=case["signature"], constexprs=case["constexprs"])
    options = {"num_warps": case["num_warps"]} if "num_warps" in case else None
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    cubin = kernel.asm.get("cubin", b"")
    ptx = kernel.asm.get("ptx", "")
    assert len(cubin) > 0 or len(ptx) > 0, f"{case['name']}: empty cubin and PTX for sm_{cc}"
    assert f"sm_{cc}" in ptx or f".target sm_{cc}" in ptx or len(cubin) > 0
    shared = kernel.metadata.shared
    assert shared <= SHARED_LIMIT[cc], f"{case['name']}: {shared} bytes of shared memory > sm_{cc} limit {SHARED_LIMIT[cc]}"
