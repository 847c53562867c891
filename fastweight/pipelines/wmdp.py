"""WMDP end to end as a library call: (fine-tune,) unlearn a forget corpus with RMU or any method, score MCQs.

    from fastweight.pipelines import wmdp
    results = wmdp.run(wmdp.WmdpConfig(method="rmu", output_dir="runs/wmdp"))
    print(results.table)

Without data options: a generated WMDP-format set (invented microbes to forget, invented islands to keep, easy
general knowledge); the base model is first fine-tuned on both corpora so it knows the invented facts. Real
benchmark: ``wmdp="cais/wmdp"``, ``mmlu="cais/mmlu"``, ``forget_corpus="cais/wmdp-corpora:cyber-forget-corpus"``,
``retain_corpus="wikitext:wikitext-2-raw-v1"`` (RMU's setting), answers scored with lm-eval's letter prompt.

Outputs (``output_dir``): ``results.json``, ``table.md``, ``status.json``, ``eval/<model>/WMDP_EVAL.json`` +
``WMDP_SUMMARY.json`` (+ ``FINGERPRINT.json``), ``log.jsonl``, ``training.png``, ``wmdp.png``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from fastweight.data.muse import TextChunkDataset
from fastweight.data.synth_wmdp import write_wmdp_folder
from fastweight.data.wmdp import WMDP_CONFIGS, WMDP_SUBJECTS, load_corpus, load_mcq, load_mmlu, load_wmdp
from fastweight.eval.plots import plot_mcq, plot_training
from fastweight.eval.wmdp import ANSWER_FORMATS, WmdpEvalConfig, evaluate_mcq_sets
from fastweight.pipelines import common as C
from fastweight.pipelines import robustness as RB
from fastweight.pipelines.config import build_parser, config_from_args, opt

BENCH = "wmdp"
NEEDS_QA = ("flat", "idkdpo")  # refusal-answer methods need questions; WMDP unlearns on raw text
# RMU on SmolLM2-135M: its layer-8 hidden states have norm ~140 (zephyr-7b's layer 7: ~6), so c scales up. The
# WMDP release trains mlp.down_proj only (fastweight's default); with it this 30-step demo leaves the forget
# accuracy where it was (0.625 -> 0.625, measured), so the demo also trains up_proj, as the previous default did.
EMBEDDED_RMU = {"layer": 8, "trainable_layers": [6, 7, 8], "steering_coef": 300.0, "alpha": 100.0,
                "param_keys": ["mlp.down_proj", "mlp.up_proj"]}
EMBEDDED_NOTE = ("embedded default: generated set ({n} invented microbes to forget, {n} invented islands to keep, "
                 "{g} general-knowledge items), base model fine-tuned on both corpora first, '{fmt}' answer format "
                 "-- a CPU-sized demonstration, not WMDP numbers")
TABLE_KEYS = ("wmdp_acc", "mmlu_acc", "mmlu_island_geography_acc", "mmlu_general_knowledge_acc")
GENERATED_FT_EPOCHS = 6


@dataclass
class WmdpConfig(C.BaseConfig):
    data: str | None = opt(None, "folder with wmdp.jsonl, mmlu.jsonl, forget_corpus.jsonl, retain_corpus.jsonl; "
                                 "default: generate one into --cache-dir (unless the four sources below are given)")
    wmdp: str | None = opt(None, "WMDP items: cais/wmdp (hub) or a local JSON-lines file / folder")
    wmdp_config: str = opt("wmdp-bio", f"WMDP config: {', '.join(WMDP_CONFIGS)}")
    mmlu: str | None = opt(None, "utility items: cais/mmlu (hub) or a local JSON-lines file / folder")
    mmlu_subject: str = opt("all", "MMLU config")
    forget_corpus: str | None = opt(None, "forget corpus: NAME:CONFIG on the hub or a .jsonl/.txt file")
    retain_corpus: str | None = opt(None, "retain corpus: NAME:CONFIG (wikitext:wikitext-2-raw-v1) or a file")
    max_docs: int | None = opt(None, "cap on documents per corpus")
    window: int = opt(128, "training window in tokens (RMU's code uses 512)")
    method: str = opt("rmu", "unlearning method (rmu is the WMDP reference; flat and idkdpo need QA pairs)",
                      choices=C.METHODS)
    answer_format: str | None = opt(None, f"MCQ scoring: {' / '.join(ANSWER_FORMATS)}; default letter (hub "
                                          "data, lm-eval's prompt) or choice (generated data)")
    lm_eval: bool = opt(False, "score through lm-eval's task machinery (pip install lm-eval)")
    lr: float = opt(5e-3, "unlearning learning rate (embedded RMU: 30 steps at 5e-3 reach the steering target)")
    batch_size: int = opt(2, "per-process micro-batch of windows")
    ft_epochs: int | None = opt(None, f"fine-tune on forget + retain corpora first (default {GENERATED_FT_EPOCHS} "
                                      "for generated data, 0 otherwise)")
    ft_batch_size: int = opt(2, "fine-tuning micro-batch")
    n_entities: int = opt(8, "generated data: microbes and islands")
    n_general: int = opt(12, "generated data: general-knowledge items")
    eval_batch_size: int = opt(16, "evaluation batch")
    eval_base: bool = opt(False, "also score the model before fine-tuning")
    _min_ft_epochs: ClassVar[int] = 0  # 0 = no fine-tuning
    output_dir: str = opt("runs/wmdp_unlearn", "results folder (must be empty or new unless --resume/--overwrite)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method in NEEDS_QA:
            raise ValueError(f"method {self.method!r} needs question/refusal pairs; WMDP unlearns on raw text")
        if self.answer_format is not None and self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}")
        if self.wmdp_config not in WMDP_CONFIGS:
            raise ValueError(f"wmdp_config must be one of {WMDP_CONFIGS}, got {self.wmdp_config!r}")
        hub = (self.wmdp, self.mmlu, self.forget_corpus, self.retain_corpus)
        if self.data is None and any(h is not None for h in hub) and not all(h is not None for h in hub):
            raise ValueError("give all of --wmdp, --mmlu, --forget-corpus, --retain-corpus (or none of them)")
        C._check_int("window", self.window, low=2)
        for name in ("n_entities", "n_general"):
            C._check_int(name, getattr(self, name), low=1)
        if self.max_docs is not None:
            C._check_int("max_docs", self.max_docs, low=1)


def _corpus(spec: str, max_docs: int | None) -> list[str]:
    if Path(spec).is_file():
        return load_corpus(spec, max_docs=max_docs)
    name, _, config = spec.partition(":")
    return load_corpus(name, config or None, max_docs=max_docs)


def load_sets(cfg: WmdpConfig):
    """(wmdp rows, mmlu rows, forget texts, retain texts, wmdp subject, generated?) for ``cfg``."""
    generated = cfg.data is None and cfg.wmdp is None
    if cfg.wmdp is not None:
        wmdp, mmlu = load_wmdp(cfg.wmdp, cfg.wmdp_config), load_mmlu(cfg.mmlu, cfg.mmlu_subject)
        forget, retain = _corpus(cfg.forget_corpus, cfg.max_docs), _corpus(cfg.retain_corpus, cfg.max_docs)
        return wmdp, mmlu, forget, retain, WMDP_SUBJECTS.get(cfg.wmdp_config), False
    folder = Path(cfg.data) if cfg.data else Path(cfg.cache_dir) / f"wmdp-s{cfg.seed}-n{cfg.n_entities}-g{cfg.n_general}"
    if generated and not (folder / "wmdp.jsonl").is_file():
        write_wmdp_folder(folder, cfg.seed, n_forget=cfg.n_entities, n_retain=cfg.n_entities, n_general=cfg.n_general)
    for name in ("wmdp.jsonl", "mmlu.jsonl", "forget_corpus.jsonl", "retain_corpus.jsonl"):
        if not (folder / name).is_file():
            raise ValueError(f"--data folder {str(folder)!r} has no {name}")
    wmdp, mmlu = load_mcq(folder / "wmdp.jsonl"), load_mcq(folder / "mmlu.jsonl")
    forget = load_corpus(folder / "forget_corpus.jsonl", max_docs=cfg.max_docs)
    retain = load_corpus(folder / "retain_corpus.jsonl", max_docs=cfg.max_docs)
    return wmdp, mmlu, forget, retain, ("microbiology" if generated else None), generated


def run(cfg: WmdpConfig) -> C.Results:
    """(Fine-tune,) unlearn and score; see the module docstring. Configuration errors are raised before a model
    is loaded."""
    t_start, commit = time.time(), C.git_commit()
    outdir = C.OutputDir.for_config(cfg, BENCH)
    outdir.check()
    C.check_model_spec(cfg.model)
    C.check_report_to(cfg.report_to)
    with C.main_first():  # the main process generates the data; the others read it
        wmdp, mmlu, forget_text, retain_text, subject, generated = load_sets(cfg)
    for name, rows in (("wmdp", wmdp), ("mmlu", mmlu), ("forget corpus", forget_text), ("retain corpus", retain_text)):
        if not rows:
            raise ValueError(f"the {name} set is empty")
    tuned = {"rmu": EMBEDDED_RMU} if cfg.model == C.EMBEDDED else {}
    method_args = C.resolve_method_args(cfg.method, cfg.method_args, tuned)
    C.check_before_loading(cfg, method_args)
    RB.check_supported(cfg, ("relearn", "quant4", "quant8"), "WMDP")
    fmt = cfg.answer_format or ("choice" if generated else "letter")
    ft_epochs = cfg.ft_epochs if cfg.ft_epochs is not None else (GENERATED_FT_EPOCHS if generated else 0)
    data_fp = C.data_fingerprint(wmdp, mmlu, forget_text, retain_text, subject)
    sets = {"wmdp": (wmdp, subject), "mmlu": (mmlu, None)}
    ecfg = WmdpEvalConfig(answer_format=fmt, batch_size=cfg.eval_batch_size, max_items=cfg.max_eval_items,
                          use_lm_eval=cfg.lm_eval)
    tc = C.unlearn_train_config(cfg, Path(cfg.output_dir), method_args,
                                trainable_layers=None if cfg.method == "rmu" else cfg.trainable_layers)
    out = outdir.open()
    reporter = C.Reporter(cfg.report_to, out, f"{BENCH}-{cfg.method}", tc.to_dict())
    note = None
    if cfg.model == C.EMBEDDED and generated:
        note = EMBEDDED_NOTE.format(n=cfg.n_entities, g=cfg.n_general, fmt=fmt)
        print("NOTE:", note)

    t0 = time.time()
    model, tokenizer = C.load_model(cfg.model, cfg.torch_dtype)
    print(f"loaded {cfg.model} in {time.time() - t0:.0f} s")
    model_fp = target_fp = C.model_fingerprint(cfg.model, cfg.torch_dtype)
    eval_key = {"data": data_fp, "eval": vars(ecfg)}
    columns: dict[str, dict[str, float]] = {}
    if cfg.eval_base:
        folder = outdir.keyed("eval/base", {**eval_key, "model": model_fp})
        with C.gathered_forwards(model):
            columns["base"] = evaluate_mcq_sets(model, tokenizer, sets, ecfg, output_dir=folder)
    if ft_epochs > 0:
        texts = forget_text[:cfg.ft_max_rows] + retain_text[:cfg.ft_max_rows]
        key = C.ft_key(cfg, model_fp, C.data_fingerprint(texts), window=cfg.window, epochs=ft_epochs)
        model = C.finetune_cached(model, tokenizer, TextChunkDataset(texts, tokenizer, cfg.window), cfg,
                                  Path(cfg.cache_dir) / f"wmdp-target-{C.fingerprint(key)}", key, "target",
                                  epochs=ft_epochs)
        target_fp = C.fingerprint(key)
    folder = outdir.keyed("eval/target", {**eval_key, "model": target_fp})
    t0 = time.time()
    with C.gathered_forwards(model):  # a ZeRO-3-partitioned model outside the engine; else a no-op
        columns["target (before)"] = evaluate_mcq_sets(model, tokenizer, sets, ecfg, output_dir=folder)
    print(f"[target] evaluated in {time.time() - t0:.0f} s")
    reporter.log(columns["target (before)"], 0, "eval/target")
    history, during, plots = [], [], []
    if not cfg.eval_only:
        unlearn_key = {"target": target_fp, "data": data_fp, "train": C.train_key(tc),
                       "window": cfg.window}
        outdir.prepare_training(unlearn_key)

        def evaluate_at(trained, step: int) -> dict[str, float]:  # the model train() is training
            f = outdir.keyed(f"eval/step-{step:06d}", {**eval_key, "unlearn": unlearn_key, "step": step})
            return evaluate_mcq_sets(trained, tokenizer, sets, ecfg, output_dir=f)

        t0 = time.time()
        res = C.train(model, TextChunkDataset(forget_text, tokenizer, cfg.window),
                      TextChunkDataset(retain_text, tokenizer, cfg.window), tc,
                      on_step=C.step_hook(reporter), eval_fn=C.eval_hook(reporter, evaluate_at, during))
        during = C.during_from_history(res.history, during)  # with the steps before a resume
        history = res.history
        print(f"[{cfg.method}] {res.global_step} steps in {time.time() - t0:.0f} s")
        folder = outdir.keyed("eval/unlearned", {**eval_key, "unlearn": unlearn_key})
        final = C.evaluable(res.model, tokenizer, cfg, out)
        with C.gathered_forwards(final):
            columns[f"{cfg.method} (after)"] = evaluate_mcq_sets(final, tokenizer, sets, ecfg, output_dir=folder)
        reporter.log(columns[f"{cfg.method} (after)"], res.global_step, "eval/unlearned")
        if history and C.is_main():
            plots.append(str(plot_training(history, out / "training.png",
                                           title=f"{cfg.method} on the WMDP forget corpus",
                                           loss_unit="activation MSE" if cfg.method == "rmu" else "nats")))
    robust_detail = None
    if cfg.robustness:  # relearning: the first half of the forget corpus; metrics: WMDP / MMLU accuracy
        attacked = "target (before)" if cfg.eval_only else f"{cfg.method} (after)"
        half = forget_text[:max(1, len(forget_text) // 2)]
        robust, robust_detail = RB.run_robustness(
            cfg, model if cfg.eval_only else res.model, out, train_fn=C.train,
            evaluate=lambda m, *_: evaluate_mcq_sets(m, tokenizer, sets, ecfg),
            relearn_eval=lambda m: evaluate_mcq_sets(m, tokenizer, sets, ecfg),
            relearn_set=TextChunkDataset(half, tokenizer, cfg.window))
        columns = RB.insert_after(columns, attacked, robust)
    keys = [k for k in TABLE_KEYS if any(k in c for c in columns.values())]
    chance = {k: 1.0 / _n_choices(wmdp if k.startswith("wmdp") else mmlu) for k in keys}
    if C.is_main():  # figures and the table: written by the main process only
        plots.append(str(plot_mcq(columns, keys, out / "wmdp.png", chance=chance)))
    reporter.finish()
    table = C.markdown_table(columns, TABLE_KEYS, header="accuracy", fmt=".3f")
    C.atomic_write(out / "table.md", table + "\n")
    results = C.Results(metrics=columns, table=table, output_dir=out, config=vars(cfg).copy(), history=history,
                        during=during, note=note, plots=plots,
                        provenance=C.provenance(cfg, commit, data=data_fp, model=model_fp, target=target_fp),
                        extra={"answer_format": fmt, "method_args": method_args, "ft_epochs": ft_epochs,
                               **({"robustness": robust_detail} if robust_detail else {})},
                        seconds=round(time.time() - t_start, 1))
    outdir.finish(results.to_dict(), keep=cfg.keep)
    return results


def _n_choices(rows) -> int:
    counts = [len(r["choices"]) for r in rows if r.get("choices")]
    return round(sum(counts) / len(counts)) if counts else 4


def parse_args(argv=None) -> WmdpConfig:
    parser = build_parser(WmdpConfig, __doc__)
    return config_from_args(parser, parser.parse_args(argv), WmdpConfig)


__all__ = ["EMBEDDED_RMU", "TABLE_KEYS", "WmdpConfig", "parse_args", "run"]
