"""The ``fastweight`` command (also ``python -m fastweight``): one entry point for the benchmark pipelines.

    fastweight tofu [options]    # = python examples/tofu_unlearn.py [options]
    fastweight muse [options]
    fastweight wmdp [options]
    fastweight cache list|clear  # the cache of generated data and fine-tuned models (pipelines/cache.py)
    fastweight <command> --help  # every option with its choices and default

Each subcommand parses its options into the pipeline's config dataclass (``fastweight.pipelines.<name>``),
runs it and prints the results table; a bad option or a failure prints one ``error:`` line and exits with 2.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module with parse_args/run, one line for the overview)
COMMANDS: dict[str, tuple[str, str]] = {
    "tofu": ("fastweight.pipelines.tofu", "TOFU: fine-tune, unlearn the forget split, evaluate (ES, ROUGE, FQ, MU)"),
    "muse": ("fastweight.pipelines.muse", "MUSE: unlearn News/Books-style text, evaluate VerbMem, KnowMem, PrivLeak"),
    "wmdp": ("fastweight.pipelines.wmdp", "WMDP: unlearn hazardous knowledge (RMU, ...), evaluate MCQ accuracy"),
}


CACHE_TEXT = "list or clear the cache of generated data and fine-tuned models (sizes, what produced them)"


def usage() -> str:
    width = max(map(len, [*COMMANDS, "cache"]))
    lines = ["usage: fastweight <command> [options]   (fastweight <command> --help lists every option)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines.append(f"  {'cache':<{width}}  {CACHE_TEXT}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``fastweight <command> [options]``; returns the exit code (0 ok, 2 bad usage or a failed run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print("fastweight", version("fastweight"))
        return 0
    name, rest = argv[0], argv[1:]
    if name == "cache":
        from fastweight.pipelines.cache import main as cache_main

        try:
            return cache_main(rest)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            return e.code if isinstance(e.code, int) else 2
    if name not in COMMANDS:
        print(f"fastweight: error: unknown command {name!r}; choose from {', '.join([*COMMANDS, 'cache'])} (see --help)",
              file=sys.stderr)
        return 2
    from fastweight.pipelines.config import cli_main

    module = importlib.import_module(COMMANDS[name][0])
    prog = sys.argv[0]
    sys.argv[0] = f"fastweight {name}"  # argparse's usage and error lines name the subcommand
    try:
        return cli_main(module.parse_args, module.run, argv=rest)
    finally:
        sys.argv[0] = prog


__all__ = ["COMMANDS", "main", "usage"]
