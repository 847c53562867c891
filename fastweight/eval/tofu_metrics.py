"""open-unlearning's TOFU metrics, by their names, on fastweight's per-token statistics.

Each metric transcribes the open-unlearning code (``locuslab/open-unlearning`` at commit ``OU_COMMIT``):
``src/evals/metrics/memorization.py`` (probability, probability_w_options, rouge, truth_ratio,
exact_memorization, extraction_strength), ``privacy.py`` (ks_test, privleak), ``utility.py`` (hm_aggregate),
``mia/`` (the six attacks, through ``fastweight.eval.attacks``), ``utils.py`` (``evaluate_probability``,
``tokenwise_vocab_logprobs``, ``eval_text_similarity``), with the data and options of
``configs/eval/tofu.yaml`` and ``configs/eval/tofu_metrics/*.yaml``:

    <s>_Q_A_Prob            mean_i exp(-avg_loss_i); avg_loss = mean NLL of the answer tokens + EOS
    <s>_Q_A_PARA_Prob       the same on ``paraphrased_answer``          (s = forget, retain)
    <s>_Q_A_PERT_Prob       mean_i mean_k exp(-avg_loss_ik) over the ``perturbed_answer`` list
    <s>_Q_A_ROUGE           rougeL_recall (rouge_score, stemmer on) of the greedy answer vs ``answer``
    <s>_Q_A_PARA_ROUGE / _PERT_ROUGE   the same generation against the paraphrased / each perturbed answer
    ra|wf_Q_A_Prob_normalised  P(answer) / (P(answer) + sum_k P(perturbed_k) + 1e-10)
    forget_truth_ratio      TR_i = exp(-mean_k loss_pert) / (exp(-loss_para) + 1e-10), closer_to_1_better:
                            mean min(TR, 1 / (TR + 1e-10));  retain/ra/wf_Truth_Ratio: true_better
                            mean max(0, 1 - TR) (ra/wf use the answer as the "correct" one);
                            prob_mean (``tr_aggregator``): TR = P_c / (P_c + P_w + 1e-10), mean TR
    forget_quality          ks_2samp(forget TR scores, the retain model's forget TR scores).pvalue
    model_utility           scipy.stats.hmean of retain_Q_A_Prob, retain_Q_A_ROUGE, retain_Truth_Ratio and the
                            ra / wf Q_A_Prob_normalised, Q_A_ROUGE, Truth_Ratio
    extraction_strength     open-unlearning ES on the forget answers (last label dropped; 1/|y| floor)
    exact_memorization      mean over forget answers of the argmax == label fraction (last label dropped)
    mia_<attack>            AUC (forget = 0, holdout = 1) of loss-like scores on forget vs ``holdoutXX``
    privleak                ((1 - AUC) - (1 - AUC_ret)) / (1 - AUC_ret + 1e-10) * 100 with the Min-K% AUCs of
                            this model and the retain model (0.5 when no retain log is given, as open-unlearning)

``question_key`` ("question" or "paraphrased_question") selects the question of the forget and retain sets
(the holdout and the real-author / world-fact sets keep ``question``, as open-unlearning's configs). The
``*_PARA_ROUGE`` / ``*_PERT_ROUGE`` metrics of the retain, ra and wf sets and ``*_PERT_ROUGE`` of forget follow
the same definition as open-unlearning's forget ones (it ships configs for forget only). Per-token statistics
come from one function, ``fastweight.eval.metrics.answer_token_stats`` (the MIAs: ``attacks.attack_scores``).

Logs use open-unlearning's layout (``TOFU_EVAL.json``: ``{metric: {"agg_value", "value_by_index": {index:
{...}}}}``, pre-computed metrics included; ``TOFU_SUMMARY.json``: the selected metrics' non-None values), so a
retain model's log written here and one written by open-unlearning are read the same way (``load_retain_logs``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

OU_COMMIT = "d3d7cf9e6b3c125d16687d4232680d8d83548f1a"
SETS = {"forget": "forget", "retain": "retain", "ra": "real_authors", "wf": "world_facts"}
DEFAULT_METRICS: tuple[str, ...] = ("forget_truth_ratio", "forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
                                    "model_utility", "privleak", "extraction_strength")  # configs/eval/tofu.yaml
MIA_ATTACKS = {"mia_loss": "loss", "mia_zlib": "zlib", "mia_min_k": "min_k", "mia_min_k_plus_plus": "min_k_plus_plus",
               "mia_gradnorm": "gradnorm", "mia_reference": "reference"}
MU_PARTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
            "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")
TR_AGGREGATORS = ("closer_to_1_better", "true_better", "prob_mean")
QUESTION_KEYS = ("question", "paraphrased_question")


def _set_metrics(p: str) -> list[str]:
    para = p in ("forget", "retain")
    names = [f"{p}_Q_A_Prob", f"{p}_Q_A_ROUGE", f"{p}_Q_A_PERT_Prob", f"{p}_Q_A_PERT_ROUGE"]
    names += [f"{p}_Q_A_PARA_Prob", f"{p}_Q_A_PARA_ROUGE"] if para else [f"{p}_Q_A_Prob_normalised"]
    return names + ["forget_truth_ratio" if p == "forget" else f"{p}_Truth_Ratio"]


ALL_METRICS: tuple[str, ...] = tuple(
    [m for p in SETS for m in _set_metrics(p)]
    + ["forget_quality", "model_utility", "extraction_strength", "exact_memorization", "privleak", *MIA_ATTACKS])


def resolve_metrics(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"default"`` / None: open-unlearning's default TOFU set; ``"all"``: ``ALL_METRICS``; else a comma list
    (or sequence) of names from ``ALL_METRICS``, where ``default`` and ``all`` expand in place."""
    items = ["default"] if spec is None else spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        names = DEFAULT_METRICS if name == "default" else ALL_METRICS if name == "all" else (name,)
        bad = [n for n in names if n not in ALL_METRICS]
        if bad or not name:
            raise ValueError(f"metrics: unknown metric {name!r}; choose 'default', 'all' or names from "
                             f"{', '.join(ALL_METRICS)}")
        out += [n for n in names if n not in out]
    return tuple(out)


