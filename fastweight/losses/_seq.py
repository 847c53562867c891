"""Shared O(N) helpers of the loss heads: valid-token masks, sequence views, sequence sums, argument checks.

Everything here works on per-token tensors shaped like ``labels`` (never on logits), so it adds O(N) work
to the one fused token-logprob pass.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from fastweight.ops._common import shift_labels


def valid_mask(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    """Bool tensor shaped like ``labels``: True where a token is scored (after the causal shift)."""
    if shift:
        labels = shift_labels(labels, ignore_index)
    return labels != ignore_index


def as_sequences(t: torch.Tensor) -> torch.Tensor:
    """View a per-token tensor as [B, T]: [T] -> [1, T] (one sequence), [..., T] -> [prod(...), T]."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(-1, t.shape[-1])


def require_sequences(name: str, labels: torch.Tensor) -> None:
    """Sequence-level losses need a batch dimension: labels [B, T]."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 2:
        raise ValueError(f"{name} must be [B, T] for a sequence-level loss, got shape {tuple(labels.shape)}")


def check_ref(name: str, ref: Any, shape: torch.Size | tuple, device: torch.device) -> torch.Tensor:
    """A reference tensor (no gradient needed) of the given shape; returned detached as float."""
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ref).__name__}")
    if not ref.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {ref.dtype}")
    if tuple(ref.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ref.shape)}")
    if ref.device != device:
        raise ValueError(f"{name} is on {ref.device} but the input is on {device}")
    return ref.detach()


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in [low, high] (open ends where asked); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def reduce_tokens(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """'mean' over valid tokens (0 when none), 'sum', or 'none' (per-token, 0 where ignored)."""
    per_token = torch.where(valid, per_token, 0.0)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def reduce_rows(per_row: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sequence values [B]: 'mean' over kept rows (0 when none), 'sum', or 'none' ([B], 0 where dropped)."""
    per_row = torch.where(keep, per_row, 0.0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1)
