"""Experiment trackers for the pipelines: accelerate's TensorBoard / wandb trackers, and the ``on_step`` hook that
logs every unlearning step, and the ``eval_fn`` hook that runs ``eval_every`` evaluations."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from fastweight.pipelines.ranks import is_main


def check_report_to(kind: str) -> None:
    """Fail before any model is loaded when the tracker's package is missing."""
    needs = {"tensorboard": ("tensorboard", "pip install 'fastweight[track]' (or pip install tensorboard)"),
             "wandb": ("wandb", "pip install wandb")}
    if kind == "none":
        return
    if kind not in needs:
        raise ValueError(f"report_to must be 'none', 'tensorboard' or 'wandb', got {kind!r}")
    import importlib.util

    module, how = needs[kind]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"--report-to {kind} needs {module}: {how}")


class Reporter:
    """Scalars to an accelerate tracker (``report_to`` "tensorboard" | "wandb"; "none" does nothing).

    TensorBoard event files go to ``<output_dir>/tensorboard/<run_name>``. Losses, learning rate and the
    method's statistics are logged per unlearning step under ``train/<name>``, evaluations under
    ``eval/<column>/<metric>``."""

    def __init__(self, kind: str, output_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        self.kind, self.tracker = kind, None
        if kind == "none" or not is_main():  # one tracker per run: the main process's
            return
        if kind == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ImportError("--report-to tensorboard needs TensorBoard: pip install 'fastweight[track]' "
                                  "(or pip install tensorboard)") from None
            from accelerate.tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker(run_name, str(output_dir / "tensorboard"))
        elif kind == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ImportError("--report-to wandb needs wandb: pip install wandb") from None
            from accelerate.tracking import WandBTracker

            self.tracker = WandBTracker(run_name, dir=str(output_dir))
        else:
            raise ValueError(f"report_to must be 'none', 'tensorboard' or 'wandb', got {kind!r}")
        if hasattr(self.tracker, "start"):
            self.tracker.start()
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str))
                for k, v in config.items() if v is not None}
        self.tracker.store_init_configuration(flat)

    def log(self, values: Mapping[str, Any], step: int, prefix: str) -> None:
        if self.tracker is None:
            return
        scalars = {f"{prefix}/{k}": float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}
        if scalars:
            self.tracker.log(scalars, step=step)

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()


def step_hook(reporter: Reporter) -> Callable[[int, dict], None]:
    """The ``on_step`` callback given to ``train``: logs each unlearning step's values to the tracker."""

    def on_step(step: int, entry: dict) -> None:
        reporter.log({k: v for k, v in entry.items() if not k.startswith("eval_")}, step, "train")  # eval_hook's

    return on_step


def eval_hook(reporter: Reporter, evaluate: Callable[[Any, int], dict[str, float]],
              during: list[dict[str, Any]]) -> Callable[..., None]:
    """The ``eval_fn`` given to ``train`` (called every ``TrainConfig.eval_every`` steps): evaluates the model
    ``train`` passes in (the unwrapped policy being trained, e.g. the ``PeftModel`` of a LoRA run, not the object
    the pipeline handed to ``train``) as ``evaluate(model, step) -> summary``, records it in ``during`` and logs
    it under ``eval/during``. Returns the numeric values, which ``train`` writes into ``log.jsonl`` as ``eval_*``, so
    a resumed run rebuilds the whole history from the log (``during_from_history``)."""

    def eval_fn(*, model, step: int, epoch: int) -> dict[str, float]:
        summary = evaluate(model, step)
        during.append({"step": step, "metrics": summary})
        reporter.log(summary, step, "eval/during")
        return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    return eval_fn


def during_from_history(history: list[dict], during: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``--eval-every`` history of the whole run: the ``eval_*`` values of the log's steps (the steps before
    a resume included), with the full summaries of the evaluations this process ran (``during``) where it has
    them; append-only, in step order (issue 22)."""
    ran = {d["step"]: d for d in during}
    out = []
    for h in history:
        metrics = {k[len("eval_"):]: v for k, v in h.items() if k.startswith("eval_")}
        if metrics or h.get("step") in ran:
            out.append(ran.get(h["step"], {"step": h["step"], "metrics": metrics}))
    steps = {d["step"] for d in out}
    return sorted(out + [d for d in during if d["step"] not in steps], key=lambda d: d["step"])


__all__ = ["Reporter", "check_report_to", "during_from_history", "eval_hook", "step_hook"]
