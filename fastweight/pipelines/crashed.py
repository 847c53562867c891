"""A crashed run's folder, recognised (issue 26): ``status.json`` still says ``"running"`` but no process of
this machine runs it (its ``pid`` is gone; a ``host`` field, when ``status.json`` has one, must name this
machine, else the process cannot be checked and the folder is not called crashed). ``crash_report(folder)`` returns one line naming where the run stopped (the last unlearning step
in ``log.jsonl``, else the last evaluation folder written, else "before unlearning") and how to go on:
``--resume`` to continue it, ``--overwrite`` to move it aside and start over. ``OutputDir.check`` raises it
instead of the generic "not empty" error when neither flag is given.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a process of another user counts as alive)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _last_step(log: Path) -> int | None:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a torn last line
        if isinstance(step, int):
            return step
    return None


def where_stopped(folder: Path) -> str:
    """The phase a run in ``folder`` reached, from the files it wrote."""
    folder = Path(folder)
    step = _last_step(folder / "log.jsonl")
    ckpt = folder / "checkpoints"
    saved = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-")) if ckpt.is_dir() else []
    if step is not None:
        return f"unlearning step {step}" + (f" (last checkpoint {saved[-1]})" if saved else " (no checkpoint)")
    evals = [p for p in (folder / "eval").iterdir() if p.is_dir()] if (folder / "eval").is_dir() else []
    if evals:
        last = max(evals, key=lambda p: p.stat().st_mtime)
        return f"evaluating the {last.name} model"
    return "before unlearning (loading, fine-tuning or evaluating the starting models)"


def crash_report(folder: str | os.PathLike) -> str | None:
    """One line when ``folder`` holds a crashed run (module docstring), else None (complete, running elsewhere
    or alive, or no run)."""
    folder = Path(folder)
    status = _read_json(folder / "status.json")
    if not isinstance(status, dict) or status.get("state") != "running":
        return None
    host = status.get("host")
    if host is not None and host != socket.gethostname():
        return None  # started on another machine: its process cannot be checked from here
    pid = status.get("pid")
    if pid is None or pid_alive(pid):
        return None
    return (f"--output-dir {str(folder)!r} holds a run that crashed (status.json says running, but its process "
            f"{pid} is gone) at {where_stopped(folder)}: pass --resume to continue it from there, or --overwrite "
            "to move it aside and start over")


__all__ = ["crash_report", "pid_alive", "where_stopped"]
