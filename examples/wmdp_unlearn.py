"""WMDP unlearning from the command line: parse the options, run ``fastweight.pipelines.wmdp``, print the table.

    python examples/wmdp_unlearn.py                       # RMU, embedded model, generated set
    python examples/wmdp_unlearn.py --model HuggingFaceH4/zephyr-7b-beta --wmdp cais/wmdp --wmdp-config wmdp-cyber \\
        --mmlu cais/mmlu --forget-corpus cais/wmdp-corpora:cyber-forget-corpus \\
        --retain-corpus wikitext:wikitext-2-raw-v1 --window 512 --method rmu --lr 5e-5 --max-steps 150 \\
        --method-arg steering_coef=6.5 --method-arg alpha=1200 --method-arg layer=7 \\
        --method-arg "trainable_layers=[5,6,7]" --answer-format letter

Every option: ``--help`` or docs/pipelines.md. Errors print one line and exit with code 2 (``--debug`` shows
the traceback). The same run from Python::

    from fastweight.pipelines import wmdp
    print(wmdp.run(wmdp.WmdpConfig()).table)
"""
from __future__ import annotations

import sys

from fastweight.pipelines import wmdp
from fastweight.pipelines.config import cli_main

parse_args = wmdp.parse_args
run = wmdp.run


def main(argv=None) -> int:
    return cli_main(parse_args, run, argv=argv)  # prints the results table, or one error line and returns 2


if __name__ == "__main__":
    sys.exit(main())
