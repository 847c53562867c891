"""Issue 22, part 1: nothing lost. Run folders are owned (a marker), --overwrite never moves the run's inputs, the
working directory or a root, resume keeps g_effect.json and the --eval-every history, train() refuses a used
folder, save_model deletes nothing it did not create, fingerprints do not hold the folder path. Each test failed
on the code before issue 22."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fastweight.data.synth_tofu import write_tofu_folder
from fastweight.data.tofu import QADataset
from fastweight.pipelines import common as C
from fastweight.pipelines import tofu
from fastweight.train.config import TrainConfig
from fastweight.train.loop import train
from fastweight.train.models import load_model_and_tokenizer, save_model
from helpers import save_tiny_pipeline_model, tiny_tofu

FAST = dict(n_authors=6, questions_per_author=2, n_general=6, max_new_tokens=2, mixed_precision="no",
            max_eval_items=1, epochs=1, finetuned=True)
DATA = tiny_tofu()




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_pipeline_model(tmp_path_factory.mktemp("tiny"))


def _cfg(tmp_path, model, **kw):
    return tofu.TofuConfig(**{**dict(model=model, output_dir=str(tmp_path / "out"),
                                     cache_dir=str(tmp_path / "cache")), **FAST, **kw})


# ---------------------------------------------------------------------------------------------- ownership
@pytest.mark.parametrize("flag", ["resume", "overwrite"])
def test_resume_and_overwrite_refuse_a_folder_no_run_created(tmp_path, tiny, loader, flag):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("table.md", "es.png", "status.json"):
        (out / name).write_text("mine")
    with pytest.raises(ValueError, match="no fastweight run"):
        tofu.run(_cfg(tmp_path, tiny, **{flag: True}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and loader == []
    assert all((out / n).read_text() == "mine" for n in ("table.md", "es.png", "status.json"))


def test_resume_refuses_a_run_of_another_kind(tmp_path, tiny, loader):
    C.OutputDir(tmp_path / "out", kind="muse").open()
    with pytest.raises(ValueError, match="muse run, not a tofu run"):
        tofu.run(_cfg(tmp_path, tiny, resume=True))
    assert loader == []


def test_overwrite_refuses_inputs_working_directory_and_root(tmp_path, tiny, loader, monkeypatch):
    out = tmp_path / "out"
    C.OutputDir(out, kind="tofu").open()
    write_tofu_folder(out / "data", 0, n_authors=6, questions_per_author=2, n_general=6)
    with pytest.raises(ValueError, match="holds --data"):
        tofu.run(_cfg(tmp_path, tiny, data=str(out / "data"), overwrite=True))
    model_inside = shutil.copytree(tiny, out / "model")
    with pytest.raises(ValueError, match="holds --model"):
        tofu.run(_cfg(tmp_path, str(model_inside), overwrite=True))
    assert (out / "data" / "full.json").is_file() and loader == []
    monkeypatch.chdir(out / "data")
    for path in (str(out), ".."):
        with pytest.raises(ValueError, match="working directory"):
            C.OutputDir(path, overwrite=True, kind="tofu").check()
    with pytest.raises(ValueError, match="filesystem root"):
        C.runfolder.check_overwrite_safe(Path("/"), {})
    assert not list(tmp_path.glob("out.old-*"))


# ---------------------------------------------------------------------------------------------- resume keeps all
def test_resume_removes_partial_files_of_dead_processes_only(tmp_path, capsys):
    """A run killed mid-write (SIGKILL) leaves ``<file>.tmp-<pid>``; ``--resume`` removes those of processes that
    are gone, says so, and keeps a live process's temporary and every finished file."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    C.OutputDir(out, kind="tofu").open()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has any more
    deep = out / "eval" / "unlearned" / "open-unlearning"
    deep.mkdir(parents=True)
    (deep / "TOFU_EVAL.json").write_text("{}")
    dead = [deep / f"TOFU_EVAL.json.tmp-{gone.pid}", out / f".status.json.tmp-{gone.pid}"]
    live = out / f"unlearn_log.jsonl.tmp-{os.getpid()}"
    for f in (*dead, live):
        f.write_text("partial")
    (out / "notes.tmp-draft").write_text("not ours")
    C.OutputDir(out, kind="tofu", resume=True).open()
    assert not any(f.exists() for f in dead)
    assert live.exists() and (out / "notes.tmp-draft").exists() and (deep / "TOFU_EVAL.json").read_text() == "{}"
    assert "removed 2 partial file(s)" in capsys.readouterr().out


