"""What ``train()`` keeps in its ``output_dir`` besides checkpoints (issue 22): the settings that produced them,
and the G-effect record of a resumed run.

* ``claim_output_dir``: a fresh run (``resume=False``) refuses a folder that already holds a run's log,
  checkpoints or settings (it would overwrite the log and mix its checkpoints with the old ones); a resumed
  run refuses a folder whose stored settings (``SETTINGS_FILE``: method, method options, schedule, LoRA ...)
  differ from this one's, naming the differences, so it never returns another run's weights as its own.
* ``restore_g_effect``: the G-effect tracker of a resumed run starts from the ``g_effect.json`` written before
  the checkpoint it resumes (the steps after it are dropped), so a resumed run never truncates that file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SETTINGS_FILE = "train_settings.json"
# options that do not change the trained weights: a resumed run may change them
_FREE = ("output_dir", "resume", "eval_every", "eval_every_epochs", "progress", "log_every")
_USED = ("log.jsonl", "checkpoints", SETTINGS_FILE)


def settings_key(cfg) -> dict[str, Any]:
    """The ``TrainConfig`` options that determine the trained weights, JSON-normalised."""
    return json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in _FREE}, default=str))


def claim_output_dir(out_dir: Path, cfg, write: bool) -> None:
    """Check that ``train()`` may use ``out_dir`` (module docstring); ``write``: record this run's settings
    (the main process)."""
    out_dir = Path(out_dir)
    key = settings_key(cfg)
    used = [name for name in _USED if (out_dir / name).exists()]
    if used and not cfg.resume:
        raise ValueError(f"output_dir {str(out_dir)!r} holds an earlier training run ({', '.join(used)}); pass "
                         "resume=True to continue it (same method and settings) or choose an empty folder")
    if used and cfg.resume:
        stored = _read_settings(out_dir / SETTINGS_FILE)
        if stored is None:
            raise ValueError(f"resume=True: output_dir {str(out_dir)!r} holds {', '.join(used)} but no readable "
                             f"{SETTINGS_FILE}, so its method and settings cannot be checked; choose another "
                             "folder or move it aside")
        diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        if diff:
            shown = ", ".join(f"{k}: {stored.get(k)!r} -> {key.get(k)!r}" for k in diff[:4])
            raise ValueError(f"resume=True: output_dir {str(out_dir)!r} holds a run with other settings ({shown}"
                             f"{', ...' if len(diff) > 4 else ''}); resume with the same settings or choose "
                             "another folder")
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{SETTINGS_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(key, indent=1))
        os.replace(tmp, out_dir / SETTINGS_FILE)


def _read_settings(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def restore_g_effect(tracker, path: Path, step: int) -> None:
    """Load the records of ``path`` (``g_effect.json``) up to ``step`` into ``tracker``; a missing or
    unreadable file leaves it empty."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        probes = saved["probes"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for name, rec in probes.items():
        n = sum(1 for s in rec["step"] if s <= step)
        cut = {k: (v[:n] if isinstance(v, list) else {g: x[:n] for g, x in v.items()}) for k, v in rec.items()}
        if n:
            tracker.probes[name] = cut


__all__ = ["SETTINGS_FILE", "claim_output_dir", "restore_g_effect", "settings_key"]
