"""``python -m fastweight``: the ``fastweight`` command (fastweight.cli)."""
import sys

from fastweight.cli import main

sys.exit(main())