@pytest.mark.slow  # four TOFU runs (~50 s on the shared 2-core machine)
def test_resume_keeps_g_effect_and_the_eval_history(tmp_path, tiny, monkeypatch):
    kw = dict(epochs=3, g_effect_every=1, eval_every=1)
    first = tofu.run(_cfg(tmp_path, tiny, **kw))
    out = tmp_path / "out"
    g_text = (out / "g_effect.json").read_text()
    steps = [d["step"] for d in first.during]
    assert steps == [1, 2, 3] and len(json.loads(g_text)["probes"]["forget"]["step"]) == 3
    again = tofu.run(_cfg(tmp_path, tiny, resume=True, **kw))  # a finished run resumed: nothing is lost
    assert (out / "g_effect.json").read_text() == g_text and again.g_effect == first.g_effect
    assert [d["step"] for d in again.during] == steps
    saved = json.loads((out / "results.json").read_text())
    assert saved["g_effect"] == first.g_effect and [d["step"] for d in saved["during"]] == steps
    for name in ("training.png", "es.png", "table.md"):
        assert (out / name).stat().st_size > 0
    # killed during the final evaluation, then resumed: the history is rebuilt from the log
    real = tofu._evaluate

    def killed(model, tokenizer, sets, ecfg, folder, retain_tr, label):
        if label == "satimp":
            raise KeyboardInterrupt
        return real(model, tokenizer, sets, ecfg, folder, retain_tr, label)

    monkeypatch.setattr(tofu, "_evaluate", killed)
    shutil.rmtree(out / "eval" / "unlearned")
    with pytest.raises(KeyboardInterrupt):
        tofu.run(_cfg(tmp_path, tiny, resume=True, **kw))
    monkeypatch.setattr(tofu, "_evaluate", real)
    last = tofu.run(_cfg(tmp_path, tiny, resume=True, **kw))
    assert [d["step"] for d in last.during] == steps and (out / "g_effect.json").read_text() == g_text


def test_resume_through_a_relative_path_or_a_moved_copy_reuses_everything(tmp_path, tiny, monkeypatch, capsys):
    first = tofu.run(_cfg(tmp_path, tiny))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    again = tofu.run(_cfg(tmp_path, tiny, output_dir="out", resume=True))
    shutil.copytree(tmp_path / "out", tmp_path / "moved")
    moved = tofu.run(_cfg(tmp_path, tiny, output_dir=str(tmp_path / "moved"), resume=True))
    printed = capsys.readouterr().out
    assert "other settings" not in printed and "other unlearning settings" not in printed
    assert not list(tmp_path.glob("*/*.stale-*")) and not list(tmp_path.glob("*/eval/*.stale-*"))
    assert again.metrics == first.metrics == moved.metrics


# ---------------------------------------------------------------------------------------------- train(), save_model
def _train(tiny_dir, out, **kw):
    model, tok = load_model_and_tokenizer(tiny_dir)
    cfg = TrainConfig(**{**dict(output_dir=str(out), lr=5e-3, epochs=1, batch_size=4, grad_accum=1, progress=False,
                                seed=3, max_steps=2), **kw})
    return train(model, QADataset(DATA["retain90"], tok, "phi", 48), QADataset(DATA["forget10"], tok, "phi", 48),
                 cfg)


def test_train_refuses_a_used_output_dir(tiny_dir, tmp_path):
    _train(tiny_dir, tmp_path, method="ga")
    log = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(ValueError, match="earlier training run"):
        _train(tiny_dir, tmp_path, method="ga")
    with pytest.raises(ValueError, match="other settings.*method"):
        _train(tiny_dir, tmp_path, method="npo", resume=True)
    assert (tmp_path / "log.jsonl").read_text() == log
    res = _train(tiny_dir, tmp_path, method="ga", resume=True)  # same settings: continues (already done)
    assert res.global_step == 2


def test_save_model_deletes_nothing_it_did_not_create(tiny_dir, tmp_path, capsys):
    model, tok = load_model_and_tokenizer(tiny_dir)
    target, sibling = tmp_path / "m", tmp_path / "m.tmp"
    target.mkdir()
    (target / "mine.txt").write_text("user file")
    sibling.mkdir()
    (sibling / "other.txt").write_text("someone else's")
    save_model(model, tok, target)
    assert (target / "config.json").is_file() and (sibling / "other.txt").read_text() == "someone else's"
    (aside,) = tmp_path.glob("m.replaced-*")
    assert (aside / "mine.txt").read_text() == "user file"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("m.replaced-")) == ["m", "m.tmp"]
