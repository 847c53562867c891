"""Triton kernels of fastweight, installed as ``fastweight.kernels``.

Only ``@triton.jit`` functions live here; launchers, options and autograd are in ``fastweight.ops``.
Importing this package requires Triton; ``fastweight.ops`` imports it lazily, only on the Triton backend.

This folder sits at the top of the checkout, so a Python started in the repository root (``python -m pytest``,
``python -c``, a notebook, DeepSpeed's launcher, which puts the working directory on ``PYTHONPATH``) could find
it as a top-level ``kernels`` before the unrelated PyPI distribution of that name, which transformers >= 5.25
imports. It never serves that name: imported as anything but ``fastweight.kernels``, this file loads the real
``kernels`` distribution from the rest of ``sys.path`` in its place (``import kernels`` then returns that
module, as it would outside the checkout), or raises ``ModuleNotFoundError`` when none is installed.
"""
import sys as _sys

if __name__ != "fastweight.kernels":  # imported as a top-level ``kernels`` from the checkout's root
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != _checkout]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {__name__!r} (the folder {_os.path.dirname(__file__)!r} is fastweight's Triton "
            "kernels, importable only as 'fastweight.kernels')", name=__name__)
    _real = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _real  # the import statement returns what sys.modules holds after this file runs
    _spec.loader.exec_module(_real)
