"""One validation module for data rows, data files and config values (issue 22).

Every loader and config reads its files and checks its values here, so every error names the file and line
(parse errors, non-UTF-8 bytes), the row and field (wrong types, empty perturbed lists, WMDP choices that are
not a list of four strings) or the option (a number given as a string that does not parse, an infinite
learning rate, a seed outside ``0 .. 2**32 - 1``), and is raised before any model is loaded.

* ``read_text(file)``: UTF-8 text; a ``ValueError`` naming the file and line of the first bad byte.
* ``read_json_rows(file)``: one JSON array or JSON lines; a ``ValueError`` ``file:line: ...``.
* ``read_mapping(file)``: a YAML/JSON mapping (config files); parse errors name file and line.
* ``check_rows(rows, fields, where)``: every field of every row has its declared kind (``FIELD_KINDS``).
* ``number(name, value, kind, ...)``: an int/float option, a numeric string (as YAML can give) coerced, range
  and finiteness checked.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

SEED_MAX = 2 ** 32 - 1


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_text(file: str | os.PathLike) -> str:
    """The UTF-8 text of ``file``; non-UTF-8 bytes are a ValueError naming the file, line and byte offset."""
    file = Path(file)
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}:{_line_of(data, e.start)}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
                         f"{e.start}); save the file as UTF-8") from None


def read_json_rows(file: str | os.PathLike) -> list:
    """Rows of a JSON file holding one array, or of a JSON-lines file; errors are ``file:line: ...``."""
    file = Path(file)
    text = read_text(file)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        return list(rows)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    return rows


def read_mapping(file: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A mapping from a ``.yaml``/``.yml`` or ``.json`` file; parse errors name the file and line."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"{what} {str(file)!r} does not exist")
    text = read_text(file)
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{file}{line}: not valid YAML ({problem})") from None
    elif file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    else:
        raise ValueError(f"{what} must end in .yaml, .yml or .json, got {str(file)!r}")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(file)!r} must hold a mapping, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------ rows
def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# kind -> (predicate, what the value must be)
FIELD_KINDS: dict[str, tuple[Any, str]] = {
    "str": (_is_str, "a string"),
    "str_list": (_is_str_list, "a non-empty list of strings"),
    "str_or_list": (lambda v: _is_str(v) or _is_str_list(v), "a string or a non-empty list of strings"),
    "choices4": (lambda v: _is_str_list(v) and len(v) == 4, "a list of 4 strings"),
    "index": (_is_index, "an integer"),
}
# the fields every loader knows, with their kinds (unknown extra fields are kept unchecked)
ROW_FIELDS: dict[str, str] = {
    "question": "str", "answer": "str", "paraphrased_answer": "str", "paraphrased_question": "str",
    "perturbed_answer": "str_list", "text": "str", "prompt": "str", "gt": "str", "choices": "choices4",
}


def check_rows(rows: Sequence[Any], needed: Sequence[str], where: str, kinds: Mapping[str, str] | None = None
               ) -> list[dict]:
    """Check that every row is a dict holding ``needed`` and that each known field has its kind (``ROW_FIELDS``,
    updated by ``kinds``); errors name ``where`` (the file or set), the row and the field."""
    kinds = {**ROW_FIELDS, **(kinds or {})}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where} row {i} must be a JSON object, got {type(row).__name__}")
        missing = [f for f in needed if f not in row]
        if missing:
            raise ValueError(f"{where} row {i} lacks fields {missing} (has {sorted(row)})")
        for name, value in row.items():
            kind = kinds.get(name)
            if kind is None or (value is None and name not in needed):
                continue
            ok, want = FIELD_KINDS[kind]
            if not ok(value):
                raise ValueError(f"{where} row {i} field {name!r} must be {want}, got {value!r:.80}")
    return list(rows)


# ------------------------------------------------------------------------------------------------ numbers
def number(name: str, value: Any, kind: type = float, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, none: bool = False) -> Any:
    """``value`` as an option ``name`` of ``kind`` (int or float): a numeric string (YAML gives ``1e-5`` as a
    string) is parsed, a bool refused, an int-valued float accepted for ints; it must be finite and within
    ``[low, high]`` (``(low, high]`` with ``low_open``). ``none``: None is allowed and returned."""
    if value is None and none:
        return None
    orig = value
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else _parse_int(value)
        except ValueError:
            raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {orig!r}"
                             ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {orig!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {orig!r}")
        value = int(value)
    elif not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {orig!r}")
    else:
        value = float(value)
    bad_low = low is not None and (value <= low if low_open else value < low)
    if bad_low or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}, got {orig!r}")
    return value


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        f = float(text.strip())
        if not f.is_integer():
            raise
        return int(f)


__all__ = ["FIELD_KINDS", "ROW_FIELDS", "SEED_MAX", "check_rows", "number", "read_json_rows", "read_mapping",
           "read_text"]
