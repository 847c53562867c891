"""``python -m fastweight``: the ``fastweight`` command (fastweight.cli)."""
import sys

from fastweight.cli import main

if __name__ == "__main__":
    sys.exit(main())
