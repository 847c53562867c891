"""Pipeline configuration: one dataclass per benchmark, options documented once, typed parsing from CLI and files.

Every option is a dataclass field declared with ``opt(default, help)``; the command-line parser
(``build_parser``), the config-file reader (``config_from_mapping``) and ``docs/pipelines.md`` all read the same
fields, so a flag cannot drift from its field. Values from YAML/JSON files and from the command line go through
one typed coercion (``coerce``): ``lr: 1e-5`` (a string to PyYAML) becomes the float 1e-5, ``epochs: "3"`` the
int 3, and a value that does not fit the field's type is a ValueError naming the option.

Precedence: dataclass defaults < ``--config FILE`` < flags given on the command line < ``--method-arg KEY=VALUE``
< the method shortcut flags (``--beta1`` ...), the last two folded into ``method_args``.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from fastweight.pipelines.ranks import is_main, shutdown

MixedPrecision = Literal["no", "bf16", "fp16"]
ReportTo = Literal["none", "tensorboard", "wandb"]
TorchDtype = Literal["fp32", "bf16", "fp16"]
Keep = Literal["final", "last", "none"]
METHOD_SHORTCUTS: tuple[str, ...] = ("beta", "beta1", "beta2", "forget_coef", "retain_coef", "alpha",
                                     "steering_coef")


def opt(default: Any, help: str, **kw) -> Any:  # noqa: A002  (argparse's word)
    """A config field with its help text (read by ``build_parser`` and the docs)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _is_none_type(tp) -> bool:
    return tp is type(None)


