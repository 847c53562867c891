"""Figures a researcher can read: titles, labelled axes, better-direction marks, reference and chance lines, one
panel per quantity scale, 150 dpi (the matplotlib objects are inspected, not pixels)."""
from __future__ import annotations

import pytest

from fastweight.eval import plots as P

pytest.importorskip("matplotlib")


def _lines_at(ax, y: float) -> list:
    """Horizontal line collections / lines drawn at height y."""
    found = []
    for coll in ax.collections:
        for seg in getattr(coll, "get_segments", lambda: [])():
            if len(seg) == 2 and abs(seg[0][1] - y) < 1e-9 and abs(seg[1][1] - y) < 1e-9:
                found.append(coll)
    for line in ax.lines:
        ys = line.get_ydata()
        if len(ys) == 2 and all(abs(float(v) - y) < 1e-9 for v in ys):
            found.append(line)
    return found


def test_training_figure_has_one_panel_per_quantity_scale():
    history = [{"step": i, "epoch": 0, "lr": 1e-4 * i, "loss": 3.0 - 0.1 * i, "forget_loss": -0.02 * i,
                "retain_loss": 2.0 + 0.5 * i, "grad_norm": 10.0 ** i, "mean_weight": 0.3} for i in range(1, 6)]
    fig = P.training_figure(history, title="satimp on forget10")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == ["loss terms (nats)", "gradient norm (L2)", "learning rate", "method statistics"]
    assert fig._suptitle.get_text() == "satimp on forget10"
    assert fig.axes[-1].get_xlabel() == "optimizer step"
    assert fig.axes[0].get_yscale() == "symlog"   # -0.02 .. 4.5: signs mix over decades
    assert fig.axes[1].get_yscale() == "log"      # 10 .. 1e5
    assert {l.get_label() for l in fig.axes[0].lines} == {"loss", "forget_loss", "retain_loss"}


def test_metric_bars_mark_direction_reference_and_chance(tmp_path):
    cols = {"target (before)": {"wmdp_acc": 0.6, "mmlu_acc": 0.5}, "rmu (after)": {"wmdp_acc": 0.26, "mmlu_acc": 0.48}}
    fig = P.mcq_figure(cols, ["wmdp_acc", "mmlu_acc"], chance={"wmdp_acc": 0.25, "mmlu_acc": 0.25})
    ax = fig.axes[0]
    assert "WMDP" in ax.get_title() and ax.get_ylabel() == "accuracy (0-1)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["WMDP acc. ↓", "MMLU acc. ↑"]
    assert _lines_at(ax, 0.25), "chance line"
    assert "chance" in [t.get_text() for t in ax.get_legend().get_texts()]
    es = P.es_figure({"target (before)": {"forget": 0.9, "retain": 0.8}, "retain model": {"forget": 0.1, "retain": 0.8}})
    ax = es.axes[0]
    assert len(ax.patches) == 2  # the reference model is a dashed line, not a bar
    assert _lines_at(ax, 0.1) and "retain model (reference)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_muse_figure_shows_privleak_in_its_own_panel():
    cols = {"target (before)": {"forget_verbmem": 0.8, "forget_knowmem": 0.5, "retain_knowmem": 0.5, "privleak": -90.0},
            "npo (after)": {"forget_verbmem": 0.1, "forget_knowmem": 0.2, "retain_knowmem": 0.4, "privleak": 20.0},
            "retrained": {"forget_verbmem": 0.2, "forget_knowmem": 0.3, "retain_knowmem": 0.5, "privleak": 0.0}}
    fig = P.muse_figure(cols, reference="retrained")
    mem, leak = fig.axes
    assert fig._suptitle.get_text() == "MUSE"
    assert [t.get_text() for t in mem.get_xticklabels()] == ["forget VerbMem ↓", "forget KnowMem ↓", "retain KnowMem ↑"]
    assert [t.get_text() for t in leak.get_xticklabels()] == ["PrivLeak →0"]
    assert "PrivLeak" in leak.get_ylabel() and _lines_at(leak, 0.0)
    assert sorted(round(p.get_height(), 6) for p in leak.patches) == [-90.0, 20.0]


def test_saved_files_are_150_dpi(tmp_path):
    from PIL import Image

    path = P.plot_fq_mu({"a": (0.5, 1e-3), "b": (0.6, 0.2)}, tmp_path / "fq.png")
    dpi = Image.open(path).info["dpi"]
    assert abs(dpi[0] - 150) < 1
    fig = P.fq_mu_figure({"a": (0.5, 1e-3)})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "Forget Quality" in ax.get_ylabel() and "Model Utility" in ax.get_xlabel()
    assert _lines_at(ax, 0.05)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="history"):
        P.training_figure([])
    with pytest.raises(ValueError, match="reference"):
        P.metrics_figure({"a": {"x": 1.0}}, ["x"], title="t", reference="b")
