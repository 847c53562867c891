"""The ``--robustness`` hook every pipeline calls after unlearning (``fastweight.eval.robustness``).

``run_robustness(cfg, model, out, evaluate=..., relearn_set=..., relearn_eval=..., probes=...)`` returns the
table columns ``{"quant4": metrics, "relearn@2": metrics, "paraphrase": metrics, ...}`` and a detail record for
``results.json``. The pipeline supplies what is benchmark-specific:

    evaluate(model, kind)   the metrics of a (quantized) model; kind = "quant4" / "quant8"
    relearn_set             the training set of the relearning attack (a held portion of the forget data)
    relearn_eval(model)     the forget metrics on the forget items *not* in ``relearn_set``
    probes                  {column name: callable(model) -> metrics} for "paraphrase" / "templates"
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from fastweight.eval import robustness as R


def check_options(cfg) -> None:
    """Validate the robustness options of a ``BaseConfig`` (called from its ``__post_init__``)."""
    R.parse_attacks(cfg.robustness)
    R.parse_steps(cfg.relearn_steps)
    v = cfg.relearn_lr
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
        raise ValueError(f"relearn_lr must be None or a number > 0, got {v!r}")
    for name in ("relearn_lora_r", "quant_group_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def check_supported(cfg, supported: tuple[str, ...], bench: str) -> None:
    """Before any model is loaded: every ``--robustness`` attack is one this pipeline has a hook for."""
    bad = [a for a in R.parse_attacks(cfg.robustness) if a not in supported]
    if bad:
        raise ValueError(f"robustness: {bench} has no {', '.join(bad)} attack (it supports {', '.join(supported)})")


def insert_after(columns: Mapping[str, dict], name: str, extra: Mapping[str, dict]) -> dict[str, dict]:
    """``columns`` with ``extra`` placed right after column ``name`` (at the end when absent)."""
    order = list(columns)
    cut = order.index(name) + 1 if name in order else len(order)
    return {**{k: columns[k] for k in order[:cut]}, **extra, **{k: columns[k] for k in order[cut:]}}


def _merged(model):
    """A LoRA-unlearned model with its adapters folded in (the attacks act on plain weights)."""
    return copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model


def run_robustness(cfg, model, out: Path, *, evaluate: Callable[[Any, str], Mapping[str, float]] | None = None,
                   relearn_set=None, relearn_eval: Callable[[Any], Mapping[str, float]] | None = None,
                   probes: Mapping[str, Callable[[Any], Mapping[str, float]]] | None = None,
                   train_fn: Callable | None = None) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Run ``cfg.robustness`` on ``model``; returns (columns, detail). An attack the pipeline gives no callback
    for is a ValueError naming it (e.g. ``paraphrase`` where the benchmark has no paraphrased questions)."""
    from fastweight.train.config import TrainConfig

    attacks = R.parse_attacks(cfg.robustness)
    model = _merged(model)
    columns: dict[str, dict[str, float]] = {}
    detail: dict[str, Any] = {"attacks": list(attacks), "seconds": {}}
    for attack in attacks:
        t0 = time.time()
        if attack in ("quant4", "quant8"):
            if evaluate is None:
                raise ValueError(f"robustness {attack}: this pipeline has no evaluation hook for it")
            bits = int(attack[len("quant"):])
            q = R.quantize_model(model, bits, cfg.quant_group_size or None)
            columns[attack] = dict(evaluate(q, attack))
            detail[attack] = {"bits": bits, "group_size": cfg.quant_group_size or "per output channel",
                              "scheme": "asymmetric round-to-nearest, fake-quantized, lm_head kept"}
            del q
        elif attack == "relearn":
            if relearn_set is None or relearn_eval is None:
                raise ValueError("robustness relearn: this pipeline has no relearning set")
            tc = TrainConfig(output_dir=str(Path(out) / "robustness-relearn.run"), lr=cfg.relearn_lr or cfg.ft_lr,
                             batch_size=cfg.ft_batch_size, grad_accum=1, seed=cfg.seed,
                             trainable_layers=cfg.trainable_layers, lora_r=cfg.relearn_lora_r,
                             mixed_precision=cfg.mixed_precision, progress=False,
                             gradient_checkpointing=cfg.gradient_checkpointing)
            base = dict(relearn_eval(model))
            steps = R.relearn(model, relearn_set, cfg.relearn_steps, relearn_eval, train_config=tc, train_fn=train_fn)
            columns["relearn@0"] = base
            for step, metrics in steps.items():
                columns[f"relearn@{step}"] = metrics
            detail["relearn"] = {"rows": len(relearn_set), "lr": tc.lr, "lora_r": tc.lora_r,
                                 "batch_size": tc.batch_size, "steps": {str(k): v for k, v in steps.items()},
                                 "recovery_vs_step0": {str(k): {m: v[m] - base[m] for m in v if m in base}
                                                       for k, v in steps.items()}}
        else:
            names = [k for k in (probes or {}) if k == attack or k.startswith(attack + ":")]
            if not names:
                raise ValueError(f"robustness {attack}: this pipeline has no {attack} probe")
            for name in names:
                columns[name] = dict(probes[name](model))
            if attack == "templates":
                detail["templates"] = {k: {"template": t, "source": src} for k, (t, src) in R.PROBE_TEMPLATES.items()}
        detail["seconds"][attack] = round(time.time() - t0, 1)
        print(f"[robustness] {attack} in {detail['seconds'][attack]:.0f} s")
    return columns, detail


__all__ = ["check_options", "check_supported", "insert_after", "run_robustness"]
