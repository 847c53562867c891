"""fastweight benchmarks: ``pytest benchmarks/`` and ``python -m benchmarks.report run.json``."""
