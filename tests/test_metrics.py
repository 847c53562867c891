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
    assert r["value_by_index"]["0"]["score"] == pytest.approx(-4.5)  # ceil(0.4 * 5) = 2 lowest
    assert r["value_by_index"]["1"]["score"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="k"):
        M.mink_prob([[-1.0]], k=0.0)
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
