"""open-unlearning's trainers on fastweight's fused losses.

open-unlearning (github.com/locuslab/open-unlearning; read and tested against commit
d3d7cf9e6b3c125d16687d4232680d8d83548f1a) picks a trainer class by the ``handler`` of its trainer config
from ``TRAINER_REGISTRY`` (``src/trainer/__init__.py``) and builds it as ``cls(model=..., train_dataset=...,
eval_dataset=..., tokenizer=..., data_collator=..., args=..., evaluators=..., template_args=...,
**method_args)``. One line in that file, after their registrations,

    from fastweight.integrations.open_unlearning import register; register(TRAINER_REGISTRY)

replaces every handler they have (GradAscent, GradDiff, NPO, SimNPO, DPO, WGA, SatImp, UNDIAL, RMU, CEU, PDU)
by a class of the same name whose loss is the fastweight method ``open_unlearning_method`` maps it to, so their
``src/train.py`` experiments and configs run unchanged. Each class is ``UnlearnMixin`` over *their* trainer
base (their ``UnlearnTrainer``, found in the registered class's MRO): their ``evaluate`` (TOFU/MUSE/WMDP
evaluators; so ``eval_on_start`` / ``eval_strategy: epoch`` work without an ``eval_dataset``), their
``prediction_step``, data collator and batch layout (``{"forget": ..., "retain": ...}``, DPO's
``forget = {"original", "alternate"}``) stay theirs. A reference model, where the method needs one, is a frozen
copy of the initial model, as their ``_prepare_ref_model``. The model is patched with ``"nll"``: their evaluators'
``outputs.logits`` are formed on access (``fastweight.patch``). ``register(registry, replace=False)`` adds the
classes as ``Fastweight<handler>`` instead (then ``trainer.handler=FastweightNPO`` selects one).

Names: ``gamma`` (forget weight) -> ``forget_coef``, ``alpha`` (retain weight) -> ``retain_coef``,
``retain_loss_type`` "NLL"/"KL" -> ``retain_loss`` "nll"/"kl"; SimNPO's ``delta`` -> ``gamma``; DPO's alternate
answer -> IdkDPO's refusal; CE-U's ``ignore_first_n_answer_tokens`` -> ``ignore_first_n``; PDU's
``retain_loss_eps`` -> ``retain_eps``; RMU's ``steering_coeff`` -> ``steering_coef``, ``module_regex``
``model\\.layers\\.<i>`` -> ``layer=i``, ``trainable_params_regex`` -> ``trainable_regex`` under
``convention="open_unlearning"``. Values as theirs: NPO ``empty_rows="keep"``, UNDIAL ``form="ce"``. Missing
arguments take the values of their ``configs/trainer/<handler>.yaml`` (not fastweight's defaults).
Trainer-side arguments (PDU's ``dual_update_upon``, ``dual_warmup_epochs``, ``loss_names``) are read by the
registered classes, ignored by ``open_unlearning_method``.
"""
from __future__ import annotations

import re
from typing import Any

# handler -> (fastweight method, their yaml defaults, their argument -> our option, fixed options)
_COMMON = {"gamma": "forget_coef", "alpha": "retain_coef", "retain_loss_type": "retain_loss"}
_GD = {"gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"}
_MAP: dict[str, tuple[str, dict[str, Any], dict[str, str], dict[str, Any]]] = {
    "GradAscent": ("ga", {}, {}, {}),
    "GradDiff": ("gd", _GD, _COMMON, {}),
    "NPO": ("npo", {"beta": 0.1, **_GD}, {**_COMMON, "beta": "beta"}, {"empty_rows": "keep"}),
    "SimNPO": ("simnpo", {"delta": 0.0, "beta": 4.5, **_GD, "gamma": 0.125},
               {**_COMMON, "beta": "beta", "delta": "gamma"}, {}),
    "DPO": ("idkdpo", {"beta": 0.1, **_GD}, {**_COMMON, "beta": "beta"}, {}),
    "WGA": ("wga", {"beta": 1.0, **_GD}, {**_COMMON, "beta": "beta"}, {}),
    "SatImp": ("satimp", {"beta1": 5.0, "beta2": 1.0, **_GD, "gamma": 0.1},
               {**_COMMON, "beta1": "beta1", "beta2": "beta2"}, {}),
    "UNDIAL": ("undial", {"beta": 10.0, **_GD, "alpha": 0.0}, {**_COMMON, "beta": "beta"}, {"form": "ce"}),
    "CEU": ("ceu", {"ignore_first_n_answer_tokens": 1}, {"ignore_first_n_answer_tokens": "ignore_first_n"}, {}),
    "PDU": ("pdu", {"retain_loss_eps": None, "primal_dual": True, "dual_step_size": 1.0, **_GD},
            {**_COMMON, "retain_loss_eps": "retain_eps", "primal_dual": "primal_dual",
             "dual_step_size": "dual_step_size"}, {}),
    "RMU": ("rmu", {"gamma": 1.0, "steering_coeff": 2, "retain_loss_type": "EMBED_DIFF", "alpha": 1,
                    "module_regex": r"model\.layers\.7", "trainable_params_regex": [".*"]},
            {"gamma": "gamma", "alpha": "alpha", "steering_coeff": "steering_coef", "module_regex": "layer",
             "trainable_params_regex": "trainable_regex", "retain_loss_type": "retain_loss"},
            {"convention": "open_unlearning"}),
}
OPEN_UNLEARNING_HANDLERS: tuple[str, ...] = tuple(_MAP)
OPEN_UNLEARNING_COMMIT = "d3d7cf9e6b3c125d16687d4232680d8d83548f1a"
# PDU's trainer-side arguments (their configs/trainer/PDU.yaml defaults)
_TRAINER_SIDE = {"PDU": {"dual_update_upon": "step", "dual_warmup_epochs": 5, "loss_names": None}}
_RETAIN = {"NLL": "nll", "KL": "kl"}


