"""``UnlearnTrainer``: every fastweight unlearning method inside ``transformers.Trainer``.

``compute_loss`` runs ``fastweight.train.methods.build_method(method, **method_options)`` on the batch, so
the optimiser, scheduler, gradient accumulation, mixed precision, gradient checkpointing, PEFT/LoRA, DDP/FSDP
and ``report_to`` all come from transformers itself; only the loss is fastweight's (fused, no ``[B, T, V]``
logits).

Batches (what the data collator returns; ``collate_unlearn`` builds them from per-example dicts):
``{"forget": {...}, "retain": {...}}`` with Hugging Face tensors ``input_ids`` / ``attention_mask`` /
``labels`` [B, T] (labels unshifted, ``IGNORE_INDEX`` on prompt and padding). Refusal ("idk") answers for
FLAT / IdkDPO: ``idk_input_ids`` / ``idk_attention_mask`` / ``idk_labels`` inside ``forget``, or a sub-dict
``inputs["idk"]``, or open-unlearning's DPO layout ``forget = {"original": ..., "alternate": ...}``.

Reference model (``ref_model=``): a model (used frozen under ``no_grad``, never updated), ``"copy"`` (a deep
copy of the policy made at construction: with ``fastweight.patch``'s copy-safe forward the copy computes
with its own weights), or ``"precomputed"``: the forget batch carries ``ref_token_logprobs`` [B, T] (and
``idk_ref_token_logprobs`` for IdkDPO), the reference's per-token log-probabilities in the layout of
``fastweight.patch``'s ``token_logprobs`` output (``add_reference_logprobs`` computes them). Precomputed
references serve the methods that read the reference only through fixed-sequence log-probabilities: NPO,
TNPO, WTNPO, IdkDPO (without a KL retain term).

The loss of one micro-batch is the method's micro-batch loss; the Trainer divides it by the number of
accumulation steps (``model_accepts_loss_kwargs`` is switched off), so a step equals the mean of its
micro-batch losses, as in a plain loop ``(method(...).loss / accum).backward()``.

When the Trainer wraps the model (DDP, FSDP, DeepSpeed), the method runs inside the wrapper's forward (the
patched forward's private ``fastweight_run`` hook), so the engine's forward hooks and gradient synchronisation
apply, and the loss is taken from the wrapper's output. Under DeepSpeed ZeRO-3 this is what makes the fused
losses' direct read of ``lm_head.weight`` correct, the mechanism ``fastweight.train.objective`` relies on: inside
the engine's forward, ZeRO-3 gathers a partitioned parameter read outside its own module's forward and registers
it as an external parameter of the running module (``deepspeed/runtime/zero/parameter_offload.py``,
``ZeROOrderedDict``), and its pre-backward hook on the forward's output tensors gathers it again for the
backward. A reference model under ZeRO-3 is a whole (unpartitioned) frozen copy on every process, or a
precomputed table; a ZeRO-3-partitioned reference is refused (nothing would gather its weights).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import transformers

from fastweight._constants import IGNORE_INDEX
from fastweight.integrations import transformers as _patch
from fastweight.losses import idk_dpo_loss, npo_loss, token_logprobs
from fastweight.train.methods import UnlearnMethod, build_method, lm_forward

# Methods whose reference enters only through fixed-sequence log-probabilities (precomputable).
PRECOMPUTABLE = ("npo", "tnpo", "wtnpo", "idkdpo")
_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


def collate_unlearn(features: list[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Stack a list of (nested) example dicts into batch tensors, right-padding 1-D sequences.

    Padding: ``*input_ids`` with ``pad_token_id``, ``*attention_mask`` with 0, ``*labels`` with IGNORE_INDEX;
    other keys must have equal shapes. Nested dicts (``forget``, ``retain``, ...) are collated key by key.
    """
    if not features:
        raise ValueError("features must be a non-empty list of dicts")
    first = features[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [f[key] for f in features]
        if isinstance(value, Mapping):
            out[key] = collate_unlearn(values, pad_token_id)
            continue
        tensors = [torch.as_tensor(v) for v in values]
        if tensors[0].dim() == 1 and len({t.shape[0] for t in tensors}) > 1:
            pad = next((p for suffix, p in _PAD.items() if key.endswith(suffix)), None)
            if pad is None:
                raise ValueError(f"feature {key!r} has sequences of different lengths and no known pad value")
            pad = pad_token_id if pad == 0 and key.endswith("input_ids") else pad
            length = max(t.shape[0] for t in tensors)
            tensors = [torch.cat([t, t.new_full((length - t.shape[0],), pad)]) for t in tensors]
        out[key] = torch.stack(tensors)
    return out


class PrecomputedReference:
    """Stand-in reference model reading ``batch[prefix + "ref_token_logprobs"]`` (``token_logp`` protocol)."""

    def token_logp(self, batch: Mapping[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        key = prefix + "ref_token_logprobs"
        if key not in batch:
            raise ValueError(f"ref_model='precomputed' but the forget batch has no {key!r}; compute it with "
                             "fastweight.integrations.trainer.add_reference_logprobs(ref_model, batch)")
        return batch[key].float().detach()


@torch.no_grad()
def add_reference_logprobs(ref_model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                           idk: bool = False) -> dict[str, torch.Tensor]:
    """``batch`` plus ``ref_token_logprobs`` [B, T] float32 (and ``idk_ref_token_logprobs`` with ``idk``):
    the frozen reference's log-probabilities of the shifted labels (entry t scores labels[:, t+1]; 0 where
    ignored and at t = T-1), computed once so training needs no reference model in memory."""
    out = dict(batch)
    for prefix in ("", "idk_") if idk else ("",):
        hidden = lm_forward(ref_model, batch, prefix)
        out[prefix + "ref_token_logprobs"] = token_logprobs(hidden.hidden, batch[prefix + "labels"], shift=True,
                                                            **hidden.head()).float()
    return out


def _precomputed_forget_term(method: UnlearnMethod, model, forget: dict) -> torch.Tensor:
    """The forget term of NPO / TNPO / WTNPO / IdkDPO from precomputed reference log-probabilities (the same
    formulas the method objects use with a live reference: ``LOSSES[name].fn``)."""
    ref = PrecomputedReference()
    cfg, labels = method.config, forget["labels"]
    out = lm_forward(model, forget)
    ref_logp = ref.token_logp(forget)
    if method.name == "npo":
        return npo_loss(out.hidden, labels, -ref_logp.sum(-1), beta=cfg.beta, shift=True, empty_rows=cfg.empty_rows,
                        **out.head())
    if method.name == "idkdpo":
        idk = lm_forward(model, forget, "idk_")
        return idk_dpo_loss(out.hidden, labels, idk.hidden, forget["idk_labels"], -ref_logp.sum(-1),
                            -ref.token_logp(forget, "idk_").sum(-1), beta=cfg.beta, shift=True, **out.head())
    hp = {h: getattr(cfg, h) for h in method.spec.hparams}
    return method.spec.fn(out.hidden, labels, ref_logp, shift=True, **hp, **out.head())


def _zero3_partitioned(module: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned ``module``'s parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _fsdp2_sharded(module: torch.nn.Module) -> bool:
    """True when FSDP2 (``fully_shard``, in place: the model is its own wrapper) manages ``module``: the method
    must then run inside its forward, where the root unit's parameters are gathered."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _normalise(inputs: Mapping[str, Any]) -> tuple[dict, dict | None]:
    """(forget, retain) batches with idk answers folded into forget under the ``idk_`` prefix."""
    if not isinstance(inputs, Mapping) or "forget" not in inputs:
        raise ValueError("UnlearnTrainer batches must be dicts with a 'forget' batch (and 'retain' where the "
                         f"method needs one); got keys {sorted(inputs) if isinstance(inputs, Mapping) else inputs}")
    forget = dict(inputs["forget"])
    if "original" in forget:  # open-unlearning's DPO layout
        alternate = forget.get("alternate", {})
        forget = {**forget["original"], **{"idk_" + k: v for k, v in alternate.items()}}
    if "idk" in inputs:
        forget.update({"idk_" + k: v for k, v in inputs["idk"].items()})
    retain = inputs.get("retain")
    return forget, (dict(retain) if retain is not None else None)


class UnlearnMixin:
    """Mixin turning any ``transformers.Trainer`` subclass into one whose loss is a fastweight unlearning method
    (``class MyTrainer(UnlearnMixin, SomeTrainer)``; ``UnlearnTrainer`` is ``UnlearnMixin`` + ``Trainer``).
    The base class keeps its own ``evaluate``, callbacks and constructor arguments (e.g. open-unlearning's
    ``evaluators``); only ``compute_loss``, ``log`` and the column filtering are the mixin's.

    Args:
        method: a name of ``fastweight.train.methods.METHODS`` ("ga", "gd", "wga", "satimp", "npo", "simnpo",
            "tnpo", "wtnpo", "idkdpo", "flat", "undial", "rmu", ...) or a built ``UnlearnMethod``.
        method_options: overrides of the registry defaults (``build_method(method, **method_options)``).
        ref_model: a frozen reference model, ``"copy"``, ``"precomputed"`` or None (methods without one).
        *args, **kwargs: ``transformers.Trainer``'s (model, args, train_dataset, data_collator, ...);
            ``data_collator`` defaults to ``collate_unlearn``.
    Raises ValueError at construction for: a method that needs a reference without one, a precomputed
    reference for a method that needs the reference model itself, an output layer carrying a PEFT adapter,
    a logit scale on a family ``fastweight.integrations.transformers.LOGIT_SCALES`` does not know (Granite's
    and Cohere's are applied), a reference partitioned by
    DeepSpeed ZeRO-3 (or ``"copy"`` of a partitioned policy).
    """

    def __init__(self, *args: Any, method: str | UnlearnMethod = "satimp",
                 method_options: Mapping[str, Any] | None = None, ref_model: Any = None, **kwargs: Any) -> None:
        if isinstance(method, UnlearnMethod):
            if method_options:
                raise ValueError("method_options given with a built method; pass the options to build_method")
            self.method = method
        else:
            self.method = build_method(method, **dict(method_options or {}))
        kwargs.setdefault("data_collator", collate_unlearn)
        super().__init__(*args, **kwargs)
        hf = _patch._unwrap(self.model)
        _patch.output_head(hf)  # LoRA on lm_head, an unknown logit scale: clear error now
        if not _patch.is_patched(hf):  # the copy-safe forward, the fastweight_run hook; "nll" for eval loss
            _patch.patch(hf, "nll")
        name = self.method.name
        self.precomputed = isinstance(ref_model, str) and ref_model == "precomputed"
        if self.precomputed and (name not in PRECOMPUTABLE or self.method.config.retain_loss == "kl"):
            raise ValueError(f"ref_model='precomputed' serves {PRECOMPUTABLE} without a KL retain term; method "
                             f"{name!r} needs the reference model itself: pass ref_model=<model> or 'copy'")
        if isinstance(ref_model, str) and ref_model == "copy":
            if _zero3_partitioned(hf):
                raise ValueError("ref_model='copy' of a model already partitioned by DeepSpeed ZeRO-3 (loaded under "
                                 "zero.Init, e.g. after TrainingArguments(deepspeed=...)) would copy empty shards; "
                                 "pass ref_model='precomputed' (NPO/TNPO/WTNPO/IdkDPO) or a reference model loaded "
                                 "without ZeRO-3 partitioning (kept whole on every process)")
            ref_model = copy.deepcopy(hf)
        elif isinstance(ref_model, str) and not self.precomputed:
            raise ValueError(f"ref_model must be a model, 'copy', 'precomputed' or None, got {ref_model!r}")
        if self.method.needs_ref and ref_model is None:
            raise ValueError(f"method {name!r} needs a reference model: pass ref_model='copy' (a frozen copy of the "
                             "initial policy), ref_model=<model>"
                             + (", or ref_model='precomputed'" if name in PRECOMPUTABLE else ""))
        if isinstance(ref_model, torch.nn.Module) and self.method.needs_ref and _zero3_partitioned(ref_model):
            raise ValueError("ref_model is partitioned by DeepSpeed ZeRO-3 (loaded under zero.Init) but runs outside "
                             "any DeepSpeed engine, so its weights would never be gathered; load the reference "
                             "without ZeRO-3 partitioning (kept whole on every process), use ref_model='copy' before "
                             "partitioning, or ref_model='precomputed' (NPO/TNPO/WTNPO/IdkDPO)")
        self.ref_model = None if self.precomputed or ref_model is None else self._freeze(ref_model)
        if not self.method.needs_ref:
            self.ref_model = None  # never built or used for methods that do not read it
        if self.args.gradient_checkpointing and hasattr(self.model, "peft_config"):
            # Reentrant checkpointing of a frozen-embedding PEFT model would see no input needing a gradient
            # (transformers < 4.5x default); let the embeddings' output carry one, as PEFT's own recipes do.
            hf.enable_input_require_grads()
        for pname, param in hf.named_parameters():  # RMU trains a few layers only
            if not self.method.trainable(pname):
                param.requires_grad_(False)
        # The method's loss is a micro-batch mean; let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = False
        self._fastweight_stats: dict[str, list[float]] = {}

    def _freeze(self, ref_model: torch.nn.Module) -> torch.nn.Module:
        ref = ref_model.to(self.args.device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # Nested forget/retain columns are not forward() arguments: the Trainer must keep them.
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def _run(self, hf: torch.nn.Module, forget: dict, retain: dict | None):
        method = self.method
        if self.precomputed:
            forget_loss = _precomputed_forget_term(method, hf, forget)
            loss = method.config.forget_coef * forget_loss
            stats = {"forget_loss": float(forget_loss.detach())}
            if method.config.retain_loss != "none":
                retain_loss = method.retain_term(hf, retain, None)
                loss = loss + method.config.retain_coef * retain_loss
                stats["retain_loss"] = float(retain_loss.detach())
            return loss, stats
        out = method(hf, forget, retain, self.ref_model)
        return out.loss, out.stats

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        forget, retain = _normalise(inputs)
        if self.method.needs_retain and retain is None:
            raise ValueError(f"method {self.method.name!r} needs a retain batch: the training batches must carry "
                             "inputs['retain'] (a forget/retain paired dataset), or set retain_loss='none'")
        if self.method.needs_idk and "idk_labels" not in forget:
            raise ValueError(f"method {self.method.name!r} needs refusal answers: put idk_input_ids / "
                             "idk_attention_mask / idk_labels in inputs['forget'] (or inputs['idk'])")
        hf = _patch._unwrap(self.accelerator.unwrap_model(model))
        result: dict[str, Any] = {}

        def run(inner):
            result["loss"], result["stats"] = self._run(inner, forget, retain)
            return result["loss"]

        if (model is hf or _patch._unwrap(model) is hf) and not _fsdp2_sharded(hf):
            loss = run(hf)
        else:
            # DDP / FSDP / DeepSpeed wrapper: run inside its forward so its hooks and gradient sync apply, and
            # take the loss from the wrapper's *output*: ZeRO-3 attaches its pre-backward hook (which gathers the
            # output embedding again for the backward) to the output tensors, not to the closure's tensor.
            loss = model(fastweight_run=run)["loss"]
        for key, value in result["stats"].items():
            self._fastweight_stats.setdefault(key, []).append(float(value))
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the method's statistics (``forget_loss``, ``retain_loss``, ``mean_weight``, ...) averaged since
        the last log, so ``report_to`` backends see them."""
        if "loss" in logs and self._fastweight_stats:
            for key, values in self._fastweight_stats.items():
                if key != "loss":
                    logs[f"fastweight_{key}"] = sum(values) / len(values)
            self._fastweight_stats = {}
        super().log(logs, *args, **kwargs)


class UnlearnTrainer(UnlearnMixin, transformers.Trainer):
    """``transformers.Trainer`` whose loss is a fastweight unlearning method (``UnlearnMixin``'s arguments)."""


__all__ = ["PRECOMPUTABLE", "PrecomputedReference", "UnlearnMixin", "UnlearnTrainer", "add_reference_logprobs",
           "collate_unlearn"]
