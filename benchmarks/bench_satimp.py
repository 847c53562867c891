"""SatImp forget loss, forward (+ backward), every implementation side by side: time, peak memory, accuracy.

    pytest benchmarks/                                         # quick set, CPU or the first GPU (< 3 min on CPU)
    FASTWEIGHT_BENCH_SIZES=reference pytest benchmarks/ --benchmark-json=run.json
    python -m benchmarks.report run.json                       # Markdown table + PNG chart

One test, parametrised by shape x dtype x mode x regime x provider (``benchmarks/shapes.py``,
``benchmarks/regimes.py``: quiet, loaded = busy processes beside the run, unlearned = low-likelihood
inputs; ``benchmarks/providers.py``; options in ``benchmarks/conftest.py``). Per case:

1. build the provider (skip with the reason when it is missing or unsupported here);
2. run it once on the case's inputs (the warm-up: compilation, autotuning) and check loss / d hidden /
   d lm_head against the float64 reference, error-relative to the naive path in the same dtype
   (STYLE.md section 5), so a fast wrong answer fails instead of winning;
3. time it with ``benchmark.pedantic`` (CUDA synchronised inside the timed call);
4. peak extra memory (``benchmarks/memory.py``: CUDA allocator peak delta, or a fresh subprocess' RSS).

``extra_info`` of every case holds: the shape, provider, errors vs float64 (and the naive path's), peak
memory and how it was measured, the floors (a measured ``hidden @ W.T`` GEMM time -> ``6NHV`` FLOPs floor,
and ``bytes * (N*H + V*H)`` memory floor), device name, versions and thread count.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import pytest
import torch

from benchmarks import memory, providers, regimes, shapes
from benchmarks.providers import Outputs, Unavailable
from fastweight.ops import _gemm

# Accuracy gate: |impl - gt| <= ERR_FACTOR * |naive - gt| + ERR_EPS * eps(dtype), errors relative to max |gt|.
# 10x the naive path's error still catches real bugs: at the quick fp32 shape undetached weights, beta2 = 1
# and a mean that counts ignored rows are 100x-5000x over it, fp16-rounded inputs 5x (d hidden). The eps
# term covers outputs where the naive error happens to be ~0.
ERR_FACTOR = 10.0
ERR_EPS = 2.0


# Timed rounds: quick shapes get ~QUICK_BUDGET_S of timing each so the whole CPU run stays
# short even for a slow provider (1 to 10 rounds); larger shapes get LARGE_ROUNDS. --bench-rounds overrides both.
QUICK_BUDGET_S = 2.0
LARGE_ROUNDS = 3


def _rounds(shape: shapes.Shape, warm_s: float) -> int:
    if shape not in shapes.QUICK_SHAPES:
        return LARGE_ROUNDS
    return int(min(10, max(1, QUICK_BUDGET_S // max(warm_s, 1e-6))))


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    opts = metafunc.config.fastweight_bench
    params = []
    for shape in opts.shapes:
        for dtype in opts.dtypes:
            for mode in opts.modes:
                for regime in opts.regimes:
                    for name in opts.providers:
                        marks = [pytest.mark.quick] if shape in shapes.QUICK_SHAPES else []
                        tag = "" if regime == "quiet" else f"{regime}-"
                        params.append(pytest.param((shape, dtype, mode, name, regime), marks=marks,
                                                   id=f"{shape.name}-{dtype}-{mode}-{tag}{name}"))
    metafunc.parametrize("case", params)


@dataclass
class Problem:
    """Inputs and everything derived from them once per (shape, dtype): reference, naive error, floor."""

    shape: shapes.Shape
    dtype: str
    likelihood: str
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    truth: Outputs
    naive_errors: dict[str, float]
    gemm_s: float


class Context:
    """Session state: device, options, and the Problem of the current (shape, dtype) (one at a time)."""

    def __init__(self, opts):
        self.opts = opts
        self.device = torch.device(opts.device)
        self._problem: Problem | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def problem(self, shape: shapes.Shape, dtype: str, likelihood: str = "spread") -> Problem:
        p = self._problem
        if p is not None and p.shape == shape and p.dtype == dtype and p.likelihood == likelihood:
            return p
        self._problem = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        inputs = providers.make_inputs(shape, shapes.DTYPES[dtype], self.device, likelihood=likelihood)
        truth = providers.reference_outputs(*inputs)
        naive = providers.run_step(providers.build("naive", self.device, shapes.DTYPES[dtype]), *inputs,
                                   backward=True)
        naive_errors = {k: providers.rel_error(v, getattr(truth, k)) for k, v in naive.items()}
        del naive
        self._problem = Problem(shape, dtype, likelihood, inputs, truth, naive_errors,
                                self.gemm_seconds(*inputs[:2]))
        return self._problem

    def gemm_seconds(self, hidden: torch.Tensor, lm_head: torch.Tensor) -> float:
        """Best time of one ``hidden @ lm_head.T`` (the unit of the FLOPs floor), same machine, same run.

        The faster of ``torch.mm`` and the torch path's own GEMM (``fastweight.ops._gemm.linear``: oneDNN for
        float32 on CPU, where ``torch.mm`` takes MKL's slower sgemm on the AMD CI machine), so the floor is the
        best GEMM rate available here, not the rate of one library.
        """
        def timed(fn) -> float:
            def once() -> float:
                t = time.perf_counter()
                fn(hidden, lm_head)
                self.sync()
                return time.perf_counter() - t

            once()
            times, start = [], time.perf_counter()
            while len(times) < 3 or (len(times) < 20 and time.perf_counter() - start < 1.0):
                times.append(once())
            return min(times)

        with torch.no_grad():
            return min(timed(lambda h, w: torch.mm(h, w.t())), timed(_gemm.linear))


@pytest.fixture(scope="session")
def bench_context(request) -> Context:
    return Context(request.config.fastweight_bench)


def _check(name: str, out: Outputs, problem: Problem, backward: bool) -> dict[str, float]:
    """Errors vs float64; fail (not skip) when an output is worse than the gate allows."""
    eps = torch.finfo(shapes.DTYPES[problem.dtype]).eps
    errors, bad = {}, []
    for key, value in out.items():
        err = providers.rel_error(value, getattr(problem.truth, key))
        errors[key] = err
        bound = ERR_FACTOR * problem.naive_errors[key] + ERR_EPS * eps
        if not err <= bound:  # NaN fails too
            bad.append(f"{key}: rel. error {err:.3g} > {bound:.3g} (naive {problem.naive_errors[key]:.3g})")
    expected = {"loss", "d_hidden", "d_lm_head"} if backward else {"loss"}
    if set(errors) != expected:
        bad.append(f"outputs {sorted(errors)} instead of {sorted(expected)}")
    if bad:
        pytest.fail(f"{name} disagrees with the float64 reference:\n  " + "\n  ".join(bad))
    return errors


def test_satimp(benchmark, case, bench_context, request):
    shape, dtype, mode, name, regime = case
    ctx, torch_dtype, backward = bench_context, shapes.DTYPES[dtype], mode == "fwd_bwd"
    if shape.gpu_only and ctx.device.type != "cuda":
        pytest.skip(f"shape {shape.name} is sized for GPUs (hours per case on a CPU)")
    try:
        fn = providers.build(name, ctx.device, torch_dtype)
    except Unavailable as exc:
        pytest.skip(f"{name}: {exc}")
    problem = ctx.problem(shape, dtype, regimes.LIKELIHOOD[regime])
    hidden, lm_head, labels = problem.inputs

    def step() -> None:
        providers.run_step(fn, hidden, lm_head, labels, backward)
        ctx.sync()

    # "loaded": busy processes from the warm-up to the last round; a variant's thread count as long
    with regimes.conditions(regime), providers.settings_for(name):
        out = providers.run_step(fn, hidden, lm_head, labels, backward)  # warm-up and the checked run
        ctx.sync()
        errors = _check(name, out, problem, backward)
        del out
        start = time.perf_counter()
        step()  # second warm-up (allocator, caches); its time sizes the quick set's rounds
        rounds = ctx.opts.rounds or _rounds(shape, time.perf_counter() - start)
        benchmark.group = f"{shape.name} {dtype} {mode}" + ("" if regime == "quiet" else f" {regime}")
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
        threads = torch.get_num_threads()

    mem = {"peak_extra_bytes": None, "method": "disabled (--bench-memory off)"}
    if regime != "quiet":
        mem = {"peak_extra_bytes": None, "method": "probed in the quiet regime only (same shapes and code)"}
    elif ctx.opts.memory:
        if ctx.device.type == "cuda":
            mem = memory.cuda_peak(lambda: providers.run_step(fn, hidden, lm_head, labels, backward), ctx.device)
        else:
            mem = memory.cpu_peak(name, shape.name, dtype, mode)

    flops = shape.flops(backward)
    info = {
        "provider": name, "what": providers.describe(name),
        "shape": shape.name, "N": shape.n, "H": shape.h, "V": shape.v, "source": shape.source,
        "dtype": dtype, "mode": mode, "regime": regime, "beta1": providers.BETA1, "beta2": providers.BETA2,
        "load_processes": regimes.LOAD_PROCESSES if regime == "loaded" else 0,
        **{f"err_{k}": v for k, v in errors.items()},
        **{f"naive_err_{k}": v for k, v in problem.naive_errors.items()},
        "peak_extra_bytes": mem["peak_extra_bytes"], "memory_method": mem["method"],
        "warmup_retained_bytes": mem.get("warmup_retained_bytes"),
        "gemm_s": problem.gemm_s, "gemm_flops_per_s": 2 * shape.n * shape.h * shape.v / problem.gemm_s,
        "floor_s": problem.gemm_s * flops / (2 * shape.n * shape.h * shape.v),
        "floor_flops": flops, "mem_floor_bytes": shape.floor_bytes(torch_dtype, backward),
        "logits_bytes": shape.logits_bytes(torch_dtype), "rounds": rounds,
        **providers.environment(ctx.device), "threads": threads,
        "chunk_rows": providers.parse_variant(name).chunk_rows,
    }
    benchmark.extra_info.update(info)
    request.config.fastweight_results.append((benchmark, info))


def test_provider_variants():
    """``fastweight:c<rows>:t<n>|t-<k>:omp`` parse to chunk rows, a thread count and the route, bad options name
    themselves, thread count and route hold inside ``settings_for`` only, and a variant computes the default
    provider's loss."""
    P = providers
    assert P.parse_variant("cce") == P.Variant("cce")
    assert P.parse_variant("fastweight:c512") == P.Variant("fastweight", 512, None)
    assert P.parse_variant("fastweight:t1:c64") == P.Variant("fastweight", 64, 1)
    assert P.parse_variant("fastweight:omp") == P.Variant("fastweight", omp=True)
    if P.DEFAULT_THREADS > 1:
        assert P.parse_variant("fastweight:t-1").threads == P.DEFAULT_THREADS - 1
    for bad, match in [("fastweight:x3", "unknown option 'x3'"), ("cce:c64", "only fastweight"),
                       ("fastweight:c0", "unknown option 'c0'"), (f"fastweight:t-{P.DEFAULT_THREADS}", "leaves 0")]:
        with pytest.raises(ValueError, match=match):
            P.parse_variant(bad)
        assert not P.known(bad)
    assert P.known("fastweight:c64:t1") and P.known("naive") and not P.known("nothing")
    before = torch.get_num_threads()
    route = os.environ.get("FASTWEIGHT_CPU_BLOCKS")
    with P.settings_for("fastweight:t1:omp"):
        assert torch.get_num_threads() == 1 and os.environ["FASTWEIGHT_CPU_BLOCKS"] == "0"
    assert torch.get_num_threads() == before and os.environ.get("FASTWEIGHT_CPU_BLOCKS") == route
    assert "64-row chunks" in P.describe("fastweight:c64")
    inputs = P.make_inputs(shapes.Shape("tiny", 40, 16, 300, "test"), torch.float32, "cpu")
    base = P.run_step(P.build("fastweight", "cpu", torch.float32), *inputs, backward=True)
    small = P.run_step(P.build("fastweight:c7", "cpu", torch.float32), *inputs, backward=True)
    for (k, a), (_, b) in zip(base.items(), small.items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=k)
    assert "OpenMP chunk ops" in P.describe("fastweight:omp")
