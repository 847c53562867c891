"""PNG plots of an unlearning run (matplotlib, Agg backend: no display needed).

``plot_training``  loss and the method's statistics (e.g. mean token weight) per optimizer step;
``plot_es``        Extraction Strength on the forget and retain splits before / after unlearning (and for the
                   retain model when given);
``plot_fq_mu``     Forget Quality (log scale) against Model Utility, one point per model;
``plot_metrics``   grouped bars of any metrics per model (MUSE, WMDP).
Each function writes one PNG and returns its path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(history: Sequence[Mapping[str, float]], path: str | os.PathLike,
                  title: str = "unlearning") -> Path:
    """Loss (top) and every other logged statistic except step/epoch/lr (bottom) against the step."""
    if not history:
        raise ValueError("history must hold at least one step")
    plt = _plt()
    steps = [h["step"] for h in history]
    extra = sorted({k for h in history for k in h} - {"step", "epoch", "lr", "loss"})
    fig, axes = plt.subplots(2, 1, figsize=(5, 4.5), sharex=True)
    axes[0].plot(steps, [h["loss"] for h in history], marker=".")
    axes[0].set_ylabel("loss")
    axes[0].set_title(title)
    for k in extra:
        axes[1].plot(steps, [h.get(k, float("nan")) for h in history], marker=".", label=k)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("statistic")
    if extra:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_metrics(values: Mapping[str, Mapping[str, float]], keys: Sequence[str], path: str | os.PathLike,
                 ylabel: str = "score", ylim: tuple[float, float] | None = (0.0, 1.05),
                 labels: Sequence[str] | None = None) -> Path:
    """Grouped bars: one group per metric key (tick ``labels``, default the keys), one bar per model
    (``values[model][key]``, insertion order; a missing key is drawn as NaN)."""
    if not values or not keys:
        raise ValueError("values must map at least one model to its metrics, and keys must be non-empty")
    plt = _plt()
    models = list(values)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(keys), 3.2))
    for j, m in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(keys))]
        vals = [float(values[m].get(k, float("nan"))) for k in keys]
        ax.bar(xs, vals, width, label=m)
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)), list(labels if labels is not None else keys), fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_es(es: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Grouped bars: ``es[model][split]`` for splits "forget" and "retain" (models in insertion order)."""
    if not es:
        raise ValueError("es must map at least one model to {'forget': ES, 'retain': ES}")
    return plot_metrics(es, ["forget", "retain"], path, ylabel="Extraction Strength", ylim=(0.0, 1.1),
                        labels=["forget split", "retain split"])


def plot_fq_mu(points: Mapping[str, tuple[float, float]], path: str | os.PathLike) -> Path:
    """Scatter of ``points[model] = (model_utility, forget_quality)``; forget quality on a log axis."""
    if not points:
        raise ValueError("points must map at least one model to (model_utility, forget_quality)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, (mu, fq) in points.items():
        ax.scatter([mu], [max(fq, 1e-30)], s=40)
        ax.annotate(name, (mu, max(fq, 1e-30)), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS p-value)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


__all__ = ["plot_es", "plot_fq_mu", "plot_metrics", "plot_training"]
