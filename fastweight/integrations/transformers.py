"""Hugging Face ``transformers`` causal LMs that return a fastweight loss without building logits.

``patch(model, loss="satimp", **loss_kwargs)`` replaces ``model.forward`` (on the instance, nothing global)
by a ``FastweightForward`` object that, when ``labels`` is given, runs the decoder (``model.get_decoder()``)
for the final hidden states and computes ``loss(hidden, labels, lm_head=W, bias=b, softcap=c, shift=True)``
on the fused-linear path (``fastweight.ops.linear_logprobs``): no ``[B, T, V]`` logits, no ``[B, T, V]``
gradient. Without labels (inference, ``generate``) the original forward runs unchanged. ``unpatch(model)``
restores it.

Copies keep their own weights: the forward object holds only a reference to its model, never a closure over
the decoder, the head or the original bound forward. ``copy.deepcopy`` and ``pickle`` rebuild that reference
to the copy (the model is memoised before its ``__dict__`` is restored), so a deep-copied reference model,
or a model sent to a worker process, computes with its own parameters. The patch itself is runtime state:
``save_pretrained`` writes only the weights and config; patch the model again after ``from_pretrained``.

Per call (all keywords, only meaningful with ``labels``):
* ``fastweight_loss="nll"`` (or any single-batch loss name; ``"none"`` for no loss) replaces the patched loss
  for this call only, with the registry defaults; a retain term inside a trainer uses ``"nll"``.
* ``fastweight_token_logprobs=True`` adds ``token_logprobs`` [B, T] float32 (differentiable; entry t is
  ``log p(labels[:, t+1] | x_<=t)``, 0 at ignored positions and at t = T-1), ``sequence_nll`` [B] float32
  (``-sum_t token_logprobs``) and ``num_tokens`` [B] int64 (valid shifted labels) to the output, for
  NPO/DPO-style losses written by a trainer.

Mixture-of-experts models (Mixtral, Qwen2-MoE, ...) with ``output_router_logits`` (argument or config) get
the router load-balancing loss exactly as their own forward adds it: ``aux_loss =
load_balancing_loss_func(router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)`` from
the model's own modeling module, ``loss += model.router_aux_loss_coef * aux_loss``, ``aux_loss`` returned.

Generic, not per architecture: W and b come from ``model.get_output_embeddings()`` (tied embeddings share
the input embedding's Parameter, so its gradient accumulates both uses), Gemma-2/3's soft-capping from
``config.final_logit_softcapping``, and the logit scale of families whose output layer rescales
(``logits = s * lm_head(h)``: Cohere's ``logit_scale`` s, Granite's ``1 / logits_scaling``; ``LOGIT_SCALES``
says which family applies which attribute how) goes into the fused op's ``logit_scale``; a scale attribute on
a family not in that table is refused rather than guessed. ``output_head`` is the one reader of a model's head
for every caller (``patch``, ``fastweight.train``, ``UnlearnTrainer``). PEFT models are unwrapped with
``get_base_model()``; adapters inside the decoder work as usual, an adapter on the output layer is refused.

``num_items_in_batch`` (passed by the HF Trainer under gradient accumulation) turns a token-mean loss into
``sum / num_items_in_batch``, exactly like ``transformers``' own ``ForCausalLMLoss``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from typing import Any, Callable

import torch

import fastweight.losses as _losses
from fastweight._constants import IGNORE_INDEX
from fastweight.ops._common import check_token_ids

_STATE = "_fastweight_patch"
# Forward arguments that concern the logits/loss only and never reach the decoder.
_HEAD_ONLY = ("labels", "num_items_in_batch", "logits_to_keep", "num_logits_to_keep", "shift_labels",
              "return_dict")
# Per-call keywords of the patched forward (removed before anything reaches transformers).
CALL_KEYWORDS = ("fastweight_loss", "fastweight_token_logprobs")
NO_LOSS = "none"
# Private hook of fastweight.integrations.trainer: ``model(fastweight_run=fn)`` returns ``fn(hf_model)``.
RUN_KEYWORD = "fastweight_run"
# Families whose logits are ``s * lm_head(h)``: config ``model_type`` -> (attribute, how s follows from it), as
# each family's ``*ForCausalLM.forward`` applies it in transformers 5.25 (models/<family>/modeling_<family>.py:
# Granite ``logits / config.logits_scaling``; MiniCPM3 divides the hidden states by it before an unbiased
# lm_head, the same map; HyperCLOVAX ``lm_head(h) * config.logits_scaling``; Cohere ``logits * logit_scale``).
# The same attribute name means opposite things in different families, so nothing is guessed: a non-unit
# value on a family missing here is refused. A composite model's ``text_config`` is read the same way.
LOGIT_SCALES: dict[str, tuple[str, str]] = {
    **{t: ("logits_scaling", "divide") for t in ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid",
                                                  "granite_swa", "granitemoe_swa", "minicpm3")},
    "hyperclovax": ("logits_scaling", "multiply"),
    **{t: ("logit_scale", "multiply") for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass")},
}
# Config attributes that a family carries but its forward never applies (MptConfig.logit_scale).
_UNUSED_SCALES = {("mpt", "logit_scale")}
_SCALE_ATTRS = ("logit_scale", "logits_scaling")
# Fields of the output added by fastweight_token_logprobs=True.
EXTRA_FIELDS = ("token_logprobs", "sequence_nll", "num_tokens")


@dataclasses.dataclass
class _PatchState:
    """Plain, picklable data: everything the forward needs besides the model itself."""

    loss_name: str
    loss_fn: Callable[..., torch.Tensor]
    loss_kwargs: dict[str, Any]
    backend: str
    positional: list[str]
    instance_forward: Any  # a forward set on the instance before patch() (e.g. an accelerate hook), or None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers PreTrainedModel inside a PEFT wrapper (or the model itself)."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        return model.get_base_model()
    return model


def _resolve_loss(loss: str | Callable[..., torch.Tensor], loss_kwargs: dict[str, Any], arg: str = "loss"):
    """(name, fn, kwargs): registry defaults of the loss's own hyper-parameters, overridden by loss_kwargs."""
    if callable(loss):
        name, fn, kwargs = getattr(loss, "__name__", "custom"), loss, {}
    else:
        if not isinstance(loss, str) or loss not in _losses.LOSSES:
            raise ValueError(f"{arg}={loss!r}: unknown loss name; known names: {', '.join(_losses.LOSSES)}")
        spec = _losses.LOSSES[loss]
        if spec.needs_ref or spec.needs_retain:
            raise ValueError(
                f"{arg}={loss!r} needs a reference model or a retain batch; the patched forward computes a "
                "single-batch loss from the model's own hidden states. Use "
                "fastweight.integrations.trainer.UnlearnTrainer (or fastweight.train) for that method.")
        if spec.needs_weights:
            raise ValueError(f"{arg}={loss!r} needs per-token weights from its batches (token_weights); the patched "
                             "forward has none. Use fastweight.integrations.trainer.UnlearnTrainer with batches "
                             "carrying 'token_weights' (or fastweight.train).")
        name, fn = spec.name, spec.fn
        kwargs = {h: spec.defaults[h] for h in spec.hparams if h in spec.defaults}
    params = inspect.signature(fn).parameters
    if "lm_head" not in params:
        raise ValueError(f"loss {name!r} does not accept hidden states with lm_head=; it cannot be patched in")
    unknown = sorted(set(loss_kwargs) - set(params))
    if unknown:
        raise TypeError(f"unknown keyword argument(s) {unknown} for loss {name!r}; it accepts {sorted(params)}")
    reserved = sorted(set(loss_kwargs) & {"lm_head", "bias", "softcap", "logit_scale", "shift", "labels"})
    if reserved:
        raise TypeError(f"loss_kwargs {reserved} are set by patch() from the model; do not pass them")
    kwargs.update(loss_kwargs)
    return name, fn, kwargs


