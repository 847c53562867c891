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
    # loss terms stay linear even when signs mix over decades (symlog magnified crossings near zero)
    assert fig.axes[0].get_yscale() == "linear"
    assert fig.axes[1].get_yscale() == "log"      # 10 .. 1e5
    labels = {l.get_label() for l in fig.axes[0].lines if not l.get_label().startswith("_")}
    assert labels == {f"loss ({P.TOTAL_NOTE})", "forget_loss", "retain_loss"}  # the total says what it sums


def test_training_figure_units_and_one_step_axis():
    """RMU's terms are activation MSE, not nats; a one-step run gets a readable step axis around its step."""
    history = [{"step": 1, "loss": 4.0, "forget_loss": 3.0, "retain_loss": 1.0, "grad_norm": 2.0, "lr": 1e-5}]
    fig = P.training_figure(history, title="rmu on WMDP", loss_unit="activation MSE")
    assert fig.axes[0].get_ylabel() == "loss terms (activation MSE)"
    lo, hi = fig.axes[-1].get_xlim()
    assert lo <= 0 and hi >= 2 and [t for t in fig.axes[-1].get_xticks() if lo <= t <= hi] == [0, 1, 2]


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
    assert fig._suptitle.get_text() == "MUSE: memorisation and privacy leakage"
    assert [t.get_text() for t in mem.get_xticklabels()] == ["forget VerbMem ↓", "forget KnowMem ↓", "retain KnowMem ↑"]
    assert [t.get_text() for t in leak.get_xticklabels()] == ["PrivLeak →0"]
    assert "PrivLeak" in leak.get_ylabel() and _lines_at(leak, 0.0)
    assert sorted(round(p.get_height(), 6) for p in leak.patches) == [-90.0, 20.0]
    assert "%" in leak.get_ylabel()
    lo, hi = leak.get_ylim()
    assert lo < -90.0 and hi > 20.0  # the bars and the retrained model's 0 lie inside the frame
    only_negative = P.muse_figure({"a": {"privleak": -50.0}, "retrained": {"privleak": 0.0}}, reference="retrained")
    assert only_negative.axes[1].get_ylim()[1] > 0.0  # 0 is not on the top edge


def test_saved_files_are_150_dpi(tmp_path):
    from PIL import Image

    path = P.plot_fq_mu({"a": (0.5, 1e-3), "b": (0.6, 0.2)}, tmp_path / "fq.png")
    dpi = Image.open(path).info["dpi"]
    assert abs(dpi[0] - 150) < 1
    fig = P.fq_mu_figure({"a": (0.5, 1e-3)})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "Forget Quality" in ax.get_ylabel() and "Model Utility" in ax.get_xlabel()
    assert _lines_at(ax, 0.05)
    assert any("0.05" in t.get_text() for t in ax.get_legend().get_texts())  # the line says what it is


def test_fq_mu_draws_a_model_without_forget_quality_as_a_line():
    """The retain model has no Forget Quality (the table prints "-"): a vertical line, not a point at FQ = 1."""
    fig = P.fq_mu_figure({"target": (0.4, 1e-4), "satimp": (0.38, 0.02), "retain model": (0.41, None)})
    ax = fig.axes[0]
    assert len(ax.collections) == 2  # two scatter points
    vertical = [l for l in ax.lines if len(set(l.get_xdata())) == 1 and abs(float(l.get_xdata()[0]) - 0.41) < 1e-9]
    assert vertical and "retain model" in vertical[0].get_label()


def test_value_labels_sit_above_reference_lines():
    es = P.es_figure({"target (before)": {"forget": 0.78, "retain": 0.77}, "satimp": {"forget": 0.05, "retain": 1.0},
                      "retain model": {"forget": 0.074, "retain": 0.77}})
    ax = es.axes[0]
    ref_z = max(l.get_zorder() for l in ax.collections)
    texts = [t for t in ax.texts if t.get_text()]
    assert texts and all(t.get_zorder() > ref_z and t.get_bbox_patch() is not None for t in texts)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="history"):
        P.training_figure([])
    with pytest.raises(ValueError, match="reference"):
        P.metrics_figure({"a": {"x": 1.0}}, ["x"], title="t", reference="b")
