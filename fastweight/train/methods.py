"""Unlearning methods for the trainer: one small class per method, each with a config dataclass.

Defaults come only from ``fastweight.losses.LOSSES`` (``build_method(name, **overrides)``); config
dataclasses have no defaults of their own. Every method gets its tensors from one shared forward helper,
``lm_forward``: the last decoder layer's hidden states plus the output head read by ``output_head`` (weight,
bias, Gemma-2 soft-capping, Cohere/Granite logit scale), handed to the fused losses with ``lm_head=`` so
[B, T, V] logits are never built by the model.

Batches are dicts of tensors in Hugging Face form: ``input_ids`` [B, T], ``attention_mask`` [B, T] (optional),
``labels`` [B, T] unshifted with ``IGNORE_INDEX`` on prompt and padding (the losses apply the causal shift).
FLAT and IdkDPO forget batches also carry ``idk_input_ids``, ``idk_attention_mask``, ``idk_labels``: a refusal
answer to the same question. A batch may carry ``token_weights`` [B, T] (float, like ``labels``; e.g. SatImp's
importance mask from ``fastweight.data.importance``): every token-level method then applies them
(``batch_weights``; reference sequence NLLs are weighted alike), and the ``*_imp`` methods require them. The
methods as the seeds' code releases them live in ``fastweight.train.methods_released``. The reference model runs under ``torch.no_grad`` and only for methods whose
``needs_ref`` is true (their loss needs it, or ``retain_loss="kl"``); a missing one is a ValueError.

Reference kinds (``method.ref_kind``): "none"; "table" (NPO, TNPO, WTNPO, IdkDPO without a KL retain term:
only the reference per-token log-probabilities of fixed sequences are read, so any object with
``token_logp(batch, prefix) -> [B, T]`` may stand in for the model, e.g. the trainer's precomputed
``fastweight.train.objective.RefLogpTable``); "model" (UNDIAL, RMU, KL retain: the reference distribution on
fresh batches). ``AdapterDisabled(peft_model)`` is a reference that is the same PEFT model with its adapters
switched off (no copy).

Normalisation: ``method(..., norm={"forget": c_f, "retain": c_r})`` sums each term (``reduction="sum"``) and
divides it by the given count, so a trainer can divide by the *global* number of units (``forget_unit`` /
``retain_unit``: "tokens", "sequences", "pairs", "positions" (unmasked KL: every position of every sequence,
``sequence_positions``), "slots" (UNDIAL: every position with a next token)) over all micro-batches and
processes (Hugging Face's ``num_items_in_batch``). ``count_units(batch, "forget" | "retain")`` counts this
batch's units. A term whose unit is "local" (SatImp group/batch granularity, hard sampling, RMU) has no global
form: it is always the micro-batch mean.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch

from fastweight.losses import (
    LOSSES, METHOD_NAMES, flat_loss, get, idk_dpo_loss,
    kl_loss, nll_loss, npo_loss, rmu_control_vector, rmu_loss, simnpo_loss, token_logprobs,
    undial_loss,
)
from fastweight._constants import IGNORE_INDEX
from fastweight.integrations.transformers import gather_output_layer, output_head
from fastweight.losses._seq import check_number, valid_mask
from fastweight.losses._weights import shift_weights
from fastweight.ops._common import check_token_ids
from fastweight.train.method_configs import (  # noqa: F401 - re-exported: the configs are part of this API
    BetaConfig, FLATConfig, HardSamplingConfig, MethodConfig, NPOConfig, RMUConfig, SatImpConfig, SimNPOConfig,
    UNDIALConfig, WTNPOConfig,
)

# beta divides the loss (2 / beta) in these methods, so 0 is not a valid value there
_BETA_POSITIVE = ("npo", "simnpo", "tnpo", "wtnpo", "idkdpo")

METHODS: tuple[str, ...] = METHOD_NAMES


@dataclass
class MethodOutput:
    loss: torch.Tensor            # scalar to minimise
    stats: dict[str, float]       # forget_loss, retain_loss, mean_weight, ...


# ---------------------------------------------------------------------------------------------------------
# The one forward helper
@dataclass
class LMHidden:
    """Last-layer hidden states [B, T, H] and what turns them into logits (never applied here)."""

    hidden: torch.Tensor
    lm_head: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float = 1.0  # logits = logit_scale * lm_head(h) (Cohere, Granite; output_head)

    def head(self) -> dict[str, Any]:
        kw = dict(lm_head=self.lm_head, bias=self.bias, softcap=self.softcap)
        if self.logit_scale != 1.0:  # only when set: custom losses without the argument keep working
            kw["logit_scale"] = self.logit_scale
        return kw

    def ref_head(self) -> dict[str, Any]:
        kw = dict(ref_lm_head=self.lm_head, ref_bias=self.bias, ref_softcap=self.softcap)
        if self.logit_scale != 1.0:
            kw["ref_logit_scale"] = self.logit_scale
        return kw


def _batch_get(batch: dict, key: str, prefix: str = "") -> torch.Tensor:
    if not isinstance(batch, dict):
        raise TypeError(f"batches must be dicts of tensors, got {type(batch).__name__}")
    if prefix + key not in batch:
        raise ValueError(f"batch is missing {prefix + key!r} (has {sorted(batch)})")
    return batch[prefix + key]


def sequence_positions(batch: dict, slots: bool = False) -> torch.Tensor:
    """[B, T] bool: the positions of the batch's sequences (``attention_mask`` 1; all when it is absent), not
    the collator's padding; ``slots``: only those whose next position is one too (a next token exists).

    The unmasked KL retain term and UNDIAL count every position (every slot) of a sequence, prompt included, as
    the sources do. Batch padding is not counted under the trainer's global normalisation: how much of it a
    sequence gets depends on which sequences share its micro-batch, i.e. on the world size and batch size.
    Without padding these are exactly the sources' positions."""
    ids = _batch_get(batch, "input_ids")
    mask = batch.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if slots:
        nxt = torch.zeros_like(keep)
        nxt[..., :-1] = keep[..., 1:]
        keep = keep & nxt
    return keep


