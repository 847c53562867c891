"""Checkpoints that load without pickle (issue 15, item 4).

A checkpoint is the folder ``output_dir/checkpoints/step-XXXXXXXX``, written under a temporary name and
renamed once complete, holding:
  * ``model.safetensors`` — the trainable parameters of the policy (the frozen ones are those of the model
    the caller passes in again on resume; LoRA runs store only the adapters);
  * ``optimizer.pt`` — ``optimizer.state_dict()``: tensors, numbers and strings only, read back with
    ``torch.load(weights_only=True)``, which refuses any other pickled object instead of running it;
  * ``rng-<rank>.safetensors`` — the torch CPU (and CUDA) generator states of each process and the state of
    every generator the method owns (e.g. ``satimp_hard`` random sampling), as uint8 tensors;
  * ``trainer_state.json`` — step, epoch, batches consumed, the LR scheduler's state, the world size and the
    engine layout (``"replicated"``, ``"fsdp"``, ``"zero12"`` or ``"zero3"``); ``"weights_only": true`` when a
    pipeline's ``--keep final`` removed ``optimizer.pt`` from the finished run's last checkpoint
    (``fastweight/pipelines/retention.py``): loading it restores the weights, scheduler and RNG states only.
Under FSDP the engine gathers the trainable weights and the optimizer state as full CPU tensors on the main
process (``torch.distributed.checkpoint.state_dict.get_state_dict``), which writes them as ``model.safetensors``
(keyed by the prepared module's names) and ``optimizer.pt``; on resume the main process reads them and the engine
broadcasts them, every process keeping its shards (``set_model_state_dict`` / ``set_optimizer_state_dict`` with
``broadcast_from_rank0=True``). The main
process needs host memory for the full trainable weights and optimizer state.
Under DeepSpeed ZeRO-3 the weights and the optimizer state are partitioned over the processes, so instead of
``model.safetensors`` and ``optimizer.pt`` every process writes ``zero-<rank>.pt``: its flat fp32 master
partitions, the state dict of the torch AdamW over them (tensors and numbers) and the loss scaler's numbers,
read back with ``torch.load(weights_only=True)`` and handed to the ZeRO optimizer's own ``load_state_dict``
(which copies the fp32 partitions into the parameters' shards). DeepSpeed's ``load_checkpoint`` (a pickled
loss-scaler object among the tensors) is never used. A ZeRO-3 checkpoint resumes only with the same world size
and engine. Source: DeepSpeed ``runtime/zero/stage3.py`` (``_rigid_state_dict`` / ``_rigid_load_state_dict``).
Under ZeRO-1/2 the parameters are whole on every process and only the optimizer state is partitioned: the main
process writes ``model.safetensors`` and every process ``zero-<rank>.pt``, the plain part of the ZeRO optimizer's
``state_dict()`` (its fp32 master partitions without padding, the torch AdamW state over them, paddings, partition
count, clip value and DeepSpeed version; the loss scaler's numbers, never the object). Loading copies the weights
into the parameters, then hands the partition to the optimizer's ``load_state_dict`` with
``load_from_fp32_weights=True`` (its rigid, same-world-size path). Source: DeepSpeed
``runtime/zero/stage_1_and_2.py`` (``state_dict`` / ``_load_legacy_checkpoint``).
Nothing else in the folder is read: a file planted there (say accelerate's ``random_states_0.pkl``) is never
opened. Sources: safetensors' format (no code execution on load); PyTorch's ``weights_only`` unpickler.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "trainer_state.json"
ZERO_FILE = "zero-{rank}.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (truncated or empty file, unreadable state, tensors of another model
    or LoRA rank); the message names the file. Nothing is deleted: the files stay for inspection."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. disk full); the message names the step and the folder of partial files."""


def _reading(path: Path, fn, what: str):
    """``fn()``, any failure re-raised as a ``CheckpointError`` naming ``path`` (one line)."""
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors / torch / json raise many types for a torn file
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read as {what} ({type(e).__name__}: "
                              f"{msg}); the file is left as it is: resume from another checkpoint or move the "
                              "checkpoint folder aside") from None


def zero3_optimizer(optimizer):
    """The DeepSpeed ZeRO-3 optimizer inside accelerate's wrapper, or None (one process, DDP, ZeRO-1/2)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "fp32_partitioned_groups_flat") else None


def zero12_optimizer(optimizer):
    """The DeepSpeed ZeRO-1/2 optimizer inside accelerate's wrapper, or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "single_partition_of_fp32_groups") else None