def coerce(name: str, tp, value: Any) -> Any:
    """``value`` converted to the annotated type ``tp`` of option ``name`` (ValueError naming it otherwise).

    Strings are parsed (numbers written ``1e-5`` are numbers, ``true``/``false`` booleans, JSON for dicts);
    ints are accepted for float fields; a float with an integral value is accepted for int fields.
    """
    origin = get_origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if any(_is_none_type(a) for a in args):
                return None
        errors = []
        for a in args:
            if _is_none_type(a):
                continue
            try:
                return coerce(name, a, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"option {name}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ValueError(f"option {name} must be one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"option {name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"option {name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ValueError(f"option {name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"option {name} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"option {name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"option {name} must be a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"option {name} must be a mapping (JSON), got {value!r}: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"option {name} must be a mapping, got {value!r}")
        return value
    return value


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_from_mapping(cls, values: dict[str, Any], *, source: str = "config"):
    """``cls(**values)`` after checking the keys and coercing every value to its field's type."""
    types_ = field_types(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {source}; known: {', '.join(names)}")
    return cls(**{k: coerce(k, types_[k], v) for k, v in values.items()})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping from a ``.yaml``/``.yml`` or ``.json`` file (keys are option names with underscores); parse
    errors and non-UTF-8 bytes name the file and line (``fastweight.data.schema.read_mapping``)."""
    from fastweight.data.schema import read_mapping

    return read_mapping(path, "--config file")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (what, which argument, how to get help), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def metavar_of(tp) -> str:
    """What ``--help`` shows for a value of type ``tp``: INT, FLOAT, TEXT, JSON (``X | None`` as ``X``)."""
    if get_origin(tp) is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        inner = [a for a in get_args(tp) if not _is_none_type(a)]
        return metavar_of(inner[0]) if len(inner) == 1 else "VALUE"
    if tp is dict or get_origin(tp) is dict:
        return "JSON"
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "VALUE")


def build_parser(cls, description: str, *, shortcuts: tuple[str, ...] = METHOD_SHORTCUTS) -> OneLineParser:
    """A parser with one ``--flag`` per field of ``cls`` (help from ``opt``), plus ``--config``,
    ``--method-arg``, the method shortcuts and ``--debug``. Flags left out parse to None (= not given)."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML/JSON file of option names (with underscores) -> values; flags given on "
                                    "the command line win")
    types_ = field_types(cls)
    for f in fields(cls):
        if f.name == "method_args":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{f.metadata.get('help', '')} (default {default})"
        tp = types_[f.name]
        if tp is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_)
        else:
            choices = get_args(tp) if get_origin(tp) is Literal else f.metadata.get("choices")
            p.add_argument(flag, default=None, choices=choices, help=help_,
                           metavar=None if choices else f.metadata.get("metavar", metavar_of(tp)))
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="method option override, repeatable; the value is parsed as JSON when it parses "
                        "(beta1=5, retain_loss=nll, 'trainable_layers=[5,6,7]')")
    for name in shortcuts:
        p.add_argument(f"--{name.replace('_', '-')}", default=None, metavar="FLOAT",
                       help=f"shortcut for --method-arg {name}=FLOAT")
    p.add_argument("--retain-loss", choices=("none", "nll", "kl"), help="shortcut for --method-arg retain_loss=VALUE")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, cls,
                     shortcuts: tuple[str, ...] = METHOD_SHORTCUTS):
    """The config dataclass from parsed arguments (precedence in the module docstring); a bad value ends in
    ``parser.error`` (one line, exit 2)."""
    try:
        values = read_config_file(args.config) if args.config else {}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown keys in --config: {unknown}")
        method_args = values.pop("method_args", None)
        if method_args is not None and not isinstance(method_args, dict):
            raise ValueError(f"method_args in --config must be a mapping, got {method_args!r}")
        for k, v in vars(args).items():
            if k in names and k != "method_args" and v is not None:
                values[k] = v
        extra: dict[str, Any] = {}
        for item in args.method_arg:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--method-arg must be KEY=VALUE, got {item!r}")
            try:
                extra[key] = json.loads(raw)
            except json.JSONDecodeError:
                extra[key] = raw
        for name in (*shortcuts, "retain_loss"):
            raw = getattr(args, name, None)
            if raw is not None:
                extra[name] = raw if name == "retain_loss" else coerce(f"--{name.replace('_', '-')}", float, raw)
        if method_args is not None or extra:
            values["method_args"] = {**(method_args or {}), **extra}
        if "trainable_layers" in values and str(values["trainable_layers"]) == "0":
            values["trainable_layers"] = None
        return config_from_mapping(cls, values, source="the command line / --config")
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def print_results(results) -> None:
    """The command line's report of a pipeline's ``Results``: its table, its note, where the files are."""
    print(results.table)
    if results.note:
        print("NOTE:", results.note)
    print(f"results in {results.output_dir} ({results.seconds} s)")


def cli_main(parse, run, show=print_results, argv=None) -> int:
    """Run a pipeline from the command line: ``show(run(parse(argv)))`` (``show`` prints the table by default).

    A ValueError / TypeError / OSError / ImportError (bad input; a missing file, unreachable hub or unwritable
    folder — ConnectionError and FileNotFoundError are OSErrors; a missing extra; a corrupt checkpoint is a
    ``CheckpointError``, a failed checkpoint write a ``CheckpointWriteError``) or the trainer's non-finite stop
    (``NonFiniteError``, a FloatingPointError) prints one line ``error: ...`` to stderr and returns 2; ``--debug``
    re-raises it with the traceback.
    """
    import warnings

    from fastweight._progress import quiet_third_party_bars

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    cfg = parse(argv)
    quiet_third_party_bars()  # off a terminal: no transformers / hub / datasets bars in the log file
    saved = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f"WARNING: {message}\n"  # one line each
    try:
        results = run(cfg)
        if is_main():  # under a launcher: one report, from the main process
            show(results)
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as e:  # + NonFiniteError (issue 22)
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = saved
        shutdown()
    return 0


__all__ = ["METHOD_SHORTCUTS", "MixedPrecision", "OneLineParser", "ReportTo", "TorchDtype", "build_parser", "cli_main",
           "coerce", "config_from_args", "config_from_mapping", "metavar_of", "opt", "print_results", "read_config_file"]