class AdapterDisabled:
    """Reference = ``peft_model`` with its adapters disabled (the base model; no copy is made)."""

    def __init__(self, peft_model) -> None:
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError(f"AdapterDisabled needs a PEFT model, got {type(peft_model).__name__}")
        self.model = peft_model


def _vocab_size(model) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def lm_forward(model, batch: dict, prefix: str = "") -> LMHidden:
    """Run the decoder of a Hugging Face causal LM on ``batch[prefix + 'input_ids']`` (and attention mask).

    Uses ``model.get_decoder()`` so the LM head is not applied; falls back to
    ``model(..., output_hidden_states=True).hidden_states[-1]`` for models without a separate decoder.
    ``model`` may be ``AdapterDisabled(peft_model)``: the forward then runs with the adapters switched off.
    """
    if isinstance(model, AdapterDisabled):
        with model.model.disable_adapter():
            return lm_forward(model.model, batch, prefix)
    gather_output_layer(model)  # FSDP2: an lm_head unit of its own is all-gathered first
    head = output_head(model)  # the one reader of the head (weight, bias, softcap, logit scale, refusals)
    return lm_hidden(decoder_hidden(model, batch, prefix), head)


def lm_hidden(hidden: torch.Tensor, head) -> LMHidden:
    """``LMHidden`` from last hidden states and an ``integrations.transformers.OutputHead``."""
    return LMHidden(hidden, head.weight, head.bias, head.softcap, head.logit_scale)


def decoder_hidden(model, batch: dict, prefix: str = "") -> torch.Tensor:
    """The last hidden states [B, T, H] of ``lm_forward`` (its decoder forward alone; the head is not read)."""
    input_ids = _batch_get(batch, "input_ids", prefix)
    attention_mask = batch.get(prefix + "attention_mask")
    check_token_ids(prefix + "input_ids", input_ids, _vocab_size(model))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


# ---------------------------------------------------------------------------------------------------------
# Methods
def _f(t: torch.Tensor) -> float:
    return float(t.detach())


