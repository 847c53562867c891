"""The TOFU pipeline's open-unlearning metrics (``--metrics``, ``--question-key``, ``--truth-ratio-agg``,
``--retain-logs``, ``--holdout-split``) and its ``--robustness`` callbacks (``fastweight.pipelines.robustness``).

Each evaluated model's open-unlearning log is kept in ``eval/<model>/open-unlearning/TOFU_EVAL.json`` (the
layout ``--retain-logs`` reads); the retain model's own log gives Forget Quality and PrivLeak unless
``--retain-logs`` names another.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastweight.data.tofu import QADataset, load_tofu
from fastweight.eval import robustness as R
from fastweight.eval import tofu_metrics as TM
from fastweight.eval.tofu_suite import TofuSuiteConfig, evaluate_tofu_suite

# What the robustness attacks re-measure (forget metrics; quantization also utility), all in open-unlearning's
# default set, so the before / after columns have them too.
ROBUST_FORGET = ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "extraction_strength")
ROBUST_QUANT = (*ROBUST_FORGET, "model_utility")
RELEARN_FRACTION = 0.5  # the first half of the forget split relearns, the other half is measured
HOLDOUTS = ("holdout01", "holdout05", "holdout10")


def check_options(cfg) -> None:
    """Validate the TOFU metric options (called from ``TofuConfig.__post_init__``)."""
    TofuSuiteConfig(metrics=cfg.metrics, question_key=cfg.question_key, tr_aggregator=cfg.truth_ratio_agg)
    if cfg.holdout_split is not None and cfg.holdout_split not in HOLDOUTS:
        raise ValueError(f"holdout_split must be one of {HOLDOUTS} or None, got {cfg.holdout_split!r}")
    if cfg.retain_logs is not None:
        TM.load_retain_logs(cfg.retain_logs)
    if "mia_reference" in TM.resolve_metrics(cfg.metrics) and cfg.finetuned and cfg.retain_model is None:
        raise ValueError("metric mia_reference needs a reference model: give --retain-model (or drop --finetuned "
                         "so one is fine-tuned)")


def suite_config(cfg) -> TofuSuiteConfig:
    """The selected metrics plus, with ``--robustness``, those the attacks compare against."""
    metrics = list(TM.resolve_metrics(cfg.metrics))
    if cfg.robustness:
        metrics += [m for m in ROBUST_QUANT if m not in metrics]
    return TofuSuiteConfig(metrics=tuple(metrics), question_key=cfg.question_key, tr_aggregator=cfg.truth_ratio_agg)


def load_holdout(cfg, data: str, split: str) -> list[dict]:
    """The holdout rows when a selected metric needs them (MIAs, privleak), else []."""
    needs = [m for m in suite_config(cfg).metrics if m == "privleak" or m.startswith("mia_")]
    if not needs:
        return []
    name = cfg.holdout_split or f"holdout{split[len('forget'):]}"
    rows = load_tofu(data, name)
    if not rows:
        raise ValueError(f"the {name} set of --data {data!r} is empty; {', '.join(needs)} need it")
    return rows


def check_rows(cfg, sets: dict[str, list[dict]]) -> None:
    """``paraphrased_question`` present where ``--question-key`` / the paraphrase probe reads it."""
    need = cfg.question_key == "paraphrased_question" or "paraphrase" in R.parse_attacks(cfg.robustness)
    for split in ("forget", "retain") if need else ():
        missing = [i for i, r in enumerate(sets[split]) if "paraphrased_question" not in r]
        if missing:
            raise ValueError(f"{split} evaluation rows {missing[:5]} have no 'paraphrased_question' field "
                             "(needed by --question-key paraphrased_question / --robustness paraphrase)")


def key(cfg, holdout: list[dict], retain_logs: dict | None) -> dict[str, Any]:
    """What the open-unlearning logs depend on beyond the evaluation config (for the keyed eval folders)."""
    from fastweight.pipelines import common as C

    return {"question_key": cfg.question_key, "tr_agg": cfg.truth_ratio_agg, "holdout": C.data_fingerprint(holdout),
            "retain_logs": C.fingerprint(retain_logs) if retain_logs else None}


def evaluate(model, tokenizer, sets, holdout, ecfg, scfg, folder: Path | None, *, retain_logs=None,
             reference=None, also=()) -> dict[str, float]:
    """``evaluate_tofu_suite`` into ``folder/open-unlearning`` (None: in memory). A ZeRO-3-partitioned model
    outside an engine runs its forwards with gathered weights (its output layer whole for the fused statistics),
    and every process waits until the main process's files are complete."""
    from fastweight.pipelines import common as C

    out = None if folder is None else Path(folder) / "open-unlearning"
    with C.gathered_forwards(model):
        result = evaluate_tofu_suite(model, tokenizer, sets, holdout, ecfg, scfg, output_dir=out,
                                     retain_logs=retain_logs, reference_model=reference, also=also)
    C.barrier()
    return result


def robustness_hooks(cfg, tokenizer, sets, holdout, ecfg, forget_rows, template, max_length,
                     retain_logs) -> dict[str, Any]:
    """The keyword arguments of ``run_robustness`` for TOFU."""
    def suite(metrics, **kw):
        return TofuSuiteConfig(metrics=metrics, question_key=kw.get("question_key", cfg.question_key),
                               tr_aggregator=cfg.truth_ratio_agg)

    def run(model, s, scfg):
        return evaluate_tofu_suite(model, tokenizer, s, holdout, ecfg, scfg, retain_logs=retain_logs)

    n = len(forget_rows)
    cut = min(n - 1, max(1, math.ceil(n * RELEARN_FRACTION))) if n > 1 else 0
    relearn_sets = {**sets, "forget": sets["forget"][cut:]}
    probes = {"paraphrase": lambda m: run(m, sets, suite(ROBUST_FORGET, question_key="paraphrased_question"))}
    for name in R.PROBE_TEMPLATES:
        wrapped = {**sets, "forget": R.with_template(sets["forget"], name, cfg.question_key)}
        probes[f"templates:{name}"] = (lambda w: lambda m: run(m, w, suite(ROBUST_FORGET)))(wrapped)
    return {"evaluate": lambda m, kind: run(m, sets, suite(ROBUST_QUANT)),
            "relearn_set": QADataset(forget_rows[:cut], tokenizer, template, max_length) if cut else None,
            "relearn_eval": lambda m: run(m, relearn_sets, suite(ROBUST_FORGET)), "probes": probes}


__all__ = ["HOLDOUTS", "RELEARN_FRACTION", "ROBUST_FORGET", "ROBUST_QUANT", "check_options", "check_rows",
           "evaluate", "key", "load_holdout", "robustness_hooks", "suite_config"]
