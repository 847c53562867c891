"""The TOFU evaluator (``shared/spec/METRICS.md``, TOFU): per-split metrics, Model Utility, Forget Quality.

``evaluate_tofu(model, tokenizer, eval_sets, config, output_dir=...)`` scores

    forget / retain             prob, rouge (greedy generation, ROUGE-L recall), truth_ratio, es (Extraction
                                Strength on the answer tokens without the EOS label, as SatImp's ``eval_es.py``;
                                ``es_convention="open-unlearning"`` drops the last label and scores a wrong last
                                token 1/|y|, as open-unlearning)
    real_authors / world_facts  prob (normalised over correct + wrong answers), rouge, truth_ratio
    model_utility               harmonic mean of the nine {retain, real_authors, world_facts} x
                                {prob, rouge, truth_ratio} values
    forget_quality              KS p-value of forget truth ratios against ``retain_tr`` (the retain model's)

and returns ``{"<split>_<metric>": agg_value, ...}``. With ``output_dir``, ``<bench>_EVAL.json`` (every
``MetricResult``) and ``<bench>_SUMMARY.json`` (aggregates) are rewritten atomically after each metric; a rerun
with the same folder skips metrics already in ``<bench>_EVAL.json`` (resumable). With an ``accelerator`` of
several processes, each rank scores ``rows[rank::world]`` and the per-item values are gathered; only the main
process writes files.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from fastweight.data.tofu import encode_prompt, encode_qa, pad_collate
from fastweight.eval import metrics as M
from fastweight.eval.store import EvalStore, Sharded

EVAL_SPLITS: tuple[str, ...] = ("forget", "retain", "real_authors", "world_facts")


@dataclass
class TofuEvalConfig:
    """Evaluation options: ``template`` must match training; ``max_items`` caps rows per split (None = all)."""

    template: str = "chat"
    batch_size: int = 8
    max_length: int = 512
    max_new_tokens: int = 200
    max_items: int | None = None
    bench: str = "TOFU"
    autocast: str | None = None  # "bf16" / "fp16": run the model under torch.autocast (faster on CPUs with bf16)
    es_convention: str = "satimp"  # "satimp" (SatImp's eval_es.py) or "open-unlearning"; see es_flags

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.max_items is not None and (not isinstance(self.max_items, int) or self.max_items < 1):
            raise ValueError(f"max_items must be None or a positive int, got {self.max_items!r}")
        if self.es_convention not in M.ES_CONVENTIONS:
            raise ValueError(f"es_convention must be one of {M.ES_CONVENTIONS}, got {self.es_convention!r}")
        if self.autocast not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'no', 'bf16' or 'fp16', got {self.autocast!r}")


def _answer_stats(model, tokenizer, cfg: TofuEvalConfig, pairs: list[tuple[str, str]]) -> list[dict]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[dict] = []
    for s in range(0, len(pairs), cfg.batch_size):
        items = [{k: torch.tensor(v) for k, v in encode_qa(tokenizer, cfg.template, q, a, cfg.max_length).items()}
                 for q, a in pairs[s:s + cfg.batch_size]]
        batch = {k: v.to(device) for k, v in pad_collate(items, pad).items()}
        out += M.answer_token_stats(model, batch)
    return out


def _generate(model, tokenizer, cfg: TofuEvalConfig, prompts: list, desc: str) -> list[str]:
    """``generate_greedy`` batch by batch under a progress bar on a terminal (in a log file the enclosing
    phase's progress lines report, so nested lines do not crowd it)."""
    from fastweight._progress import on_terminal, progress

    out: list[str] = []
    for s in progress(range(0, len(prompts), cfg.batch_size), desc=desc, unit="batch", disable=not on_terminal()):
        out += M.generate_greedy(model, tokenizer, prompts[s:s + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size)
    return out


def es_flags(stats: Sequence[Mapping], eos_token_id: int | None, convention: str = "satimp") -> list[list[bool]]:
    """Per-answer greedy-match flags ES scores (``answer_token_stats`` output, labels = answer + EOS).

    "satimp": y is the answer without EOS (SatImp's ``eval_es.py`` tokenises "question + answer" with no EOS),
    so a last label equal to ``eos_token_id`` is dropped. "open-unlearning": the last label is dropped
    whatever it is (``tokenwise_vocab_logprobs`` "ignore eos prediction"). An answer left empty is a ValueError.
    """
    out = []
    for i, st in enumerate(stats):
        flags, labels = list(st["correct"]), list(st["labels"])
        if labels and (convention == "open-unlearning" or labels[-1] == eos_token_id):
            flags = flags[:-1]
        if not flags:
            raise ValueError(f"answer {i} has no token left for Extraction Strength once its EOS label is dropped")
        out.append(flags)
    return out


def _avg_logps(model, tokenizer, cfg, rows: list[dict], key: str) -> list:
    """Mean answer log-prob per row for ``row[key]`` (str -> float, list of str -> list of float)."""
    flat = [(r["question"], a) for r in rows for a in ([r[key]] if isinstance(r[key], str) else r[key])]
    stats = iter(_answer_stats(model, tokenizer, cfg, flat))
    return [next(stats)["avg_logp"] if isinstance(r[key], str) else [next(stats)["avg_logp"] for _ in r[key]]
            for r in rows]


def evaluate_tofu(model, tokenizer, eval_sets: Mapping[str, Sequence[dict]], config: TofuEvalConfig | None = None,
                  *, output_dir: str | os.PathLike | None = None, retain_tr: Sequence[float] | None = None,
                  accelerator=None, splits: Sequence[str] = EVAL_SPLITS) -> dict[str, float]:
    """Score ``model`` on the TOFU evaluation sets; see the module docstring.

    Args:
        model: causal LM (unwrapped or accelerate-prepared); put in eval mode for the call, mode restored after.
        tokenizer: its tokenizer (``eos_token_id`` required).
        eval_sets: ``{"forget": forgetXX_perturbed rows, "retain": retain_perturbed rows, "real_authors":
            real_authors_perturbed rows, "world_facts": world_facts_perturbed rows}`` (missing splits skipped).
        retain_tr: the retain model's forget-split truth ratios (``value_by_index[i]["tr"]``) for Forget Quality.
        splits: which of ``EVAL_SPLITS`` to score.
    Returns:
        ``{metric key: agg_value}``; also ``forget_tr`` is available from the EVAL file / ``last_eval``.
    """
    cfg = config or TofuEvalConfig()
    unknown = [s for s in splits if s not in EVAL_SPLITS]
    if unknown:
        raise ValueError(f"splits must be among {EVAL_SPLITS}, got {unknown}")
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    shard = Sharded(accelerator)
    store = EvalStore(output_dir, cfg.bench, main=shard.main)
    results, record = store.results, store.record

    was_training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    amp = torch.autocast(device_type, dtype=torch.bfloat16 if cfg.autocast == "bf16" else torch.float16,
                         enabled=cfg.autocast in ("bf16", "fp16"))
    try:
        amp.__enter__()
        for split in splits:
            rows = list(eval_sets.get(split) or [])[:cfg.max_items]
            if not rows:
                continue
            general = split in ("real_authors", "world_facts")
            para_key = "answer" if general or "paraphrased_answer" not in rows[0] else "paraphrased_answer"
            if general:
                record(f"{split}_prob", lambda: M.normalised_probability(
                    shard.map(rows, lambda rs: _avg_logps(model, tokenizer, cfg, rs, "answer")),
                    shard.map(rows, lambda rs: _avg_logps(model, tokenizer, cfg, rs, "perturbed_answer"))))
            elif f"{split}_prob" not in results or f"{split}_es" not in results:
                stats = shard.map(rows, lambda rs: _answer_stats(model, tokenizer, cfg,
                                                                 [(r["question"], r["answer"]) for r in rs]))
                record(f"{split}_prob", lambda: M.probability([s["avg_logp"] for s in stats]))
                record(f"{split}_es", lambda: M.extraction_strength(
                    es_flags(stats, tokenizer.eos_token_id, cfg.es_convention), cfg.es_convention))
            record(f"{split}_rouge", lambda: M.rouge_l(shard.map(rows, lambda rs: _generate(
                model, tokenizer, cfg, [encode_prompt(tokenizer, cfg.template, r["question"]) for r in rs],
                f"TOFU {split} generation")), [r["answer"] for r in rows]))
            record(f"{split}_truth_ratio", lambda: M.truth_ratio(
                shard.map(rows, lambda rs: _avg_logps(model, tokenizer, cfg, rs, para_key)),
                shard.map(rows, lambda rs: _avg_logps(model, tokenizer, cfg, rs, "perturbed_answer")),
                mode="forget" if split == "forget" else "true_better"))
    finally:
        amp.__exit__(None, None, None)
        model.train(was_training)
    mu_keys = [f"{s}_{m}" for s in ("retain", "real_authors", "world_facts") for m in ("prob", "rouge",
                                                                                        "truth_ratio")]
    if all(k in results for k in mu_keys):
        record("model_utility", lambda: M.model_utility({k: results[k]["agg_value"] for k in mu_keys}))
    if retain_tr is not None and "forget_truth_ratio" in results:
        record("forget_quality", lambda: M.forget_quality(forget_truth_ratios(results), retain_tr))
    return store.summary()


def forget_truth_ratios(results: Mapping[str, M.MetricResult]) -> list[float]:
    """Raw forget-split truth ratios (row order) from an EVAL mapping, for Forget Quality."""
    by_index = results["forget_truth_ratio"]["value_by_index"]
    return [by_index[str(i)]["tr"] for i in range(len(by_index))]


def load_eval(output_dir: str | os.PathLike, bench: str = "TOFU") -> dict[str, M.MetricResult]:
    """The ``<bench>_EVAL.json`` written by ``evaluate_tofu`` in ``output_dir``."""
    return json.loads((Path(output_dir) / f"{bench}_EVAL.json").read_text())


__all__ = ["EVAL_SPLITS", "TofuEvalConfig", "es_flags", "evaluate_tofu", "forget_truth_ratios", "load_eval"]
