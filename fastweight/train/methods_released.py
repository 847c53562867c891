"""Trainer wiring of the methods as the seeds' code releases them (``fastweight.losses.released``): SatImp's
importance (``*_imp``) and hard-sampling GD / NPO methods, KTO, and LLMU as FLAT releases it.

Defaults come from ``fastweight.losses.LOSSES`` like every other method. ``*_imp`` methods need the forget
batch's ``token_weights`` (an importance mask aligned with the unshifted labels, as the released
``soft_mask``; build it with ``fastweight.data.importance``). Their terms are "local" (micro-batch values:
the released sums and batch-level log-ratios have no global-count form).
"""
from __future__ import annotations

from fastweight.losses import ga_loss, kto_loss, llmu_loss, nll_loss, npo_batch_loss, positions_mean_nll
from fastweight.train.method_configs import (
    BetaConfig, FLATConfig, HardSamplingConfig, KTOConfig, LLMUConfig, MethodConfig, NPOHardConfig,
)
from fastweight.train.methods import (
    FLATMethod, HardSamplingMethod, UnlearnMethod, _batch_get, batch_weights, lm_forward, ref_sequence_nll,
    ref_token_logp,
)


class ImpGAMethod(UnlearnMethod):
    """``ga_imp``: ``-sum(m_t ell_t)`` over the forget batch (``dataloader_imp.py``)."""

    forget_unit = "local"

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        out = lm_forward(model, forget)
        loss = ga_loss(out.hidden, _batch_get(forget, "labels"), shift=True, reduction="sum",
                       token_weights=batch_weights(forget, required=True), **out.head())
        return loss, {}


class ImpGDMethod(UnlearnMethod):
    """``gd_imp``: forget ``-sum(m ell)`` and retain ``sum(ell)``, each over every shifted position."""

    forget_unit = "local"

    def __init__(self, name, config):
        super().__init__(name, config)
        if config.retain_loss == "nll":
            self.retain_unit = "local"

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        out = lm_forward(model, forget)
        loss = positions_mean_nll(out.hidden, _batch_get(forget, "labels"), sign=-1.0, shift=True,
                                  token_weights=batch_weights(forget, required=True), **out.head())
        return loss, {}

    def retain_term(self, model, retain, ref_model, reduction="mean"):
        if self.config.retain_loss != "nll":
            return super().retain_term(model, retain, ref_model, reduction)
        out = lm_forward(model, retain)
        return positions_mean_nll(out.hidden, _batch_get(retain, "labels"), shift=True, **out.head())


class NPOImpMethod(UnlearnMethod):
    """``npo_imp`` / ``npo_gd_imp`` / ``npo_kl_imp``: NPO on one masked batch-level log-ratio."""

    forget_unit = "local"
    table_ref = True

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        ref_logp = ref_token_logp(ref_model, forget)
        out = lm_forward(model, forget)
        loss = npo_batch_loss(out.hidden, labels, ref_logp, beta=self.config.beta, shift=True,
                              token_weights=batch_weights(forget, required=True), **out.head())
        return loss, {}


class HardSamplingGDMethod(HardSamplingMethod):
    """``gd_topk`` / ``gd_bottomk`` / ``gd_rand``: hard-sampled GA (summed) plus the retain NLL *summed* over
    every retain token (``dataloader_hardsampling.py``: the retain mask it computes is unused)."""

    def __init__(self, name, config):
        super().__init__(name, config)
        if config.retain_loss == "nll":
            self.retain_unit = "local"

    def retain_term(self, model, retain, ref_model, reduction="mean"):
        if self.config.retain_loss != "nll":
            return super().retain_term(model, retain, ref_model, reduction)
        out = lm_forward(model, retain)
        return nll_loss(out.hidden, _batch_get(retain, "labels"), shift=True, reduction="sum",
                        token_weights=batch_weights(retain), **out.head())


