"""Hugging Face ``transformers`` causal LMs that return a fastweight loss without building logits.

``patch(model, loss="satimp", **loss_kwargs)`` replaces ``model.forward`` (on the instance, nothing global)
by a wrapper that, when ``labels`` is given, runs the decoder (``model.get_decoder()``) for the final hidden
states and computes ``loss(hidden, labels, lm_head=W, bias=b, softcap=c, shift=True)`` on the fused-linear
path (``fastweight.ops.linear_logprobs``): no ``[B, T, V]`` logits, no ``[B, T, V]`` gradient. Without
labels (inference, ``generate``) the original forward runs unchanged. ``unpatch(model)`` restores it.

Generic, not per architecture: W and b come from ``model.get_output_embeddings()`` (tied embeddings share
the input embedding's Parameter, so its gradient accumulates both uses), Gemma-2/3's soft-capping from
``config.final_logit_softcapping``. Models that rescale their logits in other ways (``config.logit_scale``,
``config.logits_scaling``) are refused rather than silently mis-computed. PEFT models are unwrapped with
``get_base_model()``; adapters inside the decoder work as usual, an adapter on the output layer is refused.

``num_items_in_batch`` (passed by the HF Trainer under gradient accumulation) turns a token-mean loss into
``sum / num_items_in_batch``, exactly like ``transformers``' own ``ForCausalLMLoss``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch

import fastweight.losses as _losses

_STATE = "_fastweight_patch"
# Forward arguments that concern the logits/loss only and never reach the decoder.
_HEAD_ONLY = ("labels", "num_items_in_batch", "logits_to_keep", "shift_labels", "return_dict")
# Config attributes of families whose logits are not ``lm_head(h)`` (optionally soft-capped).
_UNSUPPORTED_SCALES = ("logit_scale", "logits_scaling")


@dataclasses.dataclass
class _PatchState:
    loss_name: str
    loss_fn: Callable[..., torch.Tensor]
    loss_kwargs: dict[str, Any]
    had_instance_forward: bool
    instance_forward: Any


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers PreTrainedModel inside a PEFT wrapper (or the model itself)."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        return model.get_base_model()
    return model


def _resolve_loss(loss: str | Callable[..., torch.Tensor], loss_kwargs: dict[str, Any]):
    """(name, fn, kwargs): registry defaults of the loss's own hyper-parameters, overridden by loss_kwargs."""
    if callable(loss):
        name, fn, kwargs = getattr(loss, "__name__", "custom"), loss, {}
    else:
        spec = _losses.get(loss)  # ValueError naming the known losses
        if spec.needs_ref or spec.needs_retain:
            raise ValueError(
                f"loss {loss!r} needs a reference model or a retain batch; patch() computes a single-batch loss "
                "from the model's own hidden states. Use fastweight.train for that method.")
        name, fn = spec.name, spec.fn
        kwargs = {h: spec.defaults[h] for h in spec.hparams if h in spec.defaults}
    params = inspect.signature(fn).parameters
    if "lm_head" not in params:
        raise ValueError(f"loss {name!r} does not accept hidden states with lm_head=; it cannot be patched in")
    unknown = sorted(set(loss_kwargs) - set(params))
    if unknown:
        raise TypeError(f"unknown keyword argument(s) {unknown} for loss {name!r}; it accepts {sorted(params)}")
    reserved = sorted(set(loss_kwargs) & {"lm_head", "bias", "softcap", "shift", "labels"})
    if reserved:
        raise TypeError(f"loss_kwargs {reserved} are set by patch() from the model; do not pass them")
    kwargs.update(loss_kwargs)
    return name, fn, kwargs


def _output_layer(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(weight [V, H], bias [V] | None, softcap | None) of the model's output projection."""
    config = getattr(model, "config", None)
    for attr in _UNSUPPORTED_SCALES:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"model config has {attr}={value}: its logits are rescaled, which the fused path does "
                             "not reproduce; this model family is not supported by fastweight.patch")
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