# ------------------------------------------------------------------------------------------ pure definitions
def _to_1d(values) -> np.ndarray:
    """open-unlearning's ``aggregate_to_1D`` (mean over every axis but the first, i.e. over an item's answers),
    item by item, so items with different numbers of answers are allowed too."""
    return np.array([np.mean(np.asarray(v, dtype=np.float64)) for v in values], dtype=np.float64)


def _by_index(values: Sequence) -> dict[str, dict]:
    return {str(i): v for i, v in enumerate(values)}


def probability_result(avg_losses: Sequence) -> dict:
    """``probability``: per item ``{"prob": exp(-avg_loss), "avg_loss"}`` (lists for several answers);
    ``agg_value`` = mean over items of the mean over an item's answers of ``prob``."""
    per = [{"prob": (np.exp(-np.asarray(a, dtype=np.float64))).tolist(), "avg_loss": a} for a in avg_losses]
    return {"agg_value": float(np.mean(_to_1d([p["prob"] for p in per]))), "value_by_index": _by_index(per)}


def probability_w_options(correct: Mapping, wrong: Mapping) -> dict:
    """``probability_w_options`` from two ``probability`` results: ``P_c / (P_c + sum_k P_wk + 1e-10)``."""
    c_by, w_by = correct["value_by_index"], wrong["value_by_index"]
    if list(c_by) != list(w_by):
        raise ValueError("correct and wrong results must have the same indices")
    c = np.array([c_by[i]["prob"] for i in c_by], dtype=np.float64)
    w = np.array([w_by[i]["prob"] for i in c_by], dtype=np.float64)
    probs = c / (c + np.sum(w, axis=tuple(range(1, w.ndim))) + 1e-10)
    return {"agg_value": float(np.mean(probs)), "value_by_index": {i: {"prob": float(p)} for i, p in zip(c_by, probs)}}


def truth_ratio_result(correct: Mapping, wrong: Mapping, aggregator: str) -> dict:
    """``truth_ratio`` from two ``probability`` results (their ``avg_loss``; several answers averaged first)."""
    if aggregator not in TR_AGGREGATORS:
        raise ValueError(f"aggregator must be one of {TR_AGGREGATORS}, got {aggregator!r}")
    c_by, w_by = correct["value_by_index"], wrong["value_by_index"]
    if list(c_by) != list(w_by):
        raise ValueError("correct and wrong results must have the same indices")
    c = np.exp(-_to_1d([c_by[i]["avg_loss"] for i in c_by]))
    w = np.exp(-_to_1d([w_by[i]["avg_loss"] for i in c_by]))
    tr = c / (c + w + 1e-10) if aggregator == "prob_mean" else w / (c + 1e-10)
    agg = {"closer_to_1_better": lambda a: np.mean(np.minimum(a, 1 / (a + 1e-10))),
           "true_better": lambda a: np.mean(np.maximum(0, 1 - a)), "prob_mean": np.mean}[aggregator](tr)
    return {"agg_value": float(agg), "value_by_index": {i: {"score": float(t)} for i, t in zip(c_by, tr)}}


_SCORER = []


