"""Every module of the package imports on its own, as the first fastweight module a program imports.

A user's script, a notebook or a worker process may start with any submodule (``from
fastweight.train.methods_released import ...``); an import cycle that only works in one order breaks there and
nowhere in a suite that imports ``fastweight`` first. One interpreter imports torch (the slow part, outside
every cycle of ours), then forks a child per module; each child imports only that module and reports the error.
"""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

_CHILDREN = r"""
import json, os, sys, traceback
import torch  # noqa: F401  (shared by the forked children)
assert not any(m == "fastweight" or m.startswith("fastweight.") for m in sys.modules), "fastweight imported early"
failures = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            __import__(name)
            msg = b""
        except BaseException:
            msg = traceback.format_exc().encode()
        os.write(w, msg[-4000:])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if out or status:
        failures[name] = out.decode() or f"child exited with status {status}"
print(json.dumps(failures))
"""


def package_modules() -> list[str]:
    """fastweight and every submodule (fastweight.kernels included), by the installed package's files."""
    import fastweight.kernels  # binds fastweight too; kernels/ is installed there, not under fastweight.__path__

    names = ["fastweight", "fastweight.kernels"]
    for package in (fastweight, fastweight.kernels):
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(set(names))


def test_module_list_covers_the_layers():
    names = set(package_modules())
    for expected in ("fastweight.kernels", "fastweight.ops.linear_logprobs", "fastweight.train.methods_released",
                     "fastweight.pipelines.tofu", "fastweight.__main__"):
        assert expected in names
    assert len(names) > 50


def test_every_module_imports_first():
    names = package_modules()
    out = subprocess.run([sys.executable, "-c", _CHILDREN, json.dumps(names)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"import {k} first:\n{v}" for k, v in failures.items())
