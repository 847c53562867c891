"""Methods on whole-logit-row statistics, from open-unlearning: CE-U and PDU (``fastweight.losses.ce_u``).

Registered into ``fastweight.train.methods``'s table (``build_method("ceu")``, ``build_method("pdu")``).
"""
from __future__ import annotations

import torch

from fastweight.losses import ce_u_loss, pdu_loss
from fastweight.train.method_configs import CEUConfig, PDUConfig
from fastweight.train.methods import MethodOutput, UnlearnMethod, _batch_get, _f, lm_forward


class CEUMethod(UnlearnMethod):
    """CE-U (``LOSSES['ceu']``, ``fastweight.losses.ce_u``)."""

    forget_unit = "local"  # the first ignore_first_n answer tokens are not counted

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        out = lm_forward(model, forget)
        loss = ce_u_loss(out.hidden, _batch_get(forget, "labels"), ignore_first_n=self.config.ignore_first_n,
                         shift=True, **out.head())
        return loss, {}


class PDUMethod(UnlearnMethod):
    """PDU: ``forget_coef * pdu + lambda * (retain - retain_eps)`` with the dual variable ``lambda`` (starting at
    ``retain_coef``) raised after each call by ``dual_step_size * (retain - retain_eps)`` (clipped at 0) when
    ``primal_dual`` and ``dual_active``; a trainer may switch ``dual_active`` off during a warm-up and call
    ``dual_update(value)`` itself (open-unlearning's per-epoch update). ``lambda`` is part of ``state_dict``."""

    forget_unit = "local"  # PDU counts unshifted label positions

    def __init__(self, name, config):
        super().__init__(name, config)
        self.retain_weight = float(config.retain_coef)
        self.dual_active = bool(config.primal_dual)

    def dual_update(self, retain_minus_eps: float) -> None:
        self.retain_weight = max(0.0, self.retain_weight + self.config.dual_step_size * float(retain_minus_eps))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"retain_weight": torch.tensor(self.retain_weight, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"retain_weight"}:
            raise ValueError(f"PDU method state must have 'retain_weight', got {sorted(state)}")
        self.retain_weight = float(state["retain_weight"])

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        out = lm_forward(model, forget)
        return pdu_loss(out.hidden, _batch_get(forget, "labels"), shift=False, **out.head()), {}

    def __call__(self, model, forget: dict, retain: dict | None = None, ref_model=None, *,
                 norm: dict[str, float] | None = None) -> MethodOutput:
        self._check(retain, ref_model)  # norm is ignored: both terms are micro-batch means, as open-unlearning
        cfg = self.config
        forget_loss, stats = self.forget_term(model, forget, ref_model)
        retain_shifted = self.retain_term(model, retain, ref_model) - cfg.retain_eps
        loss = cfg.forget_coef * forget_loss + self.retain_weight * retain_shifted
        stats.update(forget_loss=_f(forget_loss), retain_loss=_f(retain_shifted + cfg.retain_eps),
                     retain_weight=self.retain_weight, loss=_f(loss))
        if cfg.primal_dual and self.dual_active:
            self.dual_update(_f(retain_shifted))
        return MethodOutput(loss, stats)


CLASSES: dict[str, tuple[type, type]] = {"ceu": (CEUMethod, CEUConfig), "pdu": (PDUMethod, PDUConfig)}

__all__ = ["CEUMethod", "PDUMethod"]
