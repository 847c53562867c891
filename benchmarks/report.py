"""Turn a ``pytest benchmarks/ --benchmark-json=run.json`` file into a Markdown table and a PNG chart.

    python -m benchmarks.report run.json                  # table on stdout, chart in run.png
    python -m benchmarks.report run.json --md table.md --png chart.png
    python -m benchmarks.report --resources [--only linear] [--cce] [--md resources.md]   # kernel resources

One table per group (shape, dtype, mode, regime), rows sorted by time:

* time: best (min) and median of the timed rounds; ratios use the best time, as the floor does;
* x floor: time / FLOPs floor, the floor being ``6NHV`` (forward + backward; ``2NHV`` forward) FLOPs at the
  rate of one ``hidden @ W.T`` GEMM measured in the same run (i.e. 3 GEMMs, or 1);
* x cce, x naive: time and memory relative to cut-cross-entropy and to the naive PyTorch path;
* peak extra: peak memory of one step beyond its inputs (CUDA allocator peak, or a fresh process' RSS);
  x floor = peak / ``bytes * (N*H + V*H)`` (the two gradients; forward-only floor is O(N));
* rel. error: max |x - x64| / max |x64| against the float64 reference for loss, d hidden, d lm_head.
Skipped providers are listed with their reasons.

``--resources`` needs no JSON: it compiles every kernel case of ``fastweight.ops`` (each op's
``aot_cases``) as a launch would build it at hidden / vocabulary sizes that are multiples of 16 (Triton's
JIT specialisation, ``fastweight.ops._aot``) for sm_80 and sm_90 and tabulates registers per thread,
spill (ptxas stack) bytes per thread and shared memory per block, read with the Triton wheel's
``cuobjdump -res-usage``. No GPU is needed; compiled kernels are cached by Triton.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import Any

OUTPUTS = ("loss", "d_hidden", "d_lm_head")
MIB = 2 ** 20
RETAINED_NOTE_BYTES = 24 * MIB  # warm-up leftovers above this are listed under the table


def rows_from_json(data: dict) -> list[dict]:
    """One flat dict per benchmark: its extra_info plus ``time_min_s`` / ``time_median_s``."""
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "provider" not in info:
            continue
        stats = bench.get("stats") or {}
        info["time_min_s"], info["time_median_s"] = stats.get("min"), stats.get("median")
        rows.append(info)
    return rows


def _group_key(row: dict) -> tuple:
    return (row["shape"], row["dtype"], row["mode"], row.get("regime", "quiet"), row.get("device_name", "?"))


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        out[_group_key(row)].append(row)
    for members in out.values():
        members.sort(key=lambda r: (r["time_min_s"] is None, r["time_min_s"] or 0.0))
    return dict(out)


def _ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def _time(t) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _mib(b) -> str:
    return "-" if b is None else f"{b / MIB:.1f}"


def _err(e) -> str:
    return "-" if e is None else f"{e:.1e}"


def _regime(row: dict) -> str:
    regime = row.get("regime", "quiet")
    if regime == "loaded":
        return f"loaded ({row.get('load_processes', '?')} busy process(es) beside the run)"
    return {"unlearned": "unlearned (low-likelihood targets)"}.get(regime, regime)


def _by_provider(members: list[dict], name: str) -> dict | None:
    return next((r for r in members if r["provider"] == name), None)


def group_table(members: list[dict]) -> str:
    first = members[0]
    cce, naive = _by_provider(members, "cce"), _by_provider(members, "naive")
    head = (f"### {first['shape']} (N={first['N']}, H={first['H']}, V={first['V']}; {first.get('source', '')}), "
            f"{first['dtype']}, {first['mode']}, {_regime(first)}\n\n"
            f"{first.get('device_name', '?')}, {first.get('threads', '?')} threads, torch {first.get('torch')}, "
            f"triton {first.get('triton')}. Floors: time {_time(first['floor_s'])} "
            f"({first['floor_flops'] / 1e9:.1f} GFLOP at {first['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s, one "
            f"`hidden @ W.T` = {_time(first['gemm_s'])}); memory {_mib(first['mem_floor_bytes'])} MiB; "
            f"one logits tensor = {_mib(first['logits_bytes'])} MiB.\n")
    lines = [
        "| implementation | time (best) | median | x floor | x cce | x naive | peak extra MiB | x mem floor "
        "| mem x cce | mem x naive | err loss | err d hidden | err d lm_head |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in members:
        t, m = r.get("time_min_s"), r.get("peak_extra_bytes")
        lines.append("| " + " | ".join([
            f"`{r['provider']}`", _time(t), _time(r.get("time_median_s")), _ratio(t, r["floor_s"]),
            _ratio(t, cce and cce.get("time_min_s")), _ratio(t, naive and naive.get("time_min_s")),
            _mib(m), _ratio(m, r["mem_floor_bytes"]), _ratio(m, cce and cce.get("peak_extra_bytes")),
            _ratio(m, naive and naive.get("peak_extra_bytes")),
            *(_err(r.get(f"err_{k}")) for k in OUTPUTS),
        ]) + " |")
    methods = sorted({r.get("memory_method", "?") for r in members})
    lines.append(f"\nPeak memory: {'; '.join(methods)}.")
    kept = [f"`{r['provider']}` {_mib(r['warmup_retained_bytes'])}" for r in members
            if (r.get("warmup_retained_bytes") or 0) > RETAINED_NOTE_BYTES]
    if kept:
        lines.append(f"Resident after the warm-up and not counted above (compiled code, caches; MiB): {', '.join(kept)}.")
    return head + "\n" + "\n".join(lines) + "\n"


def markdown(rows: list[dict], skipped: list[dict] | None = None) -> str:
    parts = [group_table(members) for members in groups(rows).values()]
    if skipped:
        reasons: dict[str, list[str]] = defaultdict(list)
        for s in skipped:
            reasons[s["reason"]].append(s["case"])
        parts.append("Skipped:\n\n" + "\n".join(f"- {reason} ({len(cases)} case{'s' * (len(cases) > 1)})"
                                                  for reason, cases in reasons.items()) + "\n")
    return "\n".join(parts) if parts else "No benchmark results.\n"


def chart(rows: list[dict], path: str) -> None:
    """PNG: per group, horizontal bars of best time and of peak extra memory, floors as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(rows)
    n = max(1, len(grouped))
    height = max(2.5, 0.35 * max((len(m) for m in grouped.values()), default=1) + 1.2)
    fig, axes = plt.subplots(n, 2, figsize=(12, height * n), squeeze=False)
    for (shape, dtype, mode, regime, device), members, (ax_t, ax_m) in zip(grouped.keys(), grouped.values(), axes):
        mode = f"{mode} {regime}"
        names = [r["provider"] for r in members]
        colors = ["tab:blue" if name.startswith("fastweight") else "tab:gray" for name in names]
        times = [r.get("time_min_s") or 0.0 for r in members]
        mems = [(r.get("peak_extra_bytes") or 0) / MIB for r in members]
        ax_t.barh(names, times, color=colors)
        ax_t.axvline(members[0]["floor_s"], ls="--", color="k", lw=1, label="FLOPs floor")
        positive = [t for t in times if t > 0]
        if positive and max(positive) > 20 * min(positive):  # one slow provider would flatten the others
            ax_t.set_xscale("log")
        ax_t.set_xlabel("seconds (best of rounds)")
        ax_m.barh(names, mems, color=colors)
        ax_m.axvline(members[0]["mem_floor_bytes"] / MIB, ls="--", color="k", lw=1, label="memory floor")
        ax_m.set_xlabel("peak extra memory (MiB)")
        for ax in (ax_t, ax_m):
            ax.invert_yaxis()
            ax.legend(loc="lower right", fontsize=8)
        ax_t.set_title(f"{shape} {dtype} {mode}: time", fontsize=10)
        ax_m.set_title(f"{shape} {dtype} {mode}: memory ({device})", fontsize=10)
    fig.suptitle("SatImp loss, forward(+backward): fastweight (blue) vs alternatives", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resource_rows(only: str | None = None, ccs=(80, 90)) -> list[dict]:
    """One row per aot case (aligned launch build) with registers / stack / shared for each architecture."""
    import importlib
    import pkgutil

    import fastweight.ops
    from fastweight.ops._aot import compile_launch, recorded_cases, relaunch, resource_usage

    rows = []
    for mod in pkgutil.iter_modules(fastweight.ops.__path__):
        module = importlib.import_module(f"fastweight.ops.{mod.name}")
        if not hasattr(module, "aot_cases"):
            continue
        for case, call in recorded_cases(module):
            if only and only not in case["name"]:
                continue
            la = relaunch(module, call, align=16)
            row = dict(kernel=case["fn"].__name__, case=case["name"], num_warps=la["num_warps"],
                       num_stages=la.get("num_stages"), block={k: v for k, v in la["constexprs"].items()
                                                               if k.startswith("BLOCK_")})
            for cc in ccs:
                row[cc] = resource_usage(compile_launch(case["fn"], la, cc))
            rows.append(row)
    return rows


def _capture_launch(kernel, launch) -> tuple[Any, dict]:
    """Run ``launch()`` (a library's own launcher, on 'meta' tensors) with the innermost JITFunction's ``run``
    replaced by a recorder: returns that JITFunction and the launch dict (args, constexprs, warps, stages)
    its heuristics produced, ready for ``compile_launch``. Nothing executes."""
    jit = kernel
    while not hasattr(jit, "params"):  # Heuristics / Autotuner wrappers keep the next level in .fn
        jit = jit.fn
    seen = {}

    def record(*args, grid, warmup, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    jit.run = record
    try:
        launch()
    finally:
        del jit.run
    names = [p.name for p in jit.params]
    values = dict(zip(names, seen["args"]))
    values.update({k: v for k, v in seen["kwargs"].items() if k in names})
    constexprs = {p.name: values.pop(p.name) for p in jit.params if p.is_constexpr and p.name in values}
    options = {k: seen["kwargs"][k] for k in ("num_warps", "num_stages") if k in seen["kwargs"]}
    return jit, dict(args=values, constexprs=constexprs, **options)


def cce_resource_rows(ccs=(80, 90)) -> list[dict]:
    """cut-cross-entropy's forward-LSE and backward kernels, launched through its own launchers (default
    heuristics config, filter_eps "high" as ``linear_cross_entropy``) at N=4096, H=576, V=49152, compiled
    like ours. Empty when cut-cross-entropy is not installed."""
    try:
        from cut_cross_entropy import cce_backward, cce_lse_forward
        from cut_cross_entropy.utils import _handle_eps
    except ImportError:
        return []
    import torch

    from fastweight.ops._aot import compile_launch, resource_usage

    rows = []
    meta = dict(device="meta")
    for dtype in (torch.bfloat16, torch.float16):
        e = torch.zeros(4096, 576, dtype=dtype, **meta)
        c = torch.zeros(49152, 576, dtype=dtype, **meta).requires_grad_()
        targets = torch.zeros(4096, dtype=torch.int64, **meta)
        lse = torch.zeros(4096, dtype=torch.float32, **meta)
        tag = str(dtype).replace("torch.", "")
        launches = (
            ("fwd", cce_lse_forward._cce_lse_forward_kernel,
             lambda: cce_lse_forward.cce_lse_forward_kernel(e, c, None, None, True)),
            ("bwd", cce_backward._cce_backward_kernel,
             lambda: cce_backward.cce_backward_kernel(lse, e, c, lse, None, None, _handle_eps("high", dtype),
                                                      targets)),
        )
        for kind, kernel, launch in launches:
            jit, la = _capture_launch(kernel, launch)
            row = dict(kernel=jit.__name__, case=f"cce_{kind}_{tag}", num_warps=la.get("num_warps"),
                       num_stages=la.get("num_stages"),
                       block={k: v for k, v in la["constexprs"].items() if k.startswith("BLOCK_")})
            for cc in ccs:
                row[cc] = resource_usage(compile_launch(jit, la, cc))
            rows.append(row)
    return rows


def resource_table(rows: list[dict], ccs=(80, 90)) -> str:
    head = "| case | tiles | warps / stages | " + " | ".join(
        f"sm_{cc} regs | sm_{cc} spill B | sm_{cc} shared KiB" for cc in ccs) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(ccs))]
    for r in rows:
        tiles = " x ".join(str(v) for v in r["block"].values())
        cells = []
        for cc in ccs:
            u = r[cc]
            cells += [str(u["registers"]), str(u["stack"] + u["local"]), f"{u['shared'] / 1024:.0f}"]
        lines.append(f"| {r['case']} | {tiles} | {r['num_warps']} / {r['num_stages'] or '-'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="?", help="file written by pytest benchmarks/ --benchmark-json=FILE")
    p.add_argument("--md", help="also write the Markdown table to this file")
    p.add_argument("--png", help="chart path (default: the JSON path with .png)")
    p.add_argument("--resources", action="store_true", help="kernel resource table instead (no JSON)")
    p.add_argument("--only", help="with --resources: cases whose name contains this string")
    p.add_argument("--cce", action="store_true", help="with --resources: add cut-cross-entropy's kernels")
    args = p.parse_args(argv)
    if args.resources:
        rows = resource_rows(args.only)
        if args.cce:
            rows += cce_resource_rows()
        text = resource_table(rows)
        print(text)
        if args.md:
            with open(args.md, "w") as f:
                f.write(text)
        return
    if args.json is None:
        p.error("a benchmark JSON file is required unless --resources is given")
    with open(args.json) as f:
        data = json.load(f)
    rows = rows_from_json(data)
    if not rows:
        raise SystemExit(f"{args.json}: no fastweight benchmark results (was it run with --benchmark-disable?)")
    text = markdown(rows, data.get("fastweight_skipped"))
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    png = args.png or os.path.splitext(args.json)[0] + ".png"
    chart(rows, png)
    print(f"chart: {png}")


if __name__ == "__main__":
    main()
