"""Runs every ``@pytest.mark.interpret`` test (backend="triton" on CPU tensors) in a subprocess with
TRITON_INTERPRET=1: the interpreter is chosen when kernels are decorated, so it needs a fresh process."""
from __future__ import annotations

import os
import re
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)


def test_interpret_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "pytest", "-m", "interpret", "-q", "-p", "no:cacheprovider",
           "-W", "ignore::RuntimeWarning", TESTS_DIR]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    # pytest exits 5 when nothing was collected: that must fail here, never pass silently.
    assert proc.returncode != 5, "no test marked `interpret` was collected:\n" + out[-3000:]
    assert proc.returncode == 0, f"interpret suite failed (exit {proc.returncode}):\n" + out[-6000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) > 0, "no interpret test passed:\n" + out[-3000:]
    assert " skipped" not in out.splitlines()[-1], "interpret tests were skipped:\n" + out[-3000:]
