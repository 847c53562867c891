"""Unlearning losses: O(tokens) heads over the fused token log-likelihood ops.

Every public loss accepts logits [..., V], or hidden states [..., H] with ``lm_head=`` [V, H] (plus
``bias``/``softcap``). Formulas: ``shared/spec/LOSSES.md``; the table of methods with each variant's source:
``docs/losses-and-metrics.md``.

``LOSSES`` is the one registry: name -> ``LossSpec`` (function, defaults, needs_ref, needs_retain, source).
It is the only source of defaults: a spec's hyper-parameter defaults are read from its function's
signature (so they cannot drift from it) and its method-level defaults (forget/retain coefficients, the
retain regulariser, RMU's layers) live only here. ``fastweight.train.methods.build_method`` and every CLI
read it. Where sources disagree the *proposing paper's* value is the default:

* WGA beta = 5 (G-effect paper; open-unlearning uses 1).
* SatImp beta1 = 5, beta2 = 0.1 (SatImp code README; the open-unlearning port uses beta2 = 1 with forget
  coefficient 0.1 and a retain NLL term — build it with ``beta2=1.0, forget_coef=0.1, retain_loss="nll"``).
* NPO beta = 0.1 (NPO paper and open-unlearning; the G-effect code uses 0.5).
* KL retain term and UNDIAL over every position (masked=False), as TOFU's, G-effect's and open-unlearning's
  code; ``masked=True`` (answer tokens only) is an option.
* SatImp granularity and hard sampling as the released tmlr-group/SatImp code (hard sampling: its quantile
  thresholds and summed loss; Algorithm 1's counts with ``counts="paper"``).
* RMU as the WMDP release (centerforaisafety/wmdp ``rmu/unlearn.py``): layer 7 steered, layers 5-7 trained,
  ``param_ids=6`` = ``mlp.down_proj`` only, c = 6.5 and alpha = 1200 (its zephyr-7b command). One deliberate
  difference: the MSEs average over attention-mask positions (``mask_padding=True``); the release includes
  padding (``mask_padding=False`` reproduces it).
Every method's retain regulariser defaults to the one its paper defines ("nll" for GD, RMU's own retain
MSE) and to "none" otherwise; ``retain_loss="nll"|"kl"`` adds one with ``retain_coef``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, get_args

from fastweight.losses._input import token_logprobs
from fastweight.losses.ce_u import ce_u_loss, pdu_loss
from fastweight.losses.flat import DIVERGENCES, flat_loss, mean_token_prob
from fastweight.losses.preference import (
    dpo_loss, idk_dpo_loss, npo_loss, sequence_nll, simnpo_loss, tnpo_loss, wtnpo_loss,
)
from fastweight.losses.retain import kl_loss, nll_loss, undial_loss
from fastweight.losses.reweighted import (
    GRANULARITIES, SAMPLINGS, ga_loss, hard_sampling_loss, satimp_loss, simimp_loss, wga_loss,
)
from fastweight.losses.rmu import rmu_control_vector, rmu_loss
from fastweight.losses.released import (
    KTO_FORMS, kto_loss, llmu_loss, npo_batch_loss, npo_hard_loss, positions_mean_nll,
)

RetainLoss = Literal["none", "nll", "kl"]
RETAIN_LOSSES: tuple[str, ...] = get_args(RetainLoss)


@dataclass(frozen=True)
class LossSpec:
    """One registry entry.

    name: registry key. fn: the plain loss function. defaults: read-only mapping of every default
    (hyper-parameters from ``fn``'s signature, then method-level ones). needs_ref / needs_retain: whether
    the method needs a frozen reference model / a retain batch with its default configuration. source:
    paper (and code) the formula and defaults come from. formula: one line, spec notation.
    is_method: trainable as an unlearning method (False for the pure regularisers "nll" and "kl").
    needs_weights: the method needs the forget batch's ``token_weights`` (SatImp's ``*_imp``).
    """

    name: str
    fn: Callable[..., Any]
    defaults: Mapping[str, Any]
    needs_ref: bool
    needs_retain: bool
    source: str
    formula: str
    is_method: bool = True
    hparams: tuple[str, ...] = field(default=())
    needs_weights: bool = False  # the method reads per-token weights (``token_weights``) from its forget batch


# Method-level defaults shared by every method except RMU (which has its own retain term).
_COEFS = {"forget_coef": 1.0, "retain_coef": 1.0, "retain_loss": "none",
          "kl_masked": inspect.signature(kl_loss).parameters["masked"].default}


def _spec(name, fn, hparams, *, source, formula, needs_ref=False, needs_retain=False, overrides=None,
          method=None, is_method=True, coefs=True) -> LossSpec:
    sig = inspect.signature(fn).parameters
    defaults = {h: sig[h].default for h in hparams}
    defaults.update(overrides or {})
    if is_method:
        defaults.update(_COEFS if coefs else {})
        defaults.update(method or {})
    return LossSpec(name, fn, MappingProxyType(defaults), needs_ref, needs_retain, source, formula, is_method,
                    tuple(hparams))


_SATIMP = "Yang et al., ICML 2025 (SatImp); code tmlr-group/SatImp"
_GEFFECT = "Wang et al., ICLR 2025 (G-effect); code tmlr-group/G-effect"
_SATIMP_H = ("beta1", "beta2", "granularity", "group_size")

LOSSES: Mapping[str, LossSpec] = MappingProxyType({s.name: s for s in (
    _spec("ga", ga_loss, (), source="Jang et al., 2023; Maini et al., 2024 (TOFU)", formula="-tokmean(ell_f)"),
    _spec("gd", ga_loss, (), source="Liu et al., 2022; Maini et al., 2024 (TOFU)",
          formula="-tokmean(ell_f) + c * tokmean(ell_r)", needs_retain=True, method={"retain_loss": "nll"}),
    _spec("wga", wga_loss, ("beta",), source=_GEFFECT, formula="-tokmean(sg[p^beta] * ell_f)"),
    _spec("simimp", simimp_loss, ("beta",), source=_SATIMP, formula="-tokmean(sg[(1-p)^beta] * ell_f)"),
    _spec("satimp", satimp_loss, _SATIMP_H, source=_SATIMP,
          formula="-tokmean(sg[p^beta1 (1-p)^beta2] * ell_f)"),
    _spec("satimp_instance", satimp_loss, _SATIMP_H, source=_SATIMP, overrides={"granularity": "instance"},
          formula="-mean_b(sg[q_b^beta1 (1-q_b)^beta2] * S_b), q_b = exp(-S_b)"),
    _spec("satimp_group", satimp_loss, _SATIMP_H, source=_SATIMP, overrides={"granularity": "group"},
          formula="-tokmean(groupmean_G(sorted w) * ell_f)"),
    _spec("satimp_batch", satimp_loss, _SATIMP_H, source=_SATIMP, overrides={"granularity": "batch"},
          formula="-mean_b(w_b) * mean_b(S_b), w_b = q_b^beta1 (1-q_b)^beta2"),
    _spec("satimp_hard", hard_sampling_loss, ("k", "sampling", "seed"), source=_SATIMP + " (hard sampling)",
          formula="-sum of ell_f over tokens beyond the quantile(ell_b, 1-k) threshold (topk: above)"),
    _spec("npo", npo_loss, ("beta", "empty_rows"), source="Zhang et al., 2024 (NPO)", needs_ref=True,
          formula="-(2/beta) mean_b log sigmoid(beta (S_b - S_b^ref))"),
    _spec("simnpo", simnpo_loss, ("beta", "gamma"), source="Fan et al., 2024 (SimNPO)",
          formula="-(2/beta) mean_b log sigmoid(beta (S_b / n_b - gamma))"),
    _spec("tnpo", tnpo_loss, ("beta",), source=_GEFFECT, needs_ref=True,
          formula="-tokmean(sg[2 p^beta / (p^beta + p_ref^beta + 1e-5)] * ell_f)"),
    _spec("wtnpo", wtnpo_loss, ("alpha", "beta"), source=_GEFFECT, needs_ref=True,
          formula="-tokmean(sg[p^alpha * 2 p^beta / (p^beta + p_ref^beta + 1e-5)] * ell_f)"),
    _spec("idkdpo", idk_dpo_loss, ("beta",), source="Rafailov et al., 2023 (DPO); Maini et al., 2024 (IdkDPO)",
          needs_ref=True, formula="-(2/beta) mean log sigmoid(beta ((S_f - S_f^ref) - (S_idk - S_idk^ref)))"),
    _spec("flat", flat_loss, ("divergence",), source="Wang et al., ICLR 2025 (FLAT); code UCSC-REAL/FLAT",
          formula="mean_b[-g(P_idk) + f*(g(P_f))], P = mean token probability"),
    _spec("undial", undial_loss, ("beta", "form"), source="Dong et al., 2024 (UNDIAL); open-unlearning",
          needs_ref=True,
          formula="mean_t KL(softmax(z_ref - beta onehot(y)) || p_theta) over every position"),
    _spec("rmu", rmu_loss, ("alpha",), source="Li et al., 2024 (WMDP / RMU)", needs_ref=True, needs_retain=True,
          formula="MSE(h_l(x_f), c u) + alpha MSE(h_l(x_r), h_l^ref(x_r))",
          method={"steering_coef": inspect.signature(rmu_control_vector).parameters["steering_coef"].default,
                  "layer": 7, "trainable_layers": (5, 6, 7), "param_keys": ("mlp.down_proj",),
                  "seed": 0, "mask_padding": True, "convention": "wmdp", "gamma": 1.0, "trainable_regex": (".*",)},
          coefs=False),
    _spec("ceu", ce_u_loss, ("ignore_first_n",),
          source="Yang et al., 2025 (CE-U, arXiv:2503.01224); open-unlearning",
          formula="tokmean_{t > n}(LSE(z_t) - sum_{v != y} sg[softmax(z_t | z_y = -inf)]_v z_t,v)"),
    _spec("pdu", pdu_loss, (), source="Entesari et al., 2025 (PDU, primal-dual unlearning); open-unlearning",
          needs_retain=True, formula="tokmean_unshifted((max_v z_t - mean_v z_t)^2) + lambda (ell_r - eps)",
          method={"retain_loss": "nll", "retain_eps": 0.0, "primal_dual": False, "dual_step_size": 1.0}),
    _spec("nll", nll_loss, (), source="cross-entropy (retain term)", formula="tokmean(ell_r)", is_method=False),
    _spec("kl", kl_loss, ("masked",), source="Maini et al., 2024 (TOFU KL); G-effect; open-unlearning",
          needs_ref=True, formula="batchmean_t KL(p_ref || p_theta)", is_method=False),
)})

# Methods as the seeds' code releases them (SatImp 51314c0, FLAT bf2ef07; fastweight.losses.released). The
# ``*_imp`` methods read the forget batch's ``token_weights`` (an importance mask, user data: see
# fastweight.data.importance); any token-level method applies them when a batch carries them.
_SATIMP_IMP = _SATIMP + " (dataloader/dataloader_imp.py, 51314c0)"
_SATIMP_HS = _SATIMP + " (dataloader/dataloader_hardsampling.py, 51314c0)"
_FLAT = "Wang et al., ICLR 2025 (FLAT); code UCSC-REAL/FLAT (dataloader.py, bf2ef07)"
_HS = ("k", "sampling", "seed")
_NPO_HS = ("beta",) + _HS
_SAMPLE_RULE = {"topk": "ell > quantile(ell_b, 1-k)", "bottomk": "ell < quantile(ell_b, 1-k)",
                "rand": "floor(k n_b) random tokens"}
_released_specs = [
    _spec("ga_imp", ga_loss, (), source=_SATIMP_IMP, formula="-sum(m_t * ell_f), m = token_weights"),
    _spec("gd_imp", positions_mean_nll, (), source=_SATIMP_IMP, needs_retain=True, method={"retain_loss": "nll"},
          formula="-sum(m_t ell_f) / P_f + sum(ell_r) / P_r, P = every shifted position"),
    _spec("npo_imp", npo_batch_loss, ("beta",), source=_SATIMP_IMP, needs_ref=True,
          formula="-(2/beta) log sigmoid(beta (S - S_ref)), S = sum_{b,t} m_t ell_f over the batch"),
    _spec("npo_gd_imp", npo_batch_loss, ("beta",), source=_SATIMP_IMP, needs_ref=True, needs_retain=True,
          method={"retain_loss": "nll"}, formula="npo_imp + c tokmean(ell_r)"),
    _spec("npo_kl_imp", npo_batch_loss, ("beta",), source=_SATIMP_IMP + "; its beta test reads hyper_param "
          "(None), so beta is 0.5", needs_ref=True, needs_retain=True, overrides={"beta": 0.5},
          method={"retain_loss": "kl"}, formula="npo_imp + c batchmean KL(p_ref || p_theta)"),
]
for _s in ("topk", "bottomk", "rand"):
    _samp = "random" if _s == "rand" else _s
    _released_specs += [
        _spec(f"ga_{_s}", hard_sampling_loss, _HS, source=_SATIMP_HS, overrides={"sampling": _samp},
              formula=f"-sum of ell_f over kept tokens ({_SAMPLE_RULE[_s]})"),
        _spec(f"gd_{_s}", hard_sampling_loss, _HS, source=_SATIMP_HS, overrides={"sampling": _samp},
              needs_retain=True, method={"retain_loss": "nll"},
              formula=f"-sum of ell_f over kept tokens ({_SAMPLE_RULE[_s]}) + c sum(ell_r)"),
        _spec(f"npo_{_s}", npo_hard_loss, _NPO_HS, source=_SATIMP_HS, overrides={"sampling": _samp},
              needs_ref=True, formula=f"npo_imp with m = kept tokens ({_SAMPLE_RULE[_s]}, current model)"),
        _spec(f"npo_gd_{_s}", npo_hard_loss, _NPO_HS, source=_SATIMP_HS, overrides={"sampling": _samp},
              needs_ref=True, needs_retain=True, method={"forget_coef": 0.1, "retain_loss": "nll"},
              formula=f"0.1 npo_{_s} + c tokmean(ell_r)"),
    ]
_released_specs += [
    _spec("kto_sigmoid", kto_loss, ("beta", "form"), source=_SATIMP + " (dataloader/dataloader_base.py, 51314c0)",
          needs_ref=True, formula="1 - (2/beta) mean_b sigmoid(z - beta (S_b^ref - S_b)), z = no-grad mean "
          "log-ratio of the refusals"),
    _spec("kto_logsigmoid", kto_loss, ("beta", "form"), source=_SATIMP + " (dataloader/dataloader_base.py, 51314c0)",
          needs_ref=True, overrides={"form": "logsigmoid"},
          formula="1 - (2/beta) mean_b log sigmoid(z - beta (S_b^ref - S_b))"),
    _spec("kto_logsigmoid_gd", kto_loss, ("beta", "form"),
          source=_SATIMP + " (dataloader/dataloader_base.py, 51314c0)", needs_ref=True, needs_retain=True,
          overrides={"form": "logsigmoid"}, method={"retain_loss": "nll"},
          formula="kto_logsigmoid + c tokmean(ell_r)"),
    _spec("flat_reverse_kl", flat_loss, ("divergence",), source=_FLAT, overrides={"divergence": "reverse_kl"},
          formula="mean_b[exp(P_idk) - 1 - P_f] (released; raises P_f: use divergence='reverse_kl_fgan')"),
    _spec("flat_hellinger", flat_loss, ("divergence",), source=_FLAT, overrides={"divergence": "hellinger"},
          formula="mean_b[exp(P_idk) + exp(-P_f) - 2] (released; raises P_f: use divergence='hellinger_fgan')"),
    _spec("flat_neyman", flat_loss, ("divergence",), source=_FLAT, overrides={"divergence": "neyman"},
          formula="mean_b[exp(P_idk) + 1 - 2 sqrt(1 - P_f)] (released; lowers P_idk: 'neyman_fgan')"),
    _spec("llmu", llmu_loss, ("ga_weight", "mismatch_weight"), source="Yao et al., 2023 (LLMU) as " + _FLAT,
          needs_ref=True, needs_retain=True, method={"retain_loss": "kl"},
          formula="0.5 (-tokmean(ell_f)) + tokmean(ell_mismatch) + batchmean KL(p_ref || p_theta) on retain"),
]
_released_specs = [replace(s, needs_weights=True) if s.name.endswith("_imp") else s for s in _released_specs]
LOSSES = MappingProxyType({**LOSSES, **{s.name: s for s in _released_specs}})

METHOD_NAMES: tuple[str, ...] = tuple(n for n, s in LOSSES.items() if s.is_method)


def get(name: str) -> LossSpec:
    """The registry entry for ``name``; ValueError naming the known names otherwise."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss name {name!r}; known names: {', '.join(LOSSES)}")
    return LOSSES[name]


__all__ = [
    "DIVERGENCES", "GRANULARITIES", "LOSSES", "LossSpec", "METHOD_NAMES", "RETAIN_LOSSES", "SAMPLINGS",
    "ce_u_loss", "dpo_loss", "pdu_loss",
    "flat_loss", "ga_loss", "hard_sampling_loss", "idk_dpo_loss", "kl_loss", "mean_token_prob",
    "nll_loss", "npo_loss", "rmu_control_vector", "rmu_loss", "satimp_loss", "sequence_nll", "simimp_loss",
    "simnpo_loss", "tnpo_loss", "token_logprobs", "undial_loss", "wga_loss", "wtnpo_loss",
    "KTO_FORMS", "kto_loss", "llmu_loss", "npo_batch_loss", "npo_hard_loss", "positions_mean_nll",
]
