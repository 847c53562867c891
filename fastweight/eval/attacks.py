"""Membership-inference attacks (LOSS, ZLib, Min-K%, Min-K%++, gradient norm, reference) and Exact Memorization.

Every attack gives each item (a tokenised sequence whose ``labels`` mark the scored tokens) one score. Scores use
open-unlearning's orientation: **higher score = less likely a member** (the sign of a loss); ``mia_auc`` then
reports the AUC of separating the forget set (members) from the holdout set (non-members) with forget labelled
0 and holdout 1, as open-unlearning's ``mia_auc`` does, so

    AUC ~ 1    the forget items look much more "seen" than the holdout items (the model still remembers them)
    AUC ~ 0.5  indistinguishable (what a model never trained on the forget set gives when both are i.i.d.)
    AUC < 0.5  the forget items look *less* likely than unseen text (over-unlearning)

MUSE's ``metrics/privleak.py`` labels the other way round (holdout as member, score = minus its Min-K value),
so its AUC equals ``1 - mia_auc`` on the same scores (sklearn counts ties 1/2 in both).

Notation: for an item, t runs over its scored positions (label != IGNORE_INDEX after the causal shift), n is
their number, ``log p_t`` the model's log-probability of the label (``fastweight.token_logprobs``, the fused op),
``q_t`` the model's whole next-token distribution at that position.

    loss              L = -(1/n) sum_t log p_t                       Yeom et al. 2018 (open-unlearning LOSSAttack)
    zlib              L / len(zlib.compress(text.encode("utf-8")))   Carlini et al. 2021; text = the labelled
                      tokens decoded with ``skip_special_tokens=True`` (open-unlearning ZLIBAttack)
    min_k             -mean of the m lowest log p_t, m = max(1, floor(k n)), k = 0.4
                      Shi et al. 2024 (Min-K% Prob; MUSE ``metrics/privleak.py``; open-unlearning MinKProbAttack)
    min_k_plus_plus   z_t = (log p_t - mu_t) / sqrt(max(sigma2_t, 1e-6)),  mu_t = sum_v q_v log q_v,
                      sigma2_t = sum_v q_v (log q_v)^2 - mu_t^2; score = -mean of the m lowest z_t
                      Zhang et al. 2025 (Min-K%++, ``zjysteven/mink-plus-plus`` run.py; the 1e-6 floor is
                      open-unlearning's MinKPlusPlusAttack)
    gradnorm          mean over parameter tensors W (those receiving a gradient) of ||dL/dW||_p, p in {1, 2, inf},
                      one item at a time. Wang et al. 2024 (arXiv 2402.17012); open-unlearning GradNormAttack
    reference         L(model) - L(reference model), same tokens. Carlini et al. 2021 / Mink++ ``run_ref.py``;
                      open-unlearning ReferenceAttack (MUSE uses the retrained model as the reference)
    exact_memorization  EM = (1/n) sum_t [argmax_v q_t,v == label_t]   Tirumala et al. 2022; open-unlearning
                      ``memorization.py`` (not an attack: higher = more memorised; no AUC)

Differences from open-unlearning, all deliberate: (1) its token-wise helper (used by Min-K, Min-K++, gradnorm and
Exact Memorization) drops each item's last labelled token (the EOS of its QA collator) while LOSS/ZLib/reference keep
it; ``AttackConfig(drop_last_label=True)`` reproduces that, the default scores every labelled token as the
original papers do. (2) gradnorm keeps the model in eval mode (open-unlearning switches to train mode, which
turns dropout on) and uses ``torch.autograd.grad``, so the caller's ``.grad`` buffers are left untouched.
(3) an item with no scored token raises ValueError instead of scoring 0 / None.

Min-K%++'s mu_t and sigma2_t are computed by ``logprob_moments``, chunk by chunk over rows, so no [N, V]
probability tensor exists beyond one chunk.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence, get_args

import torch

import fastweight
from fastweight._constants import IGNORE_INDEX
from fastweight.data.tofu import pad_collate
from fastweight.eval.metrics import MetricResult, teacher_forced_stats
from fastweight.ops._common import acc_dtype, row_chunks, shift_labels

AttackName = Literal["loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference"]
ATTACKS: tuple[str, ...] = get_args(AttackName)
# The attacks that need no reference model, no tokenizer and no backward pass.
DEFAULT_ATTACKS: tuple[str, ...] = ("loss", "min_k", "min_k_plus_plus")
# Min-K%++ variance floor, open-unlearning's clamp: a one-hot q gives sigma2 = 0 and z would divide by 0.
MINKPP_VAR_FLOOR = 1e-6
# float32 elements per row chunk in ``logprob_moments`` (16 MiB, the token-logprob op's torch-path chunk).
MOMENT_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class AttackConfig:
    """Options of the attacks.

    k: Min-K% / Min-K%++ fraction of lowest tokens (0.4: MUSE and open-unlearning's configs).
    p: gradnorm norm order, 1, 2 or inf (2: open-unlearning's config).
    batch_size: sequences per forward pass (gradnorm always runs one sequence at a time).
    drop_last_label: drop each item's last labelled token for Min-K, Min-K++, gradnorm and Exact Memorization, as
        open-unlearning's token-wise helper does (see the module docstring).
    """

    k: float = 0.4
    p: float = 2.0
    batch_size: int = 8
    drop_last_label: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be a number in (0, 1], got {self.k!r}")
        if self.p not in (1, 2, math.inf):
            raise ValueError(f"p must be 1, 2 or inf (open-unlearning's GradNormAttack), got {self.p!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not isinstance(self.drop_last_label, bool):
            raise TypeError(f"drop_last_label must be a bool, got {type(self.drop_last_label).__name__}")


# ------------------------------------------------------------------------------------------------ per-item scores
def _as_logp(name: str, values) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of log-probabilities, got shape {tuple(t.shape)}")
    return t


def _lowest_mean(values: torch.Tensor, k: float) -> float:
    m = max(1, int(k * values.numel()))  # floor, guarded for short items (open-unlearning; MUSE has no guard)
    return float(torch.sort(values).values[:m].mean())


def loss_score(token_logp) -> float:
    """LOSS attack: ``-mean_t log p_t`` of one item; ``token_logp`` [n] (n >= 1). Higher = non-member."""
    return -float(_as_logp("token_logp", token_logp).mean())


def zlib_score(token_logp, text: str) -> float:
    """ZLib attack: ``loss_score / len(zlib.compress(text.encode("utf-8")))`` (default level). Higher = non-member."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return loss_score(token_logp) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(token_logp, k: float = 0.4) -> float:
    """Min-K% Prob: minus the mean of the ``max(1, floor(k n))`` lowest ``log p_t``. Higher = non-member."""
    AttackConfig(k=k)
    return -_lowest_mean(_as_logp("token_logp", token_logp), k)


def min_k_plus_plus_score(token_logp, mu, var, k: float = 0.4) -> float:
    """Min-K%++: ``z_t = (log p_t - mu_t) / sqrt(max(var_t, 1e-6))``, then minus the mean of the
    ``max(1, floor(k n))`` lowest ``z_t``. ``token_logp``, ``mu``, ``var`` [n]. Higher = non-member."""
    AttackConfig(k=k)
    lp, m, v = _as_logp("token_logp", token_logp), _as_logp("mu", mu), _as_logp("var", var)
    if not lp.shape == m.shape == v.shape:
        raise ValueError(f"token_logp, mu and var must have one shape, got {tuple(lp.shape)}, {tuple(m.shape)}, "
                         f"{tuple(v.shape)}")
    return -_lowest_mean((lp - m) / v.clamp_min(MINKPP_VAR_FLOOR).sqrt(), k)


def reference_score(token_logp, ref_token_logp) -> float:
    """Reference attack: ``loss_score(token_logp) - loss_score(ref_token_logp)`` (same tokens). Higher = non-member."""
    lp, ref = _as_logp("token_logp", token_logp), _as_logp("ref_token_logp", ref_token_logp)
    if lp.shape != ref.shape:
        raise ValueError(f"token_logp {tuple(lp.shape)} and ref_token_logp {tuple(ref.shape)} differ in shape")
    return float(ref.mean() - lp.mean())


# ------------------------------------------------------------------------------------------------ tensor helpers
def logprob_moments(logits: torch.Tensor, *, chunk_elements: int = MOMENT_CHUNK_ELEMENTS,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``log q`` under ``q = softmax(logits)``, row by row (Min-K%++'s mu and sigma^2).

    Args:
        logits: [N, V] float32 / bfloat16 / float16 / float64; ``-inf`` entries are allowed (q_v = 0 adds 0).
        chunk_elements: at most this many elements are converted to the accumulation dtype at a time.
    Returns:
        ``(mu, var)``, each [N], float32 (float64 for float64 logits), no gradient:
        ``mu = sum_v q_v log q_v`` and ``var = sum_v q_v (log q_v - mu)^2`` — the same number as
        ``sum_v q_v (log q_v)^2 - mu^2`` without its cancellation for peaked rows.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point torch.Tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [N, V] with V >= 1, got shape {tuple(logits.shape)}")
    if not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    mu = torch.empty(N, dtype=acc, device=logits.device)
    var = torch.empty(N, dtype=acc, device=logits.device)
    with torch.no_grad():
        for s, e in row_chunks(N, V, chunk_elements):
            logq = logits[s:e].to(acc, copy=True)
            # log q = (z - m) - log1p(sum_{v != argmax} exp(z_v - m)): the argmax entry keeps relative
            # precision when q_max -> 1 (z - logsumexp(z) has eps * |lse| absolute error, all of log q there).
            m, top = logq.max(dim=-1, keepdim=True)
            logq.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
            logq.scatter_(1, top, float("-inf"))
            log1p_rest = torch.log1p(logq.exp().sum(dim=-1, keepdim=True))
            logq.scatter_(1, top, 0.0).sub_(log1p_rest)
            q = logq.exp()
            logq.masked_fill_(q == 0, 0.0)  # q log q -> 0 for q = 0 (logq = -inf would give NaN)
            mu_c = (q * logq).sum(dim=-1)
            var[s:e] = logq.sub_(mu_c[:, None]).square_().mul_(q).sum(dim=-1)
            mu[s:e] = mu_c
    return mu, var


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _drop_last(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] with each row's last non-ignored entry set to IGNORE_INDEX."""
    valid = labels != IGNORE_INDEX
    pos = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last = torch.where(valid, pos, -1).amax(dim=1)
    out = labels.clone()
    rows = torch.nonzero(last >= 0).flatten()
    out[rows, last[rows]] = IGNORE_INDEX
    return out


def _logits(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def sequence_token_stats(model, batch: Mapping[str, torch.Tensor], *, moments: bool = False,
                         argmax: bool = False, drop_last_label: bool = False) -> list[dict]:
    """Teacher-forced per-token statistics of each sequence's scored tokens, from one forward pass.

    Args:
        model: a Hugging Face causal LM; batch: ``input_ids``, ``attention_mask``, ``labels`` [B, T] (unshifted,
            IGNORE_INDEX where not scored), on the model's device. The statistics come from the last hidden states
            and the output layer through ``ops.token_stats.linear_token_stats``: the logits exist a chunk of rows
            at a time, never as [B, T, V].
        moments: add Min-K%++'s ``mu`` / ``var`` (mean and variance of log p under the model) at the scored
            positions.
        argmax: add ``correct`` (greedy argmax == label).
        drop_last_label: compute ``tok_logp`` / ``mu`` / ``var`` / ``correct`` without each row's last label.
    Returns:
        per sequence a dict of CPU 1-D tensors in token order: ``logp`` (float32, every scored token),
        ``tok_logp`` (float32, the scored tokens after ``drop_last_label``), optionally ``mu``, ``var`` (float32)
        and ``correct`` (bool) aligned with ``tok_logp``.
    """
    target = shift_labels(batch["labels"])  # position t scores token t + 1
    stats = teacher_forced_stats(model, batch, target)  # fused, no [B, T, V] logits for HF models
    labels = batch["labels"].to(stats.logp.device)
    target = target.to(labels.device)
    logp = stats.logp
    valid = target != IGNORE_INDEX
    tok_valid = shift_labels(_drop_last(labels)) != IGNORE_INDEX if drop_last_label else valid
    extra: dict[str, torch.Tensor] = {}
    if moments:
        extra["mu"], extra["var"] = stats.mean, stats.var
    if argmax:
        extra["correct"] = stats.argmax
    out = []
    for b in range(labels.shape[0]):
        st = {"logp": logp[b][valid[b]].float().cpu(), "tok_logp": logp[b][tok_valid[b]].float().cpu()}
        st.update({name: t[b][tok_valid[b]].cpu() for name, t in extra.items()})
        out.append(st)
    return out


def gradient_norm(model, batch: Mapping[str, torch.Tensor], p: float = 2.0, *,
                  drop_last_label: bool = False) -> float:
    """Gradient-norm statistic of ONE sequence (batch of size 1): mean over the parameter tensors that receive
    a gradient of ``||dL/dW||_p``, ``L = -mean_t log p_t`` over the scored tokens (without the last one when
    ``drop_last_label``; open-unlearning GradNormAttack). Uses ``torch.autograd.grad`` (``.grad`` buffers
    untouched); the model's mode is not changed. Norms are accumulated in float32 (float64 for float64 weights)."""
    AttackConfig(p=p)
    if batch["input_ids"].shape[0] != 1:
        raise ValueError(f"gradient_norm scores one sequence; batch has {batch['input_ids'].shape[0]}")
    params = [w for w in model.parameters() if w.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True: gradnorm needs gradients")
    with torch.enable_grad():
        logits = _logits(model, batch)
        labels = batch["labels"].to(logits.device)
        if drop_last_label:
            labels = _drop_last(labels)
        n = (shift_labels(labels) != IGNORE_INDEX).sum()
        if int(n) == 0:
            raise ValueError("an item has a single scored token and drop_last_label=True leaves none")
        logp = fastweight.token_logprobs(logits, labels, shift=True)
        grads = torch.autograd.grad(-logp.sum() / n, params, allow_unused=True)
    norms = [torch.linalg.vector_norm(g.to(acc_dtype(g.dtype)), ord=p) for g in grads if g is not None]
    return float(torch.stack([x.double() for x in norms]).mean())


# ------------------------------------------------------------------------------------------------ model-facing
Item = Mapping[str, "torch.Tensor | Sequence[int]"]


def encode_texts(tokenizer, texts: Sequence[str], *, max_length: int = 2048) -> list[dict[str, torch.Tensor]]:
    """Items for raw texts (MUSE's PrivLeak sets): the tokenizer's ids (its defaults, BOS where it adds one), cut
    to ``max_length``, every token labelled (the first is never scored: nothing predicts it)."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    items = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        ids = torch.tensor(list(tokenizer(text)["input_ids"])[:max_length], dtype=torch.long)
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return items


def _batches(items: Sequence[Item], batch_size: int, device: torch.device, name: str
             ) -> Iterable[dict[str, torch.Tensor]]:
    """Right-padded batches on ``device`` over ``items``; each item needs ``input_ids`` and ``labels``
    (1-D, same length) and may carry ``attention_mask``; other keys (``index``, ...) are ignored."""
    for s in range(0, len(items), batch_size):
        feats = []
        for i, item in enumerate(items[s:s + batch_size], start=s):
            if not isinstance(item, Mapping) or "input_ids" not in item or "labels" not in item:
                raise ValueError(f"{name}[{i}] must be a mapping with 'input_ids' and 'labels'")
            ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
            labels = torch.as_tensor(item["labels"], dtype=torch.long)
            mask = torch.as_tensor(item.get("attention_mask", torch.ones_like(ids)), dtype=torch.long)
            if ids.dim() != 1 or labels.shape != ids.shape or mask.shape != ids.shape:
                raise ValueError(f"{name}[{i}]: input_ids, labels and attention_mask must be 1-D of one length, "
                                 f"got {tuple(ids.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}")
            if not bool((labels[1:] != IGNORE_INDEX).any()):
                raise ValueError(f"{name}[{i}] has no scored token (labels after the first are all IGNORE_INDEX)")
            feats.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        yield {k: v.to(device) for k, v in pad_collate(feats, 0).items()}


def _check_attacks(attacks: Sequence[str], tokenizer, reference_model) -> tuple[str, ...]:
    if isinstance(attacks, str) or not attacks:
        raise ValueError(f"attacks must be a non-empty sequence of names from {ATTACKS}, got {attacks!r}")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"attacks has unknown names {unknown}; choose from {ATTACKS}")
    if "zlib" in attacks and tokenizer is None:
        raise ValueError("tokenizer is required for the 'zlib' attack (it decodes the labelled tokens)")
    if "reference" in attacks and reference_model is None:
        raise ValueError("reference_model is required for the 'reference' attack")
    return tuple(dict.fromkeys(attacks))


def _result(scores: Sequence[float]) -> MetricResult:
    return {"agg_value": float(sum(scores) / len(scores)),
            "value_by_index": {str(i): {"score": float(s)} for i, s in enumerate(scores)}}


class _EvalMode:
    """Put models in eval mode for the block and restore each one's mode afterwards."""

    def __init__(self, *models) -> None:
        self.models = [m for m in models if m is not None]

    def __enter__(self):
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.models, self.modes):
            m.train(mode)


def attack_scores(model, items: Sequence[Item], attacks: Sequence[AttackName] = DEFAULT_ATTACKS, *,
                  tokenizer=None, reference_model=None, config: AttackConfig | None = None,
                  ) -> dict[str, MetricResult]:
    """Per-item scores of each attack on one set (higher = less likely a member).

    Args:
        model: causal LM (``model(input_ids=, attention_mask=).logits``); put in eval mode for the call.
        items: sequence of mappings with 1-D ``input_ids``, ``labels`` (IGNORE_INDEX where not scored) and
            optionally ``attention_mask`` (a ``QADataset``, ``encode_texts(...)``, a list of dicts).
        attacks: names from ``ATTACKS``. tokenizer: needed by "zlib". reference_model: needed by "reference"
            (same tokenizer as ``model``).
    Returns:
        ``{attack: {"agg_value": mean score, "value_by_index": {str(i): {"score"}}}}`` in item order.
    """
    cfg = config or AttackConfig()
    attacks = _check_attacks(attacks, tokenizer, reference_model)
    if len(items) == 0:
        raise ValueError("items must be non-empty")
    scores: dict[str, list[float]] = {a: [] for a in attacks}
    token_attacks = [a for a in attacks if a != "gradnorm"]
    device = _device(model)
    with _EvalMode(model, reference_model):
        if token_attacks:
            for batch in _batches(items, cfg.batch_size, device, "items"):
                stats = sequence_token_stats(model, batch, moments="min_k_plus_plus" in attacks,
                                             drop_last_label=cfg.drop_last_label)
                refs = (sequence_token_stats(reference_model, {k: v.to(_device(reference_model))
                                                               for k, v in batch.items()})
                        if "reference" in attacks else None)
                for b, st in enumerate(stats):
                    for a in token_attacks:
                        if a == "loss":
                            s = loss_score(st["logp"])
                        elif a == "zlib":
                            lab = batch["labels"][b]
                            text = tokenizer.decode(lab[lab != IGNORE_INDEX].tolist(), skip_special_tokens=True)
                            s = zlib_score(st["logp"], text)
                        elif a == "min_k":
                            s = min_k_score(_nonempty(st["tok_logp"]), cfg.k)
                        elif a == "min_k_plus_plus":
                            s = min_k_plus_plus_score(_nonempty(st["tok_logp"]), st["mu"], st["var"], cfg.k)
                        else:
                            s = reference_score(st["logp"], refs[b]["logp"])
                        scores[a].append(s)
        if "gradnorm" in attacks:
            for batch in _batches(items, 1, device, "items"):
                scores["gradnorm"].append(gradient_norm(model, batch, cfg.p, drop_last_label=cfg.drop_last_label))
    return {a: _result(scores[a]) for a in attacks}


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        raise ValueError("an item has a single scored token and drop_last_label=True leaves none")
    return t


def exact_memorization(model, items: Sequence[Item], *, config: AttackConfig | None = None) -> MetricResult:
    """Exact Memorization per item: the fraction of scored tokens whose greedy (argmax) prediction under teacher
    forcing equals the label (open-unlearning ``memorization.exact_memorization``; Tirumala et al. 2022).
    ``config.drop_last_label`` drops the last labelled token as open-unlearning does; higher = more memorised.
    Returns ``{"agg_value": mean EM, "value_by_index": {str(i): {"score"}}}``."""
    cfg = config or AttackConfig()
    if len(items) == 0:
        raise ValueError("items must be non-empty")
    em = []
    with _EvalMode(model):
        for batch in _batches(items, cfg.batch_size, _device(model), "items"):
            for st in sequence_token_stats(model, batch, argmax=True, drop_last_label=cfg.drop_last_label):
                em.append(float(_nonempty(st["correct"]).double().mean()))
    return _result(em)


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """AUC (``sklearn.metrics.roc_auc_score``) with forget labelled 0 and holdout 1 over loss-oriented scores,
    as open-unlearning's ``mia_auc``: 1 = forget items look like members, 0.5 = indistinguishable."""
    from sklearn.metrics import roc_auc_score

    f, h = [float(s) for s in forget_scores], [float(s) for s in holdout_scores]
    if not f or not h:
        raise ValueError(f"forget_scores ({len(f)}) and holdout_scores ({len(h)}) must both be non-empty")
    if any(math.isnan(s) for s in f + h):
        raise ValueError("forget_scores and holdout_scores must not contain NaN")
    return float(roc_auc_score([0] * len(f) + [1] * len(h), f + h))


def _scores(res: MetricResult) -> list[float]:
    by = res["value_by_index"]
    return [by[str(i)]["score"] for i in range(len(by))]


def run_attacks(model, forget: Sequence[Item], holdout: Sequence[Item],
                attacks: Sequence[AttackName] = DEFAULT_ATTACKS, *, tokenizer=None, reference_model=None,
                config: AttackConfig | None = None) -> dict[str, dict]:
    """Run membership-inference attacks with ``forget`` as members and ``holdout`` as non-members.

    Args: as ``attack_scores`` (``forget`` / ``holdout``: item sequences, e.g. ``encode_texts(tok, texts)``).
    Returns:
        ``{"mia_<attack>": {"agg_value": AUC, "value_by_index": {}, "forget": MetricResult,
        "holdout": MetricResult}}`` — open-unlearning's metric names and output layout; AUC by ``mia_auc``.
    """
    cfg = config or AttackConfig()
    attacks = _check_attacks(attacks, tokenizer, reference_model)
    kw = {"tokenizer": tokenizer, "reference_model": reference_model, "config": cfg}
    if len(forget) == 0 or len(holdout) == 0:
        raise ValueError(f"forget ({len(forget)}) and holdout ({len(holdout)}) must both be non-empty")
    per_forget = attack_scores(model, forget, attacks, **kw)
    per_holdout = attack_scores(model, holdout, attacks, **kw)
    return {f"mia_{a}": {"agg_value": mia_auc(_scores(per_forget[a]), _scores(per_holdout[a])),
                         "value_by_index": {}, "forget": per_forget[a], "holdout": per_holdout[a]}
            for a in attacks}


__all__ = ["ATTACKS", "AttackConfig", "AttackName", "DEFAULT_ATTACKS", "MINKPP_VAR_FLOOR", "attack_scores",
           "encode_texts", "exact_memorization", "gradient_norm", "logprob_moments", "loss_score", "mia_auc",
           "min_k_plus_plus_score", "min_k_score", "reference_score", "run_attacks", "sequence_token_stats",
           "zlib_score"]