def is_fsdp(module) -> bool:
    """True when ``module`` is sharded by FSDP2 (``fully_shard``: DTensor parameters) or wrapped by FSDP1."""
    if module is None:
        return False
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def _engine(optimizer, module=None) -> str:
    if zero3_optimizer(optimizer) is not None:
        return "zero3"
    if zero12_optimizer(optimizer) is not None:
        return "zero12"
    return "fsdp" if is_fsdp(module) else "replicated"


def _fsdp_full_state(module, optimizer):
    """Trainable weights and optimizer state of an FSDP module as full (unsharded) CPU tensors on rank 0 and
    empty dicts elsewhere; a collective: every rank calls it. Source: ``torch.distributed.checkpoint.state_dict``
    (``get_state_dict`` with ``full_state_dict=True, cpu_offload=True``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(module, getattr(optimizer, "optimizer", optimizer), options=opts)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    return {n: t.contiguous() for n, t in msd.items() if n in trainable}, osd


def _load_fsdp(ckpt: Path, module, optimizer, rank: int) -> None:
    """Rank 0 reads the full weights and optimizer state and broadcasts them; every rank keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    msd, osd = {}, {}
    if rank == 0:
        msd = _reading(ckpt / MODEL_FILE, lambda: load_file(str(ckpt / MODEL_FILE)), "safetensors")
        osd = _load_tensors(ckpt / OPTIMIZER_FILE)
        _check_trainable(ckpt, msd, module)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    # two calls, not set_state_dict: that one treats an empty model dict (every rank but 0) as "optimizer only"
    # and skips the model's broadcast there, leaving rank 0 waiting
    set_model_state_dict(module, msd, options=opts)
    set_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer), osd, options=opts)


def _is_plain(v) -> bool:
    """Loadable by ``torch.load(weights_only=True)`` without any class of ours or DeepSpeed's."""
    if v is None or type(v) in (bool, int, float, str) or isinstance(v, torch.Tensor):
        return True
    if type(v) in (list, tuple):
        return all(_is_plain(x) for x in v)
    if type(v) is dict:
        return all(type(k) in (str, int) and _is_plain(x) for k, x in v.items())
    return False


def _zero12_state(zopt) -> dict:
    """This process's ZeRO-1/2 optimizer partition, plain values only (enums as ints, no loss-scaler object)."""
    out = {}
    for k, v in zopt.state_dict().items():
        if k == "loss_scaler":
            out["loss_scaler_numbers"] = _scaler_numbers(v)
        elif isinstance(v, int) and type(v) not in (bool, int):  # ZeroStageEnum
            out[k] = int(v)
        elif k == "single_partition_of_fp32_groups":
            out[k] = [t.detach().cpu().clone() for t in v]
        elif _is_plain(v):
            out[k] = v
        # else: objects DeepSpeed keeps for its universal checkpoints (param_slice_mappings); not read back
    return out


def _load_zero12_state(zopt, path: Path, world: int) -> None:
    saved = _load_tensors(path)
    groups = saved.get("single_partition_of_fp32_groups") if isinstance(saved, dict) else None
    have = [t.numel() for t in zopt.single_partition_of_fp32_groups]
    if (not isinstance(groups, list) or len(groups) != len(have)
            or any(not isinstance(g, torch.Tensor) or g.numel() > n for g, n in zip(groups, have))
            or saved.get("partition_count") != list(zopt.partition_count)):
        raise ValueError(f"ZeRO-1/2 partition file {str(path)!r} does not match this run's partitions "
                         f"({have} elements in {list(zopt.partition_count)} partitions); different model, "
                         f"trainable parameters or world size?")
    for k, v in saved.pop("loss_scaler_numbers", {}).items():
        setattr(zopt.loss_scaler, k, v)
    sd = {**saved, "loss_scaler": zopt.loss_scaler}
    # the optimizer picks list[its data-parallel rank]; rigid checkpoint: the AdamW state over the flat
    # partitions, then the fp32 master partitions copied from the file (the weights were restored before)
    zopt.load_state_dict([sd] * world, load_optimizer_states=True, load_from_fp32_weights=True)


def _scaler_numbers(scaler) -> dict:
    """A DeepSpeed loss scaler's plain attributes (scale, counters, flags): saved instead of the object."""
    return {k: v for k, v in vars(scaler).items() if type(v) in (bool, int, float)}


