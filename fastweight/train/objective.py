"""The unlearning objective as one ``nn.Module``, and the reference log-probability table.

``UnlearnObjective(policy, method, ref)`` owns the trained model (``policy``) and, where a method needs the
reference *distribution* on fresh batches (KL retain, UNDIAL, RMU), a frozen reference model as a submodule.
Its ``forward`` computes the whole loss, so when ``accelerator.prepare`` wraps it the engine sees every
parameter use inside one forward: DDP reduces the gradients, and FSDP / DeepSpeed ZeRO-3 gather sharded
weights (the output embedding ``lm_head`` included, which the fused losses read) through their own hooks.
This follows the engines' contract (Hugging Face ``Trainer.compute_loss`` likewise calls the prepared model);
no weight is read outside a forward and there is no hand-written collective.

``RefLogpTable``: NPO, TNPO, WTNPO and IdkDPO read the reference only through per-token log-probabilities of
fixed sequences (the forget answers and the drawn refusals). At step 0 the policy *is* the reference, so the
trainer runs the prepared policy once over those sequences before the first step (``mode="ref_logp"``) and
keeps an ``O(tokens)`` float32 table keyed by sequence content; no reference model is ever resident.
"""
from __future__ import annotations

from typing import Any

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.losses import nll_loss, token_logprobs
from fastweight.losses._seq import valid_mask
from fastweight.train.methods import lm_forward

Key = tuple[tuple[int, ...], tuple[int, ...]]


class RefLogpTable:
    """Reference per-token log-probabilities keyed by sequence content (valid input ids and labels).

    ``add(batch, prefix, logp)`` stores rows of ``logp`` [B, T] float32 for ``batch[prefix + 'input_ids']``;
    ``token_logp(batch, prefix)`` returns [B, T] float32 for any batch made of stored sequences, whatever
    their padding, order or batch composition (0 where a label is ignored). A sequence that was never
    stored is a KeyError naming it: the table never silently falls back to the current policy.
    """

    def __init__(self) -> None:
        self._rows: dict[Key, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._rows.values())

    @staticmethod
    def _keys(batch: dict, prefix: str) -> tuple[list[Key], torch.Tensor]:
        ids, labels = batch[prefix + "input_ids"], batch[prefix + "labels"]
        mask = batch.get(prefix + "attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        ids_c, labels_c, mask_c = ids.cpu(), labels.cpu(), mask.cpu()
        keys = [(tuple(ids_c[b][mask_c[b]].tolist()), tuple(labels_c[b][mask_c[b]].tolist()))
                for b in range(ids.shape[0])]
        return keys, mask_c

    def add(self, batch: dict, prefix: str, logp: torch.Tensor) -> None:
        keys, mask = self._keys(batch, prefix)
        logp = logp.detach().float().cpu()
        for b, key in enumerate(keys):
            self._rows[key] = logp[b][mask[b]].clone()

    def update(self, other: "RefLogpTable") -> None:
        self._rows.update(other._rows)

    def token_logp(self, batch: dict, prefix: str = "") -> torch.Tensor:
        keys, mask = self._keys(batch, prefix)
        labels = batch[prefix + "labels"]
        out = torch.zeros(labels.shape, dtype=torch.float32)
        for b, key in enumerate(keys):
            row = self._rows.get(key)
            if row is None:
                raise KeyError(f"sequence {prefix or 'forget'} row {b} (first ids {list(key[0][:8])}) is not in "
                               f"the reference table; it holds only the sequences precomputed before training")
            out[b][mask[b]] = row
        return torch.where(valid_mask(labels.cpu(), True, IGNORE_INDEX), out, 0.0).to(labels.device)

    def state(self) -> list[tuple[Key, torch.Tensor]]:
        return list(self._rows.items())

    @classmethod
    def from_state(cls, items) -> "RefLogpTable":
        t = cls()
        t._rows = {(tuple(k[0]), tuple(k[1])): v for k, v in items}
        return t


class UnlearnObjective(torch.nn.Module):
    """``forward(forget, retain, norm)`` -> ``{"loss": 0-d tensor, "stats": {name: float}}``.

    policy: the model being trained (a submodule). method: a ``fastweight.train.methods`` method, or None for
    plain fine-tuning (token NLL of the forget batch). ref: None, a frozen ``nn.Module`` (registered as the
    submodule ``ref``, so an engine shards it like the policy), or any other reference object the method
    accepts (``RefLogpTable``, ``AdapterDisabled``), set later with ``set_ref``.
    norm: global counts for ``method(..., norm=...)`` (see ``fastweight.train.methods``); None = means.
    ``forward(forget, mode="ref_logp")`` returns ``{"logp": [B, T], "idk_logp": [B, T] (when present)}`` of
    the policy under ``torch.no_grad``, for ``RefLogpTable``.
    """

    def __init__(self, policy: torch.nn.Module, method=None, ref: Any = None) -> None:
        super().__init__()
        self.policy = policy
        self.method = method
        # FSDP's transformer-based auto wrap without a layer class (accelerate: ``--fsdp_auto_wrap_policy
        # TRANSFORMER_BASED_WRAP``) reads the wrapped module's ``_no_split_modules``: the policy's decoder layers
        no_split = getattr(policy, "_no_split_modules", None)
        if no_split:
            self._no_split_modules = list(no_split)
        self.ref = None
        self._ref_obj = None
        self.set_ref(ref)

    def set_ref(self, ref: Any) -> None:
        if isinstance(ref, torch.nn.Module):
            ref.requires_grad_(False).eval()
            self.ref = ref
            self._ref_obj = None
        else:
            self.ref = None
            self._ref_obj = ref

    @property
    def reference(self):
        return self.ref if self.ref is not None else self._ref_obj

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref is not None:
            self.ref.eval()  # the frozen reference never runs dropout
        return self

    def forward(self, forget: dict, retain: dict | None = None, norm: dict | None = None,
                mode: str = "loss") -> dict[str, Any]:
        if mode == "ref_logp":
            with torch.no_grad():
                out = {}
                for prefix in ("", "idk_"):
                    if prefix + "input_ids" in forget:
                        h = lm_forward(self.policy, forget, prefix)
                        out[prefix + "logp"] = token_logprobs(h.hidden, forget[prefix + "labels"], shift=True,
                                                              **h.head())
                return out
        if mode != "loss":
            raise ValueError(f"mode must be 'loss' or 'ref_logp', got {mode!r}")
        if self.method is None:
            h = lm_forward(self.policy, forget)
            labels = forget["labels"]
            if norm is None:
                loss = nll_loss(h.hidden, labels, shift=True, **h.head())
            else:
                loss = nll_loss(h.hidden, labels, shift=True, reduction="sum", **h.head()) / max(norm["forget"],
                                                                                                 1e-12)
            return {"loss": loss, "stats": {"nll": float(loss.detach())}}
        out = self.method(self.policy, forget, retain, self.reference, norm=norm)
        return {"loss": out.loss, "stats": dict(out.stats)}


__all__ = ["RefLogpTable", "UnlearnObjective"]
