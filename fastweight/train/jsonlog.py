"""The training log ``log.jsonl`` (one JSON object per line): repair of a line torn by a kill.

Used by ``fastweight.train.loop.train`` on resume and by the pipelines before a resumed unlearning run, so a
run killed while appending a line can be continued (the torn line is dropped, the original file kept).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def move_aside(path: Path, tag: str) -> Path:
    """Rename ``path`` to ``<name>.<tag>-<time>-<pid>[-n]`` beside it (never over an existing file) and return
    the new path: how the trainer and the pipelines keep what they would otherwise overwrite or delete."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    dest = path.with_name(f"{path.name}.{tag}-{stamp}")
    n = 0
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.{tag}-{stamp}-{n}")
    os.replace(path, dest)
    return dest


def repair_log(path: str | os.PathLike) -> int:
    """Drop unparsable lines (a line torn by a kill) from a JSON-lines log; the original is kept beside it as
    ``<name>.torn-<time>-<pid>``. Returns the number of dropped lines (0: the file is left untouched)."""
    path = Path(path)
    if not path.is_file():
        return 0
    good, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            bad += 1
    if bad:
        kept = move_aside(path, "torn")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in good), encoding="utf-8")
        os.replace(tmp, path)
        print(f"{path.name}: dropped {bad} torn line(s) (original kept as {kept.name})")
    return bad


__all__ = ["repair_log"]
