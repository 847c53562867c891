"""TOFU end to end as a library call: fine-tune target and retain models, unlearn a forget split, evaluate, plot.

    from fastweight.pipelines import tofu
    results = tofu.run(tofu.TofuConfig(model="embedded", method="satimp", output_dir="runs/tofu"))
    print(results.table)

Defaults without ``data``: a generated TOFU-format set of fictitious authors sized for a 2-core CPU (max length
64, ROUGE from 24 generated tokens, the "phi" template) -- a demonstration, not TOFU numbers. With ``data``
(real TOFU, e.g. "locuslab/TOFU") the defaults are the papers': max length 512, greedy generation up to 200 new
tokens, and the TOFU prompt template of the model family (llama2 for Llama-2 names, phi for Phi names, else
the tokenizer's chat template). Every cut answer or capped generation is reported with counts.

Outputs (``output_dir``): ``results.json`` (metrics, config, versions, git commit, fingerprints), ``table.md``,
``status.json``, ``eval/<model>/TOFU_EVAL.json`` + ``TOFU_SUMMARY.json`` (+ ``FINGERPRINT.json``),
``log.jsonl``, ``training.png``, ``es.png``, ``fq_mu.png``; ``eval/step-N/`` with ``eval_every``.
open-unlearning's TOFU metrics (``metrics``: its default set, "all", or names) are added to every column and
kept in ``eval/<model>/open-unlearning/`` (``pipelines/tofu_suite.py``); ``robustness`` adds attack columns and
``robustness.png`` (``pipelines/robustness.py``).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fastweight._progress import progress

from fastweight.data.importance import ImportanceQADataset, load_importance_words
from fastweight.data.synth_tofu import write_tofu_folder
from fastweight.data.templates import TEMPLATE_NAMES
from fastweight.data.tofu import SPLITS, QADataset, answer_cut_tokens, answer_token_lengths, load_tofu, split_configs
from fastweight.eval.plots import plot_es, plot_fq_mu, plot_metrics, plot_training
from fastweight.eval.tofu import EVAL_SPLITS, TofuEvalConfig, evaluate_tofu, forget_truth_ratios, load_eval
from fastweight.eval import tofu_metrics as TM
from fastweight.pipelines import common as C
from fastweight.pipelines import tofu_suite as S
from fastweight.pipelines.config import build_parser, config_from_args, opt
from fastweight.pipelines.robustness import run_robustness

BENCH = "tofu"
# forget_coef 10: on memorised answers (p ~ 0.98) the forget gradient is ~10x smaller than the retain one
TUNED_METHOD_ARGS = {"*": {"forget_coef": 10.0, "retain_loss": "nll", "retain_coef": 1.0}}
DEMO = {"max_length": 64, "max_new_tokens": 24, "template": "phi"}
PAPER = {"max_length": 512, "max_new_tokens": 200}
TABLE_KEYS = ("forget_es", "retain_es", "forget_prob", "retain_prob", "forget_rouge", "retain_rouge",
              "forget_truth_ratio", "retain_truth_ratio", "real_authors_prob", "world_facts_prob", "model_utility",
              "forget_quality")
EMBEDDED_NOTE = ("embedded default: generated data subset ({n_authors} authors x {qpa} questions), phi prompt "
                 "template, max length {max_length}, only the last {layers} of the model's decoder layers trained, "
                 "ROUGE from at most {new} generated tokens -- a CPU-sized demonstration, not TOFU numbers")


@dataclass
class TofuConfig(C.BaseConfig):
    data: str | None = opt(None, "TOFU source: a hub dataset (locuslab/TOFU) or a local folder of <config>.json "
                                 "JSON-lines files; default: generate fictitious authors into --cache-dir. With "
                                 "--data the defaults are the papers' (max length 512, 200 new tokens)")
    split: str = opt("forget10", f"forget split: {', '.join(SPLITS)}")
    template: str | None = opt(None, f"prompt template ({', '.join(TEMPLATE_NAMES)}); default: phi for generated "
                                     "data, else the model family's TOFU template")
    max_length: int | None = opt(None, "max tokens per QA pair; default 64 (generated data) / 512 (--data)")
    max_new_tokens: int | None = opt(None, "greedy generation length for ROUGE; default 24 / 200 (--data)")
    retain_model: str | None = opt(None, "model fine-tuned on the retain split (Forget Quality reference); "
                                         "default: fine-tune one (with --finetuned: none)")
    ft_lr: float = opt(5e-4, "fine-tuning learning rate")
    ft_batch_size: int = opt(8, "fine-tuning micro-batch")
    n_authors: int = opt(8, "generated data: authors (TOFU has 200)")
    questions_per_author: int = opt(4, "generated data: questions per author (TOFU has 20)")
    n_general: int = opt(6, "generated data: real-author and world-fact items")
    eval_batch_size: int = opt(16, "evaluation batch")
    mixed_precision: C.MixedPrecision = opt("bf16", "mixed precision of fine-tuning and evaluation")
    unlearn_mixed_precision: C.MixedPrecision = opt("no", "mixed precision of unlearning (the demo was tuned "
                                                          "in fp32)")
    metrics: str = opt("default", "open-unlearning TOFU metrics to report: 'default' (its configs/eval/tofu.yaml "
                                  "set), 'all', or comma-separated names (docs/pipelines.md)")
    question_key: str = opt("question", "question field of the forget and retain sets: question or "
                                        "paraphrased_question (open-unlearning's question_key)")
    truth_ratio_agg: str | None = opt(None, "truth-ratio aggregation for every truth ratio: closer_to_1_better, "
                                            "true_better, prob_mean; default: open-unlearning's per metric")
    retain_logs: str | None = opt(None, "open-unlearning TOFU_EVAL.json of a retain model (forget_truth_ratio, "
                                        "mia_min_k) for Forget Quality and PrivLeak; default: the retain model's")
    holdout_split: str | None = opt(None, "holdout split for the MIAs and PrivLeak (holdout01/05/10); default: the "
                                          "forget split's size")
    g_effect_every: int = opt(0, "record the G-effect on forget/retain probes every N unlearning steps (0 = off)")
    g_effect_probe_size: int = opt(8, "items per G-effect probe batch")
    output_dir: str = opt("runs/tofu_unlearn", "results folder (must be empty or new unless --resume/--overwrite)")
    importance: str | None = opt(None, "SatImp token-importance file of the forget split (its released "
                                       "data/importance_<split>.pth format, your copy): forget batches carry "
                                       "token_weights (needed by the *_imp methods; weights every token-level one)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.importance is not None and not os.path.isfile(self.importance):
            raise ValueError(f"importance file {self.importance!r} does not exist")
        if isinstance(self.method, str) and self.method.endswith("_imp") and self.importance is None:
            raise ValueError(f"method {self.method!r} needs --importance FILE (SatImp's importance annotations of "
                             f"the forget split)")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise ValueError(f"template must be one of {TEMPLATE_NAMES}, got {self.template!r}")
        for name in ("max_length", "max_new_tokens"):
            if getattr(self, name) is not None:
                C._check_int(name, getattr(self, name), low=4 if name == "max_length" else 1)
        for name in ("n_authors", "questions_per_author", "g_effect_probe_size"):
            C._check_int(name, getattr(self, name), low=1)
        C._check_int("n_general", self.n_general, low=1)
        C._check_int("g_effect_every", self.g_effect_every, low=0)
        S.check_options(self)
        if self.retain_model is not None and not self.retain_model:
            raise ValueError("retain_model must be a non-empty string or None")


def family_template(model: str, tokenizer=None) -> str:
    """The TOFU prompt template of a model family: llama2 for Llama-2 names, phi for Phi names, else the
    tokenizer's chat template ("chat") when it has one, else "phi" (plain question/answer)."""
    name = model.lower().replace("_", "-")
    if "llama-2" in name or "llama2" in name:
        return "llama2"
    if "phi" in name.split("/")[-1]:
        return "phi"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "chat"
    return "phi"