class UnlearnMethod:
    """Base: ``forget_coef * forget_term + retain_coef * retain_term``; subclasses define ``forget_term``."""

    needs_idk: bool = False  # forget batches must carry idk_input_ids / idk_attention_mask / idk_labels
    forget_unit: str = "tokens"  # what the forget term averages over (see the module docstring)
    table_ref: bool = False  # the forget term reads the reference only through token_logp (see ref_kind)

    def __init__(self, name: str, config: Any) -> None:
        spec = LOSSES[name]
        self.name, self.config, self.spec = name, config, spec
        retain_loss = getattr(config, "retain_loss", "none")
        self.needs_ref: bool = spec.needs_ref or retain_loss == "kl"
        self.needs_retain: bool = spec.needs_retain or retain_loss != "none"
        self.ref_kind: str = ("none" if not self.needs_ref else
                              "table" if self.table_ref and retain_loss != "kl" else "model")
        self.retain_unit: str = ("none" if retain_loss == "none" else
                                 "positions" if retain_loss == "kl" and not config.kl_masked else "tokens")

    def count_units(self, batch: dict, which: str = "forget") -> int:
        """Number of ``forget_unit`` (or ``retain_unit``) units in ``batch``: valid shifted tokens, sequences
        with at least one, or forget/refusal pairs where both have one; 0 for "local" and "none" units."""
        unit = self.forget_unit if which == "forget" else self.retain_unit
        if unit in ("local", "none"):
            return 0
        if unit in ("positions", "slots"):
            return int(sequence_positions(batch, slots=unit == "slots").sum())
        valid = valid_mask(_batch_get(batch, "labels"), True, IGNORE_INDEX)
        if unit == "tokens":
            return int(valid.sum())
        rows = valid.any(-1)
        if unit == "pairs":
            rows = rows & valid_mask(_batch_get(batch, "labels", "idk_"), True, IGNORE_INDEX).any(-1)
        return int(rows.sum())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state of every ``torch.Generator`` the method owns (uint8 tensors), for exact resume."""
        return {k: v.get_state() for k, v in vars(self).items() if isinstance(v, torch.Generator)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        if set(state) != set(mine):
            raise ValueError(f"method state has generators {sorted(state)}, {self.name!r} owns {sorted(mine)}")
        for k, v in state.items():
            getattr(self, k).set_state(v.to(torch.uint8).cpu())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config})"

    def trainable(self, param_name: str) -> bool:
        return True

    def _check(self, retain, ref_model) -> None:
        if self.needs_ref and ref_model is None:
            raise ValueError(f"method {self.name!r} needs a reference model (ref_model=None given)")
        if self.needs_retain and retain is None:
            raise ValueError(f"method {self.name!r} needs a retain batch (retain=None given)")

    def forget_term(self, model, forget: dict, ref_model, reduction: str = "mean"
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def retain_term(self, model, retain: dict, ref_model, reduction: str = "mean") -> torch.Tensor:
        cfg = self.config
        labels = _batch_get(retain, "labels")
        out = lm_forward(model, retain)
        if cfg.retain_loss == "nll":
            return nll_loss(out.hidden, labels, shift=True, reduction=reduction, token_weights=batch_weights(retain),
                            **out.head())
        with torch.no_grad():
            ref = lm_forward(ref_model, retain)
        if reduction == "sum" and self.retain_unit == "positions":  # every position of every sequence
            kl = kl_loss(out.hidden, ref.hidden, labels, masked=False, shift=True, reduction="none", **out.head(),
                         **ref.ref_head())
            return (kl * sequence_positions(retain)).sum()
        return kl_loss(out.hidden, ref.hidden, labels, masked=cfg.kl_masked, shift=True, reduction=reduction,
                       token_weights=batch_weights(retain), **out.head(), **ref.ref_head())

    def _term(self, fn, unit: str, norm: dict | None, key: str):
        """``fn(reduction)`` as a mean, or as a sum divided by ``norm[key]`` when a global count is given."""
        if norm is None:
            return fn("mean")
        if unit == "local":  # a micro-batch mean, averaged over the micro-batches of the optimizer step
            return fn("mean") / float(norm.get("local", 1))
        if key not in norm:
            raise ValueError(f"norm must give the {key} count, got keys {sorted(norm)}")
        return fn("sum") / float(max(norm[key], 1e-12))

    def __call__(self, model, forget: dict, retain: dict | None = None, ref_model=None, *,
                 norm: dict[str, float] | None = None) -> MethodOutput:
        """``MethodOutput(loss, stats)``; ``norm`` as in the module docstring (None: micro-batch means)."""
        self._check(retain, ref_model)
        cfg = self.config
        stats: dict[str, float] = {}

        def forget_fn(reduction):
            value, st = self.forget_term(model, forget, ref_model, reduction)
            stats.update(st)
            return value

        forget_loss = self._term(forget_fn, self.forget_unit, norm, "forget")
        loss = cfg.forget_coef * forget_loss
        stats["forget_loss"] = _f(forget_loss)
        if cfg.retain_loss != "none":
            retain_loss = self._term(lambda r: self.retain_term(model, retain, ref_model, r), self.retain_unit,
                                     norm, "retain")
            loss = loss + cfg.retain_coef * retain_loss
            stats["retain_loss"] = _f(retain_loss)
        stats["loss"] = _f(loss)
        return MethodOutput(loss, stats)


def batch_weights(batch: dict, prefix: str = "", required: bool = False) -> torch.Tensor | None:
    """``batch[prefix + 'token_weights']`` ([B, T] float like the labels, unshifted; e.g. an importance mask
    from ``fastweight.data.importance``), or None when the batch has none (a ValueError when ``required``)."""
    tw = batch.get(prefix + "token_weights") if isinstance(batch, dict) else None
    if tw is None and required:
        raise ValueError(f"this method needs per-token weights: the batch must carry {prefix + 'token_weights'!r} "
                         f"([B, T] float like labels; see fastweight.data.importance)")
    return tw


def ref_sequence_nll(ref_model, batch: dict, prefix: str = "") -> torch.Tensor:
    """Reference sequence NLLs [B] (``-sum`` of ``ref_token_logp``), weighted by the batch's ``token_weights``
    (shifted like the labels) when it carries them, as the policy's are."""
    logp = ref_token_logp(ref_model, batch, prefix)
    tw = batch_weights(batch, prefix)
    if tw is not None:
        logp = logp * shift_weights(tw.detach().to(logp.device, logp.dtype))
    return -logp.sum(-1)


