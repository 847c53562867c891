"""Ownership of a pipeline's run folder (issue 22): ``--resume`` and ``--overwrite`` act only on folders a
fastweight run created.

* ``MARKER`` (``.fastweight-run.json``), written when a run claims a new or empty folder, names the run kind
  (``tofu``, ``muse``, ``wmdp``) and the run's fingerprint (``run_fingerprint``: the settings that determine
  results, without the folder paths and the run-control flags, so a moved copy or a relative path is the
  same run).
* ``check_reuse``: a non-empty folder is used only with ``--resume`` / ``--overwrite`` and only when it carries
  the marker of the same kind; ``--overwrite`` also refuses a folder that holds the run's inputs
  (``--model``, ``--data``, ``--retain-model``, ``--cache-dir``), the working directory or a filesystem root.
  Every refusal is one line and touches nothing.
* ``dead_temporaries``: on ``--resume``, the partial files a killed run left behind (``*.tmp-<pid>`` of a
  process no longer running), which the main process removes before the run goes on.
* ``check_before_loading``: a writable ``--cache-dir`` and the settings the model's config rules out
  (``modelcheck.py``), before any weights load.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

from fastweight.pipelines.crashed import pid_alive

MARKER = ".fastweight-run.json"
# fields that say where files go or how the run proceeds, not what it computes
_NOT_RESULTS = ("output_dir", "cache_dir", "resume", "overwrite", "report_to")
_INPUTS = ("model", "data", "retain_model", "cache_dir")


def run_fingerprint(cfg: Any) -> dict[str, Any]:
    """The settings of a pipeline config that determine its results (paths and run-control flags left out)."""
    values = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return {k: v for k, v in values.items() if k not in _NOT_RESULTS}


def run_inputs(cfg: Any) -> dict[str, str]:
    """``{"--model": path, ...}``: the local paths a pipeline config reads (what ``--overwrite`` must not move)."""
    out = {}
    for name in _INPUTS:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value:
            out["--" + name.replace("_", "-")] = value
    return out


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` (None when absent or unreadable)."""
    try:
        mark = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and isinstance(mark.get("kind"), str) else None


def write_marker(folder: Path, kind: str, fingerprint: str | None, created: float | None = None) -> None:
    folder = Path(folder)
    tmp = folder / f".{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"kind": kind, "fingerprint": fingerprint,
                               "created": created if created is not None else time.time()}))
    os.replace(tmp, folder / MARKER)


def claim(folder: Path, kind: str, fingerprint: str | None) -> None:
    """Write (or, on resume, update the fingerprint of) the marker; the folder exists."""
    old = read_marker(folder)
    write_marker(folder, kind, fingerprint, old.get("created") if old else None)


# every atomic write here goes through "<name>.tmp-<pid>" then os.replace (store.atomic_json, common.atomic_write,
# the JSON logs, the marker, the trainer's settings file): a file still so named is a write its process never
# finished (pids as Linux issues them: no leading zero, at most 9 digits)
_TEMPORARY = re.compile(r"\.tmp-([1-9][0-9]{0,8})$")


def dead_temporaries(folder: Path) -> list[Path]:
    """Files under ``folder`` named ``*.tmp-<pid>`` whose process is not running on this machine: half-written
    results of a killed run (its finished files were already moved into place), safe to remove on resume."""
    out = []
    for q in sorted(Path(folder).rglob("*.tmp-*")):
        m = _TEMPORARY.search(q.name)
        if m and q.is_file() and not q.is_symlink() and not pid_alive(int(m.group(1))):
            out.append(q)
    return out


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_overwrite_safe(folder: Path, inputs: Mapping[str, str]) -> None:
    """Refuse ``--overwrite`` of a filesystem root, of a folder holding the working directory, or of one
    holding an input of the run (it would be moved away under the run)."""
    p = Path(folder).resolve()
    if p.parent == p:
        raise ValueError(f"--overwrite refuses --output-dir {str(folder)!r}: it is a filesystem root")
    if _contains(p, Path.cwd().resolve()):
        raise ValueError(f"--overwrite refuses --output-dir {str(folder)!r}: it holds the working directory; "
                         "choose a sub-folder for the run")
    for flag, value in inputs.items():
        q = Path(value).expanduser()
        if q.exists() and _contains(p, q.resolve()):
            raise ValueError(f"--overwrite refuses --output-dir {str(folder)!r}: it holds {flag} {value!r}, "
                             "which the run reads; move the input or choose another folder")


def check_reuse(folder: Path, kind: str, *, resume: bool, overwrite: bool,
                inputs: Mapping[str, str] = {}) -> None:  # noqa: B006 (read only)
    """Raise (touching nothing) when the existing ``folder`` may not be used as configured (module docstring)."""
    p = Path(folder)
    if not p.is_dir() or not any(p.iterdir()):
        return
    if not (resume or overwrite):
        raise ValueError(f"--output-dir {str(p)!r} is not empty: pass --resume to continue that run, --overwrite "
                         "to move it aside (nothing is deleted), or choose another folder")
    flag = "--resume" if resume else "--overwrite"
    mark = read_marker(p)
    if mark is None:
        raise ValueError(f"{flag} refuses --output-dir {str(p)!r}: it holds files but no fastweight run (no "
                         f"{MARKER}); choose another folder")
    if mark["kind"] != kind:
        raise ValueError(f"{flag} refuses --output-dir {str(p)!r}: it holds a {mark['kind']} run, not a {kind} "
                         "run; choose another folder")
    if overwrite:
        check_overwrite_safe(p, inputs)


def check_before_loading(cfg: Any, method_args: Mapping[str, Any]) -> None:
    """What a pipeline checks without weights: a writable ``--cache-dir``; the LoRA targets, gradient
    checkpointing and RMU layers against the model's config (``modelcheck.py``)."""
    from fastweight.pipelines.modelcheck import check_model_settings
    from fastweight.train.zero3 import launch_zero_stage

    attacks = getattr(cfg, "mia_attacks", None) or ""
    if getattr(cfg, "eval_every", 0) and "gradnorm" in attacks and launch_zero_stage() == 3:
        raise ValueError("--eval-every with the gradnorm attack is not supported under DeepSpeed ZeRO-3 (its "
                         "gradients would be taken inside the training engine, whose hooks own the parameters' "
                         "gradients); drop gradnorm from --mia-attacks or leave --eval-every at 0 (the final "
                         "evaluation runs gradnorm on a separate copy of the model)")
    check_writable(cfg.cache_dir, "--cache-dir")
    check_model_settings(cfg, method_args)


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Raise when ``path`` (or, when it does not exist yet, its nearest existing parent) is not a writable folder."""
    import tempfile

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} exists and is not a folder")
    probe = p if p.is_dir() else next((q for q in p.absolute().parents if q.exists()), Path("."))
    try:  # a real write: os.access says yes to root on a read-only mount
        with tempfile.TemporaryFile(dir=probe, prefix=".fastweight-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {str(p)!r} is not writable ({str(probe)!r}: {e.strerror or e})") from None


__all__ = ["MARKER", "check_before_loading", "check_overwrite_safe", "check_reuse", "check_writable", "claim",
           "dead_temporaries", "read_marker", "run_fingerprint", "run_inputs", "write_marker"]