def resolved_lengths(cfg: TofuConfig) -> tuple[int, int]:
    """(max_length, max_new_tokens): given values, else the demo's (generated data) or the papers' (--data)."""
    d = DEMO if cfg.data is None else PAPER
    return (cfg.max_length or d["max_length"], cfg.max_new_tokens or d["max_new_tokens"])


def report_truncation(tokenizer, template: str, sets: dict[str, list[dict]], max_length: int, max_new_tokens: int,
                      ) -> dict[str, dict[str, int]]:
    """Warn, with counts, when ``max_length`` cuts answers of a set or ``max_new_tokens`` is shorter than
    reference answers (ROUGE recall of a perfect generation is then capped). Returns the counts per set."""
    report = {}
    for name, rows in sets.items():
        if not rows:
            continue
        cut = [n for n in answer_cut_tokens(tokenizer, template, rows, max_length) if n > 0]
        gen_lengths = answer_token_lengths(tokenizer, template, rows)
        long = [n for n in gen_lengths if n > max_new_tokens]
        report[name] = {"rows": len(rows), "cut_by_max_length": len(cut), "max_cut_tokens": max(cut, default=0),
                        "longer_than_max_new_tokens": len(long), "longest_answer_tokens": max(gen_lengths)}
        if cut:
            C.warn(f"max_length {max_length} cuts {len(cut)} of {len(rows)} {name} answers (by up to {max(cut)} "
                   f"tokens, {sum(cut)} in all); raise --max-length")
        if long:
            C.warn(f"max_new_tokens {max_new_tokens} is shorter than {len(long)} of {len(rows)} {name} answers "
                   f"(longest {max(gen_lengths)} tokens): their ROUGE-L recall is capped; raise --max-new-tokens")
    return report