def patch(model: torch.nn.Module, loss: str | Callable[..., torch.Tensor] = "satimp", *,
          backend: str = "auto", **loss_kwargs: Any) -> torch.nn.Module:
    """Make ``model(input_ids, labels=..., ...)`` return a fastweight loss computed without logits.

    Args:
        model: a transformers causal LM (``*ForCausalLM``: Llama, Mistral, Qwen2/3, Phi-3, Gemma/Gemma-2, ...),
            possibly wrapped by PEFT. Patched in place (instance attribute), and returned.
        loss: a name of ``fastweight.losses.LOSSES`` whose method needs neither a reference model nor a retain
            batch ("satimp", "wga", "simimp", "ga", "nll", "simnpo", ...), or a callable with the loss signature
            ``fn(hidden, labels, *, lm_head, bias, softcap, shift, reduction, backend, **kw)``.
        backend: fastweight backend ("auto" = Triton on CUDA, torch otherwise).
        **loss_kwargs: hyper-parameters of the loss (e.g. ``beta1=5.0, beta2=0.1``); registry defaults otherwise.
    Returns:
        ``model``. With ``labels`` its forward returns ``CausalLMOutputWithPast(loss=<0-d float32>,
        logits=None, ...)``; the loss follows the chosen function (token mean over labels != -100 for the
        reweighted family), or ``sum / num_items_in_batch`` when that keyword is passed and the loss has a
        ``reduction`` argument. Without labels the original forward runs (logits as usual).
    """
    hf = _unwrap(model)
    if getattr(hf, _STATE, None) is not None:
        unpatch(hf)
    name, fn, kwargs = _resolve_loss(loss, loss_kwargs)
    _output_layer(hf)  # fail now, not at the first training step
    decoder = hf.get_decoder()
    if decoder is hf:
        raise ValueError(f"{type(hf).__name__}.get_decoder() returned the model itself; expected a *ForCausalLM")
    had = "forward" in vars(hf)
    original = hf.forward
    positional = [p.name for p in inspect.signature(original).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_reduction = "reduction" in inspect.signature(fn).parameters

    def fastweight_forward(*args, **kwargs_in):
        call = dict(zip(positional, args))
        call.update(kwargs_in)
        labels = call.get("labels")
        if labels is None:  # inference, generate(): untouched
            return original(*args, **kwargs_in)
        num_items = call.get("num_items_in_batch")
        shift_labels = call.get("shift_labels")
        outputs = decoder(**{k: v for k, v in call.items() if k not in _HEAD_ONLY})
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        weight, bias, softcap = _output_layer(hf)
        loss_call = dict(kwargs, lm_head=weight, bias=bias, softcap=softcap, backend=backend)
        if shift_labels is not None:  # transformers' pre-shifted labels (context parallelism)
            labels, loss_call["shift"] = shift_labels, False
        else:
            loss_call["shift"] = True
        if num_items is not None and has_reduction:
            loss_call["reduction"] = "sum"
            value = fn(hidden, labels, **loss_call)
            value = value / torch.as_tensor(num_items, device=value.device).to(value.dtype)
        else:
            value = fn(hidden, labels, **loss_call)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
        items = outputs.items() if hasattr(outputs, "items") else ()
        extra = {k: v for k, v in items if k in fields and k not in ("loss", "logits")}
        return CausalLMOutputWithPast(loss=value, logits=None, **extra)

    hf.forward = fastweight_forward
    # A previous instance-level forward (e.g. an accelerate hook) is kept and restored by unpatch().
    setattr(hf, _STATE, _PatchState(name, fn, kwargs, had, original if had else None))
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` (no-op on an unpatched model); returns ``model``."""
    hf = _unwrap(model)
    state = getattr(hf, _STATE, None)
    if state is None:
        return model
    if state.had_instance_forward:
        hf.forward = state.instance_forward
    else:
        del hf.forward
    delattr(hf, _STATE)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """True when :func:`patch` is active on ``model`` (or on the model inside its PEFT wrapper)."""
    return getattr(_unwrap(model), _STATE, None) is not None


__all__ = ["is_patched", "patch", "unpatch"]
