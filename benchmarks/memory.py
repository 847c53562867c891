"""Peak extra memory of one benchmark case (issue 8: "an equally honest probe" per device).

CUDA: in process, ``torch.cuda.max_memory_allocated()`` during one step minus ``memory_allocated()``
before it (the allocator's view, as cut-cross-entropy's benchmark).

CPU: a FRESH subprocess (``python -m benchmarks.memory ...``) builds the inputs, runs the case once as a
warm-up (torch.compile / lazy initialisation happen there, outside the measurement), frees it, resets the
kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``), then runs the case once more:
peak extra = VmHWM after the step - VmRSS before it, i.e. everything the step touched, gradients
included, beyond the inputs; what the warm-up itself left resident (compiled code, caches a provider keeps
between calls) is reported separately as ``warmup_retained_bytes``. glibc is told to mmap every block >= 128 KiB (``MALLOC_MMAP_THRESHOLD_``),
so freed tensors go back to the kernel and cannot be silently reused from the warm-up. Where
``clear_refs`` is not writable the child skips the warm-up and reports the (less exact) fresh-process
growth, with ``method`` saying so.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
PROBE_TIMEOUT_S = float(os.environ.get("FASTWEIGHT_BENCH_PROBE_TIMEOUT", "1800"))


class ProbeError(RuntimeError):
    """The memory subprocess failed; the message holds its stderr tail."""


def cuda_peak(step, device: torch.device) -> dict:
    """Peak allocated bytes above the pre-step level during ``step()`` (one call)."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return {"peak_extra_bytes": int(peak), "method": "cuda max_memory_allocated delta"}


def cpu_peak(provider: str, shape: str, dtype: str, mode: str, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Run the case once in a fresh subprocess; its peak RSS growth in bytes (see module docstring)."""
    env = dict(os.environ, **PROBE_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.memory", provider, shape, dtype, mode,
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise ProbeError(f"memory probe {' '.join(cmd[2:])} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ child side


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise ProbeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _release_freed() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the mmap threshold above already returns big blocks
        pass


def _child(args: argparse.Namespace) -> dict:
    from benchmarks import providers, shapes

    torch.set_num_threads(args.threads)
    shape = shapes.by_name(args.shape)
    dtype = shapes.DTYPES[args.dtype]
    backward = args.mode == "fwd_bwd"
    hidden, lm_head, labels = providers.make_inputs(shape, dtype, "cpu")
    fn = providers.build(args.provider, torch.device("cpu"), dtype)
    with providers.settings_for(args.provider):  # a variant's thread count and route, as when it was timed
        return _peak(fn, hidden, lm_head, labels, backward)


def _peak(fn, hidden, lm_head, labels, backward) -> dict:
    from benchmarks import providers

    exact = os.path.exists("/proc/self/clear_refs") and _reset_high_water_mark()
    _release_freed()
    before_warmup = _status_kib("VmRSS")
    if exact:
        providers.run_step(fn, hidden, lm_head, labels, backward)  # warm-up: compilation, lazy init
        _release_freed()
        _reset_high_water_mark()
    base = _status_kib("VmRSS")
    out = providers.run_step(fn, hidden, lm_head, labels, backward)
    peak = _status_kib("VmHWM")
    retained = _status_kib("VmRSS") - base
    del out
    method = ("fresh subprocess, warm-up, VmHWM reset, peak - RSS before" if exact
              else "fresh subprocess, no warm-up, VmHWM - RSS before (clear_refs unavailable)")
    return {"peak_extra_bytes": max(0, peak - base) * 1024, "retained_bytes": max(0, retained) * 1024,
            "baseline_rss_bytes": base * 1024, "method": method,
            # what the warm-up left behind (compiled code, caches): not in the peak, so reported beside it
            "warmup_retained_bytes": max(0, base - before_warmup) * 1024}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Peak extra RSS of one benchmark case (run by bench_satimp.py).")
    p.add_argument("provider")
    p.add_argument("shape")
    p.add_argument("dtype")
    p.add_argument("mode", choices=("fwd", "fwd_bwd"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    print(json.dumps(_child(p.parse_args(argv))))


if __name__ == "__main__":
    main()
