"""Benchmark pipelines as library calls: ``tofu``, ``muse``, ``wmdp``, each a config dataclass and
``run(config) -> Results`` (fine-tune, unlearn, evaluate, tabulate, plot); shared pieces in ``common``.

    from fastweight.pipelines import tofu
    results = tofu.run(tofu.TofuConfig(method="satimp", output_dir="runs/tofu"))
    print(results.table)
"""
from fastweight.pipelines import common, muse, tofu, wmdp
from fastweight.pipelines.common import Results

__all__ = ["Results", "common", "muse", "tofu", "wmdp"]
