"""The MUSE evaluator (``shared/spec/METRICS.md``, MUSE): VerbMem, KnowMem, PrivLeak.

    forget_verbmem   prompt (the first tokens of a forget passage, ``verbmem/forget`` "prompt") -> greedy
                     ``verbmem_max_new_tokens`` (128) tokens -> ROUGE-L F1 against the true continuation "gt"
    <split>_knowmem  few-shot QA on ``knowmem/<split>_qa`` (split = forget, retain): the prompt is the in-context
                     examples then the question, each as ``"Question: {q}\\nAnswer: {a}\\n\\n"``, ending in
                     ``"Question: {q}\\nAnswer:"``; greedy ``knowmem_max_new_tokens`` (32) tokens, cut at the first
                     blank line or "Question:", ROUGE-L recall against the answer
    privleak_auc     AUC of Min-K% Prob (k = 0.4; higher = member) separating ``privleak/forget`` texts (positives)
                     from ``privleak/holdout`` texts (negatives); per-text scores in ``forget_mink`` /
                     ``holdout_mink``
    privleak         ``(AUC - AUC_retrain) / AUC_retrain`` when the retrained model's AUC is given (near 0 =
                     forget looks like never-seen data; > 0 under-unlearned, < 0 over-unlearned)

Prompts and texts are tokenised with the tokenizer's defaults (BOS where it adds one). ``evaluate_muse`` writes
``MUSE_EVAL.json`` (every ``MetricResult``) and ``MUSE_SUMMARY.json`` after each metric and skips metrics already
in the EVAL file on a rerun (resumable), exactly like the TOFU evaluator; with an ``accelerator`` of several
processes each rank scores a share of the rows and only the main process writes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from fastweight.data.muse import MuseData
from fastweight.data.tofu import pad_collate
from fastweight.eval import metrics as M
from fastweight.eval.store import EvalStore, Sharded

_STOP = re.compile(r"\n\n|\n?Question\s*:")  # end of a KnowMem answer: a blank line or the next "Question:"


@dataclass
class MuseEvalConfig:
    """Evaluation options. ``max_items`` caps rows per evaluation set (None = all); ``privleak_max_length``
    truncates each PrivLeak text (tokens)."""

    batch_size: int = 8
    verbmem_max_new_tokens: int = 128
    knowmem_max_new_tokens: int = 32
    mink_k: float = 0.4
    privleak_max_length: int = 2048
    max_items: int | None = None
    bench: str = "MUSE"

    def __post_init__(self) -> None:
        for name in ("batch_size", "verbmem_max_new_tokens", "knowmem_max_new_tokens", "privleak_max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 < self.mink_k <= 1.0:
            raise ValueError(f"mink_k must be in (0, 1], got {self.mink_k!r}")
        if self.max_items is not None and (not isinstance(self.max_items, int) or self.max_items < 1):
            raise ValueError(f"max_items must be None or a positive int, got {self.max_items!r}")


def knowmem_prompt(question: str, icl: Sequence[Mapping[str, str]] = ()) -> str:
    """The few-shot KnowMem prompt: in-context examples then ``"Question: {question}\\nAnswer:"``."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return f"{shots}Question: {question}\nAnswer:"


def cut_answer(text: str) -> str:
    """A generated KnowMem answer up to the first blank line or "Question:" marker, stripped."""
    m = _STOP.search(text)
    return (text[:m.start()] if m else text).strip()


def _encode(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    return ids[:max_length] if max_length is not None else ids


def verbmem(model, tokenizer, rows: Sequence[Mapping[str, str]], *, max_new_tokens: int = 128,
            batch_size: int = 8) -> M.MetricResult:
    """VerbMem: ROUGE-L F1 of the greedy continuation of each ``row["prompt"]`` against ``row["gt"]``.
    ``value_by_index[i]`` holds the score; the generations are returned in ``result["generations"]``."""
    prompts = [_encode(tokenizer, r["prompt"]) for r in rows]
    gens = M.generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    res = M.rouge_l(gens, [r["gt"] for r in rows], kind="fmeasure")
    return {**res, "generations": gens}


def knowmem(model, tokenizer, rows: Sequence[Mapping[str, str]], icl: Sequence[Mapping[str, str]] = (), *,
            max_new_tokens: int = 32, batch_size: int = 8) -> M.MetricResult:
    """KnowMem: ROUGE-L recall of the few-shot greedy answer (``knowmem_prompt``, ``cut_answer``) against
    ``row["answer"]``; the cut generations are returned in ``result["generations"]``."""
    prompts = [_encode(tokenizer, knowmem_prompt(r["question"], icl)) for r in rows]
    gens = [cut_answer(g) for g in M.generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                     batch_size=batch_size)]
    res = M.rouge_l(gens, [r["answer"] for r in rows], kind="recall")
    return {**res, "generations": gens}


