"""DeepSpeed ZeRO-3 as users configure it: partitioned model creation, ``"auto"`` config values, forwards of a
partitioned model outside the engine.

* ``launch_plugin()``: the launcher's DeepSpeed settings (``accelerate launch --use_deepspeed ...`` or an
  accelerate config file) as accelerate's ``DeepSpeedPlugin``, or None. Under ZeRO-3 it registers transformers'
  ``HfDeepSpeedConfig`` for as long as it lives, so ``from_pretrained`` creates the model inside
  ``deepspeed.zero.Init``: every rank holds only its partition of each parameter, never the whole model
  (``models.load_model_and_tokenizer`` keeps it alive while loading). This is what transformers' Trainer does
  with ``TrainingArguments(deepspeed=...)`` before ``from_pretrained``.
* ``fill_auto(config, model)``: the ``"auto"`` values that depend on the model, filled as transformers'
  ``HfTrainerDeepSpeedConfig.trainer_config_finalize`` (transformers/integrations/deepspeed.py) fills them from
  ``model.config.hidden_size`` (bucket sizes H*H and 0.9*H*H, persistence threshold 10*H). accelerate does the
  same only for a prepared object with a ``.config``, which the training objective is not.
* ``is_partitioned(model)``, ``gathered_forwards(model)``: a model created partitioned but not (yet) inside a
  DeepSpeed engine has empty parameters; ``gathered_forwards`` gathers each module's own parameters for the
  duration of its forward and partitions them again after it (what the engine's hooks do), so evaluation never
  holds more than one module's weights whole. Every rank must run the same forwards (the gathers are
  collective).
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from typing import Any

_HIDDEN_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def launch_plugin():
    """accelerate's ``DeepSpeedPlugin`` for a DeepSpeed launch (``ACCELERATE_USE_DEEPSPEED``), else None."""
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    import torch
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        PartialState(cpu=not torch.cuda.is_available())  # zero.Init needs the process group (gloo on CPU)
    return DeepSpeedPlugin()  # reads the launcher's environment / config file; ZeRO-3: HfDeepSpeedConfig


def hidden_size(model) -> int:
    """The hidden size transformers' Trainer fills DeepSpeed's ``"auto"`` bucket sizes from."""
    cfg = getattr(model, "config", model)  # a model or its config
    size = getattr(cfg, "hidden_size", None)
    if size is None and getattr(cfg, "hidden_sizes", None):
        size = max(cfg.hidden_sizes)
    if not isinstance(size, int):
        raise ValueError(f"DeepSpeed config: 'auto' values of zero_optimization.{'/'.join(_HIDDEN_KEYS)} are filled "
                         f"from model.config.hidden_size, which {type(model).__name__} does not have; set them to "
                         "numbers")
    return size


def fill_auto(config: dict[str, Any], model, user: dict[str, Any] | None = None) -> None:
    """Replace the model-dependent ``"auto"`` entries of a DeepSpeed ``config`` in place (see the module
    docstring); entries given as numbers are kept. ``user``: the config as written, when ``config`` may hold
    values filled for an earlier model (then its ``"auto"`` entries are filled again)."""
    zero, given = config.get("zero_optimization"), (user or config).get("zero_optimization")
    if not isinstance(zero, dict) or not isinstance(given, dict) or \
            not any(given.get(k) == "auto" for k in _HIDDEN_KEYS):
        return
    h = hidden_size(model)
    values = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
              "stage3_param_persistence_threshold": 10 * h}
    for key, value in values.items():
        if given.get(key) == "auto":
            zero[key] = value


def launch_zero_stage() -> int | None:
    """The ZeRO stage of the current ``accelerate launch --use_deepspeed`` (from its environment: the stage
    variable or the DeepSpeed config file it names), None outside a DeepSpeed launch or when it cannot be read.
    Reads files only: no process group, no engine."""
    import json

    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage not in (None, "", "auto"):
        try:
            return int(stage)
        except ValueError:
            return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, int) else None
    return None


def is_partitioned(model) -> bool:
    """True when ``model``'s parameters were partitioned by ZeRO-3 (``zero.Init`` or an engine)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def in_engine(model) -> bool:
    """True when a DeepSpeed ZeRO-3 engine has installed its gathering hooks on ``model``'s modules."""
    return hasattr(model, "ds_id") or any(hasattr(m, "ds_id") for m in model.modules())


def _head_weight(model):
    """The output layer's weight, which the fused evaluation reads outside any forward (None without one)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    w = getattr(head, "weight", None)
    return w if hasattr(w, "ds_id") else None


@contextmanager
def _head_gathered(model):
    """The output layer's weight whole for the block: the fused evaluation (``lm_forward`` + fused statistics)
    reads it outside the layer's forward. Yields the ids of the parameters it holds gathered."""
    w = _head_weight(model)
    if w is None:
        yield set()
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([w]):
        yield {id(w)}


@contextmanager
def gathered_forwards(model, whole: bool = False):
    """Forwards of a ZeRO-3-partitioned ``model`` outside an engine (see the module docstring), the output
    layer's weight held whole for the block (the fused evaluation reads it outside a forward); a no-op for an
    unpartitioned model or one inside an engine (whose hooks gather per module, but which cannot keep the output
    weight whole: the pipelines evaluate a trained model as a fresh partitioned copy, ``common.evaluable``).
    ``whole=True`` gathers every parameter for the whole block instead (for gradients with respect to the
    weights, e.g. the gradient-norm membership attack)."""
    if not hasattr(model, "parameters") or not is_partitioned(model) or in_engine(model):
        yield model
        return
    import deepspeed

    GatheredParameters = deepspeed.zero.GatheredParameters
    if whole:
        with GatheredParameters(list(model.parameters())):
            yield model
        return
    stacks: dict[int, list[ExitStack]] = {}

    def pre(module, _args):
        stack = ExitStack()
        own = [p for p in module.parameters(recurse=False) if id(p) not in keep]
        if own:
            stack.enter_context(GatheredParameters(own))
        stacks.setdefault(id(module), []).append(stack)

    def post(module, _args, _out):
        stacks[id(module)].pop().close()

    handles = []
    with _head_gathered(model) as keep:
        for m in model.modules():
            if any(True for _ in m.parameters(recurse=False)):
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
            for stack in (s for ss in stacks.values() for s in ss):
                stack.close()


def within_call(module, fn, *args):
    """``fn(*args)`` run as ``module``'s forward for one call, so the hooks on ``module`` run around it.

    Inside a ZeRO-3 engine the hooks gather a module's own parameters only for the duration of its call (and
    parameters read inside another module's call join that call's gathering); a computation that reads them
    outside any forward, as the fused evaluation reads the output layer's weight, runs through this with the
    output layer as ``module``. ``fn`` should return a tensor or a plain tuple of tensors (the hooks walk the
    output). A no-op wrapper for a module without hooks.
    """
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def local_and_full_numel(model) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model): ``ds_tensor.numel()`` / ``ds_numel`` for a
    partitioned parameter, ``numel()`` twice for an ordinary one."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local, full = local + p.ds_tensor.numel(), full + p.ds_numel
        else:
            local, full = local + p.numel(), full + p.numel()
    return local, full


__all__ = ["fill_auto", "gathered_forwards", "hidden_size", "in_engine", "is_partitioned", "launch_plugin",
           "local_and_full_numel", "within_call"]
