"""Figures of an unlearning run (matplotlib, Agg backend: no display needed), 150 dpi PNGs.

Each ``*_figure`` function builds and returns a ``matplotlib.figure.Figure`` (tests inspect its axes); each
``plot_*`` function saves that figure to ``path`` and returns the path.

``training_figure``  one panel per quantity scale against the optimizer step: loss terms (linear axis, in the
                     method's unit: nats, or activation MSE for RMU; the total's composition in its legend),
                     gradient norm (log), learning rate, the method's statistics (e.g. mean token weight),
                     G-effect values;
``metrics_figure``   grouped bars per metric with "lower/higher is better" marks, a reference model drawn as
                     dashed lines (not bars) and optional chance lines;
``es_figure``        Extraction Strength on forget / retain (TOFU), the retain model as the reference line;
``fq_mu_figure``     Forget Quality (log) against Model Utility, one point per model (a model without Forget
                     Quality, the retain model itself, as a vertical reference line at its utility);
``muse_figure``      MUSE: VerbMem / KnowMem panel (0-1) and a PrivLeak panel (signed %, 0 = the retrained model,
                     drawn inside the axis);
``mcq_figure``       WMDP / MMLU accuracy with chance lines.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

DPI = 150
LOWER, HIGHER, ZERO = "lower is better", "higher is better", "closer to 0 is better"
# metric key -> (axis / tick label, which way is better)
METRICS: dict[str, tuple[str, str]] = {
    "forget_es": ("forget ES", LOWER), "retain_es": ("retain ES", HIGHER),
    "forget_prob": ("forget prob.", LOWER), "retain_prob": ("retain prob.", HIGHER),
    "forget_rouge": ("forget ROUGE-L", LOWER), "retain_rouge": ("retain ROUGE-L", HIGHER),
    "model_utility": ("Model Utility", HIGHER), "forget_quality": ("Forget Quality", HIGHER),
    "forget_verbmem": ("forget VerbMem", LOWER), "forget_knowmem": ("forget KnowMem", LOWER),
    "retain_knowmem": ("retain KnowMem", HIGHER), "privleak": ("PrivLeak", ZERO),
    "privleak_auc": ("Min-K% AUC", ZERO),
    "wmdp_acc": ("WMDP acc.", LOWER), "mmlu_acc": ("MMLU acc.", HIGHER),
    # open-unlearning's TOFU names (fastweight.eval.tofu_metrics)
    "forget_Q_A_Prob": ("forget Q_A prob.", LOWER), "forget_Q_A_ROUGE": ("forget Q_A ROUGE-L", LOWER),
    "forget_truth_ratio": ("forget truth ratio", HIGHER), "extraction_strength": ("forget ES (OU)", LOWER),
}
_ARROW = {LOWER: "↓", HIGHER: "↑", ZERO: "→0"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return path


def metric_label(key: str) -> str:
    """Tick label with the better direction, e.g. ``"forget ES ↓"``; unknown keys: ``mmlu_x_acc`` -> ``mmlu x``."""
    if key in METRICS:
        label, better = METRICS[key]
        return f"{label} {_ARROW[better]}"
    base = key[:-4] if key.endswith("_acc") else key
    better = LOWER if base.startswith(("forget", "wmdp")) else HIGHER
    return f"{base.replace('_', ' ')} {_ARROW[better]}"


# ------------------------------------------------------------------------------------------------ training
def _group(key: str) -> str:
    if key == "lr":
        return "lr"
    if key == "grad_norm":
        return "grad_norm"
    if key.startswith("g_effect"):
        return "g_effect"
    if "loss" in key or key in ("nll", "forget", "retain", "kl") or key.endswith(("_term", "_nll", "_kl")):
        return "loss"
    return "stats"


_PANELS = {"loss": "loss terms (nats)", "grad_norm": "gradient norm (L2)", "lr": "learning rate",
           "stats": "method statistics", "g_effect": "G-effect (grad. inner product)"}


def _scale_for(ax, values: Sequence[float]) -> str:
    """linear; log when positive over > 3 decades; symlog when signs mix and magnitudes span > 2 decades
    (never for loss terms: a symlog axis magnifies sign changes near zero, which is where unlearning losses go)."""
    vals = [abs(v) for v in values if v == v and math.isfinite(v)]
    if not vals:
        return "linear"
    signed = any(v < 0 for v in values if v == v)
    nonzero = [v for v in vals if v > 0]
    span = max(nonzero) / min(nonzero) if nonzero else 1.0
    if not signed and min(vals) > 0 and span > 1e3:
        ax.set_yscale("log")
        return "log"
    if signed and span > 1e2:
        # decade-aligned linear threshold: ticks at 0 and +-10^k, not crowded inside the linear band
        thresh = max(min(nonzero), max(nonzero) * 1e-4)
        ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(thresh)))
        return "symlog"
    return "linear"


TOTAL_NOTE = "total = forget_coef x forget term + retain_coef x retain term"


def training_figure(history: Sequence[Mapping[str, float]], title: str = "unlearning", *,
                    loss_unit: str = "nats", total_note: str | None = TOTAL_NOTE):
    """One panel per quantity scale (loss terms, gradient norm, learning rate, statistics, G-effect).

    ``loss_unit`` labels the loss panel (RMU's terms are activation MSE, not nats); ``total_note`` says in the
    legend how the plotted ``loss`` is composed (the method's coefficients multiply the terms)."""
    if not history:
        raise ValueError("history must hold at least one step")
    plt = _plt()
    steps = [h["step"] for h in history]
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float))} - {"step", "epoch"})
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(_group(k), []).append(k)
    order = [g for g in ("loss", "grad_norm", "lr", "stats", "g_effect") if g in groups]
    fig, axes = plt.subplots(len(order), 1, figsize=(6, 1.9 * len(order) + 0.6), sharex=True, squeeze=False)
    for ax, g in zip(axes[:, 0], order):
        all_vals = []
        for k in groups[g]:
            ys = [float(h.get(k, float("nan"))) for h in history]
            all_vals += ys
            label = f"{k} ({total_note})" if g == "loss" and k == "loss" and total_note else k
            ax.plot(steps, ys, marker="." if len(steps) < 60 else None, label=label)
        ax.set_ylabel(f"loss terms ({loss_unit})" if g == "loss" else _PANELS[g], fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if g == "loss":
            ax.axhline(0.0, color="0.6", linewidth=0.8)
        elif g != "lr":
            _scale_for(ax, all_vals)
        if len(groups[g]) > 1 or g in ("loss", "stats"):
            ax.legend(fontsize=7, loc="best")
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if min(steps) == max(steps):  # one step: a unit-wide window, not matplotlib's +-5% around it
        axes[-1, 0].set_xlim(min(steps) - 1, max(steps) + 1)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training(history: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str = "unlearning",
                  **kw) -> Path:
    return _save(training_figure(history, title, **kw), path)


# ------------------------------------------------------------------------------------------------ bars
def _bars(ax, values: Mapping[str, Mapping[str, float]], keys: Sequence[str], reference: str | None,
          chance: Mapping[str, float] | None, annotate: bool = True) -> None:
    models = [m for m in values if m != reference]
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(keys))]
        vals = [float(values[m].get(k, float("nan"))) for k in keys]
        ax.bar(xs, vals, width, label=m)
        if annotate:  # on a white box above the reference lines, so a dashed line never runs through a number
            for x, v in zip(xs, vals):
                if v == v:
                    ax.text(x, v, f"{v:.3g}", ha="center", va="bottom" if v >= 0 else "top", fontsize=6, zorder=5,
                            bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.85))
    if reference is not None:
        for i, k in enumerate(keys):
            v = values[reference].get(k)
            if v is not None:
                ax.hlines(float(v), i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1.2, zorder=3,
                          label=f"{reference} (reference)" if i == 0 else None)
    if chance:
        for i, k in enumerate(keys):
            if k in chance:
                ax.hlines(chance[k], i - 0.45, i + 0.45, colors="grey", linestyles=":", linewidth=1.5, zorder=3,
                          label="chance" if i == 0 else None)
    ax.set_xticks(range(len(keys)), [metric_label(k) for k in keys], fontsize=8,
                  rotation=20 if len(keys) > 3 else 0, ha="right" if len(keys) > 3 else "center")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)