def ref_token_logp(ref_model, batch: dict, prefix: str = "") -> torch.Tensor:
    """Reference log-probabilities [B, T] float32 of ``batch[prefix + 'labels']`` (shifted; 0 where ignored),
    from a table (``ref_model.token_logp``) or a live forward under ``torch.no_grad``."""
    labels = _batch_get(batch, "labels", prefix)
    if hasattr(ref_model, "token_logp"):
        logp = ref_model.token_logp(batch, prefix)
    else:
        with torch.no_grad():
            ref = lm_forward(ref_model, batch, prefix)
            logp = token_logprobs(ref.hidden, labels, shift=True, **ref.head())
    return torch.where(valid_mask(labels, True, IGNORE_INDEX), logp.float(), 0.0).detach()


def _mean_weight(w: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean detached weight over valid (shifted) tokens; per-sequence weights (instance level): plain mean."""
    if w.shape == labels.shape:
        valid = valid_mask(labels, True, IGNORE_INDEX)
        return _f(torch.where(valid, w, 0.0).sum() / valid.sum().clamp(min=1))
    return _f(w.float().mean())


def warn_empty_rows(method: str, labels: torch.Tensor, treatment: str, prefix: str = "") -> None:
    """Warn, naming the rows, when forget sequences have no valid (shifted) answer token: their sequence-level
    terms (NPO's, SimNPO's S_b / n_b) are undefined there (open-unlearning's SimNPO gives NaN)."""
    empty = ~valid_mask(labels, True, IGNORE_INDEX).any(-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        warnings.warn(f"{method}: forget batch {prefix}row(s) {rows} have no answer token (every shifted label is "
                      f"{IGNORE_INDEX}); {treatment}", RuntimeWarning, stacklevel=3)


class TokenLossMethod(UnlearnMethod):
    """GA, GD, WGA, SimImp, SatImp (all granularities): ``spec.fn(hidden, labels, **hparams)`` on the forget batch."""

    def __init__(self, name, config):
        super().__init__(name, config)
        granularity = getattr(config, "granularity", "token")
        self.forget_unit = {"token": "tokens", "instance": "sequences"}.get(granularity, "local")

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        out = lm_forward(model, forget)
        hp = {h: getattr(self.config, h) for h in self.spec.hparams}
        loss, w = self.spec.fn(out.hidden, labels, shift=True, return_weights=True, reduction=reduction, **hp,
                               token_weights=batch_weights(forget), **out.head())
        return loss, {"mean_weight": _mean_weight(w, labels)}


class HardSamplingMethod(TokenLossMethod):
    """SatImp hard sampling; Random draws from one generator per method, seeded once, advanced per step
    (its state is part of ``state_dict`` so a resumed run draws the same masks)."""

    def __init__(self, name, config):
        super().__init__(name, config)
        self.forget_unit = "local"  # the kept-token count is known only after the forward
        self.generator = torch.Generator().manual_seed(config.seed)

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        out = lm_forward(model, forget)
        cfg = self.config
        loss, w = self.spec.fn(out.hidden, labels, k=cfg.k, sampling=cfg.sampling, generator=self.generator,
                               shift=True, return_weights=True, token_weights=batch_weights(forget), **out.head())
        return loss, {"kept_tokens": _f(w.sum())}


class NPOMethod(UnlearnMethod):
    """NPO (``LOSSES['npo']``); the reference sequence NLL is the sum of ``ref_token_logp``."""

    forget_unit = "sequences"
    table_ref = True

    def count_units(self, batch: dict, which: str = "forget") -> int:
        if which == "forget" and self.config.empty_rows == "keep":
            return int(_batch_get(batch, "labels").shape[0])
        return super().count_units(batch, which)

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        keep = self.config.empty_rows == "keep"
        warn_empty_rows("npo", labels, "counted with S = S_ref = 0, i.e. (2/beta) log 2, as open-unlearning"
                        if keep else "left out of the mean (empty_rows='drop')")
        ref_nll = ref_sequence_nll(ref_model, forget)
        out = lm_forward(model, forget)
        return npo_loss(out.hidden, labels, ref_nll, beta=self.config.beta, shift=True, reduction=reduction,
                        token_weights=batch_weights(forget), empty_rows=self.config.empty_rows, **out.head()), {}


class SimNPOMethod(UnlearnMethod):
    """SimNPO (``LOSSES['simnpo']``)."""

    forget_unit = "sequences"

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        warn_empty_rows("simnpo", labels, "left out of the mean (S_b / n_b is 0 / 0 there; open-unlearning gives "
                        "a NaN loss)")
        out = lm_forward(model, forget)
        cfg = self.config
        return simnpo_loss(out.hidden, labels, beta=cfg.beta, gamma=cfg.gamma, shift=True, reduction=reduction,
                           token_weights=batch_weights(forget), **out.head()), {}


class TNPOMethod(UnlearnMethod):
    """TNPO and WTNPO: per-token reference log-probabilities (a table or the frozen model)."""

    table_ref = True

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        ref_logp = ref_token_logp(ref_model, forget)
        out = lm_forward(model, forget)
        hp = {h: getattr(self.config, h) for h in self.spec.hparams}
        loss, w = self.spec.fn(out.hidden, labels, ref_logp, shift=True, return_weights=True, reduction=reduction,
                               **hp, token_weights=batch_weights(forget), **out.head())
        return loss, {"mean_weight": _mean_weight(w, labels)}


class WTNPOMethod(TNPOMethod):
    """WTNPO (``LOSSES['wtnpo']``)."""


class IdkDPOMethod(UnlearnMethod):
    needs_idk = True
    forget_unit = "pairs"
    table_ref = True

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        idk_labels = _batch_get(forget, "labels", "idk_")
        ref_f_nll = ref_sequence_nll(ref_model, forget)
        ref_e_nll = ref_sequence_nll(ref_model, forget, "idk_")
        out_f = lm_forward(model, forget)
        out_e = lm_forward(model, forget, "idk_")
        loss = idk_dpo_loss(out_f.hidden, labels, out_e.hidden, idk_labels, ref_f_nll, ref_e_nll,
                            beta=self.config.beta, shift=True, reduction=reduction,
                            forget_token_weights=batch_weights(forget), idk_token_weights=batch_weights(forget, "idk_"),
                            **out_f.head())
        return loss, {}


class FLATMethod(UnlearnMethod):
    needs_idk = True
    forget_unit = "pairs"

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        idk_labels = _batch_get(forget, "labels", "idk_")
        out_f = lm_forward(model, forget)
        out_e = lm_forward(model, forget, "idk_")
        loss = flat_loss(out_f.hidden, labels, out_e.hidden, idk_labels, divergence=self.config.divergence,
                         shift=True, reduction=reduction, forget_token_weights=batch_weights(forget),
                         idk_token_weights=batch_weights(forget, "idk_"), **out_f.head())
        return loss, {}


class UNDIALMethod(UnlearnMethod):
    """UNDIAL (``LOSSES['undial']``): every position with a next token, as open-unlearning (``slots``)."""

    forget_unit = "slots"

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        with torch.no_grad():
            ref = lm_forward(ref_model, forget)
        out = lm_forward(model, forget)
        slots = reduction == "sum"  # the trainer's global normalisation: sequence slots only, no batch padding
        loss = undial_loss(out.hidden, ref.hidden, labels, beta=self.config.beta, shift=True, form=self.config.form,
                           reduction="none" if slots else reduction, **out.head(), **ref.ref_head())
        return ((loss * sequence_positions(forget, slots=True)).sum() if slots else loss), {}


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers (``get_decoder().layers``, the Hugging Face convention)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected get_decoder().layers)")
    return layers


def layer_output(model: torch.nn.Module, batch: dict, layer: int) -> torch.Tensor:
    """Hidden states [B, T, H] output by decoder layer ``layer`` (a forward hook; the LM head is not run)."""
    layers = decoder_layers(model)
    if layer >= len(layers):
        raise ValueError(f"layer={layer} but the model has {len(layers)} decoder layers")
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = layers[layer].register_forward_hook(hook)
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        decoder(input_ids=_batch_get(batch, "input_ids"), attention_mask=batch.get("attention_mask"), use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def _per_sequence_mse(h: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """open-unlearning's ``compute_activation_loss`` (``src/trainer/unlearn/rmu.py``, d3d7cf9) as it computes:
    per sequence b the sum S_b over positions with labels != -100 of the mean over H of (h - target)^2, and the
    counts n_b; their ``S / n.sum(-1, keepdim=True)`` broadcasts [B] against [B, 1] to a [B, B] matrix whose
    mean is ``mean_b(S_b) * mean_b(1 / n_b)`` -- the per-sequence mean ``mean_b(S_b / n_b)`` whenever every
    sequence has the same count (a sequence with none: n_b clamped to 1 here, inf/NaN there)."""
    mask = (labels != IGNORE_INDEX).to(h.device)
    sq = (h.float() - target.float()).pow(2).mean(-1)
    per_seq = torch.where(mask, sq, 0.0).sum(-1)
    return per_seq.mean() * (1.0 / mask.sum(-1).clamp(min=1).float()).mean()


class RMUMethod(UnlearnMethod):
    """RMU: steer layer ``layer`` on forget data to ``c * u``, hold it at the reference on retain data."""

    forget_unit = "local"

    def __init__(self, name, config):
        super().__init__(name, config)
        self.retain_unit = "local"
        self.control: torch.Tensor | None = None

    def trainable(self, param_name: str) -> bool:
        if self.config.convention == "open_unlearning":
            return any(re.fullmatch(p, param_name) for p in self.config.trainable_regex)
        m = _LAYER_RE.search(param_name)
        return (m is not None and int(m.group(1)) in self.config.trainable_layers
                and any(k in param_name for k in self.config.param_keys))

    def __call__(self, model, forget: dict, retain: dict | None = None, ref_model=None, *,
                 norm: dict[str, float] | None = None) -> MethodOutput:
        self._check(retain, ref_model)  # norm is ignored: RMU's MSEs are micro-batch means ("local")
        cfg = self.config
        if cfg.convention == "open_unlearning":
            return self._open_unlearning(model, forget, retain, ref_model)
        h_f = layer_output(model, forget, cfg.layer)
        if self.control is None or self.control.shape[-1] != h_f.shape[-1]:
            self.control = rmu_control_vector(h_f.shape[-1], steering_coef=cfg.steering_coef, seed=cfg.seed)
        h_r = layer_output(model, retain, cfg.layer)
        with torch.no_grad():
            h_ref = layer_output(ref_model, retain, cfg.layer)
        masks = {}
        if cfg.mask_padding:
            masks = dict(forget_mask=forget.get("attention_mask"), retain_mask=retain.get("attention_mask"))
        total, f_term, r_term = rmu_loss(h_f, self.control.to(h_f.device), h_r, h_ref, alpha=cfg.alpha,
                                         return_terms=True, **masks)
        return MethodOutput(total, {"forget_loss": _f(f_term), "retain_loss": _f(r_term), "loss": _f(total)})

    def _open_unlearning(self, model, forget, retain, ref_model) -> MethodOutput:
        cfg = self.config
        h_f = layer_output(model, forget, cfg.layer)
        if self.control is None:  # their get_control_vector: the global RNG, drawn once, at the first step
            u = torch.rand(1, 1, h_f.shape[-1])
            self.control = (u / torch.norm(u) * cfg.steering_coef).reshape(-1)
        f_term = _per_sequence_mse(h_f, self.control.to(h_f.device, h_f.dtype).expand_as(h_f),
                                   _batch_get(forget, "labels"))
        h_r = layer_output(model, retain, cfg.layer)
        with torch.no_grad():
            h_ref = layer_output(ref_model, retain, cfg.layer)
        r_term = _per_sequence_mse(h_r, h_ref.to(h_r.device).detach(), _batch_get(retain, "labels"))
        total = cfg.gamma * f_term + cfg.alpha * r_term
        return MethodOutput(total, {"forget_loss": _f(f_term), "retain_loss": _f(r_term), "loss": _f(total)})


_CLASSES: dict[str, tuple[type, type]] = {
    "ga": (TokenLossMethod, MethodConfig), "gd": (TokenLossMethod, MethodConfig),
    "wga": (TokenLossMethod, BetaConfig), "simimp": (TokenLossMethod, BetaConfig),
    "satimp": (TokenLossMethod, SatImpConfig), "satimp_instance": (TokenLossMethod, SatImpConfig),
    "satimp_group": (TokenLossMethod, SatImpConfig), "satimp_batch": (TokenLossMethod, SatImpConfig),
    "satimp_hard": (HardSamplingMethod, HardSamplingConfig),
    "npo": (NPOMethod, NPOConfig), "simnpo": (SimNPOMethod, SimNPOConfig),
    "tnpo": (TNPOMethod, BetaConfig), "wtnpo": (WTNPOMethod, WTNPOConfig),
    "idkdpo": (IdkDPOMethod, BetaConfig), "flat": (FLATMethod, FLATConfig),
    "undial": (UNDIALMethod, UNDIALConfig), "rmu": (RMUMethod, RMUConfig),
}


def _classes() -> dict[str, tuple[type, type]]:
    """The method table, with the methods as the seeds' code releases them (``methods_released``) and the
    whole-logit-row methods (``methods_logit``: CE-U, PDU) added on first use. Both modules subclass this one's
    classes, so they are imported after it, whichever of the three a program imports first."""
    if "ceu" not in _CLASSES:
        from fastweight.train.methods_logit import CLASSES
        from fastweight.train.methods_released import released_method_classes

        _CLASSES.update(released_method_classes())
        _CLASSES.update(CLASSES)
    return _CLASSES


def build_method(name: str, **overrides: Any) -> UnlearnMethod:
    """The method ``name`` (one of ``METHODS``) with defaults from ``LOSSES[name]`` updated by ``overrides``.

    Unknown names, unknown override keys and invalid values raise ValueError naming the argument.
    """
    spec = get(name)
    if name not in _classes():
        raise ValueError(f"{name!r} is a regulariser, not an unlearning method; methods: {', '.join(METHODS)}")
    cls, cfg_cls = _CLASSES[name]
    known = {f.name for f in fields(cfg_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; options: {sorted(known)}")
    values = {**spec.defaults, **overrides}
    try:
        config = cfg_cls(**values)
        if name in _BETA_POSITIVE:
            check_number("beta", config.beta, low=0.0, low_open=True)
    except TypeError as e:  # a wrongly typed value: same contract as any other bad config
        raise ValueError(f"bad config for method {name!r}: {e}") from e
    except ValueError as e:
        raise ValueError(f"bad config for method {name!r}: {e}") from e
    return cls(name, config)
