"""The checkout's top-level ``kernels/`` folder never stands in for PyPI's ``kernels`` distribution.

transformers >= 5.25 imports the unrelated ``kernels`` package at import time; a Python started in the repository
root has the root on ``sys.path`` first (``python -c``, ``python -m pytest``, a notebook, DeepSpeed's launcher),
where it found this project's Triton folder instead and stopped with "cannot import name 'CUDAProperties' from
'kernels'". Each test starts a fresh interpreter from the repo root, as a user would.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _kernels_dist() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(args: list[str], *, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


IMPORT_KERNELS = (
    "import os, sys\n"
    "try:\n"
    "    import kernels\n"
    "except ModuleNotFoundError as e:\n"
    "    print('MISSING', e.name); sys.exit(0)\n"
    "print('FILE', os.path.realpath(kernels.__file__))\n"
)


@pytest.mark.parametrize("pythonpath", [False, True], ids=["cwd", "cwd+PYTHONPATH"])
def test_import_kernels_from_repo_root_is_pypis(pythonpath):
    """``import kernels`` in the repo root gives the installed distribution (or no module), never ``kernels/``;
    with the root also on PYTHONPATH, as DeepSpeed's launcher sets it."""
    out = _run(["-c", IMPORT_KERNELS], env_extra={"PYTHONPATH": str(ROOT)} if pythonpath else None)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    if _kernels_dist():
        assert line.startswith("FILE "), line
        ours = str((ROOT / "kernels").resolve()) + os.sep  # a venv inside the checkout (CI's .venv-ci) is fine
        assert not line[5:].startswith(ours), f"the checkout's kernels/ was imported: {line}"
    else:
        assert line == "MISSING kernels", line


def test_transformers_and_fastweight_kernels_from_repo_root():
    """transformers (which imports PyPI's ``kernels`` from 5.25 on) and ``fastweight.kernels`` both import from
    the repo root in one interpreter, each from where it belongs."""
    pytest.importorskip("triton")
    code = ("import os, transformers\n"
            "from transformers import PreTrainedModel, AutoModelForCausalLM\n"
            "import fastweight.kernels.token_logprobs as t\n"
            "print(os.path.realpath(t.__file__))\n")
    out = _run(["-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]) == (ROOT / "kernels" / "token_logprobs.py").resolve()


def test_pytest_on_an_hf_test_from_repo_root():
    """``python -m pytest`` on a Hugging Face integration test from the repo root collects and passes (it stopped at
    collection with transformers 5.25 before)."""
    pytest.importorskip("transformers")
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_patch_hf.py", "-k",
                "test_ga_matches_negated_hf_cross_entropy"], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout, out.stdout[-2000:]
