"""SatImp importance annotations (fastweight.data.importance): the released file format (a torch.save of
``{row: critical words}``, built here in a temporary file; the released masks are never shipped), the
released token rule, masks aligned with the labels, padding, and errors naming the file."""
from __future__ import annotations

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.importance import ImportanceQADataset, importance_mask, is_critical, load_importance_words
from fastweight.data.synth_tofu import generate_tofu
from fastweight.data.tofu import pad_collate
from fastweight.train.models import load_model_and_tokenizer, save_tiny_model


def test_released_token_rule():
    words = "BasilMahfouzAl-Kuwaiti"
    assert is_critical("ĠBasil", words)      # the space marker is stripped (non-ASCII)
    assert is_critical("▁Mah", words)
    assert not is_critical("Ġa", words)      # one letter: not critical
    assert not is_critical("Ġthe", words)    # not in the words
    assert is_critical("7", "born1977")      # one digit: numeric is enough
    assert not is_critical("Ġ", words)       # nothing left after stripping


class _Tok:
    all_special_ids = [0]
    vocab = {0: "</s>", 1: "ĠThe", 2: "ĠKuwait", 3: "ĠCity", 4: "Ġis", 5: "Ġa"}

    def convert_ids_to_tokens(self, i):
        return self.vocab[i]


def test_mask_is_aligned_with_labels_and_skips_prompt_and_special():
    ids = [1, 2, 3, 4, 5, 2, 0]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, 2, 0]   # prompt "The Kuwait" not scored; EOS is special
    assert importance_mask(_Tok(), ids, labels, "KuwaitCity") == [0, 0, 1, 0, 0, 1, 0]


def _write(tmp_path, data):
    path = tmp_path / "importance_forget01.pth"
    torch.save(data, path)
    return path


def test_load_released_format_and_errors(tmp_path):
    path = _write(tmp_path, {0: "KuwaitCity", 1: "male"})
    assert load_importance_words(path, 2) == ["KuwaitCity", "male"]
    with pytest.raises(ValueError, match="importance_forget01.pth.*2 rows but the forget split has 3"):
        load_importance_words(path, 3)
    with pytest.raises(ValueError, match="does not exist"):
        load_importance_words(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="row indices"):
        load_importance_words(_write(tmp_path, {0: "a", 2: "b"}))
    with pytest.raises(ValueError, match="must hold a dict"):
        load_importance_words(_write(tmp_path, {0: 3}))


def test_importance_dataset_items_and_padding(tmp_path):
    rows = generate_tofu(seed=3, n_authors=2, questions_per_author=2, n_general=1)["forget10"]
    texts = [" ".join([r["question"], r["answer"]]) for r in rows] + ["Question: Answer:"]
    tok = load_model_and_tokenizer(str(save_tiny_model(tmp_path / "model", texts, pad_is_eos=True)))[1]
    words = [r["answer"].replace(" ", "") for r in rows]   # every answer word is critical
    ds = ImportanceQADataset(rows, tok, "phi", 64, words=words)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        tw = it["token_weights"]
        assert tw.dtype == torch.float32 and tw.shape == it["labels"].shape
        assert bool((tw[it["labels"] == IGNORE_INDEX] == 0).all())
        assert float(tw.sum()) > 0
    batch = pad_collate(items, pad_token_id=tok.pad_token_id or 0)
    assert batch["token_weights"].dtype == torch.float32
    assert bool((batch["token_weights"][batch["labels"] == IGNORE_INDEX] == 0).all())
    with pytest.raises(ValueError, match=f"words has {len(rows) - 1} entries but there are {len(rows)} rows"):
        ImportanceQADataset(rows, tok, "phi", 64, words=words[:-1])
