"""train() robustness: a torn log line on resume, accelerate state left by a stopped Trainer, progress bars
only on a terminal."""
from __future__ import annotations

import json

import pytest
import torch

from fastweight.data.tofu import QADataset
from fastweight.train.config import TrainConfig
from fastweight.train.jsonlog import repair_log
from fastweight.train.loop import train
from fastweight.train.models import load_model_and_tokenizer
from helpers import tiny_tofu

DATA = tiny_tofu()  # the tiny TOFU set that the shared `tiny_dir` model (conftest.py) was built on


def _run(tiny_dir, out, capsys=None, **kw):
    model, tok = load_model_and_tokenizer(tiny_dir)
    cfg = TrainConfig(**{**dict(output_dir=str(out), lr=5e-3, epochs=1, batch_size=2, grad_accum=1,
                                progress=False, seed=3), **kw})
    if capsys is not None:
        capsys.readouterr()  # drop the model-loading output
    return train(model, QADataset(DATA["retain90"], tok, "phi", 48), None, cfg)


def test_repair_log_drops_only_torn_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    assert repair_log(log) == 0  # no file: nothing to do
    log.write_text('{"step": 1}\n{"step": 2}\n')
    assert repair_log(log) == 0 and not list(tmp_path.glob("log.jsonl.torn-*"))
    log.write_text('{"step": 1}\n{"step": 2, "lo')
    assert repair_log(log) == 1
    assert log.read_text() == '{"step": 1}\n'
    (kept,) = tmp_path.glob("log.jsonl.torn-*")
    assert kept.read_text() == '{"step": 1}\n{"step": 2, "lo'


def test_resume_tolerates_a_torn_last_log_line(tiny_dir, tmp_path):
    class Stop(Exception):
        pass

    def stop(step, _):
        if step == 3:
            raise Stop

    model, tok = load_model_and_tokenizer(tiny_dir)
    ds = QADataset(DATA["retain90"], tok, "phi", 48)
    cfg = dict(output_dir=str(tmp_path), lr=5e-3, epochs=1, batch_size=2, grad_accum=1, progress=False, seed=3,
               save_every=2)
    with pytest.raises(Stop):
        train(model, ds, None, TrainConfig(**cfg), on_step=stop)
    log = tmp_path / "log.jsonl"
    with open(log, "a") as fh:  # killed while appending step 4's line
        fh.write('{"step": 4, "epoch": 0, "lo')
    res = train(load_model_and_tokenizer(tiny_dir)[0], ds, None, TrainConfig(**cfg, resume=True))
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, res.global_step + 1)) and res.global_step == 5
    assert list(tmp_path.glob("log.jsonl.torn-*"))  # the original is kept beside it


def test_trainer_stopped_mid_accumulation_does_not_skip_later_steps(tiny_dir, tmp_path):
    """Regression guard for what C hit with the earlier loop (steps skipped after a stopped Trainer). The current
    loop sets sync_gradients for every micro-batch and train() resets it at start, so this passes either way;
    it fails if a later change lets the stale process-wide state through."""
    from accelerate.state import AcceleratorState, GradientState

    clean = _run(tiny_dir, tmp_path / "clean")
    try:
        # what a transformers.Trainer stopped between two micro-batches of a step leaves behind
        GradientState()._set_sync_gradients(False)
        after = _run(tiny_dir, tmp_path / "after")
        assert GradientState().sync_gradients
    finally:
        GradientState._reset_state()
        AcceleratorState._reset_state(reset_partial_state=True)
    assert after.global_step == clean.global_step == 5
    for (name, a), b in zip(clean.model.state_dict().items(), after.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_progress_off_a_terminal_is_lines_not_a_bar(tiny_dir, tmp_path, capsys):
    _run(tiny_dir, tmp_path, capsys, progress=True)
    err = capsys.readouterr().err
    # stderr is captured: not a terminal, so no bar (no it/s, no carriage returns) but [progress] lines
    assert "it/s" not in err and "\r" not in err, err
    assert "[progress] fine-tune: 0/" in err and err.rstrip().endswith("done"), err
