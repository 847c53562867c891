"""open-unlearning's TOFU metrics (fastweight.eval.tofu_metrics / tofu_suite) against float64 transcriptions of
its code (locuslab/open-unlearning d3d7cf9, src/evals/metrics/{memorization,privacy,utility,utils}.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.tofu import encode_qa
from fastweight.eval import tofu_metrics as T
from fastweight.eval.tofu import TofuEvalConfig
from fastweight.eval.tofu_suite import TofuSuiteConfig, evaluate_tofu_suite
from fastweight.train.models import load_model_and_tokenizer
from helpers import save_tiny_tofu_model, tiny_tofu


# ------------------------------------------------------------------ transcriptions of open-unlearning (float64)
def ou_aggregate_to_1d(x):
    return np.mean(x, axis=tuple(range(1, x.ndim)))


def ou_probability(losses):  # probability(): prob = exp(-avg_loss) per answer, aggregate_to_1D, mean
    return np.mean(ou_aggregate_to_1d(np.array([np.exp(-np.array(a, dtype=np.float64)) for a in losses])))


def ou_truth_ratio(correct_losses, wrong_losses, aggregator):
    c = np.exp(-ou_aggregate_to_1d(np.array(correct_losses, dtype=np.float64)))
    w = np.exp(-ou_aggregate_to_1d(np.array(wrong_losses, dtype=np.float64)))
    tr = w / (c + 1e-10) if aggregator != "prob_mean" else c / (c + w + 1e-10)
    if aggregator == "closer_to_1_better":
        return tr, np.mean(np.minimum(tr, 1 / (tr + 1e-10)))
    if aggregator == "true_better":
        return tr, np.mean(np.maximum(0, 1 - tr))
    return tr, np.mean(tr)


def ou_es_em(preds, labels):
    valid = len(labels)
    for k in range(valid):
        if torch.equal(preds[k:], labels[k:]):
            break
    es = 0 if valid == 0 else 1 - k / valid
    em = None if valid == 0 else ((preds == labels).sum().double() / valid).item()  # float64
    return es, em


def rand_losses(rng, n, k=None):
    return [float(x) for x in rng.uniform(0.1, 3, n)] if k is None else [list(map(float, rng.uniform(0.1, 3, k)))
                                                                        for _ in range(n)]


# --------------------------------------------------------------------------------------- pure definitions
@pytest.mark.parametrize("agg", T.TR_AGGREGATORS)
def test_truth_ratio_and_probabilities_match_transcription(agg):
    rng = np.random.default_rng(0)
    correct, wrong = rand_losses(rng, 7), rand_losses(rng, 7, 5)
    pc, pw = T.probability_result(correct), T.probability_result(wrong)
    assert pc["agg_value"] == pytest.approx(ou_probability(correct), rel=1e-14)
    assert pw["agg_value"] == pytest.approx(ou_probability(wrong), rel=1e-14)
    assert pw["value_by_index"]["3"]["prob"] == pytest.approx(np.exp(-np.array(wrong[3])).tolist(), rel=1e-14)
    tr, ref = ou_truth_ratio(correct, wrong, agg)
    res = T.truth_ratio_result(pc, pw, agg)
    assert res["agg_value"] == pytest.approx(ref, rel=1e-13)
    assert [v["score"] for v in res["value_by_index"].values()] == pytest.approx(tr.tolist(), rel=1e-13)
    # probability_w_options: correct / (correct + sum wrong + 1e-10)
    c, w = np.exp(-np.array(correct)), np.exp(-np.array(wrong)).sum(axis=1)
    assert T.probability_w_options(pc, pw)["agg_value"] == pytest.approx(np.mean(c / (c + w + 1e-10)), rel=1e-14)


def test_ks_privleak_hmean_match_transcription():
    rng = np.random.default_rng(1)
    f = {"value_by_index": {str(i): {"score": float(v)} for i, v in enumerate(rng.uniform(0, 2, 9))}}
    r = {"value_by_index": {str(i): {"score": float(v)} for i, v in enumerate(rng.uniform(0, 2, 11))}}
    ref = scipy.stats.ks_2samp([v["score"] for v in f["value_by_index"].values()],
                               [v["score"] for v in r["value_by_index"].values()]).pvalue
    assert T.ks_test(f, r)["agg_value"] == pytest.approx(ref, rel=1e-14)
    assert T.ks_test(f, None)["agg_value"] is None
    # privleak(): score = 1 - auc, ref = 1 - retain auc (0.5 without logs)
    assert T.privleak_result(0.8, 0.55)["agg_value"] == pytest.approx(((1 - 0.8) - 0.45) / (0.45 + 1e-10) * 100)
    assert T.privleak_result(0.8, None)["agg_value"] == pytest.approx((0.2 - 0.5) / (0.5 + 1e-10) * 100)
    vals = list(rng.uniform(0.1, 1, 9))
    assert T.hm_aggregate(vals)["agg_value"] == pytest.approx(scipy.stats.hmean(vals), rel=1e-14)


@pytest.mark.parametrize("seed", range(4))
def test_es_em_match_transcription(seed):
    g = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, 3, (n,), generator=g) for n in (1, 2, 5, 8, 0)]
    preds = [torch.where(torch.rand(len(lb), generator=g) < 0.6, lb, (lb + 1) % 3) for lb in labels]
    flags = [(p == lb).tolist() for p, lb in zip(preds, labels)]
    ref = [ou_es_em(p, lb) for p, lb in zip(preds, labels)]
    es, em = T.flags_result(flags, "extraction_strength"), T.flags_result(flags, "exact_memorization")
    assert [v["score"] for v in es["value_by_index"].values()] == pytest.approx([r[0] for r in ref], abs=1e-15)
    assert es["agg_value"] == pytest.approx(np.mean([r[0] for r in ref]))
    assert [v["score"] for v in em["value_by_index"].values()] == [r[1] for r in ref]
    assert em["agg_value"] == pytest.approx(np.mean([r[1] for r in ref if r[1] is not None]))


def test_rouge_lists_and_scalars():
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    gens, gts = ["the cat sat on mats", "blue sky"], ["a cat sat on the mat", ["blue sea", "the blue sky today"]]
    res = T.rouge_result(gens, gts)
    r0 = sc.score(gts[0], gens[0])["rougeL"].recall
    r1 = [sc.score(g, gens[1])["rougeL"].recall for g in gts[1]]
    assert res["value_by_index"]["1"]["rougeL_recall"] == pytest.approx(r1)
    assert res["agg_value"] == pytest.approx((r0 + np.mean(r1)) / 2)


def test_resolve_metrics_and_retain_logs(tmp_path):
    assert T.resolve_metrics("default") == T.DEFAULT_METRICS
    assert T.resolve_metrics("all") == T.ALL_METRICS
    assert T.resolve_metrics("mia_loss,default")[0] == "mia_loss"
    for name in ("forget_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob", "ra_Q_A_Prob_normalised", "wf_Truth_Ratio",
                 "exact_memorization", "mia_min_k_plus_plus", "mia_reference", "forget_Q_A_PERT_ROUGE"):
        assert name in T.ALL_METRICS
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        T.resolve_metrics("default,nope")
    with pytest.raises(ValueError, match="not a file"):
        T.load_retain_logs(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"forget_truth_ratio": {"value_by_index": {"0": {"tr": 1}}}}))
    with pytest.raises(ValueError, match="forget_truth_ratio"):
        T.load_retain_logs(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="question_key"):
        TofuSuiteConfig(question_key="q")
    with pytest.raises(ValueError, match="tr_aggregator"):
        TofuSuiteConfig(tr_aggregator="mean")


# ------------------------------------------------------------------------------------ evaluator on a model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model_and_tokenizer(save_tiny_tofu_model(tmp_path_factory.mktemp("m")))


def ou_token_stats(model, tok, q, a, cfg):
    """evaluate_probability's avg_loss and tokenwise_vocab_logprobs' argmax flags (last label dropped), float64."""
    enc = {k: torch.tensor([v]) for k, v in encode_qa(tok, cfg.template, q, a, cfg.max_length).items()}
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.double()
    labels = enc["labels"][0]
    logp = torch.log_softmax(logits[0, :-1], -1)
    shifted = labels[1:]
    valid = shifted != IGNORE_INDEX
    nll = -logp[valid].gather(1, shifted[valid][:, None]).squeeze(1)
    avg_loss = float(nll.sum() / (labels != IGNORE_INDEX).sum())
    idx = (labels != IGNORE_INDEX).nonzero().flatten()[:-1]
    preds = logp[idx - 1].argmax(-1)
    return avg_loss, preds, labels[idx], logp[idx - 1].gather(1, labels[idx][:, None]).squeeze(1).numpy()


def ou_min_k(lp, k=0.4):  # MinKProbAttack.compute_score
    return 0 if lp.size == 0 else -np.mean(np.sort(lp)[:max(1, int(len(lp) * k))])


@pytest.mark.slow
def test_suite_matches_transcription_on_a_model(tiny, tmp_path):
    model, tok = tiny
    data = tiny_tofu()
    sets = {"forget": data["forget10_perturbed"], "retain": data["retain_perturbed"],
            "real_authors": data["real_authors_perturbed"], "world_facts": data["world_facts_perturbed"]}
    cfg = TofuEvalConfig(template="phi", batch_size=3, max_length=48, max_new_tokens=4)
    retain_tr = {"value_by_index": {str(i): {"score": s} for i, s in enumerate([0.5, 0.9, 1.4])}}
    (tmp_path / "ret.json").write_text(json.dumps({"forget_truth_ratio": retain_tr,
                                                   "mia_min_k": {"agg_value": 0.6}}))
    logs = T.load_retain_logs(tmp_path / "ret.json")
    for qkey in ("question", "paraphrased_question"):
        out = tmp_path / qkey
        summary = evaluate_tofu_suite(model, tok, sets, data["holdout10"], cfg,
                                      TofuSuiteConfig(metrics="all", question_key=qkey), output_dir=out,
                                      retain_logs=logs, reference_model=model)
        assert set(summary) == set(T.ALL_METRICS)
        ev = json.loads((out / "TOFU_EVAL.json").read_text())
        rows = sets["forget"]
        ref = [ou_token_stats(model, tok, r[qkey], r["answer"], cfg) for r in rows]
        assert summary["forget_Q_A_Prob"] == pytest.approx(ou_probability([r[0] for r in ref]), rel=1e-5)
        para = [ou_token_stats(model, tok, r[qkey], r["paraphrased_answer"], cfg)[0] for r in rows]
        pert = [[ou_token_stats(model, tok, r[qkey], p, cfg)[0] for p in r["perturbed_answer"]] for r in rows]
        tr, agg = ou_truth_ratio(para, pert, "closer_to_1_better")
        assert summary["forget_truth_ratio"] == pytest.approx(agg, rel=1e-5)
        assert summary["forget_quality"] == pytest.approx(
            scipy.stats.ks_2samp(tr, [0.5, 0.9, 1.4]).pvalue, rel=1e-6)
        es_em = [ou_es_em(p, lb) for _, p, lb, _ in ref]
        assert summary["extraction_strength"] == pytest.approx(np.mean([e[0] for e in es_em]), abs=1e-12)
        assert summary["exact_memorization"] == pytest.approx(np.mean([e[1] for e in es_em]), abs=1e-12)
        auc = summary["mia_min_k"]
        from sklearn.metrics import roc_auc_score

        hold = [ou_min_k(ou_token_stats(model, tok, r["question"], r["answer"], cfg)[3]) for r in data["holdout10"]]
        f_scores = [ou_min_k(r[3]) for r in ref]
        assert auc == pytest.approx(roc_auc_score([0] * len(f_scores) + [1] * len(hold), f_scores + hold), abs=1e-12)
        ra = sets["real_authors"]
        c = np.array([np.exp(-ou_token_stats(model, tok, r["question"], r["answer"], cfg)[0]) for r in ra])
        w = np.array([sum(np.exp(-ou_token_stats(model, tok, r["question"], p, cfg)[0]) for p in r["perturbed_answer"])
                      for r in ra])
        assert summary["ra_Q_A_Prob_normalised"] == pytest.approx(np.mean(c / (c + w + 1e-10)), rel=1e-5)
        ret = sets["retain"]
        rpara = [ou_token_stats(model, tok, r[qkey], r["paraphrased_answer"], cfg)[0] for r in ret]
        rpert = [[ou_token_stats(model, tok, r[qkey], p, cfg)[0] for p in r["perturbed_answer"]] for r in ret]
        assert summary["retain_Truth_Ratio"] == pytest.approx(ou_truth_ratio(rpara, rpert, "true_better")[1], abs=1e-5)
        assert summary["retain_Q_A_PERT_Prob"] == pytest.approx(ou_probability(rpert), rel=1e-5)
        assert summary["privleak"] == pytest.approx(((1 - auc) - 0.4) / (0.4 + 1e-10) * 100)
        assert summary["mia_reference"] == 0.5  # the model is its own reference: every score is 0
        assert ev["mia_loss"]["forget"]["value_by_index"]["0"]["score"] == pytest.approx(ref[0][0], rel=1e-5)
        mu = [summary[m] for m in T.MU_PARTS]
        assert summary["model_utility"] == pytest.approx(scipy.stats.hmean(mu), rel=1e-12)
        assert set(json.loads((out / "TOFU_SUMMARY.json").read_text())) == set(T.ALL_METRICS)
    assert summary["forget_Q_A_Prob"] != json.loads((tmp_path / "question" / "TOFU_SUMMARY.json").read_text())[
        "forget_Q_A_Prob"]  # the paraphrased questions were used


def test_suite_default_without_logs_warns_and_skips_fq(tiny, recwarn):
    model, tok = tiny
    data = tiny_tofu()
    sets = {"forget": data["forget10_perturbed"], "retain": data["retain_perturbed"],
            "real_authors": data["real_authors_perturbed"], "world_facts": data["world_facts_perturbed"]}
    cfg = TofuEvalConfig(template="phi", batch_size=4, max_length=48, max_new_tokens=2)
    summary = evaluate_tofu_suite(model, tok, sets, data["holdout10"], cfg)
    assert set(summary) == set(T.DEFAULT_METRICS) - {"forget_quality"}  # None values are left out, as OU
    assert summary["privleak"] == pytest.approx(((1 - summary_auc(model, tok, sets, data, cfg)) - 0.5) / 0.5 * 100,
                                                rel=1e-6)
    assert any("ref_value 0.5" in str(w.message) for w in recwarn)
    with pytest.raises(ValueError, match="reference model"):
        evaluate_tofu_suite(model, tok, sets, data["holdout10"], cfg, TofuSuiteConfig(metrics="mia_reference"))


def summary_auc(model, tok, sets, data, cfg):
    return evaluate_tofu_suite(model, tok, sets, data["holdout10"], cfg, TofuSuiteConfig(metrics="mia_min_k"))[
        "mia_min_k"]