def _accepts(fn: Callable[..., Any], arg: str) -> bool:
    params = inspect.signature(fn).parameters
    return arg in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _validate_options(name: str, fn: Callable[..., torch.Tensor], kwargs: dict[str, Any]) -> None:
    """Run the loss once on a 2-token CPU input so a bad hyper-parameter fails at patch time, named by the loss's
    own validation (e.g. ``beta1 must be finite and >= 0``), not at the first training step."""
    hidden, labels, head = torch.zeros(1, 2, 1), torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, 1)
    with torch.no_grad():
        fn(hidden, labels, **{**kwargs, "lm_head": head, "shift": True, "backend": "torch"})


def logit_scale_of(config: Any) -> float:
    """The factor s of ``logits = s * lm_head(h)`` for a transformers config (1.0 for most families).

    ValueError when a scale attribute is set (not 1) on a family ``LOGIT_SCALES`` does not cover, or holds
    something other than a positive finite number."""
    for cfg in (config, getattr(config, "text_config", None)):
        model_type = getattr(cfg, "model_type", None)
        for attr in _SCALE_ATTRS:
            value = getattr(cfg, attr, None)
            if cfg is None or value is None or (model_type, attr) in _UNUSED_SCALES:
                continue
            rule = LOGIT_SCALES.get(model_type)
            if rule is not None and rule[0] == attr:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0:
                    raise ValueError(f"model config has {attr}={value!r}: expected a positive finite number")
                return float(value) if rule[1] == "multiply" else 1.0 / float(value)
            if value not in (1, 1.0):
                raise ValueError(f"model config (model_type={model_type!r}) has {attr}={value!r}: its logits are "
                                 "rescaled in a way fastweight does not know for this family (known: "
                                 f"{sorted(LOGIT_SCALES)}); train it through its own forward, unpatched")
    return 1.0


