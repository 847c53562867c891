"""WMDP data (``shared/spec/METRICS.md``, WMDP): multiple-choice items, MMLU for utility, unlearning corpora.

Multiple-choice rows are ``{"question": str, "choices": [str, ...], "answer": int}`` (index of the right choice;
WMDP and MMLU have four choices). Sources, for ``load_mcq``:

    a hub dataset name      ``datasets.load_dataset(source, config, split=split)``: ``cais/wmdp`` with configs
                            ``wmdp-bio`` / ``wmdp-cyber`` / ``wmdp-chem`` (split "test"); ``cais/mmlu`` with a
                            subject config or "all" (split "test")
    a local JSON-lines file ``{"question", "choices", "answer"}`` per line (or one JSON array)
    a local folder          ``<folder>/<config>.jsonl`` (or ``.json``)

Unlearning corpora (``load_corpus``) are lists of documents: ``cais/wmdp-corpora`` configs
``cyber-forget-corpus``, ``cyber-retain-corpus``, ``bio-retain-corpus`` (the bio forget corpus is gated:
``cais/wmdp-bio-forget-corpus``), wikitext (``wikitext`` / ``wikitext-2-raw-v1``) as the usual retain text, or a
local ``.jsonl`` (rows with a "text" field) / ``.txt`` file (documents separated by blank lines). Like the RMU
code, documents of at most ``min_chars`` characters are dropped. Training windows come from
``fastweight.data.muse.TextChunkDataset`` (the same chunker as MUSE: no token lost or duplicated).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from fastweight.data.schema import read_json_rows, read_text

WMDP_HUB = "cais/wmdp"
MMLU_HUB = "cais/mmlu"
CORPORA_HUB = "cais/wmdp-corpora"
WMDP_CONFIGS: tuple[str, ...] = ("wmdp-bio", "wmdp-cyber", "wmdp-chem")
# lm-eval's task names and subject descriptions (lm_eval/tasks/wmdp/wmdp_*.yaml)
WMDP_TASKS: dict[str, str] = {"wmdp-bio": "wmdp_bio", "wmdp-cyber": "wmdp_cyber", "wmdp-chem": "wmdp_chem"}
WMDP_SUBJECTS: dict[str, str] = {"wmdp-bio": "biology", "wmdp-cyber": "cybersecurity", "wmdp-chem": "chemistry"}


_read_json_rows = read_json_rows  # file:line in every parse error, non-UTF-8 named


def check_mcq_rows(rows: Sequence[dict], name: str = "rows", n_choices: int | None = None) -> list[dict]:
    """Validate multiple-choice rows (see the module docstring); returns them as a list of dicts.
    ``n_choices``: the exact number of choices (4 for WMDP / MMLU), else at least 2."""
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TypeError(f"{name}[{i}] must be a dict, got {type(r).__name__}")
        missing = [k for k in ("question", "choices", "answer") if k not in r]
        if missing:
            raise ValueError(f"{name}[{i}] lacks fields {missing} (has {sorted(r)})")
        choices = r["choices"]  # a string is not a list of choices ("ABCD" would split into letters)
        choices = list(choices) if isinstance(choices, (list, tuple)) else None
        if choices is None or len(choices) < 2 or (n_choices is not None and len(choices) != n_choices) or \
                not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{name}[{i}]['choices'] must be a list of {n_choices or '>= 2'} strings, got "
                             f"{r['choices']!r:.80}")
        answer = r["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{name}[{i}]['answer'] must be an int in [0, {len(choices)}), got {answer!r}")
        if not isinstance(r["question"], str):
            raise ValueError(f"{name}[{i}]['question'] must be str, got {type(r['question']).__name__}")
        out.append({**r, "choices": choices})
    return out


def load_mcq(source: str | os.PathLike, config: str | None = None, split: str = "test",
             n_choices: int | None = 4) -> list[dict]:
    """Multiple-choice rows from a hub dataset, a local JSON-lines file, or a folder of ``<config>.jsonl``;
    ``n_choices``: the number of choices every row must have (WMDP and MMLU: 4; None: at least 2)."""
    path = Path(source)
    if path.is_file():
        rows = _read_json_rows(path)
    elif path.is_dir():
        if config is None:
            raise ValueError(f"config is needed to pick a file in the folder {str(path)!r}")
        found = [path / f"{config}{ext}" for ext in (".jsonl", ".json") if (path / f"{config}{ext}").is_file()]
        if not found:
            raise ValueError(f"source folder {str(path)!r} has no {config}.jsonl or {config}.json")
        rows = _read_json_rows(found[0])
    else:
        import datasets  # lazy: only the hub path needs it

        rows = [dict(r) for r in datasets.load_dataset(str(source), config, split=split)]
    return check_mcq_rows(rows, f"{source}:{config}" if config else str(source), n_choices)


def load_wmdp(source: str | os.PathLike = WMDP_HUB, config: str = "wmdp-bio") -> list[dict]:
    """WMDP items of one config (``WMDP_CONFIGS``) from the hub (split "test") or a local file/folder."""
    if Path(source).is_file():
        return load_mcq(source)
    if config not in WMDP_CONFIGS and not Path(source).is_dir():
        raise ValueError(f"config must be one of {WMDP_CONFIGS}, got {config!r}")
    return load_mcq(source, config, "test")


def load_mmlu(source: str | os.PathLike = MMLU_HUB, subject: str = "all", split: str = "test") -> list[dict]:
    """MMLU items (each keeps its "subject" field when the source has one)."""
    if Path(source).is_file():
        return load_mcq(source)
    return load_mcq(source, subject, split)


def load_corpus(source: str | os.PathLike, name: str | None = None, *, split: str = "train",
                text_key: str = "text", min_chars: int = 50, max_docs: int | None = None) -> list[str]:
    """Documents of an unlearning corpus (see the module docstring), longer than ``min_chars`` characters."""
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
        raise ValueError(f"max_docs must be None or a positive int, got {max_docs!r}")
    path = Path(source)
    if path.is_file():
        if path.suffix == ".txt":
            docs = [d.strip() for d in read_text(path).split("\n\n")]
        else:
            rows = _read_json_rows(path)
            if rows and text_key not in rows[0]:
                raise ValueError(f"{str(path)!r} rows lack the text field {text_key!r} (have {sorted(rows[0])})")
            docs = [str(r[text_key]) for r in rows]
    elif path.exists():
        raise ValueError(f"corpus source must be a .jsonl/.json/.txt file or a dataset name, got {str(path)!r}")
    else:
        import datasets

        ds = datasets.load_dataset(str(source), name, split=split)
        if text_key not in ds.column_names:
            raise ValueError(f"{source}:{name} has no column {text_key!r} (has {ds.column_names})")
        docs = [str(t) for t in ds[text_key]]
    docs = [d for d in docs if len(d) > min_chars]
    return docs[:max_docs] if max_docs is not None else docs


__all__ = ["CORPORA_HUB", "MMLU_HUB", "WMDP_CONFIGS", "WMDP_HUB", "WMDP_SUBJECTS", "WMDP_TASKS", "check_mcq_rows",
           "load_corpus", "load_mcq", "load_mmlu", "load_wmdp"]
