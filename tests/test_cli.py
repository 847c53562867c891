"""The ``fastweight`` command: ``python -m fastweight`` and the console script run the pipelines' parsers, list
choices and defaults in ``--help``, and reject a bad argument in one line before anything touches a folder."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from fastweight import cli
from fastweight.train.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastweight", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_console_script_is_declared():
    eps = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "fastweight"]
    assert eps and eps[0].value == "fastweight.cli:main"


def test_python_m_fastweight_overview_and_unknown_command(tmp_path):
    out = _module(cwd=tmp_path)
    assert out.returncode == 2 and all(name in out.stdout for name in cli.COMMANDS)
    out = _module("nope", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown command 'nope'" in out.stderr


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_lists_choices_and_types(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: fastweight {name}")
    assert " VALUE]" not in text  # every option shows a type (INT, FLOAT, TEXT) or its choices
    assert "{" + ",".join(METHODS) + "}" in text.replace("\n", "").replace(" ", "")
    assert "(default " in text


def test_bad_method_fails_before_any_folder_is_touched(tmp_path, capsys):
    out_dir = tmp_path / "used"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        cli.main(["tofu", "--method", "foo", "--output-dir", str(out_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'foo'" in err and "not empty" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["mine.txt"]