class NPOHardMethod(HardSamplingMethod):
    """``npo_topk`` / ``npo_bottomk`` / ``npo_rand`` and the ``npo_gd_*`` forms (retain NLL, forget coef 0.1)."""

    table_ref = True

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        ref_logp = ref_token_logp(ref_model, forget)
        out = lm_forward(model, forget)
        cfg = self.config
        loss, w = self.spec.fn(out.hidden, labels, ref_logp, beta=cfg.beta, k=cfg.k, sampling=cfg.sampling,
                               generator=self.generator, shift=True, return_weights=True, **out.head())
        return loss, {"kept_tokens": float(w.sum())}


class KTOMethod(UnlearnMethod):
    """``kto_sigmoid`` / ``kto_logsigmoid`` (/ ``_gd``): forget answers vs the refusal answers' log-ratio."""

    needs_idk = True
    forget_unit = "local"  # z is a micro-batch mean (as released): no global-count form
    table_ref = True

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        labels = _batch_get(forget, "labels")
        ref_nll = ref_sequence_nll(ref_model, forget)
        ref_idk_nll = ref_sequence_nll(ref_model, forget, "idk_")
        idk_nll = ref_sequence_nll(model, forget, "idk_")  # the current model, no grad (as released)
        out = lm_forward(model, forget)
        cfg = self.config
        loss = kto_loss(out.hidden, labels, ref_nll, idk_nll, ref_idk_nll, beta=cfg.beta, form=cfg.form, shift=True,
                        reduction=reduction, token_weights=batch_weights(forget), **out.head())
        return loss, {}


class LLMUMethod(UnlearnMethod):
    """LLMU as FLAT releases it: 0.5 GA on the forget answers + 1 NLL on the mismatched (refusal) answers to the
    same questions (``idk_*`` keys) + the KL retain term (the method's default ``retain_loss="kl"``)."""

    needs_idk = True
    forget_unit = "local"

    def forget_term(self, model, forget, ref_model, reduction="mean"):
        out_f = lm_forward(model, forget)
        out_m = lm_forward(model, forget, "idk_")
        cfg = self.config
        loss = llmu_loss(out_f.hidden, _batch_get(forget, "labels"), out_m.hidden, _batch_get(forget, "labels", "idk_"),
                         ga_weight=cfg.ga_weight, mismatch_weight=cfg.mismatch_weight, shift=True,
                         forget_token_weights=batch_weights(forget), **out_f.head())
        return loss, {}


def released_method_classes() -> dict[str, tuple[type, type]]:
    """name -> (method class, config class) for every released method in ``fastweight.losses.LOSSES``."""
    classes: dict[str, tuple[type, type]] = {
        "ga_imp": (ImpGAMethod, MethodConfig), "gd_imp": (ImpGDMethod, MethodConfig),
        "npo_imp": (NPOImpMethod, BetaConfig), "npo_gd_imp": (NPOImpMethod, BetaConfig),
        "npo_kl_imp": (NPOImpMethod, BetaConfig),
        "kto_sigmoid": (KTOMethod, KTOConfig), "kto_logsigmoid": (KTOMethod, KTOConfig),
        "kto_logsigmoid_gd": (KTOMethod, KTOConfig),
        "flat_reverse_kl": (FLATMethod, FLATConfig), "flat_hellinger": (FLATMethod, FLATConfig),
        "flat_neyman": (FLATMethod, FLATConfig), "llmu": (LLMUMethod, LLMUConfig),
    }
    for s in ("topk", "bottomk", "rand"):
        classes[f"ga_{s}"] = (HardSamplingMethod, HardSamplingConfig)
        classes[f"gd_{s}"] = (HardSamplingGDMethod, HardSamplingConfig)
        classes[f"npo_{s}"] = (NPOHardMethod, NPOHardConfig)
        classes[f"npo_gd_{s}"] = (NPOHardMethod, NPOHardConfig)
    return classes


__all__ = ["released_method_classes"]
