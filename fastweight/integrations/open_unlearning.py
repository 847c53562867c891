"""open-unlearning trainer classes -> fastweight methods (for ``UnlearnTrainer``).

open-unlearning (github.com/locuslab/open-unlearning, ``src/trainer/unlearn/*.py``) configures a run by a
trainer ``handler`` name and its ``method_args``. ``open_unlearning_method(handler, **method_args)`` returns
the fastweight ``(method, method_options)`` whose loss equals that trainer's ``compute_loss`` on the same batch
(verified in ``tests/test_integrations_open_unlearning.py`` against their formulas, transcribed there), so
``UnlearnTrainer(method=name, method_options=options, ref_model=...)`` replaces the trainer class. Their
batches already have the layout UnlearnTrainer reads (``inputs["forget"]``, ``inputs["retain"]``, DPO's
``forget = {"original", "alternate"}``).

Their names -> ours: ``gamma`` (forget weight) -> ``forget_coef``, ``alpha`` (retain weight) ->
``retain_coef``, ``retain_loss_type`` "NLL"/"KL" -> ``retain_loss`` "nll"/"kl"; SimNPO's ``delta`` ->
``gamma``; DPO's alternate answer -> IdkDPO's refusal. Missing arguments take the values of their
``configs/trainer/<handler>.yaml`` (e.g. SatImp ``beta2=1, gamma=0.1``, UNDIAL ``beta=10, alpha=0``), not
fastweight's defaults, so an unchanged config keeps its meaning.

Known differences (docs/integrations.md has the measured table): their KL retain term averages over every
position of the unshifted logits, fastweight's over shifted label positions, so ``retain_loss_type="KL"``
agrees only up to that definition; UNDIAL: their soft-label cross-entropy ``-sum q log p`` averages over every
position, ignored labels included (whose one-hot index wraps around), fastweight's ``KL(q || p)`` over valid
labels only: the gradients are equal when no label is ignored, and the values differ by the mean entropy of
``q`` (a constant of the frozen reference). RMU and the
classes without a fastweight counterpart (CE-U, PDU) are not mapped: ``ValueError``.
"""
from __future__ import annotations

from typing import Any

# handler -> (fastweight method, their constructor defaults, their argument -> our option)
_COMMON = {"gamma": "forget_coef", "alpha": "retain_coef", "retain_loss_type": "retain_loss"}
_MAP: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "GradAscent": ("ga", {}, {}),
    "GradDiff": ("gd", {"gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"}, _COMMON),
    "NPO": ("npo", {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"},
            {**_COMMON, "beta": "beta"}),
    "SimNPO": ("simnpo", {"delta": 0.0, "beta": 4.5, "gamma": 0.125, "alpha": 1.0, "retain_loss_type": "NLL"},
               {**_COMMON, "beta": "beta", "delta": "gamma"}),
    "DPO": ("idkdpo", {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"},
            {**_COMMON, "beta": "beta"}),
    "WGA": ("wga", {"beta": 1.0, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"},
            {**_COMMON, "beta": "beta"}),
    "SatImp": ("satimp", {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1, "alpha": 1.0, "retain_loss_type": "NLL"},
               {**_COMMON, "beta1": "beta1", "beta2": "beta2"}),
    "UNDIAL": ("undial", {"beta": 10.0, "gamma": 1.0, "alpha": 0.0, "retain_loss_type": "NLL"},
               {**_COMMON, "beta": "beta"}),
}
OPEN_UNLEARNING_HANDLERS: tuple[str, ...] = tuple(_MAP)
_RETAIN = {"NLL": "nll", "KL": "kl"}


def open_unlearning_method(handler: str, **method_args: Any) -> tuple[str, dict[str, Any]]:
    """``(method, method_options)`` for ``UnlearnTrainer`` equal to open-unlearning's trainer ``handler``.

    Args:
        handler: one of ``OPEN_UNLEARNING_HANDLERS`` (their trainer class name).
        **method_args: their ``method_args`` (``beta``, ``gamma``, ``alpha``, ``retain_loss_type``, ...);
            missing ones take their configs/trainer/<handler>.yaml values.
    Raises:
        ValueError naming ``handler`` (unmapped class) or the unknown argument / retain_loss_type value.
    """
    if handler not in _MAP:
        raise ValueError(f"handler={handler!r} has no fastweight counterpart; mapped: {', '.join(_MAP)} (RMU: use "
                         "method='rmu' with its own options; CE-U, PDU: not implemented)")
    name, defaults, rename = _MAP[handler]
    unknown = sorted(set(method_args) - set(defaults))
    if unknown:
        raise ValueError(f"unknown method_args {unknown} for open-unlearning {handler}; it takes {sorted(defaults)}")
    values = {**defaults, **method_args}
    options: dict[str, Any] = {}
    for theirs, value in values.items():
        if theirs == "retain_loss_type":
            if value not in _RETAIN:
                raise ValueError(f"retain_loss_type must be one of {sorted(_RETAIN)}, got {value!r}")
            value = _RETAIN[value]
        options[rename[theirs]] = value
    if name not in ("ga", "gd"):  # their GradDiff subclasses always add the retain term
        options.setdefault("retain_loss", "nll")
    return name, options


__all__ = ["OPEN_UNLEARNING_HANDLERS", "open_unlearning_method"]
