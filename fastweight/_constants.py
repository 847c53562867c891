"""Constants and choice types shared by every layer of fastweight.

`IGNORE_INDEX` is the one place the Hugging Face label mask value lives; no other module writes -100.
"""
from __future__ import annotations

from typing import Literal, get_args

IGNORE_INDEX: int = -100

Backend = Literal["auto", "triton", "torch"]
Reduction = Literal["none", "mean", "sum"]

BACKENDS: tuple[str, ...] = get_args(Backend)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
