"""MUSE unlearning from the command line: parse the options, run ``fastweight.pipelines.muse``, print the table.

    python examples/muse_unlearn.py                       # embedded model, generated corpus
    python examples/muse_unlearn.py --data news --model muse-bench/MUSE-news_target --finetuned \\
        --retrain-model muse-bench/MUSE-news_retrain --method npo --lr 1e-5 --epochs 10 --trainable-layers 0

Every option: ``--help`` or docs/pipelines.md. Errors print one line and exit with code 2 (``--debug`` shows
the traceback). The same run from Python::

    from fastweight.pipelines import muse
    print(muse.run(muse.MuseConfig()).table)
"""
from __future__ import annotations

import sys

from fastweight.pipelines import muse
from fastweight.pipelines.config import cli_main

parse_args = muse.parse_args
run = muse.run


def main(argv=None) -> int:
    return cli_main(parse_args, run, argv=argv)  # prints the results table, or one error line and returns 2


if __name__ == "__main__":
    sys.exit(main())
