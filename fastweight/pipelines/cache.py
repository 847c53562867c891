"""The user cache of the pipelines (issue 26): generated data sets and fine-tuned models, keyed by fingerprint,
in one folder found again from any working directory.

* ``default_cache_dir()``: ``$FASTWEIGHT_CACHE_DIR`` when set, else the platform's user cache folder:
  ``$XDG_CACHE_HOME/fastweight`` or ``~/.cache/fastweight`` (Linux and other POSIX systems),
  ``~/Library/Caches/fastweight`` (macOS), ``%LOCALAPPDATA%\\fastweight\\Cache`` (Windows). ``--cache-dir``
  overrides both (``resolve_cache_dir``).
* ``entries(folder)``: the entries fastweight created there: top-level folders named like the pipelines name
  them (``ENTRY_NAME``: ``target-<fp>``, ``retain-<split>-<fp>``, ``muse-...``, ``wmdp-...``, ``data-...``, and
  the ``.stale-``/``.interrupted-`` copies and ``.run`` scratch folders of those). Any other file or folder in
  the cache folder is never listed or removed.
* ``clear(folder, older_than_days=, fingerprint=, dry_run=)``: remove entries (all, those not modified for N
  days, or those whose fingerprint starts with the given text); returns what it removed (or would remove).
* ``main(argv)``: ``fastweight cache list|clear`` (``fastweight/cli.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "FASTWEIGHT_CACHE_DIR"
# the names the pipelines give cache entries (tofu.py, muse.py, wmdp.py), with move_aside/scratch suffixes
ENTRY_NAME = re.compile(r"^(target|retain|muse|wmdp|data)-[A-Za-z0-9._-]+$")
_FP_TAIL = re.compile(r"-([0-9a-f]{16})(?:\.(?:run|tmp|stale-.*|interrupted-.*))?$")


def platform_cache_home(platform: str | None = None, env: dict | None = None) -> Path:
    """The user cache folder of ``platform`` (``sys.platform`` by default) from ``env`` (``os.environ``)."""
    platform = sys.platform if platform is None else platform
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    if platform.startswith("win"):
        base = env.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / "fastweight" / "Cache"
    if platform == "darwin":
        return home / "Library" / "Caches" / "fastweight"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".cache") / "fastweight"


def default_cache_dir() -> Path:
    """``$FASTWEIGHT_CACHE_DIR`` when set and non-empty, else ``platform_cache_home()``."""
    given = os.environ.get(ENV)
    return Path(given).expanduser() if given else platform_cache_home()


def resolve_cache_dir(given: str | os.PathLike | None) -> str:
    """``--cache-dir`` as an absolute path (``~`` expanded): the given folder, else ``default_cache_dir()``
    (anything but a path or None is returned as is, for the config's type check to name it)."""
    if given is not None and not isinstance(given, (str, os.PathLike)):
        return given
    path = Path(given).expanduser() if given not in (None, "") else default_cache_dir()
    return str(path.absolute())


@dataclass
class Entry:
    path: Path
    size: int                    # bytes of every file below it
    mtime: float                 # newest modification time below it
    fingerprint: str | None
    key: dict[str, Any] | None   # FINGERPRINT.json's key (model, data, settings) when the entry has one

    def describe(self) -> str:
        """What produced the entry, in one line: the key's model, data and settings, or the name's parts."""
        if not self.key:
            return "generated data" if self.path.name.startswith(("data-", "muse-s", "wmdp-s")) else "-"
        key = dict(self.key)
        parts = [f"model {key.pop('model', '?')}", f"data {key.pop('data', '?')}"]
        parts += [f"{k}={v}" for k, v in sorted(key.items()) if v is not None]
        return ", ".join(parts)


def _walk(path: Path) -> tuple[int, float]:
    size, newest = 0, path.lstat().st_mtime
    for root, _, files in os.walk(path):
        for f in files:
            st = (Path(root) / f).lstat()
            size, newest = size + st.st_size, max(newest, st.st_mtime)
    return size, newest


def entries(folder: str | os.PathLike) -> list[Entry]:
    """The cache entries fastweight created in ``folder`` (module docstring), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if not (p.is_dir() and not p.is_symlink() and ENTRY_NAME.match(p.name)):
            continue
        key, fp = None, None
        try:
            mark = json.loads((p / "FINGERPRINT.json").read_text(encoding="utf-8"))
            key, fp = mark.get("key"), mark.get("fingerprint")
        except (OSError, ValueError, AttributeError):
            pass
        if fp is None and (m := _FP_TAIL.search(p.name)):
            fp = m.group(1)
        size, mtime = _walk(p)
        out.append(Entry(p, size, mtime, fp, key if isinstance(key, dict) else None))
    return out


def select(found: list[Entry], *, older_than_days: float | None = None, fingerprint: str | None = None,
           now: float | None = None) -> list[Entry]:
    """The entries matching both filters (None = no filter)."""
    if older_than_days is not None and not older_than_days >= 0:
        raise ValueError(f"--older-than must be a number of days >= 0, got {older_than_days!r}")
    if fingerprint is not None and not re.fullmatch(r"[0-9a-f]{4,16}", fingerprint):
        raise ValueError(f"fingerprint must be 4 to 16 hex digits (as `fastweight cache list` shows), got "
                         f"{fingerprint!r}")
    now = time.time() if now is None else now
    return [e for e in found
            if (older_than_days is None or now - e.mtime >= older_than_days * 86400)
            and (fingerprint is None or (e.fingerprint or "").startswith(fingerprint))]


def clear(folder: str | os.PathLike, *, older_than_days: float | None = None, fingerprint: str | None = None,
          dry_run: bool = False) -> list[Entry]:
    """Remove the selected entries of ``folder`` (only ones fastweight created); returns them."""
    chosen = select(entries(folder), older_than_days=older_than_days, fingerprint=fingerprint)
    if not dry_run:
        for e in chosen:
            shutil.rmtree(e.path)
    return chosen


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastweight cache", description=(
        "The cache of generated data and fine-tuned models (default: $FASTWEIGHT_CACHE_DIR, else the user cache "
        "folder: $XDG_CACHE_HOME/fastweight or ~/.cache/fastweight, ~/Library/Caches/fastweight on macOS, "
        "%%LOCALAPPDATA%%\\fastweight\\Cache on Windows). Only entries fastweight created are listed or removed."))
    sub = p.add_subparsers(dest="verb", required=True, metavar="list|clear")
    for verb, text in (("list", "each entry with its size and what produced it, and the total"),
                       ("clear", "remove entries (all, or those matching --older-than / FINGERPRINT); asks nothing")):
        s = sub.add_parser(verb, help=text, description=text)
        s.add_argument("--cache-dir", metavar="PATH", default=None,
                       help=f"cache folder (default: ${ENV}, else the user cache folder: {default_cache_dir()})")
        if verb == "clear":
            s.add_argument("fingerprint", nargs="?", default=None, metavar="FINGERPRINT",
                           help="only entries whose fingerprint starts with these hex digits")
            s.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                           help="only entries not modified for DAYS days (fractions allowed)")
            s.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fastweight cache list|clear``; returns the exit code (2 on a bad argument)."""
    args = _parser().parse_args(argv)
    folder = Path(resolve_cache_dir(args.cache_dir))
    if args.verb == "list":
        found = entries(folder)
        print(f"cache folder: {folder}" + ("" if folder.is_dir() else " (does not exist)"))
        for e in found:
            print(f"{human(e.size):>9}  {e.path.name}  ({e.describe()})")
        print(f"{len(found)} entries, {human(sum(e.size for e in found))} in all")
        return 0
    try:
        gone = clear(folder, older_than_days=args.older_than, fingerprint=args.fingerprint, dry_run=args.dry_run)
    except ValueError as e:
        print(f"fastweight cache: error: {e}", file=sys.stderr)
        return 2
    verb = "would remove" if args.dry_run else "removed"
    for e in gone:
        print(f"{verb} {e.path} ({human(e.size)})")
    print(f"{verb} {len(gone)} entries, {human(sum(e.size for e in gone))} from {folder}")
    return 0


__all__ = ["ENV", "Entry", "clear", "default_cache_dir", "entries", "main", "platform_cache_home",
           "resolve_cache_dir", "select"]
