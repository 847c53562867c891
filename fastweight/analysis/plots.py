"""Plots of recorded G-effects (``GEffectTracker.to_dict()`` dicts, e.g. read back from ``results.json``).

* ``plot_curves``: G-effect per step, one panel per probe (forget, retain), one line per run.
* ``plot_heatmap``: one run, one probe: layer groups (rows) x recorded steps (columns).
* ``plot_compare``: curves on top, and below one heat map per probe of runs (rows) x layer groups (columns) on
  one shared symmetric-log colour scale, so an objective whose G-effect is 1000x another's shows as such.
* ``save_g_effect_plots``: what a trainer writes for one run (curves + one heat map per probe).

Colours: red = positive G (the probe NLL would fall), blue = negative (the probe NLL would rise: forgetting
on the forget probe, damage on the retain probe). Uses matplotlib's object API with the Agg canvas (no
pyplot, no global backend switch); files are written to a temporary name and renamed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from fastweight.analysis.g_effect import merge_groups

Record = Mapping[str, Any]  # one GEffectTracker.to_dict()
DPI = 150


def _runs(records: Record | Mapping[str, Record]) -> dict[str, Record]:
    """A single tracker dict -> {"": it}; a {label: tracker dict} mapping passes through."""
    if not isinstance(records, Mapping) or not records:
        raise ValueError("records must be a GEffectTracker.to_dict() or a non-empty {label: to_dict()} mapping")
    if "probes" in records:
        return {"": records}
    for label, rec in records.items():
        if not isinstance(rec, Mapping) or "probes" not in rec:
            raise ValueError(f"records[{label!r}] is not a GEffectTracker.to_dict() (no 'probes' key)")
    return dict(records)


def _probe(rec: Record, probe: str) -> Mapping[str, Any]:
    if probe not in rec["probes"]:
        raise ValueError(f"probe {probe!r} was not recorded (recorded: {sorted(rec['probes'])})")
    return rec["probes"][probe]


def _probe_names(runs: Mapping[str, Record], probes: Sequence[str] | None) -> list[str]:
    if probes is not None:
        return list(probes)
    names: list[str] = []
    for rec in runs.values():
        names += [p for p in rec["probes"] if p not in names]
    return names


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _figure(rows: int, cols: int, size: tuple[float, float], dpi: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _draw_curves(ax, runs: Mapping[str, Record], probe: str, smoothed: bool, yscale: str) -> None:
    key = "total_ema" if smoothed else "total"
    for label, rec in runs.items():
        if probe in rec["probes"]:
            p = rec["probes"][probe]
            ax.plot(p["step"], p[key], marker="o", markersize=3, label=label or None)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.margins(y=0.08)  # the first (often the largest) point is not cut by the frame
    if yscale == "symlog":
        values = [abs(v) for rec in runs.values() if probe in rec["probes"] for v in rec["probes"][probe][key]]
        nonzero = [v for v in values if v > 0]
        # linear within a decade-aligned threshold (at least 1e-4 of the largest magnitude): clean ticks
        thresh = max(min(nonzero), max(nonzero) * 1e-4) if nonzero else 1.0
        ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(thresh)))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("G-effect, grad. inner product" + (" (EMA)" if smoothed else ""), fontsize=8)
    better = "lower = more forgetting" if probe == "forget" else "higher = less damage"
    ax.set_title(f"{probe} probe ({better})", fontsize=9)
    if any(runs):
        ax.legend(fontsize="small")


def _check_scale(yscale: str) -> None:
    if yscale not in ("linear", "symlog"):
        raise ValueError(f"yscale must be 'linear' or 'symlog', got {yscale!r}")


def plot_curves(records: Record | Mapping[str, Record], path: str | os.PathLike, *,
                probes: Sequence[str] | None = None, smoothed: bool = True, yscale: str = "symlog",
                dpi: int = DPI) -> Path:
    """Total G-effect per step, one panel per probe, one line per run (EMA values when ``smoothed``).

    records: one ``GEffectTracker.to_dict()`` or ``{label: to_dict()}``. yscale: "symlog" (objectives
    differ by orders of magnitude) or "linear". Returns the written path (format from its suffix).
    """
    _check_scale(yscale)
    runs = _runs(records)
    names = _probe_names(runs, probes)
    fig, axes = _figure(1, len(names), (4.2 * len(names), 3.2), dpi)
    for ax, probe in zip(axes[0], names):
        _draw_curves(ax, runs, probe, smoothed, yscale)
    return _save(fig, path)


def _group_values(p: Mapping[str, Any], by: str, smoothed: bool) -> tuple[list[str], list[list[float]]]:
    """Group names (rows) and their per-step values [group][step], coarsened ``by`` "block"/"kind"/"auto"."""
    series = p["groups_ema" if smoothed else "groups"]
    steps = range(len(p["step"]))
    per_step = []
    for t in steps:
        values = {g: (v[t] if v[t] is not None else 0.0) for g, v in series.items()}
        per_step.append(values if by == "auto" else merge_groups(values, by))
    names = list(per_step[0]) if per_step else []
    return names, [[s.get(g, 0.0) for s in per_step] for g in names]


def _check_by(by: str) -> None:
    if by not in ("auto", "block", "kind"):
        raise ValueError(f"by must be 'auto', 'block' or 'kind', got {by!r}")


def _imshow(fig, ax, matrix, cbar_label: str):
    import numpy as np
    from matplotlib.colors import SymLogNorm

    m = np.asarray(matrix, dtype=float)
    top = float(np.abs(m).max()) if m.size else 1.0
    top = top if top > 0 else 1.0
    norm = SymLogNorm(linthresh=top * 1e-3, vmin=-top, vmax=top)
    im = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.9)
    return im


def plot_heatmap(record: Record, path: str | os.PathLike, *, probe: str = "forget", by: str = "block",
                 smoothed: bool = True, dpi: int = DPI) -> Path:
    """One run's per-group G-effect on one probe: groups (rows, model order) x recorded steps (columns).

    by: "block" (embed, each decoder block, final norm, head), "kind" (attn / mlp / norm summed over
    blocks) or "auto" (each block's attn / mlp / norm); needs the tracker's default ``groups="auto"``.
    Colour scale: symmetric log (``SymLogNorm``, linear within 1e-3 of the largest magnitude).
    """
    _check_by(by)
    p = _probe(record, probe)
    names, matrix = _group_values(p, by, smoothed)
    fig, axes = _figure(1, 1, (max(4.0, 0.25 * len(p["step"]) + 3.0), max(3.0, 0.22 * len(names) + 1.0)), dpi)
    ax = axes[0][0]
    _imshow(fig, ax, matrix, "G-effect" + (" (EMA)" if smoothed else ""))
    ax.set_yticks(range(len(names)), names, fontsize="small")
    ticks = list(range(0, len(p["step"]), max(1, len(p["step"]) // 10)))
    ax.set_xticks(ticks, [str(p["step"][i]) for i in ticks])
    ax.set_xlabel("optimizer step")
    ax.set_title(f"G-effect per layer group, {probe} probe")
    return _save(fig, path)


def layer_profile(record: Record, probe: str, *, by: str = "block", smoothed: bool = False) -> dict[str, float]:
    """Mean over recorded steps of each group's G-effect on ``probe`` (``{group: value}``, model order)."""
    _check_by(by)
    names, matrix = _group_values(_probe(record, probe), by, smoothed)
    return {g: (sum(row) / len(row) if row else 0.0) for g, row in zip(names, matrix)}


def plot_compare(records: Mapping[str, Record], path: str | os.PathLike, *,
                 probes: Sequence[str] | None = None, by: str = "block", smoothed: bool = True,
                 yscale: str = "symlog", dpi: int = DPI) -> Path:
    """``compare_figure`` saved to ``path`` (format from its suffix); returns the path."""
    return _save(compare_figure(records, probes=probes, by=by, smoothed=smoothed, yscale=yscale, dpi=dpi), path)


def compare_figure(records: Mapping[str, Record], *, probes: Sequence[str] | None = None, by: str = "block",
                   smoothed: bool = True, yscale: str = "symlog", dpi: int = DPI):
    """Compare runs (e.g. objectives): top row, total G-effect curves per probe; bottom row, per probe, a
    heat map of runs x layer groups of the mean per-step G-effect on one symmetric-log colour scale shared by
    all runs (where an objective acts, with which sign and how strongly relative to the others)."""
    import numpy as np

    _check_scale(yscale)
    _check_by(by)
    runs = _runs(records)
    names = _probe_names(runs, probes)
    labels = list(runs)
    fig, axes = _figure(2, len(names), (5.0 * len(names), 3.2 + 0.35 * len(labels) + 1.2), dpi)
    for j, probe in enumerate(names):
        _draw_curves(axes[0][j], runs, probe, smoothed, yscale)
        profiles = [layer_profile(runs[k], probe, by=by) if probe in runs[k]["probes"] else {} for k in labels]
        groups = list(dict.fromkeys(g for prof in profiles for g in prof))
        m = np.array([[prof.get(g, 0.0) for g in groups] for prof in profiles], dtype=float).reshape(
            len(labels), len(groups))
        ax = axes[1][j]
        _imshow(fig, ax, m, "mean G-effect (symmetric log)")
        ax.set_yticks(range(len(labels)), [k or "run" for k in labels])
        short = [g.replace("layers.", "") for g in groups]
        ticks = list(range(0, len(groups), max(1, len(groups) // 16)))
        ax.set_xticks(ticks, [short[i] for i in ticks], rotation=90, fontsize="small")
        ax.set_xlabel("layer group (model order)")
        ax.set_title(f"per layer, mean over steps ({probe})")
    fig.suptitle("G-effect of each objective: how strongly (top) and where in the network (bottom); "
                 "G < 0 on forget = forgetting, on retain = damage", fontsize=10)
    return fig


def save_g_effect_plots(record: Record, out_dir: str | os.PathLike, *, prefix: str = "g_effect",
                        dpi: int = DPI) -> list[Path]:
    """A trainer's figures for one run: ``<prefix>_curves.png`` (all probes) and one
    ``<prefix>_layers_<probe>.png`` heat map per recorded probe. Returns the written paths (none when
    nothing was recorded)."""
    if not record.get("probes"):
        return []
    out_dir = Path(out_dir)
    paths = [plot_curves(record, out_dir / f"{prefix}_curves.png", dpi=dpi)]
    for probe in record["probes"]:
        paths.append(plot_heatmap(record, out_dir / f"{prefix}_layers_{probe}.png", probe=probe, dpi=dpi))
    return paths


__all__ = ["compare_figure", "layer_profile", "plot_compare", "plot_curves", "plot_heatmap", "save_g_effect_plots"]
