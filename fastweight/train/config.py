"""Training configuration: one dataclass, validated once, loadable from YAML/JSON.

Defaults follow ``shared/spec/LOSSES.md`` (training defaults): AdamW, lr 1e-5, 5 epochs, effective batch
16 (4 x 4 accumulation), linear warm-up over the first epoch then linear decay, max grad norm 1.
Method hyper-parameters are not defaulted here: ``method_args`` only overrides what
``fastweight.train.methods.build_method`` (and through it ``fastweight.losses.LOSSES``) defines.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from fastweight.data.schema import SEED_MAX, number, read_mapping

MixedPrecision = Literal["no", "bf16", "fp16"]
MIXED_PRECISIONS: tuple[str, ...] = get_args(MixedPrecision)


@dataclass
class TrainConfig:
    """Options of ``fastweight.train.loop.train``.

    method: unlearning method name for ``build_method``; None = plain fine-tuning (NLL on the forget/train set).
    method_args: overrides passed to ``build_method(method, **method_args)``.
    batch_size: per-process micro-batch; ``grad_accum`` micro-batches per optimizer step.
    epochs / max_steps: the run is ``epochs`` passes, cut at ``max_steps`` optimizer steps when set (the
        schedule is computed for the cut run).
    warmup_steps: None = one epoch of warm-up (at most half of the run), then linear decay to 0.
    trainable_layers: train only the last N decoder blocks (+ final norm), e.g. for a CPU budget; None = all
        (intersected with the method's ``trainable``).
    save_every: checkpoint every N optimizer steps (0 = only at the end); ``resume``: continue from the
        latest checkpoint in ``output_dir/checkpoints``.
    lora_r: LoRA rank (0 = no LoRA): the model is wrapped with ``peft`` and only the adapters train; a model
        that already is a ``PeftModel`` trains only its adapters too. ``lora_alpha``, ``lora_dropout`` and
        ``lora_targets`` (module names; None = peft's default for the architecture) as in ``peft.LoraConfig``.
    gradient_checkpointing: recompute decoder activations in the backward (non-reentrant checkpointing).
    eval_every / eval_every_epochs: call ``train(..., eval_fn=)`` every N optimizer steps / epochs (0 = never).
    check_finite: stop with ``NonFiniteError`` on a non-finite loss term or gradient norm, before the optimizer
        step and before any checkpoint.
    g_effect_every: record the G-effect of the objective on forget and retain probes every N optimizer steps
        (0 = off); ``g_effect_ema`` smooths it (weight of the running value), ``g_effect_probe_size`` items per
        probe batch (the first items of the forget / retain sets).
    """

    output_dir: str = "runs/tofu"
    method: str | None = None
    method_args: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-5
    epochs: int = 5
    batch_size: int = 4
    grad_accum: int = 4
    max_steps: int | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    trainable_layers: int | None = None
    save_every: int = 0
    resume: bool = False
    log_every: int = 1
    progress: bool = True
    g_effect_every: int = 0
    g_effect_ema: float = 0.6
    g_effect_probe_size: int = 8
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    gradient_checkpointing: bool = False
    eval_every: int = 0
    eval_every_epochs: int = 0
    check_finite: bool = True

    def __post_init__(self) -> None:
        self._coerce_numbers()
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("max_steps", "trainable_layers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or a positive int, got {v!r}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError(f"warmup_steps must be None or an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.g_effect_every, int) or self.g_effect_every < 0:
            raise ValueError(f"g_effect_every must be an int >= 0, got {self.g_effect_every!r}")
        if not isinstance(self.g_effect_probe_size, int) or self.g_effect_probe_size < 1:
            raise ValueError(f"g_effect_probe_size must be a positive int, got {self.g_effect_probe_size!r}")
        if not 0 <= self.g_effect_ema < 1:
            raise ValueError(f"g_effect_ema must be in [0, 1), got {self.g_effect_ema!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every must be an int >= 0, got {self.save_every!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be None or > 0, got {self.max_grad_norm!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        if not isinstance(self.method_args, dict):
            raise TypeError(f"method_args must be a dict, got {type(self.method_args).__name__}")
        for name in ("lora_r", "eval_every", "eval_every_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or \
                not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or \
                not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str):
                self.lora_targets = tuple(t for t in self.lora_targets.split(",") if t)
            self.lora_targets = tuple(self.lora_targets)
            if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
                raise ValueError(f"lora_targets must be None or non-empty module names, got {self.lora_targets!r}")
        for name in ("gradient_checkpointing", "check_finite", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.method is not None:  # unknown method or option: fail here, before any model is loaded
            from fastweight.train.methods import build_method

            if not isinstance(self.method, str):
                raise TypeError(f"method must be a str or None, got {type(self.method).__name__}")
            try:
                build_method(self.method, **self.method_args)
            except ValueError as e:
                raise ValueError(f"method={self.method!r}: {e}") from None

    def _coerce_numbers(self) -> None:
        """Numbers given as strings (as YAML gives ``1e-5``) become numbers, others are refused naming the field;
        floats must be finite (``lr: inf``), the seed within ``0 .. 2**32 - 1`` (issue 22)."""
        for name in _INT_FIELDS:
            setattr(self, name, number(name, getattr(self, name), int, none=name in _OPTIONAL))
        for name in _FLOAT_FIELDS:
            setattr(self, name, number(name, getattr(self, name), float, none=name in _OPTIONAL))
        number("seed", self.seed, int, low=0, high=SEED_MAX)
        if self.lora_targets is not None and "lm_head" in (self.lora_targets.split(",") if isinstance(
                self.lora_targets, str) else self.lora_targets):
            raise ValueError("lora_targets contains lm_head: the fused loss reads lm_head.weight directly, so an "
                             "adapter there would never train; leave lm_head out")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_INT_FIELDS = ("epochs", "batch_size", "grad_accum", "max_steps", "warmup_steps", "seed", "trainable_layers",
               "save_every", "log_every", "g_effect_every", "g_effect_probe_size", "lora_r", "eval_every",
               "eval_every_epochs")
_FLOAT_FIELDS = ("lr", "weight_decay", "max_grad_norm", "g_effect_ema", "lora_alpha", "lora_dropout")
_OPTIONAL = ("max_steps", "warmup_steps", "trainable_layers", "max_grad_norm")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping from a ``.yaml``/``.yml`` or ``.json`` file (keys are CLI/dataclass field names); parse
    errors name the file and line (``fastweight.data.schema.read_mapping``)."""
    return read_mapping(path)


def train_config_from(mapping: dict[str, Any]) -> TrainConfig:
    """``TrainConfig`` from the keys of ``mapping`` that are its fields (others ignored)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in mapping.items() if k in names})


__all__ = ["MIXED_PRECISIONS", "MixedPrecision", "TrainConfig", "read_config_file", "train_config_from"]