def _data_source(cfg: TofuConfig) -> str:
    if cfg.data is not None:
        return cfg.data
    folder = Path(cfg.cache_dir) / f"data-s{cfg.seed}-a{cfg.n_authors}-q{cfg.questions_per_author}-g{cfg.n_general}"
    if not (folder / "full.json").is_file():
        write_tofu_folder(folder, cfg.seed, n_authors=cfg.n_authors, questions_per_author=cfg.questions_per_author,
                          n_general=cfg.n_general)
    return str(folder)


def _evaluate(model, tokenizer, sets, ecfg, folder: Path, retain_tr, label: str) -> dict[str, float]:
    """``evaluate_tofu`` split by split under a progress bar (a line every 30 s off a terminal)."""
    splits = [s for s in EVAL_SPLITS if sets.get(s)]
    summary: dict[str, float] = {}
    with C.gathered_forwards(model):  # a ZeRO-3-partitioned model outside the engine; else a no-op
        for split in progress(splits, desc=f"TOFU eval {label}", unit="split", disable=not C.is_main()):
            summary = evaluate_tofu(model, tokenizer, sets, ecfg, output_dir=folder, retain_tr=retain_tr,
                                    splits=[split])
    C.barrier()  # the main process's files are complete before any process reads them (load_eval)
    return summary


