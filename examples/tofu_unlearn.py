"""TOFU unlearning from the command line: parse the options, run ``fastweight.pipelines.tofu``, print the table.

    python examples/tofu_unlearn.py                       # embedded model, generated data
    python examples/tofu_unlearn.py --data locuslab/TOFU --split forget10 \\
        --model open-unlearning/tofu_Llama-2-7b-chat-hf_full --finetuned \\
        --retain-model open-unlearning/tofu_Llama-2-7b-chat-hf_retain90 --method satimp --lr 1e-5

Every option: ``--help`` or docs/pipelines.md. Errors print one line and exit with code 2 (``--debug`` shows
the traceback). The same run from Python::

    from fastweight.pipelines import tofu
    print(tofu.run(tofu.TofuConfig()).table)
"""
from __future__ import annotations

import sys

from fastweight.pipelines import tofu
from fastweight.pipelines.config import cli_main

parse_args = tofu.parse_args
run = tofu.run


def main(argv=None) -> int:
    return cli_main(parse_args, run, argv=argv)  # prints the results table, or one error line and returns 2


if __name__ == "__main__":
    sys.exit(main())
