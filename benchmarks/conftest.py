"""Options, markers and the printed comparison of ``pytest benchmarks/``.

Every option has an environment variable (the environment is what CI and scripts set) and a flag:

==========================  ================  ==========================================================
env                         flag              default
==========================  ================  ==========================================================
FASTWEIGHT_BENCH_SIZES      --bench-sizes     quick (sets in benchmarks/shapes.py: reference, llama, gemma,
                                              gpu, all)
FASTWEIGHT_BENCH_DTYPES     --bench-dtypes    fp32 on CPU, bf16 on CUDA (comma list of fp32, bf16, fp16)
FASTWEIGHT_BENCH_MODES      --bench-modes     fwd_bwd (comma list of fwd_bwd, fwd)
FASTWEIGHT_BENCH_REGIMES    --bench-regimes   quiet,loaded,unlearned on CPU, quiet on CUDA (benchmarks/regimes.py)
FASTWEIGHT_BENCH_PROVIDERS  --bench-providers all of benchmarks/providers.py
FASTWEIGHT_BENCH_DEVICE     --bench-device    cuda when available, else cpu
FASTWEIGHT_BENCH_MEMORY     --bench-memory    1 (0: no peak-memory probe)
FASTWEIGHT_BENCH_ROUNDS     --bench-rounds    quick shapes: ~2 s of rounds (1 to 10); other shapes 3
==========================  ================  ==========================================================
The quick-set cases also carry the ``quick`` marker (``pytest benchmarks/ -m quick``).

At the end of the run the terminal shows one table per group (time, ratios to the floor / cce / naive,
peak memory, float64 errors) and every skipped provider with its reason; ``--benchmark-json`` files get
the skips under ``"fastweight_skipped"`` (``python -m benchmarks.report`` prints them too).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest

MODES = ("fwd_bwd", "fwd")
DEFAULT_MODES = ("fwd_bwd",)  # what a training step does; add "fwd" for forward-only timings
_SKIPPED: list[dict] = []  # this hook has no config argument, so the list lives here


@dataclass(frozen=True)
class BenchOptions:
    shapes: tuple
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    regimes: tuple[str, ...]
    providers: tuple[str, ...]
    device: str
    memory: bool
    rounds: int | None


def pytest_addoption(parser):
    group = parser.getgroup("fastweight benchmarks")
    for flag, env, what in (
        ("--bench-sizes", "FASTWEIGHT_BENCH_SIZES", "size sets/shapes (quick, reference, llama, gemma, gpu, all)"),
        ("--bench-dtypes", "FASTWEIGHT_BENCH_DTYPES", "dtypes (fp32, bf16, fp16)"),
        ("--bench-modes", "FASTWEIGHT_BENCH_MODES", "modes (fwd_bwd, fwd)"),
        ("--bench-regimes", "FASTWEIGHT_BENCH_REGIMES", "regimes (quiet, loaded, unlearned)"),
        ("--bench-providers", "FASTWEIGHT_BENCH_PROVIDERS", "providers (see benchmarks/providers.py)"),
        ("--bench-device", "FASTWEIGHT_BENCH_DEVICE", "cpu or cuda[:i]"),
        ("--bench-memory", "FASTWEIGHT_BENCH_MEMORY", "1 to probe peak memory, 0 to skip it"),
        ("--bench-rounds", "FASTWEIGHT_BENCH_ROUNDS", "timed rounds per case"),
    ):
        group.addoption(flag, default=os.environ.get(env) or None, help=f"{what}; env {env}")


def _words(value: str | None, default: tuple[str, ...], known, what: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in (value or ",".join(default)).split(",") if w.strip())
    unknown = [w for w in words if w not in known]
    if unknown or not words:
        raise pytest.UsageError(f"{what}: unknown {unknown or value!r}; choose from {', '.join(known)}")
    return words


class _ProviderNames:
    """``in``: a provider or a variant of one (``fastweight:c512:t-1``); listed as the providers."""

    def __contains__(self, name) -> bool:
        from benchmarks import providers

        return providers.known(name)

    def __iter__(self):
        from benchmarks import providers

        return iter(list(providers.PROVIDERS) + ["fastweight:c<rows>:t<n>|t-<k>"])


def _options(config) -> BenchOptions:
    import torch

    from benchmarks import providers, regimes, shapes

    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device {device}: torch {torch.__version__} sees no CUDA device")
    try:
        shape_list = tuple(shapes.select(config.getoption("--bench-sizes")))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    default_dtype = ("bf16",) if device.startswith("cuda") else ("fp32",)
    default_regimes = ("quiet",) if device.startswith("cuda") else regimes.REGIMES  # issue 21 is about CPUs
    memory = (config.getoption("--bench-memory") or "1").strip().lower() not in ("0", "off", "false", "no")
    rounds = config.getoption("--bench-rounds")
    if rounds is not None and not (rounds.isdigit() and int(rounds) > 0):
        raise pytest.UsageError(f"--bench-rounds must be a positive integer, got {rounds!r}")
    return BenchOptions(
        shapes=shape_list,
        dtypes=_words(config.getoption("--bench-dtypes"), default_dtype, shapes.DTYPES, "--bench-dtypes"),
        modes=_words(config.getoption("--bench-modes"), DEFAULT_MODES, MODES, "--bench-modes"),
        regimes=_words(config.getoption("--bench-regimes"), default_regimes, regimes.REGIMES, "--bench-regimes"),
        providers=_words(config.getoption("--bench-providers"), tuple(providers.PROVIDERS), _ProviderNames(),
                         "--bench-providers"),
        device=device, memory=memory, rounds=int(rounds) if rounds else None,
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: benchmark case of the quick (CI) size set")
    # torch.compile's CPU path warns about its own use of torch.jit; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    config.fastweight_bench = _options(config)
    config.fastweight_results = []  # (benchmark fixture, extra_info) per finished case
    config.fastweight_skipped = _SKIPPED  # {"case", "reason"}; filled by pytest_runtest_logreport


if importlib.util.find_spec("pytest_benchmark") is None:
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed (pip install pytest-benchmark, or the `bench` extra)")


def pytest_runtest_logreport(report):
    if report.skipped and "bench_" in report.nodeid:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"case": report.nodeid.split("[")[-1].rstrip("]"),
                         "reason": reason.removeprefix("Skipped: ")})


def _rows(config) -> list[dict]:
    rows = []
    for bench, info in config.fastweight_results:
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        rows.append({**info, "time_min_s": getattr(stats, "min", None), "time_median_s": getattr(stats, "median", None)})
    return rows


def pytest_terminal_summary(terminalreporter, config):
    if not hasattr(config, "fastweight_results"):
        return
    from benchmarks import report

    rows, skipped = _rows(config), config.fastweight_skipped
    if not rows and not skipped:
        return
    terminalreporter.section("fastweight: SatImp forward(+backward), side by side")
    terminalreporter.write_line(report.markdown(rows, skipped))


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastweight_skipped"] = list(config.fastweight_skipped)
