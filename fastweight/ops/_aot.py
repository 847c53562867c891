"""Compile a kernel launch ahead of time exactly as Triton's JIT would, and read its resource usage.

A launch ``kernel[grid](**args, **constexprs, num_warps=...)`` does not compile the bare signature: Triton's
binder (``triton.runtime.jit.create_function_from_signature`` around ``native_specialize_impl``) first
specialises every argument on its value — pointers and integers divisible by 16 get a ``tt.divisibility``
hint, integers equal to 1 become constants — and those hints change the generated code (vector widths,
pipelining, register pressure). ``compile_launch`` runs that same binder and ``JITFunction._pack_args`` for a
chosen ``GPUTarget`` on the arguments ``_launch_args`` built from real (or 'meta') tensors, then
``triton.compile``: the binary is the one a launch with those arguments would build on that architecture.
No GPU is needed. ``resource_usage`` reads registers / stack / shared memory with ``cuobjdump -res-usage``
shipped in the Triton wheel.

Triton is imported inside the functions only, so this module costs nothing where Triton is absent.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any

# Opt-in maximum dynamic shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def compile_launch(fn, launch: dict[str, Any], cc: int):
    """``triton.compile`` of ``fn`` specialised on ``launch`` (a ``_launch_args`` result) for sm_``cc``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = {k: launch[k] for k in ("num_warps", "num_stages", "maxnreg") if launch.get(k) is not None}
    bound, specialization, options = binder(**launch["args"], **launch["constexprs"], **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def cuobjdump_path() -> str | None:
    """The ``cuobjdump`` binary of the installed Triton wheel (or None)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(kernel) -> dict[str, int]:
    """{"registers", "stack", "static_shared", "local", "shared"} of a compiled kernel (per thread /
    per block bytes). "stack" is ptxas's spill + local stack per thread; "shared" is Triton's total
    (dynamic) shared memory per block."""
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found in the Triton wheel (triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    reg, stack, static_shared, local = map(int, m.groups())
    return dict(registers=reg, stack=stack, static_shared=static_shared, local=local,
                shared=int(kernel.metadata.shared))


def recorded_cases(module) -> list[tuple[dict[str, Any], tuple[tuple, dict]]]:
    """``module.aot_cases()`` with, for each case, the (args, kwargs) of the ``_launch_args`` call behind it.

    The module's ``_launch_args`` is wrapped while ``aot_cases`` runs; a case is matched to its call by the
    identity of the signature dict it carries, so no op has to return its call arguments.
    """
    calls = {}
    original = module._launch_args

    def recording(*args, **kwargs):
        la = original(*args, **kwargs)
        calls[id(la["signature"])] = (args, kwargs)
        return la

    module._launch_args = recording
    try:
        cases = module.aot_cases()
    finally:
        module._launch_args = original
    out = []
    for case in cases:
        if id(case["signature"]) not in calls:
            raise RuntimeError(f"{module.__name__}: case {case['name']} does not carry _launch_args' signature")
        out.append((case, calls[id(case["signature"])]))
    return out


def relaunch(module, call: tuple[tuple, dict], *, align: int | None = None) -> dict[str, Any]:
    """``module._launch_args`` for a recorded call; with ``align``, every tensor dimension is rounded up to a
    multiple of ``align`` first (real models' hidden and vocabulary sizes, which turn divisibility hints on)."""
    import torch

    def resize(x):
        if align is None or not isinstance(x, torch.Tensor):
            return x
        return torch.zeros([-(-s // align) * align for s in x.shape], dtype=x.dtype, device=x.device)

    args, kwargs = call
    return module._launch_args(*(resize(a) for a in args), **{k: resize(v) for k, v in kwargs.items()})