def run(cfg: TofuConfig) -> C.Results:
    """Fine-tune (unless ``finetuned``), unlearn and evaluate; see the module docstring. Every configuration
    error (method and options, data rows, model path, output folder) is raised before a model is loaded."""
    t_start, commit = time.time(), C.git_commit()
    # ---- everything that can be checked without a model ------------------------------------------------
    outdir = C.OutputDir.for_config(cfg, BENCH)
    outdir.check()
    C.check_model_spec(cfg.model)
    C.check_report_to(cfg.report_to)
    if cfg.retain_model is not None:
        C.check_model_spec(cfg.retain_model, "retain_model")
    method_args = C.resolve_method_args(cfg.method, cfg.method_args, TUNED_METHOD_ARGS)
    C.check_before_loading(cfg, method_args)
    with C.main_first():  # the main process generates the data; the others read it
        data = _data_source(cfg)
    names = split_configs(cfg.split)
    rows = {k: load_tofu(data, names[k]) for k in ("forget", "retain")}
    sets = {s: load_tofu(data, names[f"{s}_eval"]) for s in EVAL_SPLITS}
    for name, r in {**rows, "forget eval": sets["forget"], "retain eval": sets["retain"]}.items():
        if not r:
            raise ValueError(f"the {name} set of --data {data!r} (split {cfg.split}) is empty")
    S.check_rows(cfg, sets)
    holdout = S.load_holdout(cfg, data, cfg.split)
    retain_logs = TM.load_retain_logs(cfg.retain_logs) if cfg.retain_logs else None
    scfg = S.suite_config(cfg)
    need_target_ft = not cfg.finetuned
    need_retain_ft = cfg.retain_model is None and not cfg.finetuned
    full = load_tofu(data, "full")[:cfg.ft_max_rows] if need_target_ft else []
    data_fp = C.data_fingerprint(rows, sets)
    max_length, max_new_tokens = resolved_lengths(cfg)
    ecfg = TofuEvalConfig(template="phi", batch_size=cfg.eval_batch_size, max_length=max_length,
                          max_new_tokens=max_new_tokens, max_items=cfg.max_eval_items,
                          autocast=cfg.mixed_precision)
    tc_probe = C.unlearn_train_config(cfg, Path(cfg.output_dir), method_args,
                                      mixed_precision=cfg.unlearn_mixed_precision,
                                      g_effect_every=cfg.g_effect_every, g_effect_probe_size=cfg.g_effect_probe_size)
    out = outdir.open()
    reporter = C.Reporter(cfg.report_to, out, f"{BENCH}-{cfg.method}", tc_probe.to_dict())

    # ---- models ----------------------------------------------------------------------------------------
    t0 = time.time()
    base, tokenizer = C.load_model(cfg.model, cfg.torch_dtype)
    print(f"loaded {cfg.model} in {time.time() - t0:.0f} s")
    template = cfg.template or (DEMO["template"] if cfg.data is None else family_template(cfg.model, tokenizer))
    ecfg.template = template
    note = None
    if cfg.model == C.EMBEDDED and cfg.data is None:
        note = EMBEDDED_NOTE.format(n_authors=cfg.n_authors, qpa=cfg.questions_per_author, max_length=max_length,
                                    layers=cfg.trainable_layers or "all", new=max_new_tokens)
        print("NOTE:", note)
    truncation = report_truncation(tokenizer, template, {cfg.split: rows["forget"], "retain": rows["retain"],
                                                         f"{cfg.split} eval": sets["forget"]},
                                   max_length, max_new_tokens)
    model_fp = C.model_fingerprint(cfg.model, cfg.torch_dtype)
    common_key = {"template": template, "max_length": max_length}
    if need_target_ft:
        key = C.ft_key(cfg, model_fp, C.data_fingerprint(full), **common_key)
        target = C.finetune_cached(base, tokenizer, QADataset(full, tokenizer, template, max_length), cfg,
                                   Path(cfg.cache_dir) / f"target-{C.fingerprint(key)}", key, "target")
        target_fp = C.fingerprint(key)
    else:
        target, target_fp = base, model_fp
    eval_key = {"data": data_fp, "eval": vars(ecfg), "suite": S.key(cfg, holdout, retain_logs)}
    columns: dict[str, dict[str, float]] = {}
    retain_tr = None
    if cfg.retain_model is not None or need_retain_ft:
        if cfg.retain_model is not None:
            retain, _ = C.load_model(cfg.retain_model, cfg.torch_dtype)
            retain_fp = C.model_fingerprint(cfg.retain_model, cfg.torch_dtype)
        else:
            retain_rows = rows["retain"][:cfg.ft_max_rows]
            key = C.ft_key(cfg, model_fp, C.data_fingerprint(retain_rows), **common_key)
            retain = C.finetune_cached(base, tokenizer, QADataset(retain_rows, tokenizer, template, max_length), cfg,
                                       Path(cfg.cache_dir) / f"retain-{cfg.split}-{C.fingerprint(key)}", key,
                                       "retain")
            retain_fp = C.fingerprint(key)
        folder = outdir.keyed("eval/retain", {**eval_key, "model": retain_fp})
        columns["retain model"] = _evaluate(retain, tokenizer, sets, ecfg, folder, None, "retain")
        retain_tr = forget_truth_ratios(load_eval(folder))
        reference = retain if "mia_reference" in scfg.metrics else None
        columns["retain model"].update(S.evaluate(
            retain, tokenizer, sets, holdout, ecfg, scfg, folder, retain_logs=retain_logs, reference=reference,
            also=["forget_truth_ratio"] + (["mia_min_k"] if holdout else [])))
        if retain_logs is None:
            retain_logs = TM.load_retain_logs(folder / "open-unlearning" / "TOFU_EVAL.json")
        del retain
    else:
        reference = None
    del base
    folder = outdir.keyed("eval/target", {**eval_key, "model": target_fp, "retain": retain_tr is not None})
    columns = {"target (before)": _evaluate(target, tokenizer, sets, ecfg, folder, retain_tr, "target"), **columns}
    columns["target (before)"].update(S.evaluate(target, tokenizer, sets, holdout, ecfg, scfg, folder,
                                                 retain_logs=retain_logs, reference=reference))
    reporter.log(columns["target (before)"], 0, "eval/target")

    history, g_effect, during, plots = [], None, [], []
    if not cfg.eval_only:
        forget_ds = QADataset(rows["forget"], tokenizer, template, max_length)
        importance_fp = None
        if cfg.importance is not None:
            forget_ds = ImportanceQADataset(rows["forget"], tokenizer, template, max_length,
                                            words=load_importance_words(cfg.importance, len(rows["forget"])))
            importance_fp = hashlib.sha256(Path(cfg.importance).read_bytes()).hexdigest()
        retain_ds = QADataset(rows["retain"], tokenizer, template, max_length)
        unlearn_key = {"target": target_fp, "data": data_fp, "train": C.train_key(tc_probe),
                       "template": template, "max_length": max_length}
        if importance_fp is not None:  # only then, so earlier runs' keys are unchanged
            unlearn_key["importance"] = importance_fp
        outdir.prepare_training(unlearn_key)

        def evaluate_at(trained, step: int) -> dict[str, float]:  # the model train() is training
            f = outdir.keyed(f"eval/step-{step:06d}", {**eval_key, "unlearn": unlearn_key, "step": step})
            return _evaluate(trained, tokenizer, sets, ecfg, f, retain_tr, f"step {step}")

        t0 = time.time()
        res = C.train(target, forget_ds, retain_ds, tc_probe,
                      on_step=C.step_hook(reporter), eval_fn=C.eval_hook(reporter, evaluate_at, during))
        during = C.during_from_history(res.history, during)  # with the steps before a resume
        history, g_effect = res.history, res.g_effect
        print(f"[{cfg.method}] {res.global_step} steps in {time.time() - t0:.0f} s")
        folder = outdir.keyed("eval/unlearned", {**eval_key, "unlearn": unlearn_key, "retain": retain_tr is not None})
        evaluated = C.evaluable(res.model, tokenizer, cfg, out)  # ZeRO-3: a partitioned copy of the final weights
        after = _evaluate(evaluated, tokenizer, sets, ecfg, folder, retain_tr, cfg.method)
        after.update(S.evaluate(evaluated, tokenizer, sets, holdout, ecfg, scfg, folder, retain_logs=retain_logs,
                                reference=reference))
        reporter.log(after, res.global_step, "eval/unlearned")
        columns = {"target (before)": columns.pop("target (before)"), f"{cfg.method} (after)": after, **columns}
        if history and C.is_main():
            plots.append(str(plot_training(history, out / "training.png", title=f"{cfg.method} on TOFU {cfg.split}")))
    attacked = res.model if not cfg.eval_only else target
    robust = {}
    if cfg.robustness:
        hooks = S.robustness_hooks(cfg, tokenizer, sets, holdout, ecfg, rows["forget"], template, max_length,
                                   retain_logs)
        robust, robust_detail = run_robustness(cfg, attacked, out, train_fn=C.train, **hooks)
        attacked_name = f"{cfg.method} (after)" if not cfg.eval_only else "target (before)"
        order = list(columns)
        cut = order.index(attacked_name) + 1
        columns = {**{k: columns[k] for k in order[:cut]}, **robust, **{k: columns[k] for k in order[cut:]}}
    if C.is_main():  # figures and the table: written by the main process only
        if cfg.robustness:
            shown = {k: v for k, v in columns.items() if k in ("target (before)", attacked_name) or k in robust}
            plots.append(str(plot_metrics(shown, [k for k in S.ROBUST_QUANT if any(k in v for v in shown.values())],
                                          out / "robustness.png", title=f"TOFU {cfg.split}: {cfg.method} under "
                                          "attack (relearn@N: held-out half of the forget split)",
                                          ylabel="score (unitless, 0-1)")))
        plots.append(str(plot_es({k: {"forget": v["forget_es"], "retain": v["retain_es"]} for k, v in columns.items()
                                  if "forget_es" in v and "retain_es" in v}, out / "es.png")))
        if any("forget_quality" in v for v in columns.values()):  # the retain model has none: a reference line
            plots.append(str(plot_fq_mu({k: (v["model_utility"], v.get("forget_quality"))
                                         for k, v in columns.items() if "model_utility" in v and k not in robust},
                                        out / "fq_mu.png")))
    reporter.finish()
    table = C.markdown_table(columns, TABLE_KEYS + tuple(m for m in scfg.metrics if m not in TABLE_KEYS))
    C.atomic_write(out / "table.md", table + "\n")
    results = C.Results(metrics=columns, table=table, output_dir=out, config=vars(cfg).copy(), history=history,
                        during=during, g_effect=g_effect, note=note, plots=plots,
                        provenance=C.provenance(cfg, commit, data=data_fp, model=model_fp, target=target_fp),
                        extra={"template": template, "max_length": max_length, "max_new_tokens": max_new_tokens,
                               "method_args": method_args, "truncation": truncation,
                               "open_unlearning": {"commit": TM.OU_COMMIT, "metrics": list(scfg.metrics),
                                                   "question_key": cfg.question_key,
                                                   "retain_logs": cfg.retain_logs or "the retain model's"},
                               **({"robustness": robust_detail} if cfg.robustness else {})},
                        seconds=round(time.time() - t_start, 1))
    outdir.finish(results.to_dict(), keep=cfg.keep)
    return results


def parse_args(argv=None) -> TofuConfig:
    parser = build_parser(TofuConfig, __doc__)
    return config_from_args(parser, parser.parse_args(argv), TofuConfig)


__all__ = ["TABLE_KEYS", "TUNED_METHOD_ARGS", "TofuConfig", "family_template", "parse_args", "report_truncation",
           "resolved_lengths", "run"]
