"""MUSE data (``shared/spec/METRICS.md``, MUSE): loading, and raw text chunked into fixed-length token windows.

Sources: the hub datasets ``muse-bench/MUSE-News`` / ``muse-bench/MUSE-Books`` (short names ``"news"`` /
``"books"``), or a local folder with the same layout, one file per ``(config, split)``:

    <folder>/raw/{forget,retain1,retain2,holdout}.{txt|jsonl|json}      rows {"text"} (a .txt file = one document)
    <folder>/knowmem/{forget_qa,retain_qa,forget_qa_icl,retain_qa_icl}.{jsonl|json}    rows {"question", "answer"}
    <folder>/verbmem/forget.{jsonl|json}                                 rows {"prompt", "gt"}
    <folder>/privleak/{forget,holdout,retain}.{txt|jsonl|json}          rows {"text"}

(``.json`` = one JSON array or JSON lines). ``fastweight.data.synth_muse.write_muse_folder`` writes this layout.

Chunking (training data). The documents of a split are tokenised one by one (no special tokens) and joined
with one EOS between consecutive documents into a single token stream ``S``. ``chunk_token_ids`` cuts ``S`` into
consecutive windows of ``window`` tokens; with ``bos_id`` each window is ``[bos] + S[i : i + window - 1]``
(MUSE's own trainer does this). The last window may be shorter. Concatenating the windows (without their BOS)
gives back ``S`` exactly: no token is lost or duplicated (no decode/re-encode round trip, which can merge or
split tokens at window edges).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fastweight.data.schema import check_rows, read_json_rows, read_text
from fastweight.data.tofu import TokenizedDataset

MUSE_HUB: dict[str, str] = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
DEFAULT_WINDOW = 2048  # MUSE trains on 2048-token windows

# (config, split) -> required fields
MUSE_LAYOUT: dict[tuple[str, str], tuple[str, ...]] = {
    **{("raw", s): ("text",) for s in ("forget", "retain1", "retain2", "holdout")},
    **{("knowmem", s): ("question", "answer") for s in ("forget_qa", "retain_qa", "forget_qa_icl",
                                                         "retain_qa_icl")},
    ("verbmem", "forget"): ("prompt", "gt"),
    **{("privleak", s): ("text",) for s in ("forget", "holdout", "retain")},
}


def _read_rows(file: Path) -> list[dict]:
    if file.suffix == ".txt":
        return [{"text": read_text(file)}]
    return read_json_rows(file)


def load_muse_split(source: str | os.PathLike, config: str, split: str) -> list[dict]:
    """Rows of one MUSE ``(config, split)``.

    Args:
        source: a local folder (layout in the module docstring), a hub dataset name, or ``"news"``/``"books"``.
        config / split: e.g. ``("raw", "forget")``, ``("knowmem", "retain_qa")``; ``MUSE_LAYOUT`` lists them.
    Returns:
        a list of dicts holding at least the fields of ``MUSE_LAYOUT[(config, split)]``.
    """
    needed = MUSE_LAYOUT.get((config, split))
    if needed is None:
        raise ValueError(f"(config, split) must be one of {sorted(MUSE_LAYOUT)}, got {(config, split)!r}")
    source = MUSE_HUB.get(str(source), source)
    path = Path(source)
    if path.is_dir():
        files = [path / config / f"{split}{ext}" for ext in (".jsonl", ".json", ".txt")]
        found = [f for f in files if f.is_file()]
        if not found:
            raise ValueError(f"source folder {str(path)!r} has no {config}/{split}.jsonl|.json|.txt")
        rows = _read_rows(found[0])
        where = str(found[0])
    elif path.exists():
        raise ValueError(f"source must be a folder (MUSE layout) or a dataset name, got the file {str(path)!r}")
    else:
        import datasets  # lazy: only the hub path needs it

        rows = [dict(r) for r in datasets.load_dataset(str(source), config, split=split)]
        where = f"{source}:{config}/{split}"
    return check_rows(rows, needed, where)


@dataclass
class MuseData:
    """One MUSE corpus: raw text (lists of documents) and the evaluation sets (lists of rows)."""

    forget_text: list[str]
    retain_text: list[str]
    holdout_text: list[str]
    knowmem_forget: list[dict]
    knowmem_retain: list[dict]
    knowmem_forget_icl: list[dict]
    knowmem_retain_icl: list[dict]
    verbmem_forget: list[dict]
    privleak_forget: list[str]
    privleak_holdout: list[str]
    source: str = ""
    extra: dict = field(default_factory=dict)


def load_muse(source: str | os.PathLike, *, retain_split: str = "retain1") -> MuseData:
    """Every split of one MUSE corpus (``source`` as in ``load_muse_split``; ``retain_split`` "retain1" or
    "retain2", MUSE trains its retain models and regularises unlearning on retain1)."""
    if retain_split not in ("retain1", "retain2"):
        raise ValueError(f"retain_split must be 'retain1' or 'retain2', got {retain_split!r}")

    def get(config: str, split: str) -> list[dict]:
        return load_muse_split(source, config, split)

    def texts(config: str, split: str) -> list[str]:
        return [r["text"] for r in get(config, split)]

    return MuseData(
        forget_text=texts("raw", "forget"), retain_text=texts("raw", retain_split),
        holdout_text=texts("raw", "holdout"),
        knowmem_forget=get("knowmem", "forget_qa"), knowmem_retain=get("knowmem", "retain_qa"),
        knowmem_forget_icl=get("knowmem", "forget_qa_icl"), knowmem_retain_icl=get("knowmem", "retain_qa_icl"),
        verbmem_forget=get("verbmem", "forget"),
        privleak_forget=texts("privleak", "forget"), privleak_holdout=texts("privleak", "holdout"),
        source=str(source))


def token_stream(tokenizer, texts: Sequence[str]) -> list[int]:
    """The documents tokenised one by one (no special tokens), one EOS between consecutive documents."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of documents (list of str), got one str")
    if len(texts) > 1 and tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id to separate documents")
    ids: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
        if i:
            ids.append(tokenizer.eos_token_id)
        ids += list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends its BOS token to plain text by default."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def chunk_token_ids(ids: Sequence[int], window: int, *, bos_id: int | None = None) -> list[list[int]]:
    """Cut ``ids`` into consecutive windows of ``window`` tokens (the last may be shorter).

    With ``bos_id`` every window is ``[bos_id]`` + ``window - 1`` stream tokens (``window >= 2``). The
    stream tokens of the windows, concatenated in order, equal ``ids``. Empty ``ids`` give no window.
    """
    if not isinstance(window, int) or isinstance(window, bool) or window < (2 if bos_id is not None else 1):
        raise ValueError(f"window must be an int >= {2 if bos_id is not None else 1}, got {window!r}")
    step = window - 1 if bos_id is not None else window
    head = [bos_id] if bos_id is not None else []
    ids = list(ids)
    return [head + ids[i:i + step] for i in range(0, len(ids), step)]