def _value(handler: str, theirs: str, value: Any) -> Any:
    if theirs == "retain_loss_type":
        if handler == "RMU":
            if value != "EMBED_DIFF":
                raise ValueError(f"RMU retain_loss_type={value!r}: fastweight's RMU (convention='open_unlearning') "
                                 "has their EMBED_DIFF retain term only")
            return None
        if value not in _RETAIN:
            raise ValueError(f"retain_loss_type must be one of {sorted(_RETAIN)}, got {value!r}")
        return _RETAIN[value]
    if theirs == "module_regex":
        m = re.fullmatch(r"model\\\.layers\\\.(\d+)", str(value))
        if m is None:
            raise ValueError(rf"RMU module_regex={value!r}: expected model\.layers\.<i> (a decoder layer)")
        return int(m.group(1))
    if theirs == "retain_loss_eps" and value is None:
        raise ValueError("PDU needs method_args.retain_loss_eps (their configs/trainer/PDU.yaml leaves it ???)")
    return value


def _split(handler: str, method_args: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    if handler not in _MAP:
        raise ValueError(f"handler={handler!r} is not an open-unlearning unlearning trainer; mapped: {', '.join(_MAP)}")
    name, defaults, rename, fixed = _MAP[handler]
    side_defaults = _TRAINER_SIDE.get(handler, {})
    unknown = sorted(set(method_args) - set(defaults) - set(side_defaults))
    if unknown:
        raise ValueError(f"unknown method_args {unknown} for open-unlearning {handler}; it takes "
                         f"{sorted({**defaults, **side_defaults})}")
    values = {**defaults, **{k: v for k, v in method_args.items() if k in defaults}}
    options: dict[str, Any] = dict(fixed)
    for theirs, value in values.items():
        value = _value(handler, theirs, value)
        if value is not None:
            options[rename[theirs]] = value
    if name not in ("ga", "gd", "ceu", "rmu"):  # their GradDiff subclasses always add the retain term
        options.setdefault("retain_loss", "nll")
    side = {**side_defaults, **{k: v for k, v in method_args.items() if k in side_defaults}}
    return name, options, side


def open_unlearning_method(handler: str, **method_args: Any) -> tuple[str, dict[str, Any]]:
    """``(method, method_options)`` for ``UnlearnTrainer`` whose loss equals open-unlearning's ``handler``.

    Args:
        handler: one of ``OPEN_UNLEARNING_HANDLERS`` (their trainer class name).
        **method_args: their ``method_args``; missing ones take their configs/trainer/<handler>.yaml values.
    Raises:
        ValueError naming ``handler``, an unknown argument, or an unsupported value (RMU's NLL/KL retain
        terms, a ``module_regex`` that is not one decoder layer, PDU without ``retain_loss_eps``).
    """
    name, options, _ = _split(handler, method_args)
    return name, options


def _their_base(registered: type) -> type:
    """Their trainer base class for ``registered`` (``UnlearnTrainer`` in its MRO, else ``FinetuneTrainer``,
    else the first ``transformers.Trainer``)."""
    import transformers

    for wanted in ("UnlearnTrainer", "FinetuneTrainer"):
        for cls in registered.__mro__:
            if cls.__name__ == wanted and issubclass(cls, transformers.Trainer):
                return cls
    return transformers.Trainer


def trainer_class(handler: str, base: type) -> type:
    """The fastweight-backed trainer class for open-unlearning's ``handler``, on their trainer ``base``."""
    from fastweight.integrations.trainer import UnlearnMixin
    from fastweight.train.methods import build_method

    if handler not in _MAP:
        _split(handler, {})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        trainer_keys = {"model", "args", "train_dataset", "eval_dataset", "tokenizer", "data_collator",
                        "evaluators", "template_args", "processing_class", "callbacks", "optimizers",
                        "compute_metrics", "model_init", "preprocess_logits_for_metrics"}
        method_args = {k: kwargs.pop(k) for k in list(kwargs) if k not in trainer_keys}
        name, options, side = _split(handler, method_args)
        needs_ref = build_method(name, **options).needs_ref
        _tokenizer_compat(base, kwargs)
        # Their evaluate() runs the evaluators and never reads eval_dataset; transformers >= 4.46 refuses an
        # eval_strategy without one at construction, so hand it a placeholder for that check only.
        placeholder = kwargs.get("eval_dataset") is None and bool(kwargs.get("evaluators"))
        if placeholder:
            kwargs["eval_dataset"] = []
        UnlearnMixin.__init__(self, *args, method=name, method_options=options,
                              ref_model="copy" if needs_ref else None, **kwargs)
        if placeholder:
            self.eval_dataset = None
        if name == "pdu":
            _pdu_schedule(self, side)

    return type(handler, (UnlearnMixin, base), {"__init__": __init__, "__module__": __name__,
                                                 "__qualname__": handler, "open_unlearning_handler": handler})


def _tokenizer_compat(base: type, kwargs: dict[str, Any]) -> None:
    """Their ``load_trainer`` passes ``tokenizer=`` (transformers 4.45, their pin); newer transformers name it
    ``processing_class``."""
    import inspect

    import transformers

    if "tokenizer" in kwargs and "tokenizer" not in inspect.signature(transformers.Trainer.__init__).parameters:
        kwargs.setdefault("processing_class", kwargs.pop("tokenizer"))


def _pdu_schedule(trainer, side: dict[str, Any]) -> None:
    """Their PDU dual schedule: no dual update before ``dual_warmup_epochs`` epochs; then per step (in the
    method) or, with ``dual_update_upon="epoch"``, after each epoch from the mean retain loss over the training
    data (their ``post_epoch_dual_param_update``)."""
    import torch
    import transformers

    method = trainer.method
    upon, warmup = side["dual_update_upon"], side["dual_warmup_epochs"]
    if upon not in ("step", "epoch"):
        raise ValueError(f"PDU dual_update_upon must be 'step' or 'epoch', got {upon!r}")
    method.dual_active = method.config.primal_dual and warmup == 0 and upon == "step"
    if not method.config.primal_dual:
        return

    class _Dual(transformers.TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch < warmup:
                return
            method.dual_active = upon == "step"
            if upon == "epoch":
                trainer.model.eval()
                with torch.no_grad():
                    values = [float(method.retain_term(trainer.model, dict(trainer._prepare_inputs(b)["retain"]),
                                                       trainer.ref_model))
                              for b in trainer.get_train_dataloader()]
                method.dual_update(sum(values) / len(values) - method.config.retain_eps)
                trainer.log({"retain_preference": method.retain_weight})

    trainer.add_callback(_Dual())


def register(registry: dict[str, Any], *, replace: bool = True) -> dict[str, type]:
    """Put fastweight-backed classes for every open-unlearning unlearning handler into their ``registry``
    (``TRAINER_REGISTRY``): under their own names (``replace=True``; configs unchanged) or as
    ``Fastweight<handler>``. Each class is built on their trainer base found from the registered class.
    Returns the classes added, by registry key."""
    added = {}
    for handler in _MAP:
        if handler not in registry:
            continue
        cls = trainer_class(handler, _their_base(registry[handler]))
        key = handler if replace else f"Fastweight{handler}"
        registry[key] = added[key] = cls
    if not added:
        raise ValueError(f"registry has none of open-unlearning's handlers {list(_MAP)}: pass their TRAINER_REGISTRY "
                         "after its registrations")
    return added


__all__ = ["OPEN_UNLEARNING_COMMIT", "OPEN_UNLEARNING_HANDLERS", "open_unlearning_method", "register",
           "trainer_class"]
