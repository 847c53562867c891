"""The MUSE evaluator (``shared/spec/METRICS.md``, MUSE): VerbMem, KnowMem, PrivLeak, as ``swj0419/muse_bench``.

    forget_verbmem   prompt (``verbmem/forget`` "prompt", tokenised with special tokens) -> greedy
                     ``verbmem_max_new_tokens`` (128) tokens -> ROUGE-L F1, no stemming, against the true
                     continuation "gt" cut to its first 128 tokens (tokenised with special tokens, so a BOS counts,
                     then decoded without them) — MUSE's ``metrics/verbmem.py``
    <split>_knowmem  few-shot QA on ``knowmem/<split>_qa`` (split = forget, retain): the in-context examples as
                     ``"Question: {q}\nAnswer: {a}\n\n"`` then ``"Question: {q}\nAnswer: "``; greedy
                     ``knowmem_max_new_tokens`` (32) tokens, cut before "\n\n", "\nQuestion" and "Question:";
                     ROUGE-L F1 without stemming against the answer — MUSE's ``metrics/knowmem.py``
    forget_mink /    MUSE's Min-40% score per text (``metrics.mink_prob``: ``-mean`` of the lowest floor(0.4 n)
    holdout_mink     token log-probabilities, every token after the first scored)
    privleak_auc     ``metrics.privleak_auc``: MUSE's AUC orientation (about 0 when the model still knows the
                     forget texts, 0.5 when they look like holdout texts)
    privleak         ``(AUC - AUC_retrain) / AUC_retrain * 100`` when a retrained model's AUC is given: about
                     -100 for a leaking model, 0 for a retrained one (MUSE's ``eval.py``; MUSE itself divides by
                     its tabulated retrain AUC, ``metrics.MUSE_RETRAIN_AUC``, which can be passed as
                     ``retrain_auc`` to reproduce its tables)

MUSE multiplies ROUGE by 100 in its tables; fastweight keeps ROUGE in [0, 1]. ``convention="open-unlearning"``
switches to open-unlearning's MUSE port: ROUGE with stemming, Min-K% over ``max(1, floor(k n))`` tokens, its AUC
orientation (1 - MUSE's) and its PrivLeak formula (the same percentage).

Prompts and texts are tokenised with the tokenizer's defaults (BOS where it adds one). ``evaluate_muse`` writes
``MUSE_EVAL.json`` (every ``MetricResult``) and ``MUSE_SUMMARY.json`` after each metric and skips metrics already
in the EVAL file on a rerun (resumable), exactly like the TOFU evaluator; with an ``accelerator`` of several
processes each rank scores a share of the rows and only the main process writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from fastweight.data.muse import MuseData
from fastweight.data.tofu import pad_collate
from fastweight.eval import metrics as M
from fastweight.eval.store import EvalStore, Sharded

# MUSE's ``get_prefix_before_words_occur``: the answer is cut before each marker in turn.
KNOWMEM_STOP_WORDS: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")


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
    convention: str = "muse"  # "muse" (muse_bench) or "open-unlearning" (its MUSE port); see the module docstring

    def __post_init__(self) -> None:
        for name in ("batch_size", "verbmem_max_new_tokens", "knowmem_max_new_tokens", "privleak_max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 < self.mink_k <= 1.0:
            raise ValueError(f"mink_k must be in (0, 1], got {self.mink_k!r}")
        if self.max_items is not None and (not isinstance(self.max_items, int) or self.max_items < 1):
            raise ValueError(f"max_items must be None or a positive int, got {self.max_items!r}")
        if self.convention not in M.MIA_CONVENTIONS:
            raise ValueError(f"convention must be one of {M.MIA_CONVENTIONS}, got {self.convention!r}")


def knowmem_prompt(question: str, icl: Sequence[Mapping[str, str]] = ()) -> str:
    """The few-shot KnowMem prompt: in-context examples, then the question ending in MUSE's "Answer: " (with its
    trailing space)."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return f"{shots}Question: {question}\nAnswer: "


def cut_answer(text: str) -> str:
    """A generated KnowMem answer cut before each of ``KNOWMEM_STOP_WORDS`` in turn (MUSE), stripped."""
    for word in KNOWMEM_STOP_WORDS:
        text = text.split(word)[0]
    return text.strip()


