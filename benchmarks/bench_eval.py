"""Teacher-forced evaluation statistics: fused (hidden states + lm_head, no logits) against the logits path.

What TOFU/MUSE evaluation and the membership attacks need per answer token: log p of the label, whether the
label is the greedy argmax, and the mean / variance of log p under the model's distribution (Min-K%++). Two
providers, side by side in one run, at two vocabulary sizes (Llama-2's 32000 and Llama-3's 128256) with
SmolLM2's hidden size and a batch of 8 answers x 128 tokens:

    fused    ``fastweight.ops.token_stats.linear_token_stats(hidden, labels, lm_head=W)``: logits formed a
             chunk of rows at a time, never [N, V]
    logits   the path the evaluators took before: ``logits = hidden @ W.T`` (float32 [N, V]), then
             ``fastweight.token_logprobs``, ``argmax`` and ``eval.attacks.logprob_moments``

Both are checked against each other before timing (log p, mean, var to float32 tolerance; argmax flags
exactly). Peak extra memory is measured as in benchmarks/memory.py (fresh subprocess, warm-up, VmHWM reset;
CUDA: max_memory_allocated delta) and stored in ``extra_info``.

    pytest benchmarks/bench_eval.py --benchmark-json eval.json
    FASTWEIGHT_BENCH_EVAL_SIZES=eval32k pytest benchmarks/bench_eval.py    # one size
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from benchmarks.memory import PROBE_ENV, REPO_ROOT, _release_freed, _reset_high_water_mark, _status_kib, cuda_peak


@dataclass(frozen=True)
class EvalShape:
    name: str
    n: int
    h: int
    v: int


SHAPES = {s.name: s for s in (EvalShape("eval32k", 1024, 576, 32000), EvalShape("eval128k", 1024, 576, 128256))}
PROVIDERS = ("fused", "logits")


def _selected() -> list[EvalShape]:
    names = [w for w in os.environ.get("FASTWEIGHT_BENCH_EVAL_SIZES", "eval32k,eval128k").split(",") if w]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"FASTWEIGHT_BENCH_EVAL_SIZES: unknown {unknown}; choose from {list(SHAPES)}")
    return [SHAPES[n] for n in names]


def make_inputs(shape: EvalShape, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(shape.n, shape.h, generator=gen)
    lm_head = torch.randn(shape.v, shape.h, generator=gen) * (2.0 / shape.h ** 0.5)
    labels = torch.randint(0, shape.v, (shape.n,), generator=gen)
    labels[::4] = (hidden @ lm_head.t()).argmax(-1)[::4]  # a share of greedy-correct tokens
    return hidden.to(device), lm_head.to(device), labels.to(device)


def build(provider: str):
    if provider == "fused":
        from fastweight.ops.token_stats import linear_token_stats

        def fused(h, w, y):
            s = linear_token_stats(h, y, lm_head=w)
            return s.logp, s.argmax, s.mean, s.var

        return fused
    if provider == "logits":
        import fastweight
        from fastweight.eval.attacks import logprob_moments

        @torch.no_grad()
        def logits_path(h, w, y):
            z = h @ w.t()
            mean, var = logprob_moments(z)
            return fastweight.token_logprobs(z, y), z.argmax(-1) == y, mean, var

        return logits_path
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _child(provider: str, shape_name: str) -> dict:
    hidden, lm_head, labels = make_inputs(SHAPES[shape_name])
    fn = build(provider)
    exact = _reset_high_water_mark()
    if exact:
        fn(hidden, lm_head, labels)  # warm-up
        _release_freed()
        _reset_high_water_mark()
    base = _status_kib("VmRSS")
    out = fn(hidden, lm_head, labels)
    peak = _status_kib("VmHWM")
    del out
    return {"peak_extra_bytes": max(0, peak - base) * 1024,
            "method": "fresh subprocess, VmHWM - RSS before" + (" (after a warm-up and reset)" if exact else "")}


def cpu_peak(provider: str, shape_name: str) -> dict:
    env = dict(os.environ, **PROBE_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.bench_eval", provider, shape_name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {provider} {shape_name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_REFERENCE: dict[str, tuple] = {}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", _selected(), ids=lambda s: s.name)
def test_eval_stats(benchmark, provider, shape):
    device = "cuda" if os.environ.get("FASTWEIGHT_BENCH_DEVICE", "cpu").startswith("cuda") else "cpu"
    hidden, lm_head, labels = make_inputs(shape, device)
    fn = build(provider)
    out = fn(hidden, lm_head, labels)
    ref = _REFERENCE.setdefault(shape.name, tuple(t.cpu() for t in build("logits")(hidden, lm_head, labels)))
    for name, a, b in zip(("logp", "argmax", "mean", "var"), out, ref):
        if name == "argmax":
            assert torch.equal(a.cpu(), b), f"{provider}: argmax flags differ from the logits path"
        else:
            torch.testing.assert_close(a.cpu().float(), b.float(), rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))
    benchmark.group = f"eval stats {shape.name} (N={shape.n}, H={shape.h}, V={shape.v})"
    benchmark.pedantic(fn, args=(hidden, lm_head, labels), rounds=3, iterations=1, warmup_rounds=1)
    mem = (cuda_peak(lambda: fn(hidden, lm_head, labels), torch.device(device)) if device == "cuda"
           else cpu_peak(provider, shape.name))
    benchmark.extra_info.update(mem, logits_bytes=shape.n * shape.v * 4, threads=torch.get_num_threads(),
                                device=torch.cuda.get_device_name() if device == "cuda" else "cpu")


def table(path: str) -> str:
    """The Markdown table of a ``--benchmark-json`` file of this module: time (best of the timed rounds) and
    peak extra memory per size, fused against the logits path."""
    with open(path) as f:
        data = json.load(f)
    rows: dict[str, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        if not b["name"].startswith("test_eval_stats["):
            continue
        shape, provider = b["name"][len("test_eval_stats["):-1].split("-")
        rows.setdefault(shape, {})[provider] = b
    out = ["| size | logits [N, V] | fused time | logits-path time | time ratio | fused peak | logits-path peak | "
           "memory ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    mib = 2 ** 20
    for shape, pr in rows.items():
        f, lg = pr["fused"], pr["logits"]
        s = SHAPES[shape]
        ft, lt = f["stats"]["min"], lg["stats"]["min"]
        fm, lm = f["extra_info"]["peak_extra_bytes"], lg["extra_info"]["peak_extra_bytes"]
        out.append(f"| N={s.n}, H={s.h}, V={s.v} | {f['extra_info']['logits_bytes'] / mib:.0f} MiB | {ft:.2f} s | "
                   f"{lt:.2f} s | {ft / lt:.2f}x | {fm / mib:.0f} MiB | {lm / mib:.0f} MiB | {fm / lm:.2f}x |")
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    return "\n".join(out) + f"\n\nMeasured on {cpu}, {data['benchmarks'][0]['extra_info'].get('threads')} threads."


if __name__ == "__main__":
    if sys.argv[1] == "table":
        print(table(sys.argv[2]))
    else:
        print(json.dumps(_child(sys.argv[1], sys.argv[2])))