def _zero3_state(zopt) -> dict:
    """This process's ZeRO-3 partition as tensors, numbers and strings (loadable with weights_only=True)."""
    sd = zopt.state_dict()
    scaler = _scaler_numbers(sd["loss_scaler"])
    return {"optimizer": sd["optimizer_state_dict"], "fp32_flat_groups": [t.detach().cpu().clone() for t in
                                                                          sd["fp32_flat_groups"]],
            "loss_scaler": scaler, "dynamic_loss_scale": bool(sd["dynamic_loss_scale"]),
            "overflow": bool(sd["overflow"])}


def _load_zero3_state(zopt, path: Path, world: int) -> None:
    saved = _load_tensors(path)
    groups = saved.get("fp32_flat_groups") if isinstance(saved, dict) else None
    have = [tuple(t.shape) for t in zopt.fp32_partitioned_groups_flat]
    if not isinstance(groups, list) or [tuple(getattr(t, "shape", ())) for t in groups] != have:
        raise ValueError(f"ZeRO-3 partition file {str(path)!r} does not match this run's partitions "
                         f"({have}); different model, trainable parameters or world size?")
    for k, v in saved["loss_scaler"].items():
        setattr(zopt.loss_scaler, k, v)
    sd = {"loss_scaler": zopt.loss_scaler, "dynamic_loss_scale": saved["dynamic_loss_scale"],
          "overflow": saved["overflow"], "optimizer_state_dict": saved["optimizer"], "fp32_flat_groups": groups}
    # the ZeRO optimizer picks list[its data-parallel rank]; it restores the fp32 partitions, the AdamW state
    # and copies the partitions into the parameters' shards
    zopt.load_state_dict([sd] * world, load_optimizer_states=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/step-*`` folder (one with ``trainer_state.json``), or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
            and (p / STATE_FILE).is_file()]
    return max(done)[1] if done else None


def trainable_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in policy.named_parameters() if p.requires_grad}


def _rng_state(method) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    if method is not None:
        out.update({f"method.{k}": v for k, v in method.state_dict().items()})
    return out


def save_checkpoint(acc, output_dir: Path, state: dict, *, policy, optimizer, scheduler, method,
                    keep: int = 1, module=None) -> Path:
    """Write the checkpoint of ``state['global_step']`` (all processes call this; see the module docstring).

    ``module``: the engine-prepared module (the objective); needed to checkpoint FSDP-sharded weights.
    A failed write raises ``CheckpointWriteError`` naming the step, the partial files left in place.
    """
    root = output_dir / "checkpoints"
    final = root / f"step-{state['global_step']:08d}"
    tmp = root / f".tmp-step-{state['global_step']:08d}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a torn write of this run; never a finished checkpoint
        tmp.mkdir()
    acc.wait_for_everyone()
    try:
        _write_files(acc, tmp, state, policy=policy, optimizer=optimizer, scheduler=scheduler, method=method,
                     module=module)
    except Exception as e:  # noqa: BLE001 - disk full shows as OSError, SafetensorError or torch's RuntimeError
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointWriteError(f"writing the checkpoint of step {state['global_step']} failed ({type(e).__name__}"
                                   f": {msg}); the partial files are left in {str(tmp)!r}; earlier checkpoints "
                                   "are kept") from e
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a checkpoint folder exists only once complete
        older = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))[:-keep]
        for _, p in older:
            shutil.rmtree(p)
    acc.wait_for_everyone()
    return final


def _write_files(acc, tmp: Path, state: dict, *, policy, optimizer, scheduler, method, module) -> None:
    from safetensors.torch import save_file

    save_file(_rng_state(method), str(tmp / f"rng-{acc.process_index}.safetensors"))
    engine = _engine(optimizer, module)
    fsdp_state = _fsdp_full_state(module, optimizer) if engine == "fsdp" else None  # collective
    if engine == "zero3":  # every process writes its own partition
        torch.save(_zero3_state(zero3_optimizer(optimizer)), tmp / ZERO_FILE.format(rank=acc.process_index))
    elif engine == "zero12":
        torch.save(_zero12_state(zero12_optimizer(optimizer)), tmp / ZERO_FILE.format(rank=acc.process_index))
    if acc.is_main_process:
        if engine == "fsdp":  # full tensors gathered on the main process, keyed by the module's names
            save_file(fsdp_state[0], str(tmp / MODEL_FILE))
            torch.save(fsdp_state[1], tmp / OPTIMIZER_FILE)
        elif engine != "zero3":  # parameters are whole on every process
            save_file(trainable_state(policy), str(tmp / MODEL_FILE))
        if engine == "replicated":
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        full = {**state, "scheduler": scheduler.state_dict(), "world_size": acc.num_processes, "engine": engine}
        (tmp / STATE_FILE).write_text(json.dumps(full))


