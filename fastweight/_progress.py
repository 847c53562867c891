"""Progress that talks in a terminal and in a log file alike.

On a terminal ``progress(...)`` is a tqdm bar. Off a terminal (a run's output redirected to a file, a batch job)
tqdm's bars are switched off, so ``progress`` prints plain lines instead: one when the phase starts, then at least
every ``FASTWEIGHT_PROGRESS_EVERY`` seconds (default 30) while it runs — from a timer, so a single slow item
(a long generation batch, a checkpoint write) still reports — and one when it ends:

    [progress] TOFU eval target: 3/8 split (38%), 64 s elapsed, ~107 s left

``quiet_third_party_bars()`` silences the bars transformers, huggingface_hub and datasets draw (loading and
converting weights, writing shards, mapping data sets) when stderr is not a terminal, where they only fill log
files with carriage-return debris; on a terminal they stay.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Iterable, Iterator

ENV_EVERY = "FASTWEIGHT_PROGRESS_EVERY"


def _interval() -> float:
    raw = os.environ.get(ENV_EVERY, "30")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_EVERY} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{ENV_EVERY} must be positive, got {raw!r}")
    return value


def on_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class LineProgress:
    """tqdm's small interface (``update``, ``set_postfix_str``, ``close``, iteration, context manager) printing
    plain lines: at the start, every ``interval`` seconds from a daemon timer, and at the end."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, interval: float | None = None, stream=None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.start, self.postfix, self.stream = time.monotonic(), "", stream or sys.stderr
        self.interval = _interval() if interval is None else interval
        self._lock, self._done = threading.Lock(), threading.Event()
        self._emit("started")
        self._timer = threading.Thread(target=self._beat, name=f"progress:{desc}", daemon=True)
        self._timer.start()

    def _line(self, state: str = "") -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{elapsed:.0f} s elapsed")
        if self.total and 0 < self.n < self.total:
            parts.append(f"~{elapsed / self.n * (self.total - self.n):.0f} s left")
        if self.postfix:
            parts.append(self.postfix)
        if state:
            parts.append(state)
        return f"[progress] {self.desc}: " + ", ".join(parts)

    def _emit(self, state: str = "") -> None:
        with self._lock:
            print(self._line(state), file=self.stream, flush=True)

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            self._emit()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._emit("done")

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress object wraps no iterable")
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, leave: bool = False):
    """A tqdm bar on a terminal, ``LineProgress`` lines off one, nothing when ``disable`` (e.g. other ranks)."""
    from tqdm.auto import tqdm

    if disable:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=True)
    if on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


def quiet_third_party_bars() -> bool:
    """Off a terminal, switch off the progress bars of transformers, huggingface_hub and datasets (only those
    already installed); returns whether it did."""
    if on_terminal():
        return False
    for module, fn in (("transformers.utils.logging", "disable_progress_bar"),
                       ("huggingface_hub.utils", "disable_progress_bars"), ("datasets", "disable_progress_bars")):
        try:
            mod = __import__(module, fromlist=[fn])
        except ImportError:
            continue
        getattr(mod, fn, lambda: None)()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # transformers' GGUF conversion bar is a plain tqdm that ignores its own switch
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return True
    if hasattr(gguf_utils, "tqdm") and not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    return True


__all__ = ["ENV_EVERY", "LineProgress", "on_terminal", "progress", "quiet_third_party_bars"]
