"""Checks of a pipeline's settings against the model's configuration, before any weights load (issue 22).

When a check below applies, the model (a local ``save_pretrained`` folder, a GGUF file or the embedded model) is
built on the meta device from its config (accelerate's ``init_empty_weights``: no memory, no weights read), and:
  * every ``--lora-targets`` name must match a module of the model (as peft matches: the name or a dotted suffix
    of a module's path);
  * ``--gradient-checkpointing`` needs a model class that supports it;
  * RMU's ``layer`` and ``trainable_layers`` must lie within the model's decoder depth;
  * ``--trainable-layers`` larger than the depth is reported as what it is (all layers).
Hub ids are not checked here (their config needs the hub); their errors come from ``train`` once loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def meta_model(spec: str):
    """The model ``spec`` (the embedded model, a local folder or GGUF file) built on the meta device from its
    config, or None for a hub id (its config would need the hub)."""
    from fastweight.train import models as _models

    if spec != _models.EMBEDDED and not Path(spec).exists():
        return None
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    name, kwargs = _models._resolve(spec)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {spec!r}: its config cannot be read ({' '.join(str(e).split())[:160]})") from None
    with init_empty_weights():
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as e:  # not a causal LM architecture
            raise ValueError(f"--model {spec!r} is not a causal LM ({' '.join(str(e).split())[:160]})") from None


def _module_matches(target: str, names: list[str]) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def check_model_settings(cfg: Any, method_args: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the flag when ``cfg`` asks for something the model's config rules out (module
    docstring). No-op for hub ids."""
    wants = (getattr(cfg, "lora_r", 0) and cfg.lora_targets) or getattr(cfg, "gradient_checkpointing", False) \
        or cfg.method == "rmu"
    model = meta_model(cfg.model) if wants else None  # reading a GGUF header takes seconds: only when needed
    if model is None:
        return
    names = [n for n, _ in model.named_modules() if n]
    if getattr(cfg, "lora_r", 0) and cfg.lora_targets:
        bad = [t for t in cfg.lora_targets.split(",") if not _module_matches(t, names)]
        if bad:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if n and not list(m.children())})
            raise ValueError(f"--lora-targets {','.join(bad)}: no such module in {type(model).__name__} (its leaf "
                             f"modules: {', '.join(leaves)})")
    if getattr(cfg, "gradient_checkpointing", False) and not getattr(model, "supports_gradient_checkpointing",
                                                                     False):
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing; leave the flag out")
    depth = getattr(model.config, "num_hidden_layers", None)
    if depth is None:
        return
    if cfg.method == "rmu":
        from fastweight.train.methods import build_method

        settings = build_method(cfg.method, **method_args).config  # the defaults included
        for key in ("layer", "trainable_layers"):
            value = getattr(settings, key, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            out = [v for v in values if isinstance(v, int) and v >= depth]
            if out:
                raise ValueError(f"RMU {key} {out[0]} is outside the model's {depth} decoder layers (0 .. "
                                 f"{depth - 1}); pass --method-arg {key}=... within them")


__all__ = ["check_model_settings", "meta_model"]
