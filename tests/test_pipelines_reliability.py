"""Reliability of the pipelines (issue 15 items 1-3): output safety, fail fast before any model is loaded, one-line
CLI errors with exit code 2, typed config parsing, resume keyed by fingerprints, atomic results and incomplete-run
marks, torn log lines. Each test failed on the pre-pipeline examples (rmtree of --output-dir, late errors, raw
tracebacks, path-keyed caches, reused evaluations)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastweight.data.synth_tofu import write_tofu_folder
from fastweight.pipelines import common as C
from fastweight.pipelines import tofu
from fastweight.pipelines.config import cli_main
from fastweight.pipelines.config import coerce, config_from_mapping
from helpers import Loaded, save_tiny_pipeline_model

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(n_authors=6, questions_per_author=2, n_general=6, max_new_tokens=2, mixed_precision="no",
            max_eval_items=1, epochs=1)




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_pipeline_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    write_tofu_folder(folder, 0, n_authors=6, questions_per_author=2, n_general=6)
    return folder


def _cfg(tmp_path, model, **kw):
    return tofu.TofuConfig(model=model, output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                           **{**FAST, **kw})


# ---------------------------------------------------------------------------------------------- output safety
def test_non_empty_output_dir_survives_a_failing_run(tmp_path, tiny, loader):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        tofu.run(_cfg(tmp_path, tiny))
    with pytest.raises(ValueError, match="no such file"):
        tofu.run(_cfg(tmp_path / "new", str(tmp_path / "missing-model"), resume=True))
    assert (out / "keep.txt").read_text() == "mine" and loader == []


def test_overwrite_moves_the_old_folder_aside(tmp_path):
    out = tmp_path / "out"
    C.OutputDir(out).open()  # a run's folder (it carries the marker)
    (out / "keep.txt").write_text("mine")
    C.OutputDir(out, overwrite=True).open()
    moved = list(tmp_path.glob("out.old-*"))
    assert len(moved) == 1 and (moved[0] / "keep.txt").read_text() == "mine"
    assert json.loads((out / "status.json").read_text())["state"] == "running"
    with pytest.raises(ValueError, match="exclude"):
        tofu.TofuConfig(resume=True, overwrite=True)


# ---------------------------------------------------------------------------------------------- fail fast
def _corrupt(folder: Path, config: str, how: str) -> None:
    file = folder / f"{config}.json"
    if how == "empty":
        file.write_text("")
        return
    rows = [json.loads(l) for l in file.read_text().splitlines() if l.strip()]
    del rows[0]["answer"]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("case,kw,match", [
    ("unknown method", {"method": "nosuch"}, "nosuch"),
    ("unknown option", {"method_args": {"nosuch": 1}}, "nosuch"),
    ("non-numeric option", {"method_args": {"beta1": "abc"}}, "beta1"),
    ("negative option", {"method": "npo", "method_args": {"beta": -1.0}}, "beta"),
    ("row without answer", {"_corrupt": ("forget10", "row")}, "answer"),
    ("empty forget split", {"_corrupt": ("forget10", "empty")}, "empty"),
    ("missing model", {"model": "/nonexistent/model"}, "model"),
    ("bad retain model", {"retain_model": "./nope"}, "retain-model"),
])
def test_config_errors_are_raised_before_any_model_is_loaded(tmp_path, tiny, data, loader, case, kw, match):
    kw = dict(kw)
    if "_corrupt" in kw:
        _corrupt(data, *kw.pop("_corrupt"))
    with pytest.raises(ValueError, match=match):
        tofu.run(_cfg(tmp_path, kw.pop("model", tiny), data=str(data), **kw))
    assert loader == [], case


@pytest.mark.parametrize("kw,match", [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
                                      ({"max_length": 2}, "max_length"), ({"split": "forget99"}, "split"),
                                      ({"eval_every": -1}, "eval_every")])
def test_numeric_ranges_fail_at_config_time(kw, match):
    with pytest.raises(ValueError, match=match):
        tofu.TofuConfig(**kw)


def test_a_valid_config_reaches_the_loader_and_rmu_needs_no_config_file(tmp_path, tiny, data, loader):
    with pytest.raises(Loaded):
        tofu.run(_cfg(tmp_path, tiny, data=str(data)))
    assert loader == [tiny]  # the recorder is hit once everything else was checked
    args = C.resolve_method_args("rmu", None, tofu.TUNED_METHOD_ARGS)
    assert "forget_coef" not in args and "retain_loss" not in args  # TOFU's tuned options are not RMU's


# ---------------------------------------------------------------------------------------------- CLI
def _example():
    spec = importlib.util.spec_from_file_location("tofu_unlearn", ROOT / "examples" / "tofu_unlearn.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv", [["--method-arg", "nosuch=1"], ["--model", "/nonexistent/x"],
                                  ["--method-arg", "beta1=abc"]])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, argv, capsys, loader):
    code = _example().main(argv + ["--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert loader == []


@pytest.mark.parametrize("exc", [ConnectionError("Couldn't reach 'org/x' on the Hub"),
                                 PermissionError("[Errno 13] Permission denied: '/out'")])
def test_cli_environment_errors_are_one_line_with_exit_code_2(exc, capsys):
    """An unreachable hub (--data / --model ids offline) or an unwritable folder: one line, exit 2, no traceback;
    --debug re-raises it."""
    def run(cfg):
        raise exc

    assert cli_main(lambda argv: None, run, print, argv=[]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(exc).split(":")[0] in err[0], err
    with pytest.raises(type(exc)):
        cli_main(lambda argv: None, run, print, argv=["--debug"])


@pytest.mark.parametrize("argv", [["--epochs", "abc"], ["--epochs", "0"], ["--split", "x"], ["--beta1", "x"],
                                  ["--method-arg", "novalue"], ["--config", "/nonexistent.yaml"]])
def test_cli_parse_errors_are_one_line_with_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _example().main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "error:" in err[0], err


def test_debug_shows_the_traceback(tmp_path, loader):
    with pytest.raises(ValueError, match="nosuch"):
        _example().main(["--method-arg", "nosuch=1", "--debug", "--output-dir", str(tmp_path / "o")])


def test_typed_parsing_of_config_values():
    assert coerce("lr", float, "1e-5") == 1e-5 and coerce("epochs", int, "3") == 3 and coerce("epochs", int, 3.0) == 3
    assert coerce("max_steps", int | None, "null") is None and coerce("resume", bool, "true") is True
    for tp, value in ((float, "fast"), (int, "2.5"), (bool, "maybe"), (int, True)):
        with pytest.raises(ValueError, match="option x"):
            coerce("x", tp, value)
    cfg = config_from_mapping(tofu.TofuConfig, {"lr": "1e-5", "epochs": "2", "max_steps": None})
    assert (cfg.lr, cfg.epochs, cfg.max_steps) == (1e-5, 2, None)
    with pytest.raises(ValueError, match="unknown option"):
        config_from_mapping(tofu.TofuConfig, {"lrr": 1})


# ---------------------------------------------------------------------------------------------- resume
def test_resume_with_other_method_or_epochs_recomputes(tmp_path, tiny, capsys):
    first = tofu.run(_cfg(tmp_path, tiny, finetuned=True))
    assert list(first.metrics) == ["target (before)", "satimp (after)"]
    again = tofu.run(_cfg(tmp_path, tiny, finetuned=True, resume=True))  # same settings: reused
    assert again.metrics == first.metrics and not list((tmp_path / "out" / "eval").glob("*.stale-*"))
    capsys.readouterr()
    other = tofu.run(_cfg(tmp_path, tiny, finetuned=True, resume=True, method="ga", epochs=2))
    printed = capsys.readouterr().out
    assert list(other.metrics) == ["target (before)", "ga (after)"]
    assert list((tmp_path / "out" / "eval").glob("unlearned.stale-*"))  # satimp's evaluation moved, not reused
    assert list((tmp_path / "out").glob("checkpoints.stale-*")) and "other unlearning settings" in printed
    assert other.metrics["target (before)"] == first.metrics["target (before)"]  # same target: reused
    assert len(other.history) == 2 * len(first.history)


def test_edited_data_is_not_served_from_the_model_cache(tmp_path, tiny, data, monkeypatch):
    trained = []
    real = C.train
    monkeypatch.setattr(C, "train", lambda *a, **k: trained.append(1) or real(*a, **k))
    kw = dict(data=str(data), eval_only=True, ft_epochs=1, max_length=32, max_new_tokens=2)
    tofu.run(_cfg(tmp_path, tiny, **kw))
    assert len(trained) == 2  # target and retain model fine-tuned
    tofu.run(_cfg(tmp_path, tiny, resume=True, **kw))
    assert len(trained) == 2  # both from the cache
    rows = [json.loads(l) for l in (data / "full.json").read_text().splitlines() if l.strip()]
    rows[-1]["answer"] += " Edited."
    (data / "full.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tofu.run(_cfg(tmp_path, tiny, resume=True, **kw))
    assert len(trained) == 3  # the target is fine-tuned again; the retain model's data did not change


def test_nothing_to_resume_is_said(tmp_path, capsys):
    out = C.OutputDir(tmp_path / "new", resume=True)
    out.open()
    assert out.prepare_training({"k": 1}) is False
    printed = capsys.readouterr().out
    assert "nothing to resume" in printed and "no unlearning checkpoint" in printed


def test_killed_resumed_run_does_not_look_complete(tmp_path, tiny, monkeypatch):
    tofu.run(_cfg(tmp_path, tiny, finetuned=True))
    out = tmp_path / "out"

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        tofu.run(_cfg(tmp_path, tiny, finetuned=True, resume=True, method="ga"))
    assert not (out / "results.json").exists() and (out / "results.previous.json").is_file()
    assert json.loads((out / "status.json").read_text())["state"] == "running"


def test_torn_log_line_is_tolerated(tmp_path):
    out = C.OutputDir(tmp_path / "o", resume=True)
    out.open()
    log = tmp_path / "o" / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    key = {"k": 1}
    (tmp_path / "o" / "UNLEARN_FINGERPRINT.json").write_text(json.dumps({"fingerprint": C.fingerprint(key)}))
    out.prepare_training(key)
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [1]
    assert list((tmp_path / "o").glob("log.jsonl.torn-*"))  # the original is kept