@torch.no_grad()
def text_token_logps(model, tokenizer, texts: Sequence[str], *, max_length: int = 2048,
                     batch_size: int = 8) -> list[list[float]]:
    """Teacher-forced log-probability of every token of each text after the first (``max_length`` tokens)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[float]] = []
    for s in range(0, len(texts), batch_size):
        items = []
        for t in texts[s:s + batch_size]:
            ids = torch.tensor(_encode(tokenizer, t, max_length), dtype=torch.long)
            if ids.numel() < 2:
                raise ValueError(f"text {s + len(items)} has fewer than 2 tokens: nothing to score")
            items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        batch = {k: v.to(device) for k, v in pad_collate(items, pad).items()}
        out += [st["token_logp"] for st in M.answer_token_stats(model, batch)]
    return out


def mink_scores(model, tokenizer, texts: Sequence[str], *, k: float = 0.4, max_length: int = 2048,
                batch_size: int = 8) -> M.MetricResult:
    """Min-K% Prob per text (``metrics.mink_prob``; higher = more likely seen in training)."""
    return M.mink_prob(text_token_logps(model, tokenizer, texts, max_length=max_length, batch_size=batch_size), k)


def privleak_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """AUC of the member scores: forget texts are the positives, holdout texts the negatives (ties 1/2)."""
    return M.auc(list(forget_scores), list(holdout_scores))


def privleak(auc: float, retrain_auc: float) -> float:
    """PrivLeak = ``(auc - retrain_auc) / retrain_auc``."""
    if not retrain_auc > 0:
        raise ValueError(f"retrain_auc must be > 0, got {retrain_auc!r}")
    return (auc - retrain_auc) / retrain_auc


def _scores(result: M.MetricResult) -> list[float]:
    by = result["value_by_index"]
    return [by[str(i)]["score"] for i in range(len(by))]


def evaluate_muse(model, tokenizer, data: MuseData, config: MuseEvalConfig | None = None, *,
                  output_dir: str | os.PathLike | None = None, retrain_auc: float | None = None,
                  accelerator=None) -> dict[str, float]:
    """Score ``model`` on a MUSE corpus; see the module docstring.

    Args:
        model: causal LM (put in eval mode for the call, mode restored after); tokenizer: its tokenizer.
        data: ``MuseData`` (``fastweight.data.muse.load_muse``).
        retrain_auc: the retrained model's ``privleak_auc`` (adds ``privleak``).
    Returns:
        ``{metric key: agg_value}`` for ``forget_verbmem``, ``forget_knowmem``, ``retain_knowmem``,
        ``forget_mink``, ``holdout_mink``, ``privleak_auc`` (and ``privleak``).
    """
    cfg = config or MuseEvalConfig()
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    shard = Sharded(accelerator)
    store = EvalStore(output_dir, cfg.bench, main=shard.rank == 0)
    results, record = store.results, store.record

    def gathered(rows: list, fn: Callable[[list], M.MetricResult]) -> M.MetricResult:
        """Per-row scores (and generations) from every rank, as one MetricResult in row order."""
        def per_row(rs):
            res = fn(rs)
            gens = res.get("generations", [None] * len(rs))
            return [(res["value_by_index"][str(i)]["score"], gens[i]) for i in range(len(rs))]

        pairs = shard.map(rows, per_row)
        res = M._result([p[0] for p in pairs])
        if pairs and pairs[0][1] is not None:
            for i, (_, g) in enumerate(pairs):
                res["value_by_index"][str(i)]["generation"] = g
        return res

    cap = cfg.max_items
    was_training = model.training
    model.eval()
    try:
        record("forget_verbmem", lambda: gathered(list(data.verbmem_forget[:cap]), lambda rs: verbmem(
            model, tokenizer, rs, max_new_tokens=cfg.verbmem_max_new_tokens, batch_size=cfg.batch_size)))
        for split, rows, icl in (("forget", data.knowmem_forget, data.knowmem_forget_icl),
                                 ("retain", data.knowmem_retain, data.knowmem_retain_icl)):
            record(f"{split}_knowmem", lambda: gathered(list(rows[:cap]), lambda rs: knowmem(
                model, tokenizer, rs, icl, max_new_tokens=cfg.knowmem_max_new_tokens, batch_size=cfg.batch_size)))
        for split, texts in (("forget", data.privleak_forget), ("holdout", data.privleak_holdout)):
            record(f"{split}_mink", lambda: gathered(list(texts[:cap]), lambda ts: mink_scores(
                model, tokenizer, ts, k=cfg.mink_k, max_length=cfg.privleak_max_length, batch_size=cfg.batch_size)))
    finally:
        model.train(was_training)
    auc = privleak_auc(_scores(results["forget_mink"]), _scores(results["holdout_mink"]))
    record("privleak_auc", lambda: {"agg_value": auc, "value_by_index": {}})
    if retrain_auc is not None:
        record("privleak", lambda: {"agg_value": privleak(auc, retrain_auc),
                                    "value_by_index": {"retrain_auc": {"score": float(retrain_auc)}}})
    return store.summary()


__all__ = ["MuseEvalConfig", "cut_answer", "evaluate_muse", "knowmem", "knowmem_prompt", "mink_scores",
           "privleak", "privleak_auc", "text_token_logps", "verbmem"]
