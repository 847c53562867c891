"""Evaluate a model on open-unlearning's TOFU metrics (``fastweight.eval.tofu_metrics``) by name.

    from fastweight.eval.tofu_suite import TofuSuiteConfig, evaluate_tofu_suite
    summary = evaluate_tofu_suite(model, tokenizer, eval_sets, holdout_rows, TofuEvalConfig(template="phi"),
                                  TofuSuiteConfig(metrics=resolve_metrics("all")), output_dir="eval/ou",
                                  retain_logs=load_retain_logs("retain/TOFU_EVAL.json"), reference_model=retain)

A metric is computed once with what it pre-computes (``forget_truth_ratio`` needs ``forget_Q_A_PARA_Prob`` and
``forget_Q_A_PERT_Prob``, as open-unlearning's ``pre_compute``), every result is kept in ``<output_dir>/
TOFU_EVAL.json`` in open-unlearning's layout (a rerun skips what is there) and the summary holds the selected
metrics whose value is not None. Per-token statistics come from ``metrics.answer_token_stats`` only.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fastweight.data.tofu import encode_prompt, encode_qa, pad_collate
from fastweight.eval import metrics as M
from fastweight.eval import tofu_metrics as T
from fastweight.eval.attacks import AttackConfig, attack_scores, mia_auc
from fastweight.eval.store import EvalStore

_ANSWER_KEYS = {"": "answer", "PARA_": "paraphrased_answer", "PERT_": "perturbed_answer"}


@dataclass
class TofuSuiteConfig:
    """metrics: names (``resolve_metrics``); question_key: "question" / "paraphrased_question" for the forget
    and retain sets; tr_aggregator: None = open-unlearning's per metric (closer_to_1_better for forget,
    true_better otherwise) or one of ``TR_AGGREGATORS`` for every truth ratio; k: Min-K% / Min-K%++ fraction;
    p: gradnorm norm order (open-unlearning's configs: 0.4, 2)."""

    metrics: tuple[str, ...] = T.DEFAULT_METRICS
    question_key: str = "question"
    tr_aggregator: str | None = None
    k: float = 0.4
    p: float = 2.0

    def __post_init__(self) -> None:
        self.metrics = T.resolve_metrics(self.metrics)
        if self.question_key not in T.QUESTION_KEYS:
            raise ValueError(f"question_key must be one of {T.QUESTION_KEYS}, got {self.question_key!r}")
        if self.tr_aggregator is not None and self.tr_aggregator not in T.TR_AGGREGATORS:
            raise ValueError(f"tr_aggregator must be None or one of {T.TR_AGGREGATORS}, got {self.tr_aggregator!r}")
        AttackConfig(k=self.k, p=self.p)


class _Suite:
    def __init__(self, model, tokenizer, sets, holdout, ecfg, scfg, output_dir, retain_logs, reference_model):
        self.model, self.tok, self.sets, self.holdout = model, tokenizer, sets, holdout
        self.ecfg, self.scfg, self.retain_logs, self.ref = ecfg, scfg, retain_logs or {}, reference_model
        self.store = EvalStore(output_dir, ecfg.bench)
        self._stats: dict[tuple[str, str], list] = {}
        self._gens: dict[str, list[str]] = {}

    # ---- data -----------------------------------------------------------------------------------------
    def rows(self, p: str) -> list[dict]:
        rows = list(self.sets.get(T.SETS[p]) or [])[:self.ecfg.max_items]
        if not rows:
            raise ValueError(f"metric needs the {T.SETS[p]} evaluation set, which is empty or missing")
        return rows

    def question(self, p: str, row: dict) -> str:
        key = self.scfg.question_key if p in ("forget", "retain") else "question"
        if key not in row:
            raise ValueError(f"{T.SETS[p]} rows have no {key!r} field (question_key); fields: {sorted(row)}")
        return row[key]

    def stats(self, p: str, key: str) -> list:
        """Per row: ``answer_token_stats`` of ``row[key]`` (a list of them when ``row[key]`` is a list)."""
        if (p, key) not in self._stats:
            rows = self.rows(p)
            flat = [(self.question(p, r), a) for r in rows for a in ([r[key]] if isinstance(r[key], str) else r[key])]
            out = []
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
            device = next(self.model.parameters()).device
            for s in range(0, len(flat), self.ecfg.batch_size):
                items = [{k: torch.tensor(v) for k, v in encode_qa(self.tok, self.ecfg.template, q, a,
                                                                   self.ecfg.max_length).items()}
                         for q, a in flat[s:s + self.ecfg.batch_size]]
                out += M.answer_token_stats(self.model, {k: v.to(device) for k, v in pad_collate(items, pad).items()})
            it = iter(out)
            self._stats[(p, key)] = [next(it) if isinstance(r[key], str) else [next(it) for _ in r[key]] for r in rows]
        return self._stats[(p, key)]

    def generations(self, p: str) -> list[str]:
        if p not in self._gens:
            prompts = [encode_prompt(self.tok, self.ecfg.template, self.question(p, r)) for r in self.rows(p)]
            self._gens[p] = M.generate_greedy(self.model, self.tok, prompts, max_new_tokens=self.ecfg.max_new_tokens,
                                              batch_size=self.ecfg.batch_size)
        return self._gens[p]

    # ---- metrics --------------------------------------------------------------------------------------
    def get(self, name: str) -> dict:
        if name not in self.store.results:
            if name in T.MIA_ATTACKS:
                self.mias([name])
            else:
                self.store.results[name] = self.compute(name)
                self.store.save()
        return self.store.results[name]

    def compute(self, name: str) -> dict:
        p, _, rest = name.partition("_")
        if rest.startswith("Q_A_") and rest.endswith("_normalised"):
            return T.probability_w_options(self.get(f"{p}_Q_A_Prob"), self.get(f"{p}_Q_A_PERT_Prob"))
        if rest.startswith("Q_A_"):
            kind = rest[len("Q_A_"):]
            variant = kind[:-len("Prob")] if kind.endswith("Prob") else kind[:-len("ROUGE")]
            key = _ANSWER_KEYS[variant]
            if kind.endswith("Prob"):
                return T.probability_result([[-s["avg_logp"] for s in st] if isinstance(st, list) else -st["avg_logp"]
                                             for st in self.stats(p, key)])
            return T.rouge_result(self.generations(p), [r[key] for r in self.rows(p)])
        if name in ("forget_truth_ratio", f"{p}_Truth_Ratio"):
            default = "closer_to_1_better" if p == "forget" else "true_better"
            correct = self.get(f"{p}_Q_A_PARA_Prob" if p in ("forget", "retain") else f"{p}_Q_A_Prob")
            return T.truth_ratio_result(correct, self.get(f"{p}_Q_A_PERT_Prob"), self.scfg.tr_aggregator or default)
        if name == "forget_quality":
            ref = self.retain_logs.get("forget_truth_ratio")
            if ref is None:
                warnings.warn("forget_quality needs the retain model's forget_truth_ratio (retain logs); it is None",
                              stacklevel=2)
            return T.ks_test(self.get("forget_truth_ratio"), ref)
        if name == "model_utility":
            return T.hm_aggregate([self.get(m)["agg_value"] for m in T.MU_PARTS])
        if name in ("extraction_strength", "exact_memorization"):
            return T.flags_result([st["correct"][:-1] for st in self.stats("forget", "answer")], name)
        if name == "privleak":
            ref = self.retain_logs.get("mia_min_k")
            if ref is None:
                warnings.warn("privleak: no retain model Min-K% AUC (retain logs); using open-unlearning's "
                              "ref_value 0.5", stacklevel=2)
            return T.privleak_result(self.get("mia_min_k")["agg_value"], None if ref is None else ref["agg_value"])
        raise ValueError(f"unknown metric {name!r}")

    def mias(self, names: Sequence[str]) -> None:
        """The MIAs among ``names`` (and any other selected one not yet done) in one pass over each set."""
        todo = [n for n in dict.fromkeys([*names, *self.scfg.metrics]) if n in T.MIA_ATTACKS
                and n not in self.store.results]
        if "mia_reference" in todo and self.ref is None:
            raise ValueError("mia_reference needs a reference model (the retain model); none was given")
        if not self.holdout:
            raise ValueError("the MIA metrics and privleak need the holdout set (holdoutXX), which is empty or missing")
        attacks = [T.MIA_ATTACKS[n] for n in todo]
        forget = [encode_qa(self.tok, self.ecfg.template, self.question("forget", r), r["answer"], self.ecfg.max_length)
                  for r in self.rows("forget")]
        holdout = [encode_qa(self.tok, self.ecfg.template, r["question"], r["answer"], self.ecfg.max_length)
                   for r in list(self.holdout)[:self.ecfg.max_items]]
        cfg = AttackConfig(k=self.scfg.k, p=self.scfg.p, batch_size=self.ecfg.batch_size, drop_last_label=True)
        frozen = [w for w in self.model.parameters() if not w.requires_grad] if "gradnorm" in attacks else []
        for w in frozen:  # open-unlearning's gradnorm takes the norm over every parameter
            w.requires_grad_(True)
        try:
            kw = {"tokenizer": self.tok, "reference_model": self.ref, "config": cfg}
            f, h = attack_scores(self.model, forget, attacks, **kw), attack_scores(self.model, holdout, attacks, **kw)
        finally:
            for w in frozen:
                w.requires_grad_(False)
        for n, a in zip(todo, attacks):
            auc = mia_auc([v["score"] for v in f[a]["value_by_index"].values()],
                          [v["score"] for v in h[a]["value_by_index"].values()])
            self.store.results[n] = {"forget": f[a], "holdout": h[a], "auc": auc, "agg_value": auc}
        self.store.save()


def evaluate_tofu_suite(model, tokenizer, eval_sets: Mapping[str, Sequence[dict]], holdout: Sequence[dict] | None,
                        config, suite: TofuSuiteConfig | None = None, *, output_dir: str | os.PathLike | None = None,
                        retain_logs: Mapping | None = None, reference_model=None,
                        also: Sequence[str] = ()) -> dict[str, float]:
    """Compute ``suite.metrics`` (plus ``also``, kept in the log but not in the summary) on ``model``.

    Args:
        eval_sets: ``{"forget", "retain", "real_authors", "world_facts"}`` -> ``*_perturbed`` rows.
        holdout: ``holdoutXX`` rows (MIAs, privleak). config: a ``TofuEvalConfig`` (template, lengths, batch).
        retain_logs: the retain model's open-unlearning log (``load_retain_logs``) for Forget Quality / privleak.
        reference_model: the reference of ``mia_reference`` (same tokenizer).
    Returns:
        ``{metric: agg_value}`` for the selected metrics whose value is not None.
    """
    scfg = suite or TofuSuiteConfig()
    s = _Suite(model, tokenizer, eval_sets, holdout, config, scfg, output_dir, retain_logs, reference_model)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device.type
    amp = torch.autocast(dev, dtype=torch.bfloat16 if config.autocast == "bf16" else torch.float16,
                         enabled=config.autocast in ("bf16", "fp16"))
    try:
        with amp:
            for name in (*scfg.metrics, *(T.resolve_metrics(list(also)) if also else ())):
                s.get(name)
    finally:
        model.train(was)
    out = {}
    for name in scfg.metrics:
        v = s.store.results[name].get("agg_value")
        if v is not None:
            out[name] = float(v)
    return out


__all__ = ["TofuSuiteConfig", "evaluate_tofu_suite"]
