"""Progress bars of TOFU generation, MUSE evaluation and G-effect probes: shown on a terminal, absent otherwise
(tqdm ``disable=None``), so log files get no bar spam."""
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


def _both(monkeypatch, capsys, run, text):
    """``run()`` prints no bar to a captured (non-terminal) stderr and ``text`` to a terminal."""
    first = run()
    assert text not in capsys.readouterr().err
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
    out = _both(monkeypatch, capsys, lambda: T._generate(None, None, cfg, [1, 2, 3, 4, 5], "TOFU forget generation"),
                "TOFU forget generation")
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
