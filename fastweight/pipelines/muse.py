"""MUSE end to end as a library call: fine-tune target and retrained models, unlearn the forget corpus, evaluate.

    from fastweight.pipelines import muse
    results = muse.run(muse.MuseConfig(method="npo", output_dir="runs/muse"))
    print(results.table)

The target model is the base model fine-tuned on forget + retain text, the retrained model (the reference of
PrivLeak) the base model fine-tuned on retain text only. Without ``data``: a generated MUSE-format corpus of
invented local news, 128-token windows -- a CPU-sized demonstration, not MUSE numbers. With ``data`` (``news``,
``books``, a hub name or a local MUSE-layout folder): MUSE's 2048-token windows.

Outputs (``output_dir``): ``results.json``, ``table.md``, ``status.json``, ``eval/<model>/MUSE_EVAL.json`` +
``MUSE_SUMMARY.json`` (+ ``FINGERPRINT.json``), ``log.jsonl``, ``training.png``, ``muse.png``.

``mia_attacks`` (e.g. ``"loss,zlib,min_k,min_k_plus_plus"``) adds membership-inference AUCs
(``fastweight.eval.attacks.run_attacks``) on the PrivLeak forget texts (members) vs the holdout texts
(non-members) to every column, as ``mia_<attack>`` (open-unlearning's orientation: 1 = the forget texts still
look seen, 0.5 = indistinguishable); per-text scores go to ``eval/<model>/MUSE_MIA.json``. The ``reference``
attack uses the retrained model as its reference (MUSE's choice).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fastweight.data.muse import DEFAULT_WINDOW, MUSE_HUB, TextChunkDataset, load_muse
from fastweight.data.synth_muse import write_muse_folder
from fastweight.eval.attacks import ATTACKS, AttackConfig, encode_texts, run_attacks
from fastweight.eval.muse import MuseEvalConfig, evaluate_muse
from fastweight.eval.plots import plot_muse, plot_training
from fastweight.pipelines import common as C
from fastweight.pipelines import robustness as RB
from fastweight.pipelines.config import build_parser, config_from_args, opt

BENCH = "muse"
EMBEDDED_WINDOW = 128  # the generated articles are ~90 tokens; 2048-token windows would give one step per epoch
NEEDS_QA = ("flat", "idkdpo")  # refusal-answer methods need questions; MUSE trains on raw text
TUNED_METHOD_ARGS = {"*": {"retain_loss": "nll", "retain_coef": 1.0}}
EMBEDDED_NOTE = ("embedded default: generated news corpus ({n} forget / {n} retain / {n} holdout articles), "
                 "{window}-token windows, only the last {layers} decoder layers trained, VerbMem from {verb} "
                 "generated tokens -- a CPU-sized demonstration, not MUSE numbers")
TABLE_KEYS = ("forget_verbmem", "forget_knowmem", "retain_knowmem", "privleak_auc", "privleak")


@dataclass
class MuseConfig(C.BaseConfig):
    data: str | None = opt(None, f"MUSE source: {' / '.join(MUSE_HUB)} (hub), a hub dataset name, or a local "
                                 "folder in MUSE layout; default: generate a news corpus into --cache-dir")
    retain_split: str = opt("retain1", "raw retain split: retain1 or retain2")
    window: int | None = opt(None, f"training window in tokens (default {DEFAULT_WINDOW}; {EMBEDDED_WINDOW} for "
                                   "generated data)")
    retrain_model: str | None = opt(None, "model trained without the forget corpus (PrivLeak reference); default: "
                                          "fine-tune one on the retain text (with --finetuned: none)")
    # embedded demo: 20 SatImp steps at 5e-4 halve forget VerbMem (5e-5 x 10 steps barely moved)
    lr: float = opt(5e-4, "unlearning learning rate")
    batch_size: int = opt(2, "per-process micro-batch of windows")
    ft_epochs: int = opt(6, "fine-tuning epochs")
    ft_batch_size: int = opt(2, "fine-tuning micro-batch")
    n_articles: int = opt(4, "generated data: articles per forget / holdout set (retain: twice as many)")
    verbmem_max_new_tokens: int | None = opt(None, "VerbMem generation length; default 64 (generated data) / "
                                                   "128 (--data, MUSE's setting)")
    knowmem_max_new_tokens: int | None = opt(None, "KnowMem generation length; default 16 (generated data) / "
                                                   "32 (--data, MUSE's setting)")
    output_dir: str = opt("runs/muse_unlearn", "results folder (must be empty or new unless --resume/--overwrite)")
    mia_attacks: str | None = opt(None, "comma-separated membership-inference attacks on the PrivLeak forget vs "
                                        f"holdout texts, from {','.join(ATTACKS)} (reference: against the retrained "
                                        "model); adds mia_<attack> AUCs (1 = forget still looks seen); default: "
                                        "none beyond MUSE's PrivLeak")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method in NEEDS_QA:
            raise ValueError(f"method {self.method!r} needs question/refusal pairs; MUSE trains on raw text")
        if self.retain_split not in ("retain1", "retain2"):
            raise ValueError(f"retain_split must be 'retain1' or 'retain2', got {self.retain_split!r}")
        if self.window is not None:
            C._check_int("window", self.window, low=2)
        C._check_int("n_articles", self.n_articles, low=1)
        for name in ("verbmem_max_new_tokens", "knowmem_max_new_tokens"):
            if getattr(self, name) is not None:
                C._check_int(name, getattr(self, name), low=1)
        if self.mia_attacks is not None:
            names = self.mia_attacks.split(",") if isinstance(self.mia_attacks, str) else [None]
            names = [n.strip() if isinstance(n, str) else n for n in names]
            bad = [n for n in names if n not in ATTACKS]
            if bad or len(set(names)) != len(names):
                raise ValueError(f"mia_attacks must be comma-separated distinct names from {list(ATTACKS)}, got "
                                 f"{self.mia_attacks!r}")
            if "reference" in names and self.finetuned and self.retrain_model is None:
                raise ValueError("mia_attacks 'reference' needs the retrained model: pass --retrain-model (with "
                                 "--finetuned no retrained model is fine-tuned)")
            self.mia_attacks = ",".join(names)

    @property
    def attacks(self) -> tuple[str, ...]:
        """The ``mia_attacks`` names (empty when none)."""
        return tuple(self.mia_attacks.split(",")) if self.mia_attacks else ()


def generation_lengths(cfg: MuseConfig) -> tuple[int, int]:
    """(VerbMem, KnowMem) max new tokens: given values, else the demo's (generated data) or MUSE's (--data)."""
    verb, know = (64, 16) if cfg.data is None else (128, 32)
    return cfg.verbmem_max_new_tokens or verb, cfg.knowmem_max_new_tokens or know


def _data_source(cfg: MuseConfig) -> str:
    if cfg.data is not None:
        return cfg.data
    folder = Path(cfg.cache_dir) / f"muse-s{cfg.seed}-n{cfg.n_articles}"
    if not (folder / "raw" / "forget.jsonl").is_file():
        write_muse_folder(folder, cfg.seed, n_forget=cfg.n_articles, n_retain=2 * cfg.n_articles,
                          n_holdout=cfg.n_articles)
    return str(folder)


def membership_attacks(model, tokenizer, data, cfg: MuseConfig, ecfg: MuseEvalConfig, folder: Path,
                       reference=None, reference_fp: str | None = None) -> dict[str, float]:
    """``{"mia_<attack>": AUC}`` of ``cfg.attacks`` on the PrivLeak forget (members) vs holdout texts, the
    per-text scores in ``folder/MUSE_MIA.json`` (reused when written for the same attacks, texts and reference).
    Without ``reference`` the ``reference`` attack is left out (the retrained model's own column)."""
    attacks = [a for a in cfg.attacks if a != "reference" or reference is not None]
    if not attacks:
        return {}
    cap = ecfg.max_items
    forget, holdout = list(data.privleak_forget[:cap]), list(data.privleak_holdout[:cap])
    acfg = AttackConfig(k=ecfg.mink_k, batch_size=ecfg.batch_size)
    key = C.fingerprint(attacks, forget, holdout, vars(acfg), ecfg.privleak_max_length,
                        reference_fp if "reference" in attacks else None)
    path = folder / "MUSE_MIA.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == key:
            return {k: v["agg_value"] for k, v in saved["results"].items()}
    import torch

    with torch.enable_grad():  # gradnorm needs gradients, also when train() evaluates under no_grad
        res = run_attacks(model, encode_texts(tokenizer, forget, max_length=ecfg.privleak_max_length),
                          encode_texts(tokenizer, holdout, max_length=ecfg.privleak_max_length), attacks,
                          tokenizer=tokenizer, reference_model=reference, config=acfg)
    C.atomic_write(path, json.dumps({"fingerprint": key, "attacks": attacks, "results": res}, default=str))
    return {k: v["agg_value"] for k, v in res.items()}


def run(cfg: MuseConfig) -> C.Results:
    """Fine-tune (unless ``finetuned``), unlearn and evaluate; see the module docstring. Configuration errors
    are raised before a model is loaded."""
    t_start, commit = time.time(), C.git_commit()
    outdir = C.OutputDir.for_config(cfg, BENCH)
    outdir.check()
    C.check_model_spec(cfg.model)
    C.check_report_to(cfg.report_to)
    if cfg.retrain_model is not None:
        C.check_model_spec(cfg.retrain_model, "retrain_model")
    method_args = C.resolve_method_args(cfg.method, cfg.method_args, TUNED_METHOD_ARGS)
    C.check_before_loading(cfg, method_args)
    RB.check_supported(cfg, ("relearn", "quant4", "quant8"), "MUSE")
    with C.main_first():  # the main process generates the data; the others read it
        data_src = _data_source(cfg)
    data = load_muse(data_src, retain_split=cfg.retain_split)
    for name in ("forget_text", "retain_text"):
        if not getattr(data, name):
            raise ValueError(f"--data {data_src!r}: the {name.replace('_text', '')} corpus is empty")
    window = cfg.window or (EMBEDDED_WINDOW if cfg.data is None else DEFAULT_WINDOW)
    data_fp = C.data_fingerprint({k: v for k, v in vars(data).items() if k != "source"})
    verb_new, know_new = generation_lengths(cfg)
    ecfg = MuseEvalConfig(batch_size=cfg.eval_batch_size, verbmem_max_new_tokens=verb_new,
                          knowmem_max_new_tokens=know_new, max_items=cfg.max_eval_items)
    tc = C.unlearn_train_config(cfg, Path(cfg.output_dir), method_args,
                                trainable_layers=None if cfg.method == "rmu" else cfg.trainable_layers)
    out = outdir.open()
    reporter = C.Reporter(cfg.report_to, out, f"{BENCH}-{cfg.method}", tc.to_dict())
    note = None
    if cfg.model == C.EMBEDDED and cfg.data is None:
        note = EMBEDDED_NOTE.format(n=cfg.n_articles, window=window, layers=cfg.trainable_layers or "all",
                                    verb=verb_new)
        print("NOTE:", note)

    t0 = time.time()
    base, tokenizer = C.load_model(cfg.model, cfg.torch_dtype)
    print(f"loaded {cfg.model} in {time.time() - t0:.0f} s")
    model_fp = C.model_fingerprint(cfg.model, cfg.torch_dtype)
    eval_key = {"data": data_fp, "eval": vars(ecfg)}
    columns: dict[str, dict[str, float]] = {}
    retrain_auc = reference = retrain_fp = None
    cap = cfg.ft_max_rows
    if cfg.retrain_model is not None or not cfg.finetuned:
        if cfg.retrain_model is not None:
            retrained, _ = C.load_model(cfg.retrain_model, cfg.torch_dtype)
            retrain_fp = C.model_fingerprint(cfg.retrain_model, cfg.torch_dtype)
        else:
            texts = data.retain_text[:cap]
            key = C.ft_key(cfg, model_fp, C.data_fingerprint(texts), window=window)
            retrained = C.finetune_cached(base, tokenizer, TextChunkDataset(texts, tokenizer, window), cfg,
                                          Path(cfg.cache_dir) / f"muse-retrain-{C.fingerprint(key)}", key, "retrain")
            retrain_fp = C.fingerprint(key)
        folder = outdir.keyed("eval/retrained", {**eval_key, "model": retrain_fp})
        with C.gathered_forwards(retrained, whole="gradnorm" in cfg.attacks):
            columns["retrained"] = evaluate_muse(retrained, tokenizer, data, ecfg, output_dir=folder) | \
                membership_attacks(retrained, tokenizer, data, cfg, ecfg, folder)
        retrain_auc = columns["retrained"]["privleak_auc"]
        reference = retrained if "reference" in cfg.attacks else None
        del retrained
    if cfg.finetuned:
        target, target_fp = base, model_fp
    else:
        texts = data.forget_text[:cap] + data.retain_text[:cap]
        key = C.ft_key(cfg, model_fp, C.data_fingerprint(texts), window=window)
        target = C.finetune_cached(base, tokenizer, TextChunkDataset(texts, tokenizer, window), cfg,
                                   Path(cfg.cache_dir) / f"muse-target-{C.fingerprint(key)}", key, "target")
        target_fp = C.fingerprint(key)
    del base
    folder = outdir.keyed("eval/target", {**eval_key, "model": target_fp, "retrain_auc": retrain_auc})
    mia = dict(cfg=cfg, ecfg=ecfg, reference=reference, reference_fp=retrain_fp)
    with C.gathered_forwards(target, whole="gradnorm" in cfg.attacks):
        columns = {"target (before)": evaluate_muse(target, tokenizer, data, ecfg, output_dir=folder,
                                                    retrain_auc=retrain_auc) |
                   membership_attacks(target, tokenizer, data, folder=folder, **mia), **columns}
    reporter.log(columns["target (before)"], 0, "eval/target")
    history, during, plots = [], [], []
    if not cfg.eval_only:
        unlearn_key = {"target": target_fp, "data": data_fp, "train": C.train_key(tc),
                       "window": window}
        outdir.prepare_training(unlearn_key)

        def evaluate_at(trained, step: int) -> dict[str, float]:  # the model train() is training
            f = outdir.keyed(f"eval/step-{step:06d}", {**eval_key, "unlearn": unlearn_key, "step": step})
            return evaluate_muse(trained, tokenizer, data, ecfg, output_dir=f, retrain_auc=retrain_auc) | \
                membership_attacks(trained, tokenizer, data, folder=f, **mia)

        t0 = time.time()
        res = C.train(target, TextChunkDataset(data.forget_text, tokenizer, window),
                      TextChunkDataset(data.retain_text, tokenizer, window), tc,
                      on_step=C.step_hook(reporter), eval_fn=C.eval_hook(reporter, evaluate_at, during))
        during = C.during_from_history(res.history, during)  # with the steps before a resume
        history = res.history
        print(f"[{cfg.method}] {res.global_step} steps in {time.time() - t0:.0f} s")
        folder = outdir.keyed("eval/unlearned", {**eval_key, "unlearn": unlearn_key, "retrain_auc": retrain_auc})
        final = C.evaluable(res.model, tokenizer, cfg, out)
        with C.gathered_forwards(final, whole="gradnorm" in cfg.attacks):
            after = evaluate_muse(final, tokenizer, data, ecfg, output_dir=folder, retrain_auc=retrain_auc) | \
                membership_attacks(final, tokenizer, data, folder=folder, **mia)
        reporter.log(after, res.global_step, "eval/unlearned")
        columns = {"target (before)": columns.pop("target (before)"), f"{cfg.method} (after)": after, **columns}
        if history and C.is_main():
            plots.append(str(plot_training(history, out / "training.png", title=f"{cfg.method} on MUSE forget")))
    robust_detail = None
    if cfg.robustness:  # relearning: the first half of the forget documents; metrics: MUSE's forget/retain sets
        def _eval(m, *_):
            return evaluate_muse(m, tokenizer, data, ecfg, retrain_auc=retrain_auc)

        attacked = "target (before)" if cfg.eval_only else f"{cfg.method} (after)"
        half = data.forget_text[:max(1, len(data.forget_text) // 2)]
        robust, robust_detail = RB.run_robustness(
            cfg, target if cfg.eval_only else res.model, out, evaluate=_eval, relearn_eval=_eval,
            relearn_set=TextChunkDataset(half, tokenizer, window), train_fn=C.train)
        columns = RB.insert_after(columns, attacked, robust)
    if C.is_main():  # figures and the table: written by the main process only
        plots.append(str(plot_muse(columns, out / "muse.png",
                                   reference="retrained" if "retrained" in columns else None)))
    reporter.finish()
    table = C.markdown_table(columns, TABLE_KEYS + tuple(f"mia_{a}" for a in cfg.attacks), fmt=".3f")
    C.atomic_write(out / "table.md", table + "\n")
    results = C.Results(metrics=columns, table=table, output_dir=out, config=vars(cfg).copy(), history=history,
                        during=during, note=note, plots=plots,
                        provenance=C.provenance(cfg, commit, data=data_fp, model=model_fp, target=target_fp),
                        extra={"window": window, "method_args": method_args,
                               **({"robustness": robust_detail} if robust_detail else {})},
                        seconds=round(time.time() - t_start, 1))
    outdir.finish(results.to_dict(), keep=cfg.keep)
    return results


def parse_args(argv=None) -> MuseConfig:
    parser = build_parser(MuseConfig, __doc__)
    return config_from_args(parser, parser.parse_args(argv), MuseConfig)


__all__ = ["MuseConfig", "TABLE_KEYS", "TUNED_METHOD_ARGS", "generation_lengths", "membership_attacks", "parse_args",
           "run"]
