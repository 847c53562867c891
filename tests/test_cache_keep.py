"""Issue 26: a user cache found again from any working directory (``fastweight cache list|clear``), checkpoint
retention (``--keep final|last|none``) and crashed run folders recognised. Each test failed on the code before
(cache relative to the working directory, no ``cache`` command, every run keeping its whole checkpoint, a crashed
folder reported as "not empty")."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastweight.cli import main as cli
from fastweight.pipelines import cache as K
from fastweight.pipelines import common as C
from fastweight.pipelines import tofu
from helpers import save_tiny_pipeline_model

FAST = dict(n_authors=6, questions_per_author=2, n_general=6, ft_epochs=1, ft_max_steps=1, max_new_tokens=2,
            mixed_precision="no", max_eval_items=1, epochs=2, max_steps=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_pipeline_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A temporary HOME and XDG_CACHE_HOME, no FASTWEIGHT_CACHE_DIR."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(K.ENV, raising=False)
    return tmp_path


# ------------------------------------------------------------------------------------------------ cache folder
def test_platform_cache_folders():
    env = {"HOME": "/h"}
    assert K.platform_cache_home("linux", env) == Path("/h/.cache/fastweight")
    assert K.platform_cache_home("linux", {**env, "XDG_CACHE_HOME": "/x"}) == Path("/x/fastweight")
    assert K.platform_cache_home("linux", {**env, "XDG_CACHE_HOME": "rel"}) == Path("/h/.cache/fastweight")
    assert K.platform_cache_home("darwin", env) == Path("/h/Library/Caches/fastweight")
    assert K.platform_cache_home("win32", {**env, "LOCALAPPDATA": "/L"}) == Path("/L/fastweight/Cache")


def test_cache_dir_default_env_and_flag(home, monkeypatch):
    if sys.platform.startswith(("win", "darwin")):
        pytest.skip("XDG_CACHE_HOME applies to Linux")
    assert tofu.TofuConfig().cache_dir == str(home / "xdg" / "fastweight")
    monkeypatch.setenv(K.ENV, str(home / "env"))
    assert tofu.TofuConfig().cache_dir == str(home / "env")
    assert tofu.parse_args(["--cache-dir", str(home / "flag")]).cache_dir == str(home / "flag")
    monkeypatch.chdir(home)
    assert tofu.TofuConfig(cache_dir="rel").cache_dir == str(home / "rel")  # absolute once resolved


@pytest.mark.slow  # two tiny fine-tunings and evaluations: ~35 s on the loaded 2-core machine
def test_same_run_from_two_working_directories_reuses_the_cache(tiny, home, monkeypatch, capsys):
    for i, cwd in enumerate(("a", "b")):
        (home / cwd).mkdir()
        monkeypatch.chdir(home / cwd)
        tofu.run(tofu.TofuConfig(model=tiny, output_dir="out", eval_only=True, **FAST))
        said = capsys.readouterr().out
        if i == 0:
            assert "[target] fine-tuned" in said and "[retain] fine-tuned" in said
        else:
            assert "fine-tuned" not in said.replace("[target] cached", "").replace("[retain] cached", "")
            assert "[target] cached" in said and "[retain] cached" in said
    assert not (home / "a" / "runs").exists() and not (home / "b" / "runs").exists()
    names = sorted(p.name for p in (home / "xdg" / "fastweight").iterdir())
    assert [n.split("-")[0] for n in names] == ["data", "retain", "target"]


# ------------------------------------------------------------------------------------------------ cache verb
def _entry(folder: Path, name: str, nbytes: int, key: dict | None = None, age_days: float = 0) -> Path:
    p = folder / name
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"x" * nbytes)
    if key is not None:
        (p / "FINGERPRINT.json").write_text(json.dumps({"fingerprint": name.rsplit("-", 1)[1], "key": key}))
    t = time.time() - age_days * 86400
    for f in [*p.iterdir(), p]:
        os.utime(f, (t, t))
    return p


def test_cache_list_and_clear(home, capsys):
    root = home / "xdg" / "fastweight"
    old = _entry(root, "target-0123456789abcdef", 3000, {"model": "m1", "data": "d1", "lr": 0.0003}, age_days=10)
    new = _entry(root, "retain-forget10-fedcba9876543210", 2000, {"model": "m1", "data": "d2", "epochs": 4})
    data = _entry(root, "data-s0-a6-q2-g6", 500)
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    size = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (old, new, data)}
    assert cli(["cache", "list"]) == 0
    said = capsys.readouterr().out
    assert str(root) in said and f"{size[old] / 1000:.1f} KB  {old.name}  (model m1, data d1, lr=0.0003)" in said
    assert "(model m1, data d2, epochs=4)" in said and "500 B  data-s0-a6-q2-g6  (generated data)" in said
    assert f"3 entries, {sum(size.values()) / 1000:.1f} KB in all" in said and "mine" not in said
    assert cli(["cache", "clear", "--dry-run"]) == 0
    assert "would remove 3 entries" in capsys.readouterr().out and old.exists() and new.exists()
    assert cli(["cache", "clear", "--older-than", "5"]) == 0
    assert not old.exists() and new.exists() and data.exists()
    assert f"removed 1 entries, {size[old] / 1000:.1f} KB" in capsys.readouterr().out
    assert cli(["cache", "clear", "fedcba98"]) == 0
    assert not new.exists() and data.exists()
    assert cli(["cache", "clear", "xyz"]) == 2 and "4 to 16 hex digits" in capsys.readouterr().err
    assert cli(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert not data.exists() and (foreign / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------------ --keep
def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out / "checkpoints")) for p in (out / "checkpoints").rglob("*") if p.is_file())


@pytest.mark.slow  # a TOFU run each (and a resumed one): 4-26 s on the loaded 2-core machine
@pytest.mark.parametrize("keep", ["final", "last", "none"])
def test_keep_modes(tiny, shared_cache, tmp_path, keep):
    out = tmp_path / "out"
    cfg = dict(model=tiny, output_dir=str(out), cache_dir=shared_cache, keep=keep, save_every=1, **FAST)
    first = tofu.run(tofu.TofuConfig(**cfg))
    assert len(first.history) == 2  # a checkpoint at step 1 (--save-every 1) and the final one at step 2
    files = _files(out) if (out / "checkpoints").exists() else []
    if keep == "last":
        assert files == ["step-00000002/model.safetensors", "step-00000002/optimizer.pt",
                         "step-00000002/rng-0.safetensors", "step-00000002/trainer_state.json"]
    elif keep == "final":
        assert files == ["step-00000002/model.safetensors", "step-00000002/rng-0.safetensors",
                         "step-00000002/trainer_state.json"]
        assert json.loads((out / "checkpoints/step-00000002/trainer_state.json").read_text())["weights_only"]
    else:
        assert files == [] and not (out / "checkpoints").exists()
    assert (out / "results.json").is_file() and (out / "table.md").is_file() and (out / "log.jsonl").is_file()
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    if keep != "none":  # --resume of the finished run: restores the kept weights, trains nothing more
        shutil.rmtree(out / "eval" / "unlearned")  # so the restored weights are evaluated again
        again = tofu.run(tofu.TofuConfig(**{**cfg, "resume": True}))
        after = "satimp (after)"
        assert again.metrics[after] == first.metrics[after] != first.metrics["target (before)"]
        assert _files(out) == files


def test_keep_deletes_only_checkpoint_files(tmp_path):
    from fastweight.pipelines.retention import apply_keep

    out = tmp_path / "out"
    for step in (1, 2):
        d = out / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.pt", "rng-0.safetensors"):
            (d / name).write_bytes(b"w" * 100)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "engine": "replicated"}))
    (out / "checkpoints" / "step-00000001" / "notes.txt").write_text("mine")
    assert "removed" in apply_keep(out, "none")[0]
    assert [p.name for p in (out / "checkpoints").rglob("*")] == ["step-00000001", "notes.txt"]
    with pytest.raises(ValueError, match="keep must be one of"):
        apply_keep(out, "some")


# ------------------------------------------------------------------------------------------------ crashed runs
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_crashed_run_is_recognised(tmp_path, monkeypatch):
    out = tmp_path / "out"
    C.OutputDir(out).open()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "running" and status["pid"] == os.getpid()
    with pytest.raises(ValueError, match="is not empty"):  # its process (this one) is alive: no crash
        C.OutputDir(out).check()
    (out / "status.json").write_text(json.dumps({**status, "pid": _dead_pid()}))
    (out / "eval" / "target").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"crashed .* at evaluating the target model: pass --resume .* --overwrite"):
        C.OutputDir(out).check()
    (out / "log.jsonl").write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 3}) + "\n{\"ste")
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    cfg = tofu.TofuConfig(output_dir=str(out), cache_dir=str(tmp_path / "c"))
    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError) as err:
        tofu.run(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "at unlearning step 3 (last checkpoint step-00000002)" in msg
    assert cli(["tofu", "--output-dir", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    C.OutputDir(out, resume=True).check()  # --resume and --overwrite accept it
    C.OutputDir(out, overwrite=True).check()
