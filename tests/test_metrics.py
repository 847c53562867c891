"""Metrics (shared/spec/METRICS.md) against hand-computed cases; model helpers against direct computations."""
from __future__ import annotations

import math

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.eval import metrics as M
from fastweight.train.models import load_model_and_tokenizer, save_tiny_model

L = math.log


@pytest.mark.parametrize("correct, es", [
    ([True, True, True, True], 1.0),            # all correct -> 1
    ([True, True, True, False], 0.0),           # last token wrong -> 0
    ([False, True, True, True], 0.75),          # only the first wrong -> (|y| - 1) / |y|
    ([True, False, True, True], 0.5),           # k = 2
    ([False, True, False, True], 0.25),         # the last wrong one decides: k = 3
    ([True], 1.0), ([False], 0.0),
])
def test_extraction_strength_cases(correct, es):
    assert M.extraction_strength_item(correct) == es


def test_extraction_strength_mean_and_errors():
    r = M.extraction_strength([[True, True], [False, True], [True, False]])
    assert r["agg_value"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert r["value_by_index"]["1"]["score"] == 0.5
    with pytest.raises(ValueError, match="correct"):
        M.extraction_strength_item([])


def test_probability_and_normalised_probability():
    assert M.probability([L(0.5), L(0.25)])["agg_value"] == pytest.approx(0.375)
    r = M.normalised_probability([L(0.5), L(0.2)], [[L(0.25), L(0.25)], [L(0.2), L(0.4)]])
    assert r["value_by_index"]["0"]["score"] == pytest.approx(0.5)
    assert r["value_by_index"]["1"]["score"] == pytest.approx(0.2 / 0.8)
    assert r["agg_value"] == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError, match="wrong_avg_logp"):
        M.normalised_probability([0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="wrong_avg_logp"):
        M.normalised_probability([0.0, 0.0], [[0.0]])


def test_truth_ratio_cases():
    para = [L(0.5), L(0.5), L(0.1)]
    pert = [[L(0.25), L(0.25)],        # TR = 0.25 / 0.5 = 0.5
            [L(0.1), L(0.4)],          # geomean 0.2 -> TR = 0.4
            [L(0.2), L(0.2)]]          # TR = 2
    f = M.truth_ratio(para, pert, mode="forget")
    t = M.truth_ratio(para, pert, mode="true_better")
    assert [f["value_by_index"][str(i)]["tr"] for i in range(3)] == pytest.approx([0.5, 0.4, 2.0])
    assert [f["value_by_index"][str(i)]["score"] for i in range(3)] == pytest.approx([0.5, 0.4, 0.5])
    assert [t["value_by_index"][str(i)]["score"] for i in range(3)] == pytest.approx([0.5, 0.6, 0.0])
    assert f["agg_value"] == pytest.approx(1.4 / 3) and t["agg_value"] == pytest.approx(1.1 / 3)
    with pytest.raises(ValueError, match="mode"):
        M.truth_ratio(para, pert, mode="max")
    with pytest.raises(ValueError, match="perturbed_avg_logp"):
        M.truth_ratio(para, pert[:2])


def test_forget_quality_ks_pvalue():
    # D = 1 for fully separated samples of 3 and 3: exact two-sided p = 2 / C(6, 3) = 0.1
    r = M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert r["agg_value"] == pytest.approx(0.1) and r["value_by_index"]["ks"]["score"] == 1.0
    assert M.forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["agg_value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tr_retain"):
        M.forget_quality([1.0], [])


def test_rouge_l():
    r = M.rouge_l(["the cat sat", "cats running"], ["the cat sat on the mat", "cat run"])
    assert r["value_by_index"]["0"]["score"] == pytest.approx(0.5)   # LCS 3 of 6 reference tokens
    assert r["value_by_index"]["1"]["score"] == pytest.approx(1.0)   # stemming: cats -> cat, running -> run
    f1 = M.rouge_l(["the cat sat"], ["the cat sat on the mat"], kind="fmeasure")["agg_value"]
    assert f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert M.rouge_l(["dog"], ["cat"])["agg_value"] == 0.0
    with pytest.raises(ValueError, match="predictions"):
        M.rouge_l(["a"], [])


def test_model_utility_mink_auc():
    assert M.model_utility({"a": 1.0, "b": 0.5})["agg_value"] == pytest.approx(2 / 3)
    assert M.model_utility({"a": 1.0, "b": 0.0})["agg_value"] == 0.0
    with pytest.raises(ValueError, match="values"):
        M.model_utility({"a": -1.0})
    r = M.mink_prob([[-1.0, -2.0, -3.0, -4.0, -5.0], [-1.0]], k=0.4)
    assert r["value_by_index"]["0"]["score"] == pytest.approx(4.5)  # floor(0.4 * 5) = 2 lowest, negated
    assert math.isnan(r["value_by_index"]["1"]["score"])  # floor(0.4) = 0: MUSE's mean of nothing
    with pytest.raises(ValueError, match="k"):
        M.mink_prob([[-1.0]], k=0.0)
    with pytest.raises(ValueError, match="convention"):
        M.mink_prob([[-1.0]], convention="tofu")
    assert M.auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert M.auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert M.auc([1.0], [2.0, 0.0]) == 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = ["Question : who wrote the red book ? Answer : Ana Vant wrote it .", "the sea is blue and deep"]
    folder = save_tiny_model(tmp_path_factory.mktemp("m"), texts, hidden_size=32, seed=1)
    return load_model_and_tokenizer(str(folder))


def test_answer_token_stats_matches_direct(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    ids = torch.randint(4, len(tok), (2, 7))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, 6] = 0  # a padded position
    labels[1, 6] = IGNORE_INDEX
    stats = M.answer_token_stats(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    for b in range(2):
        pos = [t for t in range(1, 7) if labels[b, t] != IGNORE_INDEX]
        ref = [torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item() for t in pos]
        assert stats[b]["token_logp"] == pytest.approx(ref, abs=1e-5)
        assert stats[b]["correct"] == [bool(logits[b, t - 1].argmax() == ids[b, t]) for t in pos]
        assert stats[b]["avg_logp"] == pytest.approx(sum(ref) / len(ref), abs=1e-5)


def test_generate_greedy_left_padding_matches_unbatched(tiny):
    model, tok = tiny
    prompts = [tok("Question : who wrote the red book ? Answer :")["input_ids"], tok("the sea")["input_ids"]]
    batched = M.generate_greedy(model, tok, prompts, max_new_tokens=5, batch_size=2)
    single = [M.generate_greedy(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single and all(isinstance(t, str) for t in batched)


# --------------------------------------------------------------------------------------------------------
# Benchmark conventions: each metric against a float64 transcription of the benchmark's own code.
def _satimp_es(preds, labels):
    """SatImp eval_es.py: flip both, count matching tokens from the end until the first mismatch."""
    p, y = list(reversed(preds)), list(reversed(labels))
    same = 0
    for i in range(len(p)):
        if p[i] == y[i]:
            same += 1
        else:
            break
    return same / len(p)


def _open_unlearning_es(preds, labels):
    """open-unlearning memorization.extraction_strength: first k in 0..n-1 whose suffix matches."""
    n = len(labels)
    for k in range(n):
        if preds[k:] == labels[k:]:
            break
    return 1 - k / n


def test_extraction_strength_matches_satimp_and_open_unlearning_code():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 9, (1,), generator=g))
        labels = torch.randint(0, 3, (n,), generator=g).tolist()
        preds = [y if float(torch.rand((), generator=g)) < 0.7 else y + 1 for y in labels]
        flags = [a == b for a, b in zip(preds, labels)]
        assert M.extraction_strength_item(flags) == pytest.approx(_satimp_es(preds, labels), abs=1e-15)
        assert M.extraction_strength_item(flags, "open-unlearning") == pytest.approx(
            _open_unlearning_es(preds, labels), abs=1e-15)
    assert M.extraction_strength_item([True, True, False]) == 0.0             # SatImp: last wrong -> 0
    assert M.extraction_strength_item([True, True, False], "open-unlearning") == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="convention"):
        M.extraction_strength_item([True], "tofu")


def test_es_drops_the_eos_label_only_error():
    from fastweight.eval.tofu import es_flags

    eos = 9
    # answer [5, 6] perfectly predicted, only the EOS prediction is wrong
    stats = [{"correct": [True, True, False], "labels": [5, 6, eos]},
             {"correct": [False, True, True], "labels": [5, 6, eos]},
             {"correct": [True, False], "labels": [5, 6]}]          # truncated answer: no EOS label
    flags = es_flags(stats, eos)
    assert flags == [[True, True], [False, True], [True, False]]
    assert M.extraction_strength(flags)["agg_value"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert M.extraction_strength([s["correct"] for s in stats])["value_by_index"]["0"]["score"] == 0.0
    ou = es_flags(stats, eos, "open-unlearning")                     # always drops the last label
    assert ou == [[True, True], [False, True], [True]]
    with pytest.raises(ValueError, match="answer 0"):
        es_flags([{"correct": [True], "labels": [eos]}], eos)


def _muse_min_k(all_prob, ratio=0.4):
    """MUSE metrics/privleak.py inference(): -mean of the int(n * ratio) lowest (numpy; nan when empty)."""
    import warnings

    import numpy as np

    k_length = int(len(all_prob) * ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(-np.mean(np.sort(np.asarray(all_prob, dtype=np.float64))[:k_length]))


def test_mink_matches_muse_and_open_unlearning_code():
    g = torch.Generator().manual_seed(1)
    items = [(-torch.rand(n, generator=g, dtype=torch.float64) * 5).tolist() for n in range(1, 14)]
    muse = M.mink_prob(items, 0.4)["value_by_index"]
    ou = M.mink_prob(items, 0.4, "open-unlearning")["value_by_index"]
    for i, lp in enumerate(items):
        want = _muse_min_k(lp)
        got = muse[str(i)]["score"]
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12)
        s = max(1, int(len(lp) * 0.4))
        assert ou[str(i)]["score"] == pytest.approx(-sum(sorted(lp)[:s]) / s, abs=1e-12)
    assert math.isnan(muse["0"]["score"]) and math.isnan(muse["1"]["score"])  # n = 1, 2: floor(0.4 n) = 0
    assert not math.isnan(muse["2"]["score"])                                # n = 3: one token
    assert M.mink_prob([[]], convention="open-unlearning")["agg_value"] == 0.0


def _muse_auc(forget, holdout):
    """MUSE privleak.py: nonmember = forget (y 0), member = holdout (y 1); roc_curve(y, -ppl); auc(fpr, tpr)."""
    import numpy as np
    from sklearn.metrics import auc, roc_curve

    ppl = np.array(forget + holdout, dtype=np.float64)
    y = np.array([0] * len(forget) + [1] * len(holdout))
    fpr, tpr, _ = roc_curve(y, -ppl)
    return float(auc(fpr, tpr))


def test_privleak_matches_muse_code_and_sign():
    g = torch.Generator().manual_seed(2)
    mk = lambda shift: [(-torch.rand(20, generator=g, dtype=torch.float64) * 4 + shift).tolist() for _ in range(30)]
    leak_f, holdout = mk(3.0), mk(0.0)           # the leaking model puts high log-probs on forget texts
    fresh_f = mk(0.0)                             # a retrained model sees forget texts like holdout texts
    for forget in (leak_f, fresh_f):
        f = [r["score"] for r in M.mink_prob(forget)["value_by_index"].values()]
        h = [r["score"] for r in M.mink_prob(holdout)["value_by_index"].values()]
        want = _muse_auc(f, h)
        assert M.privleak_auc(f, h) == pytest.approx(want, abs=1e-12)
        ou_auc = M.privleak_auc(f, h, "open-unlearning")
        assert ou_auc == pytest.approx(1 - want, abs=1e-12)
        r = 0.4772
        muse_pl = (want - r) / r * 100                            # MUSE eval.py
        assert M.privleak(M.privleak_auc(f, h), r) == pytest.approx(muse_pl, abs=1e-9)
        ou_pl = ((1 - ou_auc) - (1 - (1 - r))) / ((1 - (1 - r)) + 1e-10) * 100  # open-unlearning privleak
        assert M.privleak(ou_auc, 1 - r, "open-unlearning") == pytest.approx(ou_pl, abs=1e-9)
        assert ou_pl == pytest.approx(muse_pl, abs=1e-6)
        if forget is leak_f:
            assert muse_pl == pytest.approx(-100.0)              # leaking: AUC 0 -> -100
        else:
            assert abs(muse_pl) < 40                              # retrained-like: near 0
    with pytest.raises(ValueError, match=r"forget\[0\]"):
        M.privleak_auc([float("nan"), 1.0], [0.5])
    with pytest.raises(ValueError, match="retrain_auc"):
        M.privleak(0.5, 0.0)
    with pytest.raises(ValueError, match="auc"):
        M.privleak(1.5, 0.5)


def _rouge_l_prf(pred, ref):
    """ROUGE-L without stemming: rouge_score's tokenisation (lower case, non-alphanumerics -> spaces), LCS."""
    import re

    tok = lambda s: re.sub(r"[^a-z0-9]+", " ", s.lower()).split()
    a, b = tok(ref), tok(pred)
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            dp[i + 1][j + 1] = dp[i][j] + 1 if a[i] == b[j] else max(dp[i][j + 1], dp[i + 1][j])
    lcs = dp[-1][-1]
    if lcs == 0:
        return 0.0, 0.0, 0.0
    p, r = lcs / len(b), lcs / len(a)
    return p, r, 2 * p * r / (p + r)


def test_rouge_f1_without_stemming_matches_transcription_verbose_vs_short():
    refs = ["Bram Quarry", "cat run", "the harbour drew visitors this August"]
    preds = ["Bram Quarry organised the festival in the autumn", "cats running", "the harbour drew visitors"]
    f1 = M.rouge_l(preds, refs, kind="fmeasure", use_stemmer=False)["value_by_index"]
    rec = M.rouge_l(preds, refs, kind="recall", use_stemmer=False)["value_by_index"]
    for i, (p, r) in enumerate(zip(preds, refs)):
        _, want_r, want_f = _rouge_l_prf(p, r)
        assert f1[str(i)]["score"] == pytest.approx(want_f, abs=1e-12)
        assert rec[str(i)]["score"] == pytest.approx(want_r, abs=1e-12)
    assert rec["0"]["score"] == 1.0 and f1["0"]["score"] == pytest.approx(0.4)  # verbose: recall 1, F1 0.4
    assert f1["1"]["score"] == 0.0                                              # no stemming: cats != cat
    assert M.rouge_l(preds[1:2], refs[1:2], kind="fmeasure")["agg_value"] == 1.0  # TOFU's stemming
    with pytest.raises(TypeError, match="use_stemmer"):
        M.rouge_l(["a"], ["a"], use_stemmer=1)