def _load_tensors(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is not a plain tensor file; refusing to unpickle it "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_checkpoint(acc, ckpt: Path, *, policy, optimizer, scheduler, method, module=None) -> dict:
    """Restore what ``save_checkpoint`` wrote; returns the trainer state dict. No pickle is executed."""
    from safetensors.torch import load_file

    state = _reading(ckpt / STATE_FILE, lambda: json.loads((ckpt / STATE_FILE).read_text()), "JSON")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in
                                              ("global_step", "epoch", "batch_in_epoch")) \
            or not isinstance(state.get("scheduler"), dict):
        raise CheckpointError(f"checkpoint file {str(ckpt / STATE_FILE)!r} is not a trainer state (a JSON object "
                              f"with global_step, epoch, batch_in_epoch and scheduler), got {str(state)[:60]!r}")
    if state.get("world_size", acc.num_processes) != acc.num_processes:
        raise ValueError(f"checkpoint {str(ckpt)!r} was written by {state['world_size']} processes; resume with "
                         f"the same number (got {acc.num_processes}) so the data order and RNG streams match")
    engine = _engine(optimizer, module)
    if state.pop("engine", "replicated") != engine:
        raise ValueError(f"checkpoint {str(ckpt)!r} was not written by a {engine} run (one process / DDP, FSDP, "
                         f"DeepSpeed ZeRO-1/2 and ZeRO-3 checkpoints hold different files); resume under the engine "
                         f"that wrote it")
    zero_file = ckpt / ZERO_FILE.format(rank=acc.process_index)
    if engine == "zero3":
        _load_zero3_state(zero3_optimizer(optimizer), zero_file, acc.num_processes)
    elif engine == "zero12":
        _load_weights(ckpt, policy)
        _load_zero12_state(zero12_optimizer(optimizer), zero_file, acc.num_processes)
    elif engine == "fsdp":
        _load_fsdp(ckpt, module, optimizer, acc.process_index)
    else:
        _load_weights(ckpt, policy)
        if not state.pop("weights_only", False):  # ``--keep final`` dropped the optimizer of a finished run
            opt_file = ckpt / OPTIMIZER_FILE
            opt_state = _load_tensors(opt_file)
            _reading(opt_file, lambda: optimizer.load_state_dict(opt_state), "this run's optimizer state")
    _reading(ckpt / STATE_FILE, lambda: scheduler.load_state_dict(state.pop("scheduler")), "a scheduler state")
    rng_file = ckpt / f"rng-{acc.process_index}.safetensors"
    rng = _reading(rng_file, lambda: load_file(str(rng_file)), "safetensors")
    _reading(rng_file, lambda: torch.set_rng_state(rng.pop("torch_cpu")), "a generator state")
    cuda = sorted(k for k in rng if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in cuda])
    if method is not None:
        _reading(rng_file, lambda: method.load_state_dict({k[len("method."):]: v for k, v in rng.items()
                                                           if k.startswith("method.")}), "the method's generators")
    return state


def _check_trainable(ckpt: Path, weights: dict, module) -> None:
    want = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(weights) != want:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} holds {len(weights)} trainable tensors, the run trains "
                         f"{len(want)} (different trainable_layers, method or LoRA settings?)")


def _load_weights(ckpt: Path, policy) -> None:
    from safetensors.torch import load_file

    weights = _reading(ckpt / MODEL_FILE, lambda: load_file(str(ckpt / MODEL_FILE)), "safetensors")
    params = dict(policy.named_parameters())
    _check_trainable(ckpt, weights, policy)
    for n, t in weights.items():
        if t.shape != params[n].shape:
            raise CheckpointError(f"checkpoint file {str(ckpt / MODEL_FILE)!r}: {n} has shape {tuple(t.shape)}, this "
                                  f"run's parameter {tuple(params[n].shape)} (a checkpoint of another model size "
                                  "or LoRA rank?)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device))


__all__ = ["CheckpointError", "CheckpointWriteError", "MODEL_FILE", "OPTIMIZER_FILE", "STATE_FILE", "ZERO_FILE",
           "latest_checkpoint", "load_checkpoint", "is_fsdp", "save_checkpoint", "trainable_state", "zero12_optimizer",
           "zero3_optimizer"]
