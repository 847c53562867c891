"""Pickle-free checkpoints (issue 15 item 4) and the non-finite stop (item 5, trainer half)."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from fastweight.data.tofu import QADataset
from fastweight.train.checkpoint import OPTIMIZER_FILE, latest_checkpoint
from fastweight.train.config import TrainConfig
from fastweight.train.engine import NonFiniteError
from fastweight.train.loop import train
from fastweight.train.models import load_model_and_tokenizer
from helpers import tiny_tofu

DATA = tiny_tofu()  # the tiny TOFU set that the shared `tiny_dir` model (conftest.py) was built on


def _run(tiny_dir, out, on_step=None, **kw):
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget = QADataset(DATA["full"][:8], tok, "phi", 48)
    retain = QADataset(DATA["full"][8:], tok, "phi", 48)
    base = dict(output_dir=str(out), lr=1e-2, epochs=2, batch_size=2, grad_accum=1, progress=False, seed=3,
                save_every=2)
    return train(model, forget, retain, TrainConfig(**{**base, **kw}), on_step=on_step)


class _Stop(Exception):
    pass


def _stop_at(n):
    def f(step, _):
        if step == n:
            raise _Stop
    return f


class _Planted:
    """Unpickling this object creates a marker file: proof that a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_files_are_plain(tiny_dir, tmp_path):
    _run(tiny_dir, tmp_path, epochs=1, save_every=2)
    ckpt = latest_checkpoint(tmp_path)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["model.safetensors", "optimizer.pt", "rng-0.safetensors", "trainer_state.json"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and "scheduler" in state
    torch.load(ckpt / OPTIMIZER_FILE, weights_only=True)  # loads with the safe unpickler


def test_planted_pickle_is_never_executed(tiny_dir, tmp_path):
    with pytest.raises(_Stop):
        _run(tiny_dir, tmp_path, on_step=_stop_at(3))
    ckpt = latest_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    with open(ckpt / "random_states_0.pkl", "wb") as fh:  # accelerate's file name; we never open it
        pickle.dump(_Planted(str(marker)), fh)
    res = _run(tiny_dir, tmp_path, resume=True)
    assert res.global_step == 8 and not marker.exists()
    ckpt = latest_checkpoint(tmp_path)
    torch.save({"state": {}, "param_groups": [], "x": _Planted(str(marker))}, ckpt / OPTIMIZER_FILE)
    (ckpt / "trainer_state.json").write_text(json.dumps({**json.loads((ckpt / "trainer_state.json").read_text()),
                                                         "global_step": 6}))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        _run(tiny_dir, tmp_path, resume=True)  # same settings (others are refused)
    assert not marker.exists()


def test_satimp_hard_random_resumes_bit_exactly(tiny_dir, tmp_path):
    kw = dict(method="satimp_hard", method_args={"sampling": "random", "k": 0.5})
    full = _run(tiny_dir, tmp_path / "a", **kw)
    with pytest.raises(_Stop):
        _run(tiny_dir, tmp_path / "b", on_step=_stop_at(3), **kw)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000002"
    resumed = _run(tiny_dir, tmp_path / "b", resume=True, **kw)
    want = full.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_stops_before_the_step_with_checkpoint_intact(tiny_dir, tmp_path, where):
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget = QADataset(DATA["full"][:8], tok, "phi", 48)
    calls = {"n": 0}
    if where == "loss":
        def hook(_m, _i, out):  # NaN hidden states from the 4th forward (step 4: one forward per step) on
            calls["n"] += 1
            return out * float("nan") if calls["n"] >= 4 else out
        model.model.norm.register_forward_hook(hook)
    else:
        def grad_hook(g):
            calls["n"] += 1
            return g * float("nan") if calls["n"] >= 4 else g
        model.lm_head.weight.register_hook(grad_hook)
    snapshot = {}

    def keep(step, _):
        snapshot.update({k: v.clone() for k, v in model.state_dict().items()})

    cfg = TrainConfig(output_dir=str(tmp_path), method="ga", lr=1e-2, epochs=2, batch_size=2, grad_accum=1,
                      progress=False, save_every=2)
    with pytest.raises(NonFiniteError, match=r"step 4") as err:
        train(model, forget, None, cfg, on_step=keep)
    assert ("forget_loss" in str(err.value)) == (where == "loss")
    assert ("gradient norm" in str(err.value)) == (where == "grad")
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    for k, v in model.state_dict().items():  # no optimizer step was taken with the bad values
        assert torch.equal(v, snapshot[k]) and torch.isfinite(v).all(), k
    from safetensors.torch import load_file

    saved = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_checkpoint_of_another_engine_is_refused(tiny_dir, tmp_path):
    """A ZeRO-3 checkpoint (per-rank partitions, no model.safetensors) cannot be resumed by one process / DDP."""
    _run(tiny_dir, tmp_path, epochs=1, save_every=2)
    ckpt = latest_checkpoint(tmp_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["engine"] == "replicated"
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "engine": "zero3", "global_step": 2}))
    with pytest.raises(ValueError, match="not written by a replicated run"):
        _run(tiny_dir, tmp_path, resume=True, epochs=1, save_every=2)