def metrics_figure(values: Mapping[str, Mapping[str, float]], keys: Sequence[str], *, title: str,
                   ylabel: str = "score (0-1)", ylim: tuple[float, float] | None = (0.0, 1.05),
                   reference: str | None = None, chance: Mapping[str, float] | None = None):
    """Grouped bars: one group per metric key, one bar per model (``values[model][key]``, insertion order);
    ``reference`` (a key of ``values``) drawn as dashed lines, ``chance[key]`` as dotted lines."""
    if not values or not keys:
        raise ValueError("values must map at least one model to its metrics, and keys must be non-empty")
    if reference is not None and reference not in values:
        raise ValueError(f"reference {reference!r} is not one of the models {list(values)}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(keys), 3.4))
    _bars(ax, values, keys, reference, chance)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_metrics(values: Mapping[str, Mapping[str, float]], keys: Sequence[str], path: str | os.PathLike, *,
                 title: str = "metrics", **kw) -> Path:
    return _save(metrics_figure(values, keys, title=title, **kw), path)


def es_figure(es: Mapping[str, Mapping[str, float]]):
    """``es[model] = {"forget": ES, "retain": ES}``; a model named "retain model" is the reference line."""
    if not es:
        raise ValueError("es must map at least one model to {'forget': ES, 'retain': ES}")
    values = {m: {"forget_es": v["forget"], "retain_es": v["retain"]} for m, v in es.items()}
    ref = "retain model" if "retain model" in es and len(es) > 1 else None
    return metrics_figure(values, ["forget_es", "retain_es"], title="TOFU Extraction Strength",
                          ylabel="Extraction Strength (0-1)", ylim=(0.0, 1.1), reference=ref)


def plot_es(es: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    return _save(es_figure(es), path)


def fq_mu_figure(points: Mapping[str, tuple[float, float | None]]):
    """Scatter of ``points[model] = (model_utility, forget_quality)``; Forget Quality on a log axis, with the
    0.05 significance line (above it the forget-set truth ratios are indistinguishable from the retain model's).
    A model whose Forget Quality is None (the retain model: the table's "-") is a vertical dashed line at its
    Model Utility, not a point at FQ = 1."""
    if not points:
        raise ValueError("points must map at least one model to (model_utility, forget_quality)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, (mu, fq) in points.items():
        if fq is None or fq != fq:
            ax.axvline(mu, color="black", linestyle="--", linewidth=1, label=f"{name} (utility; no FQ)")
            continue
        y = max(fq, 1e-30)
        ax.scatter([mu], [y], s=40, label=name, zorder=3)
        ax.annotate(name, (mu, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.axhline(0.05, color="grey", linestyle=":", linewidth=1, label="FQ = 0.05 (KS test p-value)")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("Model Utility (harmonic mean, 0-1) ↑")
    ax.set_ylabel("Forget Quality (KS p-value, log) ↑")
    ax.set_title("TOFU: Forget Quality vs Model Utility (top right is best)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_fq_mu(points: Mapping[str, tuple[float, float]], path: str | os.PathLike) -> Path:
    return _save(fq_mu_figure(points), path)


def muse_figure(columns: Mapping[str, Mapping[str, float]], reference: str | None = None,
                title: str = "MUSE: memorisation and privacy leakage"):
    """Two panels: VerbMem / KnowMem (0-1 scores) and PrivLeak (signed %; 0 = as private as the retrained model,
    kept inside the axis; without a retrained model the raw Min-K% AUC is shown with its 0.5 no-leak line)."""
    if not columns:
        raise ValueError("columns must map at least one model to its MUSE metrics")
    plt = _plt()
    mem = [k for k in ("forget_verbmem", "forget_knowmem", "retain_knowmem") if any(k in c for c in columns.values())]
    leak = "privleak" if any("privleak" in c for c in columns.values()) else "privleak_auc"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.5, 3.6), gridspec_kw={"width_ratios": [max(1, len(mem)), 1.2]})
    _bars(ax1, columns, mem, reference, None)
    ax1.set_ylim(0.0, 1.05)
    ax1.set_ylabel("score (0-1)")
    ax1.set_title("memorisation", fontsize=9)
    ax1.legend(fontsize=7, loc="best")
    _bars(ax2, columns, [leak], reference, None)
    if leak == "privleak":
        ax2.axhline(0.0, color="black", linestyle="--", linewidth=1, label="0 = retrained", zorder=3)
        vals = [float(c["privleak"]) for c in columns.values() if c.get("privleak") is not None] + [0.0]
        lo, hi = min(vals), max(vals)
        pad = 0.12 * max(hi - lo, 1.0)
        ax2.set_ylim(lo - pad, hi + pad)  # the retrained model's 0 never sits on the frame
        ax2.set_ylabel("PrivLeak (%, 0 = retrained)")
    else:
        ax2.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="AUC 0.5")
        ax2.set_ylim(0.0, 1.05)
        ax2.set_ylabel("Min-K% AUC forget vs holdout")
    ax2.set_title("privacy leakage", fontsize=9)
    ax2.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_muse(columns: Mapping[str, Mapping[str, float]], path: str | os.PathLike, reference: str | None = None,
              **kw) -> Path:
    return _save(muse_figure(columns, reference, **kw), path)


def mcq_figure(columns: Mapping[str, Mapping[str, float]], keys: Sequence[str], chance: Mapping[str, float] | None):
    return metrics_figure(columns, keys, title="WMDP / MMLU accuracy (WMDP ↓ to chance, MMLU ↑)",
                          ylabel="accuracy (0-1)", chance=chance)


def plot_mcq(columns: Mapping[str, Mapping[str, float]], keys: Sequence[str], path: str | os.PathLike,
             chance: Mapping[str, float] | None = None) -> Path:
    return _save(mcq_figure(columns, keys, chance), path)


__all__ = ["DPI", "METRICS", "es_figure", "fq_mu_figure", "mcq_figure", "metric_label", "metrics_figure",
           "muse_figure", "plot_es", "plot_fq_mu", "plot_mcq", "plot_metrics", "plot_muse", "plot_training",
           "training_figure"]
