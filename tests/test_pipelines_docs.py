"""docs/pipelines.md documents every command-line flag of the three pipelines (so the page cannot drift)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fastweight.pipelines import muse, tofu, wmdp
from fastweight.pipelines.config import build_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "pipelines.md"


@pytest.mark.parametrize("cls", [tofu.TofuConfig, muse.MuseConfig, wmdp.WmdpConfig], ids=lambda c: c.__name__)
def test_every_flag_is_documented(cls):
    text = DOC.read_text()
    flags = [o for a in build_parser(cls, "")._actions for o in a.option_strings if o.startswith("--")]
    missing = [f for f in flags if f"`{f}" not in text and f != "--help"]
    assert not missing, f"add to docs/pipelines.md: {missing}"
