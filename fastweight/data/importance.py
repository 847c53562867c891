"""SatImp's token-importance annotations as per-token weights (``token_weights``) for the ``*_imp`` methods.

The annotation format is the released one (tmlr-group/SatImp 51314c0, ``data/importance_forget{01,05,10}.pth``,
read by ``dataloader/data_module_imp.py``): a ``torch.save`` of a dict ``{row index: critical words}`` whose
values are the forget row's critical words concatenated without separators (e.g. ``'KuwaitCity'``), one entry
per row of the forget split, in row order. The files are the user's data: fastweight never downloads or ships
them; pass the path (``load_importance_words``; the TOFU pipeline's ``--importance FILE``).

The released rule marks an answer token as important when its token string, stripped of non-ASCII characters
(the tokenizers' space markers ``Ġ`` / ``▁``), is non-empty, is a substring of the row's critical words, and is
at least two characters long or numeric. The released code tokenizes the answer text on its own to find those
tokens; fastweight applies the same rule to the label tokens of the encoded pair (the same tokens wherever the
tokenization of question + answer splits at the answer), and never marks a special token (EOS). The mask is
aligned with the unshifted labels, as the released ``soft_mask`` (the losses shift it with the labels).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.tofu import QADataset


def load_importance_words(path: str | os.PathLike, n_rows: int | None = None) -> list[str]:
    """The critical words of each forget row from a SatImp importance file (see the module docstring).

    Loaded with ``torch.load(weights_only=True)`` (no arbitrary pickle). ``n_rows``: the forget split's size;
    a file with another number of entries is a ValueError naming the file (the released code raises too).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"importance file {path!r} does not exist")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its name
        raise ValueError(f"importance file {path!r} is not a torch.save file of a dict: {e}") from e
    if not isinstance(data, Mapping) or not all(isinstance(k, int) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"importance file {path!r} must hold a dict {{row index (int): critical words (str)}}")
    if sorted(data) != list(range(len(data))):
        raise ValueError(f"importance file {path!r}: keys must be the row indices 0..{len(data) - 1}")
    if n_rows is not None and len(data) != n_rows:
        raise ValueError(f"importance file {path!r} has {len(data)} rows but the forget split has {n_rows}")
    return [data[i] for i in range(len(data))]


def is_critical(token: str, words: str) -> bool:
    """The released rule for one token string (``data_module_imp.py``, ``critical_idx_tokens``)."""
    t = "".join(ch for ch in token if ch.isascii())
    return t != "" and t in words and (len(t) >= 2 or t.isnumeric())


def importance_mask(tokenizer, input_ids: Sequence[int], labels: Sequence[int], words: str) -> list[float]:
    """0/1 weights aligned with ``labels`` (unshifted): 1 on answer tokens the released rule marks critical."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for tok_id, label in zip(input_ids, labels):
        if label == IGNORE_INDEX or tok_id in special:
            out.append(0.0)
            continue
        out.append(1.0 if is_critical(tokenizer.convert_ids_to_tokens(int(tok_id)), words) else 0.0)
    return out


class ImportanceQADataset(QADataset):
    """``QADataset`` whose items also carry ``token_weights`` (float32, like ``labels``): SatImp's importance
    mask of each row from ``words`` (``load_importance_words``; one entry per row)."""

    def __init__(self, rows, tokenizer, template="chat", max_length: int = 512, answer_key: str = "answer", *,
                 words: Sequence[str]) -> None:
        super().__init__(rows, tokenizer, template, max_length, answer_key)
        if len(words) != len(self.items):
            raise ValueError(f"words has {len(words)} entries but there are {len(self.items)} rows")
        self.weights = [importance_mask(tokenizer, it["input_ids"], it["labels"], w)
                        for it, w in zip(self.items, words)]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        item["token_weights"] = torch.tensor(self.weights[i], dtype=torch.float32)
        return item


__all__ = ["ImportanceQADataset", "importance_mask", "is_critical", "load_importance_words"]
