"""Progress of TOFU generation, MUSE evaluation and G-effect probes: a bar on a terminal; in a log file plain
``[progress]`` lines (at the start, at least every FASTWEIGHT_PROGRESS_EVERY seconds, at the end) and no bar
debris; third-party bars silenced off a terminal (fastweight._progress)."""
from __future__ import annotations

import importlib
import io
import math
import sys

import torch

from fastweight.data.muse import MuseData
from fastweight.eval import metrics as M
from fastweight.eval import muse as MU
from fastweight.eval import tofu as T

G = importlib.import_module("fastweight.analysis.g_effect")  # the package re-exports a function g_effect


class Tty(io.StringIO):
    def isatty(self):
        return True


def _both(monkeypatch, capsys, run, text, lines: bool = True):
    """``run()`` prints ``[progress] text`` lines (or nothing, ``lines=False``) and no carriage-return bar to a
    captured (non-terminal) stderr, and a bar with ``text`` to a terminal."""
    first = run()
    err = capsys.readouterr().err
    assert "\r" not in err
    if lines:
        assert f"[progress] {text}:" in err and err.rstrip().endswith("done"), err
    else:
        assert text not in err
    fake = Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    assert run() == first  # the bar does not change results
    assert text in fake.getvalue()
    return first


def test_tofu_generation_bar(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(M, "generate_greedy",
                        lambda model, tok, prompts, **k: calls.append(len(prompts)) or [str(p) for p in prompts])
    cfg = T.TofuEvalConfig(batch_size=2, max_new_tokens=3)
    # nested inside an evaluation phase: a bar on a terminal only (the phase's own lines report in a log)
    out = _both(monkeypatch, capsys, lambda: T._generate(None, None, cfg, [1, 2, 3, 4, 5], "TOFU forget generation"),
                "TOFU forget generation", lines=False)
    assert out == ["1", "2", "3", "4", "5"] and calls[:3] == [2, 2, 1]  # batch by batch, order kept


def test_muse_evaluation_bar(monkeypatch, capsys):
    def fake(model, tok, rows, *a, **k):
        return M._result([float(len(str(r))) for r in rows])

    for name in ("verbmem", "knowmem", "mink_scores"):
        monkeypatch.setattr(MU, name, fake)
    data = MuseData(forget_text=[], retain_text=[], holdout_text=[], knowmem_forget=[{"q": 1}],
                    knowmem_retain=[{"q": 22}], knowmem_forget_icl=[], knowmem_retain_icl=[],
                    verbmem_forget=[{"p": 1}], privleak_forget=["aa", "b"], privleak_holdout=["ccc", "d"])
    model = torch.nn.Linear(1, 1)
    res = _both(monkeypatch, capsys, lambda: MU.evaluate_muse(model, None, data), "MUSE eval")
    assert set(res) >= {"forget_verbmem", "forget_knowmem", "retain_knowmem", "privleak_auc"}


def test_g_effect_probe_bar(monkeypatch, capsys):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)

    def probe_loss(m, batch):
        return (m(batch["x"]) ** 2).mean()

    def run():
        res = G.g_effects(model, lambda m: m(x).sum(), {"forget": {"x": x}, "retain": {"x": -x}},
                          probe_loss=probe_loss)
        return {k: v.total for k, v in res.items()}

    out = _both(monkeypatch, capsys, run, "G-effect probes")
    assert list(out) == ["forget", "retain"]
    assert all(math.isfinite(v) for v in out.values())


def test_log_lines_at_least_every_interval_even_inside_one_slow_item():
    import time

    from fastweight._progress import LineProgress

    out = io.StringIO()
    bar = LineProgress(total=2, desc="slow phase", unit="batch", interval=0.05, stream=out)
    time.sleep(0.3)  # one item that takes six intervals
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[progress] slow phase: 0/2 batch (0%)") and lines[0].endswith("started")
    assert len([line for line in lines if "0/2" in line]) >= 4  # heartbeats while the item ran
    assert lines[-1].startswith("[progress] slow phase: 1/2 batch (50%)") and lines[-1].endswith("done")
    bar.close()  # idempotent
    assert len(out.getvalue().splitlines()) == len(lines)


def test_third_party_bars_silenced_off_a_terminal(monkeypatch):
    from transformers.utils import logging as hf_logging

    from fastweight._progress import quiet_third_party_bars

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()  # an earlier in-process CLI run may have switched them off
    monkeypatch.setattr(sys, "stderr", Tty())
    assert quiet_third_party_bars() is False and hf_logging.is_progress_bar_enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    try:
        assert quiet_third_party_bars() is True
        assert not hf_logging.is_progress_bar_enabled()
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        assert gguf_utils.tqdm(range(2)).disable  # the GGUF conversion bar, a plain tqdm, is off too
    finally:
        hf_logging.enable_progress_bar()


def test_progress_interval_is_validated(monkeypatch):
    import pytest

    from fastweight._progress import LineProgress

    monkeypatch.setenv("FASTWEIGHT_PROGRESS_EVERY", "soon")
    with pytest.raises(ValueError, match="FASTWEIGHT_PROGRESS_EVERY"):
        LineProgress(total=1, desc="x", stream=io.StringIO())
