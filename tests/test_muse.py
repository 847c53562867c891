"""MUSE pipeline: chunking, loading, VerbMem / KnowMem / PrivLeak on hand-made cases, one example smoke run."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.muse import (
    MUSE_LAYOUT, TextChunkDataset, adds_bos, chunk_token_ids, load_muse, load_muse_split, token_stream,
)
from fastweight.data.synth_muse import generate_muse, write_muse_folder
from fastweight.eval import muse as E

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_muse_folder(tmp_path_factory.mktemp("muse") / "data", seed=3, n_forget=4, n_retain=4, n_holdout=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus):
    from fastweight.train.models import load_model_and_tokenizer, save_tiny_model

    rows = generate_muse(3, n_forget=4, n_retain=4, n_holdout=4)
    texts = [" ".join(str(v) for v in r.values()) for rs in rows.values() for r in rs] + [
        "Question: Answer: The harbour of Kalby drew visitors this August Bram Quarry said the festival will last "
        "one day longer Q1? A1 Q2? A2 Q? who x"]
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", texts)
    model, tok = load_model_and_tokenizer(str(folder))
    return folder, model.eval(), tok


# ---------------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 23])
@pytest.mark.parametrize("window", [1, 5, 10])
def test_chunks_partition_the_stream(n, window):
    ids = list(range(100, 100 + n))
    chunks = chunk_token_ids(ids, window)
    assert [t for c in chunks for t in c] == ids
    assert all(len(c) == window for c in chunks[:-1])
    assert len(chunks) == math.ceil(n / window)
    if chunks:
        assert 1 <= len(chunks[-1]) <= window


@pytest.mark.parametrize("n", [1, 6, 7, 8, 20])
def test_chunks_with_bos(n):
    ids = list(range(10, 10 + n))
    chunks = chunk_token_ids(ids, 4, bos_id=1)
    assert all(c[0] == 1 for c in chunks)
    assert all(len(c) == 4 for c in chunks[:-1])
    assert [t for c in chunks for t in c[1:]] == ids  # BOS aside: nothing lost or duplicated
    assert chunks[0][1:] == ids[:3] and (n <= 3 or chunks[1][1] == ids[3])  # boundary at 3 stream tokens


@pytest.mark.parametrize("window, bos", [(0, None), (1, 1), (2.0, None), (True, None)])
def test_chunk_window_errors(window, bos):
    with pytest.raises(ValueError, match="window"):
        chunk_token_ids([1, 2, 3], window, bos_id=bos)


def test_token_stream_and_dataset(tiny):
    _, _, tok = tiny
    docs = ["The harbour of Kalby", "Bram Quarry said the festival", "will last"]
    stream = token_stream(tok, docs)
    per_doc = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert stream == per_doc[0] + [tok.eos_token_id] + per_doc[1] + [tok.eos_token_id] + per_doc[2]
    for add_bos in (False, True):
        ds = TextChunkDataset(docs, tok, 4, add_bos=add_bos)
        items = [ds[i] for i in range(len(ds))]
        skip = 1 if add_bos else 0
        assert [t for it in items for t in it["input_ids"][skip:].tolist()] == stream
        for it in items:
            assert it["input_ids"].shape[0] <= 4 and it["attention_mask"].all()
            lab = it["labels"].tolist()
            assert lab[skip:] == it["input_ids"][skip:].tolist()
            assert not add_bos or (lab[0] == IGNORE_INDEX and it["input_ids"][0] == tok.bos_token_id)
    assert TextChunkDataset(docs, tok, 4).items == TextChunkDataset(docs, tok, 4, add_bos=adds_bos(tok)).items
    with pytest.raises(TypeError, match="texts"):
        token_stream(tok, "one string")
    with pytest.raises(ValueError, match="no tokens"):
        TextChunkDataset([""], tok, 4, add_bos=False)


# ----------------------------------------------------------------------------------------------- loading
def test_generator_is_deterministic_and_complete():
    a, b, c = generate_muse(5), generate_muse(5), generate_muse(6)
    assert a == b and a != c
    assert set(a) == set(MUSE_LAYOUT)
    forget_text = " ".join(r["text"] for r in a[("raw", "forget")])
    for row in a[("knowmem", "forget_qa")]:  # every forget answer is stated in the forget text
        assert row["answer"].removeprefix("the ").removeprefix("a new ") in forget_text
    holdout = {r["text"] for r in a[("raw", "holdout")]}
    assert not holdout & {r["text"] for r in a[("raw", "forget")]}
    for v, r in zip(a[("verbmem", "forget")], a[("raw", "forget")]):
        assert v["prompt"] + " " + v["gt"] == r["text"]


def test_load_muse_folder(corpus, tmp_path):
    data = load_muse(corpus)
    assert len(data.forget_text) == 4 and len(data.holdout_text) == 4
    assert data.knowmem_forget[0].keys() >= {"question", "answer"}
    assert data.verbmem_forget[0].keys() >= {"prompt", "gt"}
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "forget.txt").write_text("one whole document")
    assert load_muse_split(tmp_path, "raw", "forget") == [{"text": "one whole document"}]
    (tmp_path / "verbmem").mkdir()
    (tmp_path / "verbmem" / "forget.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="gt"):
        load_muse_split(tmp_path, "verbmem", "forget")
    with pytest.raises(ValueError, match="config, split"):
        load_muse_split(tmp_path, "raw", "nope")
    with pytest.raises(ValueError, match="retain_split"):
        load_muse(corpus, retain_split="retain3")


# ------------------------------------------------------------------------------------------------ metrics
class _Scripted(torch.nn.Module):
    """A stand-in LM whose ``generate`` appends fixed token ids to every prompt (for hand-made metric cases)."""

    def __init__(self, continuations):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuations = list(continuations)

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        outs = []
        for row in input_ids:
            cont = self.continuations.pop(0)[:max_new_tokens]
            outs.append(row.tolist() + cont)
        width = max(len(o) for o in outs)
        return torch.tensor([o + [kw["pad_token_id"]] * (width - len(o)) for o in outs])


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_verbmem_rouge_f1_hand_made(tiny):
    _, _, tok = tiny
    rows = [{"prompt": "The harbour of Kalby", "gt": "drew visitors this August"},
            {"prompt": "The festival", "gt": "drew visitors this August"}]
    model = _Scripted([_ids(tok, "drew visitors this August"), _ids(tok, "drew visitors")])
    res = E.verbmem(model, tok, rows, max_new_tokens=16)
    # exact -> F1 1; "drew visitors" vs 4 words: P = 1, R = 1/2, F1 = 2/3
    assert res["value_by_index"]["0"]["score"] == pytest.approx(1.0)
    assert res["value_by_index"]["1"]["score"] == pytest.approx(2 / 3)
    assert res["agg_value"] == pytest.approx(5 / 6)
    # MUSE cuts the reference to max_new_tokens tokens too: 2 generated tokens against the first 2 of gt
    model = _Scripted([_ids(tok, "drew visitors this August")] * 2)
    assert E.verbmem(model, tok, rows, max_new_tokens=2)["agg_value"] == pytest.approx(1.0)


class _BosTokenizer:
    """Wraps a tokenizer so that add_special_tokens=True prepends a BOS id (as Llama-2's, MUSE's tokenizer)."""

    def __init__(self, tok):
        self.tok, self.bos = tok, tok.bos_token_id

    def __call__(self, text, add_special_tokens=True):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self.bos] if add_special_tokens else []) + list(ids)}

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


def test_verbmem_reference_counts_bos_as_muse(tiny):
    _, _, tok = tiny
    gt = "drew visitors this August"
    # transcription of MUSE verbmem.py: tokenizer(gt, add_special_tokens=True)[:, :n], decoded without specials
    for n in (1, 2, 3, 128):
        ids = ([tok.bos_token_id] + _ids(tok, gt))[:n]
        want = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        assert E.verbmem_reference(_BosTokenizer(tok), gt, n) == want
    assert E.verbmem_reference(_BosTokenizer(tok), gt, 2) == tok.decode(_ids(tok, gt)[:1])  # BOS takes a slot


def test_knowmem_prompt_cut_and_recall(tiny):
    _, _, tok = tiny
    icl = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert E.knowmem_prompt("Q?", icl) == ("Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\n"
                                           "Question: Q?\nAnswer: ")
    assert E.cut_answer(" Bram Quarry\n\nQuestion: who") == "Bram Quarry"
    assert E.cut_answer("Bram Quarry Question: x") == "Bram Quarry"
    assert E.cut_answer("Bram\nQuestion: x") == "Bram"
    assert E.cut_answer("Bram\nQuestions remain") == "Bram"     # MUSE cuts at "\nQuestion" without a colon
    assert E.cut_answer("Bram Question :x") == "Bram Question :x"
    rows = [{"question": "Who organised the harvest festival of Kalby?", "answer": "Bram Quarry"},
            {"question": "Who organised the harvest festival of Kalby?", "answer": "Bram Quarry said"}]
    # this word-level tokenizer decodes "Question:" as "Question :", which MUSE's markers do not cut
    model = _Scripted([_ids(tok, "Bram Quarry") + [tok.eos_token_id], _ids(tok, "Bram Quarry") + [tok.eos_token_id]])
    res = E.knowmem(model, tok, rows, icl, max_new_tokens=32)
    assert res["generations"] == ["Bram Quarry", "Bram Quarry"]
    # ROUGE-L F1 as MUSE: "Bram Quarry" vs "Bram Quarry said": P = 1, R = 2/3, F1 = 0.8 (recall would be 2/3)
    assert [res["value_by_index"][k]["score"] for k in "01"] == pytest.approx([1.0, 0.8])


def test_privleak_auc_known_answer():
    # Min-K% scores (higher = less likely a member). MUSE's AUC = P(holdout scored lower than forget), ties 1/2:
    # pairs (f, h): 3>0, 3>1.5, 2>0, 2>1.5, 1>0 count; 1<1.5 does not -> 5/6
    assert E.privleak_auc([3, 2, 1], [0, 1.5]) == pytest.approx(5 / 6)
    assert E.privleak_auc([1.5, 0], [1.5]) == pytest.approx(0.25)
    assert E.privleak_auc([3, 2, 1], [0, 1.5], "open-unlearning") == pytest.approx(1 / 6)
    assert E.privleak(0.75, 0.5) == pytest.approx(50.0)
    assert E.privleak(0.25, 0.5) == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="retrain_auc"):
        E.privleak(0.5, 0.0)


def test_mink_scores_match_manual_logprobs(tiny):
    _, model, tok = tiny
    texts = ["The harbour of Kalby drew visitors", "Bram Quarry said the festival will last one day longer"]
    got = E.text_token_logps(model, tok, texts, batch_size=2)
    for text, lps in zip(texts, got):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0, :-1]
        ref = logp.gather(-1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), ref, atol=1e-5)
        k = int(0.4 * len(ref))
        manual = sorted(ref.tolist())[:k]
        res = E.mink_scores(model, tok, [text], k=0.4)
        assert res["agg_value"] == pytest.approx(-sum(manual) / k, abs=1e-5)


def test_evaluate_muse_writes_and_resumes(tiny, corpus, tmp_path):
    _, model, tok = tiny
    data = load_muse(corpus)
    cfg = E.MuseEvalConfig(batch_size=4, verbmem_max_new_tokens=4, knowmem_max_new_tokens=4, max_items=3)
    res = E.evaluate_muse(model, tok, data, cfg, output_dir=tmp_path, retrain_auc=0.5)
    assert set(res) == {"forget_verbmem", "forget_knowmem", "retain_knowmem", "forget_mink", "holdout_mink",
                        "privleak_auc", "privleak"}
    assert res["privleak"] == pytest.approx((res["privleak_auc"] - 0.5) / 0.5 * 100)
    saved = json.loads((tmp_path / "MUSE_EVAL.json").read_text())
    assert len(saved["forget_mink"]["value_by_index"]) == 3 and "generation" in saved["forget_verbmem"][
        "value_by_index"]["0"]

    class Broken:  # a rerun must not touch the model: every metric is already on disk
        training = False

        def parameters(self):
            raise AssertionError("model used on resume")

        def eval(self):
            return self

        def train(self, mode=True):
            return self

    assert E.evaluate_muse(Broken(), tok, data, cfg, output_dir=tmp_path, retrain_auc=0.5) == res
    with pytest.raises(ValueError, match="mink_k"):
        E.MuseEvalConfig(mink_k=0.0)


# ---------------------------------------------------------------------------------------------- example
def test_example_smoke(tiny, tmp_path):
    folder, _, _ = tiny
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import muse_unlearn
    finally:
        sys.path.pop(0)
    out = tmp_path / "run"
    argv = ["--model", str(folder), "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--n-articles", "2", "--window", "32", "--max-eval-items", "2", "--ft-epochs", "1", "--epochs", "1",
            "--eval-batch-size", "8",
            "--verbmem-max-new-tokens", "4", "--knowmem-max-new-tokens", "4", "--seed", "3"]
    res = muse_unlearn.run(muse_unlearn.parse_args(argv))
    assert set(res.metrics) == {"target (before)", "satimp (after)", "retrained"}
    assert "privleak" in res.metrics["satimp (after)"]
    for name in ("results.json", "table.md", "muse.png", "training.png", "log.jsonl"):
        assert (out / name).is_file(), name
    # resume: nothing left to do, the same numbers come back
    again = muse_unlearn.run(muse_unlearn.parse_args(argv + ["--resume"]))
    assert again.metrics == res.metrics
    with pytest.raises(SystemExit):
        muse_unlearn.parse_args(["--method", "flat"])
