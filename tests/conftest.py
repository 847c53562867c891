"""Marker rules (markers themselves are registered in pyproject.toml, except ``interpret`` below).

* ``interpret``: runs Triton kernels on CPU through the interpreter; skipped unless TRITON_INTERPRET=1
  (the interpreter is chosen when kernels are decorated, so tests/test_interpret.py runs these in a
  subprocess with the variable set).
* ``cuda``: skipped when no CUDA device is present.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any working directory


def _interpret_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpret: Triton kernels under TRITON_INTERPRET=1 (run by test_interpret.py)")


def pytest_collection_modifyitems(config, items):
    interpret = _interpret_on()
    cuda = None
    for item in items:
        if "interpret" in item.keywords and not interpret:
            item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (run by tests/test_interpret.py)"))
        if "cuda" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """One tiny random Llama saved once per session for the trainer tests (helpers.save_tiny_tofu_model); a module
    that needs another model defines its own ``tiny_dir``."""
    from helpers import save_tiny_tofu_model

    return save_tiny_tofu_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fresh_accelerate_state():
    """Reset accelerate's process-wide state after the test: a Trainer run stopped by an exception leaves the
    GradientState mid-accumulation (sync_gradients False), which would make a later accelerate loop in this
    process skip optimizer steps. Modules use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    GradientState._reset_state()
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def loader(monkeypatch):
    """``pipelines.common.load_model`` replaced by a recorder that raises ``helpers.Loaded``: a test sees which
    model specs a run tried to load, and that every check came before the first load. Returns the spec list."""
    from fastweight.pipelines import common as C
    from helpers import Loaded

    calls: list[str] = []

    def fake(spec, *args, **kwargs):
        calls.append(spec)
        raise Loaded(spec)

    monkeypatch.setattr(C, "load_model", fake)
    return calls