@dataclasses.dataclass(frozen=True)
class OutputHead:
    """What turns a causal LM's last hidden states into logits: ``softcap(logit_scale * (h @ weight.T + bias))``.

    weight [V, H] (the Parameter itself, tied or not), bias [V] | None, softcap (Gemma-2/3) | None,
    logit_scale (``LOGIT_SCALES``; 1.0 for most families)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float = 1.0

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a fastweight loss (``logit_scale`` only when it is not 1, so custom losses
        without that argument keep working on unscaled models)."""
        kw = dict(lm_head=self.weight, bias=self.bias, softcap=self.softcap)
        if self.logit_scale != 1.0:
            kw["logit_scale"] = self.logit_scale
        return kw


def gather_output_layer(model: torch.nn.Module) -> None:
    """When the output layer of ``model`` (PEFT unwrapped) is an FSDP2 unit of its own (``fully_shard(lm_head)``
    before the root, torchtitan's layout), all-gather it through FSDP's own ``unshard()`` so that its weight is
    the full, plain parameter the fused losses read outside its forward. It stays unsharded until the backward
    ends: FSDP's root post-backward callback then runs this unit's post-backward (reduce-scatter of its
    gradient, reshard), as for any unit whose forward did not run. No-op otherwise (with the head in the root
    unit, the root's forward has gathered it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    get = getattr(_unwrap(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, FSDPModule):
        head.unshard()


def output_head(model: torch.nn.Module) -> OutputHead:
    """The output projection of a transformers causal LM (PEFT wrappers unwrapped), with the refusals every
    caller shares: no ``get_output_embeddings()``, a PEFT adapter on the output layer, an unknown logit scale."""
    model = _unwrap(model)
    weight, bias, softcap = _output_layer(model)
    return OutputHead(weight, bias, softcap, logit_scale_of(getattr(model, "config", None)))


def _output_layer(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(weight [V, H], bias [V] | None, softcap | None) of the model's output projection (``output_head``
    adds the logit scale)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__}.get_output_embeddings() is None: not a causal LM with an lm_head")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError("the output layer carries a PEFT adapter; the fused path reads lm_head.weight directly. "
                         "Leave lm_head out of the adapter's target_modules (or merge the adapter first)")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"output layer {type(head).__name__} has no 2-D weight [V, H]")
    softcap = getattr(config, "final_logit_softcapping", None)
    return weight, getattr(head, "bias", None), softcap


def _router_aux_loss_fn(model: torch.nn.Module):
    """The modeling module's ``load_balancing_loss_func`` for MoE families (None for dense ones)."""
    config = getattr(model, "config", None)
    if not hasattr(config, "output_router_logits"):
        return None
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    missing = [a for a in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef") if not hasattr(model, a)]
    if fn is None or missing:
        raise ValueError(f"{type(model).__name__} is a mixture-of-experts model whose router loss fastweight.patch "
                         f"cannot reproduce (no load_balancing_loss_func or missing {missing}); set "
                         "output_router_logits=False in its config to train without the router loss")
    return fn


_OUTPUT_CLASS: list[type] = []


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the unpatched forward would return for ``hidden`` [B, T, H]: the model's own output layer
    (its forward, so FSDP / accelerate hooks apply), the family's logit scale and Gemma-2/3's soft-capping."""
    logits = model.get_output_embeddings()(hidden)
    scale = logit_scale_of(getattr(model, "config", None))
    if scale != 1.0:
        logits = logits * scale
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _materialise_logits(out) -> None:
    """Form ``out.logits`` from the kept hidden states (once; differentiable when they are)."""
    model, hidden = object.__getattribute__(out, "_fastweight_hidden")
    logits = head_logits(model, hidden)
    object.__setattr__(out, "_fastweight_hidden", None)
    out["logits"] = logits  # ModelOutput.__setitem__: the key and the attribute


def _lazy_getattribute(self, name: str):
    if name == "logits" and object.__getattribute__(self, "__dict__").get("_fastweight_hidden") is not None:
        _materialise_logits(self)
    return object.__getattribute__(self, name)


def _lazy_getitem(self, key):
    if key == "logits" and self.__dict__.get("_fastweight_hidden") is not None:
        _materialise_logits(self)
    return type(self).__mro__[1].__getitem__(self, key)


def _output_class() -> type:
    """``FastweightCausalLMOutput``: transformers' MoE causal-LM output (loss, aux_loss, logits, cache, hidden
    states, attentions, router_logits) plus ``token_logprobs``, ``sequence_nll``, ``num_tokens``. Built on first
    use so that ``import fastweight`` does not import transformers."""
    if not _OUTPUT_CLASS:
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast

        namespace = {"__annotations__": {f: "torch.Tensor | None" for f in EXTRA_FIELDS},
                     **{f: None for f in EXTRA_FIELDS}, "__module__": __name__,
                     "__qualname__": "FastweightCausalLMOutput"}
        namespace.update(__getattribute__=_lazy_getattribute, __getitem__=_lazy_getitem)
        cls = dataclasses.dataclass(type("FastweightCausalLMOutput", (MoeCausalLMOutputWithPast,), namespace))
        globals()["FastweightCausalLMOutput"] = cls  # picklable by its module-level name
        _OUTPUT_CLASS.append(cls)
    return _OUTPUT_CLASS[0]


def __getattr__(name: str):
    if name == "FastweightCausalLMOutput":
        return _output_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FastweightForward:
    """The patched ``forward`` of one model: a callable holding only ``self.model`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        # What Trainer's column filter and loss-kwargs detection read: the class forward plus our keywords.
        sig = inspect.signature(type(self.model).forward)
        params = [p for p in sig.parameters.values() if p.name != "self"]
        extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in CALL_KEYWORDS]
        var_kw = [p for p in params if p.kind == p.VAR_KEYWORD]
        params = [p for p in params if p.kind != p.VAR_KEYWORD]
        return sig.replace(parameters=params + extra + var_kw)

    def _original(self, hf, state: _PatchState):
        return state.instance_forward if state.instance_forward is not None else type(hf).forward.__get__(hf)

    def __call__(self, *args: Any, **kwargs: Any):
        hf = self.model
        state: _PatchState = getattr(hf, _STATE)
        run = kwargs.pop(RUN_KEYWORD, None)
        if run is not None:  # UnlearnTrainer under DDP/FSDP: the whole method inside the wrapper's forward
            if args or kwargs:
                raise TypeError(f"{RUN_KEYWORD}= takes no other arguments, got {sorted(kwargs)} and {len(args)} "
                                "positional")
            return _output_class()(loss=run(hf), logits=None)
        per_call_loss = kwargs.pop("fastweight_loss", None)
        want_logp = kwargs.pop("fastweight_token_logprobs", False)
        call = dict(zip(state.positional, args))
        call.update(kwargs)
        labels = call.get("labels")
        if labels is None:  # inference, generate(): untouched
            if per_call_loss is not None or want_logp:
                raise ValueError("fastweight_loss= / fastweight_token_logprobs= need labels=; pass the labels")
            return self._original(hf, state)(*args, **kwargs)
        if per_call_loss is None or per_call_loss == state.loss_name:
            name, fn, loss_kwargs = state.loss_name, state.loss_fn, state.loss_kwargs
        elif per_call_loss == NO_LOSS:
            name, fn, loss_kwargs = NO_LOSS, None, {}
        else:
            name, fn, loss_kwargs = _resolve_loss(per_call_loss, {}, arg="fastweight_loss")
        num_items = call.get("num_items_in_batch")
        shift_labels = call.get("shift_labels")
        emb = hf.get_input_embeddings()
        check_token_ids("input_ids", call.get("input_ids"), getattr(emb, "num_embeddings", None))
        decoder = hf.get_decoder()
        outputs = decoder(**{k: v for k, v in call.items() if k not in _HEAD_ONLY})
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        gather_output_layer(hf)  # FSDP2: an lm_head unit of its own is all-gathered first
        head = dict(output_head(hf).loss_kwargs(), backend=state.backend)
        if shift_labels is not None:  # transformers' pre-shifted labels (context parallelism)
            labels, head["shift"] = shift_labels, False
        else:
            head["shift"] = True
        value = None
        if fn is not None:
            if num_items is not None and "reduction" in inspect.signature(fn).parameters:
                value = fn(hidden, labels, **loss_kwargs, **head, reduction="sum")
                value = value / torch.as_tensor(num_items, device=value.device).to(value.dtype)
            else:
                value = fn(hidden, labels, **loss_kwargs, **head)
        extra: dict[str, Any] = {}
        if want_logp:
            logp = _losses.token_logprobs(hidden, labels, **head)
            valid = torch.zeros_like(labels, dtype=torch.bool)
            if head["shift"]:
                valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
            else:
                valid = labels != IGNORE_INDEX
            extra.update(token_logprobs=logp, sequence_nll=-logp.sum(-1), num_tokens=valid.sum(-1))
        aux_fn = _router_aux_loss_fn(hf)
        use_router = call.get("output_router_logits")
        if use_router is None:
            use_router = getattr(hf.config, "output_router_logits", False)
        if aux_fn is not None and use_router:
            aux = aux_fn(outputs.router_logits, hf.num_experts, hf.num_experts_per_tok, call.get("attention_mask"))
            extra["aux_loss"] = aux
            if value is not None:
                value = value + hf.router_aux_loss_coef * aux.to(value.device)
        cls = _output_class()
        fields = {f.name for f in dataclasses.fields(cls)}
        items = outputs.items() if hasattr(outputs, "items") else ()
        passed = {k: v for k, v in items if k in fields and k not in ("loss", "logits", "aux_loss")}
        out = cls(loss=value, logits=None, **passed, **extra)
        object.__setattr__(out, "_fastweight_hidden", (hf, hidden))  # for logits formed on access
        return out


def _check_causal_lm(hf: torch.nn.Module) -> None:
    """Refuse a model that is not a causal LM (a masked LM such as ``BertForMaskedLM``, an encoder-decoder):
    the patched loss shifts labels by one position, which is the wrong loss for them (issue 22)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = type(hf).__name__
    config = getattr(hf, "config", None)
    causal = cls.endswith("ForCausalLM") or cls in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not causal or getattr(config, "is_encoder_decoder", False) or (
            cls == "BertLMHeadModel" and not getattr(config, "is_decoder", False)):
        raise ValueError(f"patch() needs a causal LM (*ForCausalLM); {cls} is not one: the fastweight loss shifts "
                         "labels by one token, which is not this model's loss")


def patch(model: torch.nn.Module, loss: str | Callable[..., torch.Tensor] = "satimp", *,
          backend: str = "auto", **loss_kwargs: Any) -> torch.nn.Module:
    """Make ``model(input_ids, labels=..., ...)`` return a fastweight loss computed without logits.

    Args:
        model: a transformers causal LM (``*ForCausalLM``: Llama, Mistral, Mixtral, Qwen2/3, Qwen2-MoE, Phi-3,
            Gemma/Gemma-2, Granite, Cohere, ...), possibly wrapped by PEFT. Patched in place (instance
            attribute), and returned.
        loss: a name of ``fastweight.losses.LOSSES`` whose method needs neither a reference model nor a retain
            batch ("satimp", "wga", "simimp", "ga", "nll", "simnpo", ...), or a callable with the loss signature
            ``fn(hidden, labels, *, lm_head, bias, softcap, shift, reduction, backend, **kw)`` (plus
            ``logit_scale`` for models that scale their logits, Cohere and Granite).
        backend: fastweight backend ("auto" = Triton on CUDA, torch otherwise).
        **loss_kwargs: hyper-parameters of the loss (e.g. ``beta1=5.0, beta2=0.1``); registry defaults otherwise.
            Validated now: ``patch(m, "satimp", beta1=-1)`` raises ValueError naming ``beta1``.
    Returns:
        ``model``. With ``labels`` its forward returns ``FastweightCausalLMOutput(loss=<0-d float32>,
        logits=None, aux_loss=<MoE router loss or None>, ...)``; the loss follows the chosen function (token mean
        over labels != -100 for the reweighted family), or ``sum / num_items_in_batch`` when that keyword is
        passed and the loss has a ``reduction`` argument; MoE models add ``router_aux_loss_coef * aux_loss``.
        ``fastweight_loss=`` and ``fastweight_token_logprobs=`` choose per call (module docstring). Without
        labels the original forward runs (logits as usual).
    """
    hf = _unwrap(model)
    if getattr(hf, _STATE, None) is not None:
        unpatch(hf)
    if not isinstance(backend, str) or backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    name, fn, kwargs = _resolve_loss(loss, loss_kwargs)
    _validate_options(name, fn, kwargs)
    _check_causal_lm(hf)
    out_head = output_head(hf)  # fail now, not at the first training step
    if out_head.logit_scale != 1.0 and not _accepts(fn, "logit_scale"):
        raise ValueError(f"{type(hf).__name__} scales its logits by {out_head.logit_scale} but loss {name!r} has no "
                         "logit_scale= argument; add one (and pass it to fastweight's token_logprobs)")
    _router_aux_loss_fn(hf)
    decoder = hf.get_decoder()
    if decoder is hf:
        raise ValueError(f"{type(hf).__name__}.get_decoder() returned the model itself; expected a *ForCausalLM")
    previous = vars(hf).get("forward")
    positional = [p.name for p in inspect.signature(type(hf).forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
    setattr(hf, _STATE, _PatchState(name, fn, kwargs, backend, positional, previous))
    hf.forward = FastweightForward(hf)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` (no-op on an unpatched model); returns ``model``."""
    hf = _unwrap(model)
    state = getattr(hf, _STATE, None)
    if state is None:
        return model
    if state.instance_forward is not None:
        hf.forward = state.instance_forward
    else:
        del hf.forward
    delattr(hf, _STATE)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """True when :func:`patch` is active on ``model`` (or on the model inside its PEFT wrapper)."""
    return getattr(_unwrap(model), _STATE, None) is not None


__all__ = ["CALL_KEYWORDS", "EXTRA_FIELDS", "FastweightForward", "gather_output_layer", "head_logits",
           "is_patched", "patch", "unpatch"]