def rouge_result(generations: Sequence[str], ground_truths: Sequence) -> dict:
    """``rouge`` (``eval_rouge_recall_batch``): rouge1 / rougeL with the stemmer; a list of ground truths per
    item gives lists; ``agg_value`` = mean over items of the mean ``rougeL_recall``."""
    if len(generations) != len(ground_truths):
        raise ValueError(f"generations ({len(generations)}) and ground_truths ({len(ground_truths)}) differ in length")
    if not _SCORER:
        from rouge_score import rouge_scorer

        _SCORER.append(rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True))
    per = []
    for gen, gts in zip(generations, ground_truths):
        scores = [_SCORER[0].score(gt, gen) for gt in ([gts] if isinstance(gts, str) else gts)]
        vals = {"rouge1_recall": [s["rouge1"].recall for s in scores], "rougeL_f1": [s["rougeL"].fmeasure for s in scores],
                "rougeL_recall": [s["rougeL"].recall for s in scores]}
        per.append({**{k: v[0] if isinstance(gts, str) else v for k, v in vals.items()}, "generation": gen,
                    "ground_truth": gts})
    return {"agg_value": float(np.mean(_to_1d([p["rougeL_recall"] for p in per]))), "value_by_index": _by_index(per)}


def ks_test(forget_tr: Mapping, retain_tr: Mapping | None) -> dict:
    """``ks_test``: p-value of ``scipy.stats.ks_2samp`` between the ``score`` values of two truth-ratio results;
    ``agg_value`` None without the retain model's (open-unlearning warns and does the same)."""
    from scipy.stats import ks_2samp

    if retain_tr is None:
        return {"agg_value": None}
    f = np.array([v["score"] for v in forget_tr["value_by_index"].values()])
    r = np.array([v["score"] for v in retain_tr["value_by_index"].values()])
    return {"agg_value": float(ks_2samp(f, r).pvalue)}


def privleak_result(forget_auc: float, retain_auc: float | None, ref_value: float = 0.5) -> dict:
    """``privleak``: ``((1 - auc) - (1 - ref)) / (1 - ref + 1e-10) * 100``, ref = the retain model's Min-K% AUC
    or ``ref_value`` (open-unlearning's config: 0.5) without one."""
    ref = ref_value if retain_auc is None else retain_auc
    score, ref = 1 - forget_auc, 1 - ref
    return {"agg_value": float((score - ref) / (ref + 1e-10) * 100)}


def hm_aggregate(values: Sequence[float]) -> dict:
    """``hm_aggregate``: ``scipy.stats.hmean`` of the given aggregate values."""
    from scipy.stats import hmean

    return {"agg_value": float(hmean(np.asarray(values, dtype=np.float64)))}


def flags_result(flags: Sequence[Sequence[bool]], kind: str) -> dict:
    """``exact_memorization`` (mean of the flags) or ``extraction_strength`` (``1 - k / n``, k the first start
    of an all-correct suffix searched in 0..n-1) per item from greedy-match flags with the last label dropped
    (``tokenwise_vocab_logprobs``); an item left with no flag scores None (EM) / 0 (ES), as open-unlearning."""
    per = []
    for f in flags:
        f = [bool(x) for x in f]
        n = len(f)
        if n == 0:
            per.append({"score": None if kind == "exact_memorization" else 0})
        elif kind == "exact_memorization":
            per.append({"score": sum(f) / n})
        else:
            k = next((k for k in range(n) if all(f[k:])), n - 1)
            per.append({"score": 1 - k / n})
    vals = [p["score"] for p in per if p["score"] is not None]
    return {"agg_value": float(np.mean(vals)) if vals else None, "value_by_index": _by_index(per)}


def load_retain_logs(path: str | os.PathLike) -> dict:
    """An open-unlearning ``TOFU_EVAL.json`` (``--retain-logs``): ``{"forget_truth_ratio": {"value_by_index":
    {index: {"score": TR}}}, "mia_min_k": {"agg_value": AUC}, ...}``. Missing metrics read as absent."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"retain_logs: {str(p)!r} is not a file (expected open-unlearning's TOFU_EVAL.json)")
    try:
        logs = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"retain_logs: {str(p)!r} is not JSON ({e})") from None
    if not isinstance(logs, dict):
        raise ValueError(f"retain_logs: {str(p)!r} must hold a JSON object of metrics")
    tr = logs.get("forget_truth_ratio")
    if tr is not None and not (isinstance(tr, dict) and isinstance(tr.get("value_by_index"), dict) and
                               all(isinstance(v, dict) and "score" in v for v in tr["value_by_index"].values())):
        raise ValueError(f"retain_logs: {str(p)!r} forget_truth_ratio must have value_by_index {{index: {{'score'}}}}")
    mk = logs.get("mia_min_k")
    if mk is not None and not (isinstance(mk, dict) and isinstance(mk.get("agg_value"), (int, float))):
        raise ValueError(f"retain_logs: {str(p)!r} mia_min_k must have a numeric agg_value")
    return logs


__all__ = ["ALL_METRICS", "DEFAULT_METRICS", "MIA_ATTACKS", "MU_PARTS", "OU_COMMIT", "QUESTION_KEYS", "SETS",
           "TR_AGGREGATORS", "flags_result", "hm_aggregate", "ks_test", "load_retain_logs", "privleak_result",
           "probability_result", "probability_w_options", "resolve_metrics", "rouge_result", "truth_ratio_result"]
