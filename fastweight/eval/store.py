"""Resumable result files and row sharding shared by the TOFU, MUSE and WMDP evaluators.

Results follow open-unlearning's schema: ``<bench>_EVAL.json`` holds ``{metric key: {"agg_value",
"value_by_index"}}`` and ``<bench>_SUMMARY.json`` ``{metric key: agg_value}``; both are rewritten atomically
after every metric, so an interrupted evaluation loses nothing already written and a rerun skips finished keys.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence


def atomic_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # per process: never two writers of one file
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Sharded:
    """Run a per-row function on this rank's rows and gather the results in row order on every rank."""

    def __init__(self, accelerator) -> None:
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        # the process that writes result files: with an accelerator its main process; without one (each
        # process of a launched run evaluates every row) global rank 0
        self.main = accelerator.is_main_process if accelerator is not None else _global_rank() == 0

    def map(self, rows: Sequence, fn: Callable[[list], list]) -> list:
        idx = list(range(self.rank, len(rows), self.world))
        local = list(zip(idx, fn([rows[i] for i in idx]))) if idx else []
        if self.world > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        return [v for _, v in sorted(local, key=lambda t: t[0])]


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class EvalStore:
    """``results`` (metric key -> MetricResult) loaded from and saved to ``output_dir`` (None: in memory only).

    Only the main process (``main=True``) writes.
    """

    def __init__(self, output_dir: str | os.PathLike | None, bench: str, main: bool = True) -> None:
        self.out_dir = Path(output_dir) if output_dir is not None else None
        self.bench, self.main = bench, main
        self.results: dict[str, dict] = {}
        if self.out_dir is not None:
            if self.eval_path.is_file():
                self.results = json.loads(self.eval_path.read_text())
            if main:
                self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def eval_path(self) -> Path:
        return self.out_dir / f"{self.bench}_EVAL.json"

    def summary(self) -> dict[str, float]:
        return {k: v["agg_value"] for k, v in self.results.items()}

    def save(self) -> None:
        if self.out_dir is not None and self.main:
            atomic_json(self.eval_path, self.results)
            atomic_json(self.out_dir / f"{self.bench}_SUMMARY.json", self.summary())

    def record(self, key: str, fn: Callable[[], dict]) -> None:
        """Compute ``fn()`` unless ``key`` is already done, then save both files."""
        if key in self.results:
            return
        self.results[key] = fn()
        self.save()


__all__ = ["EvalStore", "Sharded", "atomic_json"]
