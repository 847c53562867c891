"""The conditions a benchmark case runs under (issue 21, item 9): where users' machines and data differ.

=========  ======================================================================================
regime     what changes
=========  ======================================================================================
quiet      nothing: the inputs of ``providers.make_inputs`` (target probabilities from ~0 to ~1)
loaded     the same inputs, timed while ``LOAD_PROCESSES`` busy processes (one spinning Python loop
           each) compete for the cores, as on a shared machine; started by the benchmark for the case
           (warm-up and timed rounds) and stopped after it, each bounded by ``LOAD_LIMIT_S`` and by the
           life of the benchmark process
unlearned  low-likelihood inputs (``make_inputs(likelihood="low")``): every target is unlikely, as forget
           tokens after unlearning, so SatImp's weights p**5 are tiny, many of them subnormal float32
=========  ======================================================================================

Peak memory does not depend on the regime (same shapes, same code), so it is probed for "quiet" only.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

REGIMES = ("quiet", "loaded", "unlearned")
LIKELIHOOD = {"quiet": "spread", "loaded": "spread", "unlearned": "low"}
LOAD_PROCESSES = int(os.environ.get("FASTWEIGHT_BENCH_LOAD_PROCESSES", "1"))
LOAD_LIMIT_S = float(os.environ.get("FASTWEIGHT_BENCH_LOAD_LIMIT_S", "900"))

# The competing process: spins until its time limit, or until its parent (the benchmark) is gone.
_SPIN = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(100000):
        pass
"""


@contextlib.contextmanager
def busy_processes(n: int = LOAD_PROCESSES, limit_s: float = LOAD_LIMIT_S):
    """Run ``n`` spinning processes for the duration of the ``with`` block (at most ``limit_s`` each)."""
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid()), str(limit_s)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def conditions(regime: str):
    """Context manager for timing a case of ``regime`` (the busy processes for "loaded")."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    return busy_processes() if regime == "loaded" else contextlib.nullcontext()