class TextChunkDataset(TokenizedDataset):
    """Raw text as fixed-length training windows (see the module docstring), for ``fastweight.train.loop``.

    Item: dict of 1-D int64 tensors ``input_ids``, ``attention_mask`` (ones), ``labels`` (= ``input_ids``,
    unshifted Hugging Face style; a leading BOS is labelled with IGNORE_INDEX so it never counts), plus
    ``index`` (0-d). ``add_bos``: prepend the tokenizer's BOS to every window; None (default) = exactly when
    the tokenizer itself adds a BOS to plain text (Llama-style yes, GPT-2/SmolLM-style no).
    ``rows`` holds ``{"text": decoded window}`` per item (for logs; training never re-encodes it).
    """

    def __init__(self, texts: Sequence[str], tokenizer, window: int = DEFAULT_WINDOW, *, add_bos: bool | None = None,
                 max_windows: int | None = None) -> None:
        from fastweight._constants import IGNORE_INDEX

        self.tokenizer = tokenizer
        if add_bos is None:
            add_bos = adds_bos(tokenizer)
        if add_bos and tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        bos = tokenizer.bos_token_id if add_bos else None
        self.windows = chunk_token_ids(token_stream(tokenizer, texts), window, bos_id=bos)
        if max_windows is not None:
            if not isinstance(max_windows, int) or max_windows < 1:
                raise ValueError(f"max_windows must be None or a positive int, got {max_windows!r}")
            self.windows = self.windows[:max_windows]
        if not self.windows:
            raise ValueError("texts hold no tokens: nothing to train on")
        self.items = []
        for w in self.windows:
            labels = list(w)
            if bos is not None:
                labels[0] = IGNORE_INDEX
            self.items.append({"input_ids": w, "attention_mask": [1] * len(w), "labels": labels})
        self.rows = [{"text": tokenizer.decode(w[1 if bos is not None else 0:])} for w in self.windows]


__all__ = ["DEFAULT_WINDOW", "MUSE_HUB", "MUSE_LAYOUT", "MuseData", "TextChunkDataset", "adds_bos", "chunk_token_ids",
           "load_muse", "load_muse_split", "token_stream"]
