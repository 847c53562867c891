"""Checkpoint retention of a finished pipeline run (``--keep``, issue 26), applied by ``OutputDir.finish`` once
``results.json`` is written.

* ``last``: nothing is removed: the last training checkpoint (``checkpoints/step-N``: weights, optimizer state,
  RNG states, ``trainer_state.json``) stays, as before this option.
* ``final`` (default): earlier ``checkpoints/step-*`` folders go, and the last one keeps only what re-evaluating
  needs: its ``model.safetensors`` (the trainable weights of the final model), RNG files and
  ``trainer_state.json``, which is marked ``"weights_only": true`` so ``load_checkpoint`` restores the weights
  without the optimizer (``--resume`` of a finished run re-evaluates; it trains no further step). A checkpoint of
  a ZeRO-3 / ZeRO-1/2 / FSDP run (partitioned optimizer or weights) is kept whole.
* ``none``: no weights: every ``checkpoints/step-*`` folder and the engine-gathered ``model.safetensors`` next to
  them go; results, logs, evaluations and figures stay.

Only files a training run writes are deleted, by name (``checkpoint.py``'s file names in ``step-*`` folders);
a folder is removed only once empty, so anything else put there survives.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

KEEP_MODES = ("final", "last", "none")
_STEP = re.compile(r"^step-(\d+)$")
_WRITTEN = re.compile(r"^(model\.safetensors|optimizer\.pt|trainer_state\.json|rng-\d+\.safetensors|zero-\d+\.pt)$")
_STRIPPED = re.compile(r"^(optimizer\.pt|zero-\d+\.pt)$")  # what ``final`` drops from the last checkpoint


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else 0


def _remove(folder: Path, names: re.Pattern) -> int:
    """Delete the files of ``folder`` whose names match; the folder too once empty. Returns the bytes freed."""
    freed = 0
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink() and names.match(f.name):
            freed += _size(f)
            f.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()
    return freed


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def apply_keep(out: str | os.PathLike, keep: str) -> list[str]:
    """Apply ``keep`` to the run folder ``out`` (module docstring); returns one line per action taken."""
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}, got {keep!r}")
    out = Path(out)
    root = out / "checkpoints"
    if keep == "last":
        return []
    steps = sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
                   if (m := _STEP.match(p.name)) and p.is_dir() and not p.is_symlink())
    lines, freed = [], 0
    drop = steps if keep == "none" else steps[:-1]
    for _, p in drop:
        freed += _remove(p, _WRITTEN)
    if keep == "none":
        gathered = out / "model.safetensors"
        if gathered.is_file() and not gathered.is_symlink():
            freed += _size(gathered)
            gathered.unlink()
    elif steps:
        last = steps[-1][1]
        state_file = last / "trainer_state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if state.get("engine", "replicated") == "replicated" and (last / "model.safetensors").is_file():
            freed += sum(_size(f) for f in last.iterdir() if _STRIPPED.match(f.name))
            for f in last.iterdir():
                if _STRIPPED.match(f.name):
                    f.unlink()
            tmp = state_file.with_name(state_file.name + ".tmp")
            tmp.write_text(json.dumps({**state, "weights_only": True}))
            os.replace(tmp, state_file)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    if freed:
        lines.append(f"--keep {keep}: removed {_mb(freed)} of training checkpoint files from {out} "
                     f"({'no weights kept' if keep == 'none' else 'the final weights kept'})")
    return lines


__all__ = ["KEEP_MODES", "apply_keep"]