def verbmem_reference(tokenizer, gt: str, max_new_tokens: int = 128) -> str:
    """MUSE's VerbMem reference: ``gt`` tokenised with special tokens, cut to ``max_new_tokens`` ids, decoded
    without special tokens (``clean_up_tokenization_spaces=True``)."""
    ids = list(tokenizer(gt, add_special_tokens=True)["input_ids"])[:max_new_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def _encode(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    return ids[:max_length] if max_length is not None else ids


def verbmem(model, tokenizer, rows: Sequence[Mapping[str, str]], *, max_new_tokens: int = 128,
            batch_size: int = 8, convention: str = "muse") -> M.MetricResult:
    """VerbMem: ROUGE-L F1 of the greedy continuation of each ``row["prompt"]`` against ``verbmem_reference``
    of ``row["gt"]`` (no stemming; stemming under ``convention="open-unlearning"``).
    ``value_by_index[i]`` holds the score; the generations are returned in ``result["generations"]``."""
    prompts = [_encode(tokenizer, r["prompt"]) for r in rows]
    gens = M.generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             clean_up_tokenization_spaces=True)
    refs = [verbmem_reference(tokenizer, r["gt"], max_new_tokens) for r in rows]
    res = M.rouge_l(gens, refs, kind="fmeasure", use_stemmer=convention == "open-unlearning")
    return {**res, "generations": gens}


def knowmem(model, tokenizer, rows: Sequence[Mapping[str, str]], icl: Sequence[Mapping[str, str]] = (), *,
            max_new_tokens: int = 32, batch_size: int = 8, convention: str = "muse") -> M.MetricResult:
    """KnowMem: ROUGE-L F1 (MUSE's ``mean_rougeL``; no stemming, stemming under
    ``convention="open-unlearning"``) of the few-shot greedy answer (``knowmem_prompt``, ``cut_answer``)
    against ``row["answer"]``; the cut generations are returned in ``result["generations"]``."""
    prompts = [_encode(tokenizer, knowmem_prompt(r["question"], icl)) for r in rows]
    gens = [cut_answer(g) for g in M.generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                     batch_size=batch_size, clean_up_tokenization_spaces=True)]
    res = M.rouge_l(gens, [r["answer"] for r in rows], kind="fmeasure", use_stemmer=convention == "open-unlearning")
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
                batch_size: int = 8, convention: str = "muse") -> M.MetricResult:
    """Min-K% score per text (``metrics.mink_prob``: ``-mean`` of the lowest log-probabilities; higher = less
    likely seen in training)."""
    return M.mink_prob(text_token_logps(model, tokenizer, texts, max_length=max_length, batch_size=batch_size), k,
                       convention)


privleak_auc = M.privleak_auc
privleak = M.privleak


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
        retrain_auc: the retrained model's ``privleak_auc`` under the same convention, or MUSE's tabulated
            ``metrics.MUSE_RETRAIN_AUC[corpus]`` (adds ``privleak``, in percent).
    Returns:
        ``{metric key: agg_value}`` for ``forget_verbmem``, ``forget_knowmem``, ``retain_knowmem``,
        ``forget_mink``, ``holdout_mink``, ``privleak_auc`` (and ``privleak``).
    """
    cfg = config or MuseEvalConfig()
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    shard = Sharded(accelerator)
    store = EvalStore(output_dir, cfg.bench, main=shard.main)
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
    from fastweight._progress import progress

    # one step per metric: a bar on a terminal, a line every 30 s in a log file
    bar = progress(total=5, desc="MUSE eval", unit="metric", disable=shard.rank != 0)
    try:
        bar.set_postfix_str("forget_verbmem")
        record("forget_verbmem", lambda: gathered(list(data.verbmem_forget[:cap]), lambda rs: verbmem(
            model, tokenizer, rs, max_new_tokens=cfg.verbmem_max_new_tokens, batch_size=cfg.batch_size,
            convention=cfg.convention)))
        bar.update(1)
        for split, rows, icl in (("forget", data.knowmem_forget, data.knowmem_forget_icl),
                                 ("retain", data.knowmem_retain, data.knowmem_retain_icl)):
            bar.set_postfix_str(f"{split}_knowmem")
            record(f"{split}_knowmem", lambda: gathered(list(rows[:cap]), lambda rs: knowmem(
                model, tokenizer, rs, icl, max_new_tokens=cfg.knowmem_max_new_tokens, batch_size=cfg.batch_size,
                convention=cfg.convention)))
            bar.update(1)
        for split, texts in (("forget", data.privleak_forget), ("holdout", data.privleak_holdout)):
            bar.set_postfix_str(f"{split}_mink")
            record(f"{split}_mink", lambda: gathered(list(texts[:cap]), lambda ts: mink_scores(
                model, tokenizer, ts, k=cfg.mink_k, max_length=cfg.privleak_max_length, batch_size=cfg.batch_size,
                convention=cfg.convention)))
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    auc = privleak_auc(_scores(results["forget_mink"]), _scores(results["holdout_mink"]), cfg.convention)
    record("privleak_auc", lambda: {"agg_value": auc, "value_by_index": {}})
    if retrain_auc is not None:
        record("privleak", lambda: {"agg_value": privleak(auc, retrain_auc, cfg.convention),
                                    "value_by_index": {"retrain_auc": {"score": float(retrain_auc)}}})
    return store.summary()


__all__ = ["KNOWMEM_STOP_WORDS", "MuseEvalConfig", "cut_answer", "evaluate_muse", "knowmem", "knowmem_prompt",
           "mink_scores", "privleak", "privleak_auc", "text_token_logps", "verbmem", "verbmem_reference"]
