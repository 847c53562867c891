"""The one accelerate training loop: plain fine-tuning and unlearning on accelerate's engines (STYLE.md 4).

``train(model, forget, retain, config)``:
  * Engine: the objective ``UnlearnObjective(policy, method, ref)`` (``fastweight.train.objective``), the
    AdamW optimizer and the data loader all go through ``accelerator.prepare``, so whatever ``accelerate
    launch --config_file`` selects (one process, DDP, FSDP, DeepSpeed ZeRO-2/3) reduces gradients and gathers
    sharded weights with its own hooks; the loss is computed inside the prepared module's forward.
  * Data: ``ForgetRetainDataset`` (forget item + a retain item / refusal drawn per ``(seed, epoch, index)``,
    the same whatever the rank layout) read in a shuffled order that depends only on ``(seed, epoch)``;
    accelerate's prepared loader gives process r the batches r, r + W, ... (when the batch count does not
    divide by the world size it wraps around to the start: a few items are seen twice, none is dropped).
  * Normalisation by the global count: before the micro-batches of an optimizer step run, their loss units
    (valid tokens, sequences or pairs, per term: ``method.count_units``) are summed over the accumulation
    group and all processes (Hugging Face's ``num_items_in_batch``); each term is summed and divided by that
    count. So one process with batch 2, two processes with batch 1, and batch 1 x accumulation 2 give the same
    update (fp32 rounding aside); the unmasked KL retain term and UNDIAL count every position of every sequence
    (batch padding excluded). Terms with no global form ("local": SatImp group/batch, hard sampling, RMU)
    are micro-batch means averaged over the group, as before.
  * Reference: NPO/TNPO/WTNPO/IdkDPO get a ``RefLogpTable`` computed by the prepared policy before step 1 (no
    reference model is kept); KL retain / UNDIAL / RMU get a frozen copy prepared with the policy (sharded
    like it), or for a PEFT model the same model with adapters disabled (no copy).
  * Precision: bf16 weights train through fp32 master weights and fp32 AdamW state (``MasterWeightAdamW``
    for one process / DDP, the engine's own under DeepSpeed / FSDP2); fp16 weights without DeepSpeed's loss
    scaler are refused before any step (``fastweight.train.precision``).
  * LoRA (``config.lora_r``), gradient checkpointing, a non-finite stop (``NonFiniteError``, before the
    optimizer step and any checkpoint), pickle-free checkpoints (``fastweight.train.checkpoint``), linear
    warm-up then decay, one JSON line per optimizer step in ``output_dir/log.jsonl``, the G-effect tracker.
  * A multi-process CPU run: ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.templates import REFUSALS
from fastweight.data.tofu import EpochSampler, ForgetRetainDataset, QADataset, pad_collate
from fastweight.losses._seq import valid_mask
from fastweight.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastweight.train.config import TrainConfig
from fastweight.train.engine import (
    NonFiniteError, build_reference_table, check_engine, is_sharded, make_accelerator, maybe_lora,
)
from fastweight.train.jsonlog import move_aside, repair_log
from fastweight.train.objective import UnlearnObjective
from fastweight.train.precision import make_optimizer, plan_for
from fastweight.train.runstate import claim_output_dir, restore_g_effect

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ADDITIVE = frozenset({"loss", "forget_loss", "retain_loss", "nll"})  # logged values that are loss terms


@dataclass
class TrainResult:
    """``model``: the trained model (unwrapped; a ``PeftModel`` for LoRA runs; under FSDP / ZeRO-3 its
    parameters are shards and the gathered weights are in ``output_dir/model.safetensors``);
    ``history``: one dict per optimizer step (also in log.jsonl)."""

    model: Any
    global_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    g_effect: dict | None = None


def nll_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean NLL of the labelled tokens (fine-tuning objective) through the fused-linear path."""
    out = UnlearnObjective(model)(batch)
    return out["loss"], out["stats"]


def layer_filter(model, trainable_layers: int | None) -> Callable[[str], bool]:
    """Name predicate: True for parameters of the last ``trainable_layers`` decoder blocks and the final norm
    (everything when None)."""
    if trainable_layers is None:
        return lambda name: True
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if n_layers is None:
        raise ValueError("trainable_layers needs model.config.num_hidden_layers")
    first = max(0, n_layers - trainable_layers)

    def keep(name: str) -> bool:
        m = _LAYER.search(name)
        if m is not None:
            return int(m.group(1)) >= first
        return name.endswith("norm.weight") and "layers." not in name  # the final norm

    return keep


def check_head_without_adapter(model) -> None:
    """LoRA on the output layer never trains: the fused loss reads ``lm_head.weight`` directly (issue 22)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and (hasattr(head, "lora_A") or hasattr(head, "base_layer")):
        raise ValueError("lora_targets puts a LoRA adapter on the output layer (lm_head), which the fused loss "
                         "bypasses (it reads lm_head.weight directly), so the adapter would never train; leave "
                         "lm_head out of lora_targets")


def _lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def _strip(batch):
    if isinstance(batch, dict):
        return {k: _strip(v) for k, v in batch.items() if k != "index"}
    return batch


def _units(method, batch: dict) -> list[int]:
    """[forget units, retain units] of one micro-batch (tokens for plain fine-tuning)."""
    if method is None:
        return [int(valid_mask(batch["forget"]["labels"], True, IGNORE_INDEX).sum()), 0]
    retain = batch.get("retain")
    return [method.count_units(batch["forget"], "forget"),
            method.count_units(retain, "retain") if retain is not None else 0]


def train(model, forget: QADataset, retain: QADataset | None = None, config: TrainConfig | None = None, *,
          refusals: Sequence[str] | None = None, on_step: Callable[[int, dict], None] | None = None,
          eval_fn: Callable[..., dict | None] | None = None) -> TrainResult:
    """Fine-tune (``config.method`` None) or unlearn ``model``; see the module docstring.

    Args:
        model: a causal LM (``transformers`` ``PreTrainedModel``, optionally a ``peft`` ``PeftModel``).
        forget: the forget set (the training set when fine-tuning), a ``QADataset``.
        retain: the retain set, used only when the method needs it (``method.needs_retain``).
        config: ``TrainConfig``.
        refusals: refusal answers for FLAT / IdkDPO forget batches (default ``REFUSALS``).
        on_step: called on every process after each optimizer step with ``(global_step, log dict)``.
        eval_fn: called on every process as ``eval_fn(model=<unwrapped policy>, step=, epoch=)`` every
            ``config.eval_every`` steps / ``config.eval_every_epochs`` epochs, in eval mode without gradients;
            a returned dict of numbers is logged with an ``eval_`` prefix. Under FSDP / ZeRO-3 every process
            must run the same forwards (the engine gathers the shards in them).
    Returns:
        ``TrainResult``. Raises ``NonFiniteError`` (a ``FloatingPointError``) on a non-finite loss term or
        gradient norm, before that optimizer step and before any checkpoint of it.
    """
    from fastweight._progress import progress

    cfg = config or TrainConfig()
    out_dir = Path(cfg.output_dir)
    method = _method(cfg, retain)
    claim_output_dir(out_dir, cfg, write=False)  # every process checks before anything is written
    retain_probe_set = retain  # G-effect probes the retain set even for methods without a retain term
    if method is None or not method.needs_retain:
        retain = None
    acc = make_accelerator(cfg)
    # accelerate's GradientState is process-wide: a loop stopped mid-accumulation (a transformers.Trainer that
    # raised) leaves sync_gradients False, which makes the prepared optimizer skip its steps; start synced
    acc.gradient_state._set_sync_gradients(True)
    check_engine(acc, cfg, method, model)
    model, params, is_peft = _trainable(model, cfg, method)
    precision = plan_for(acc, {p.dtype for p in params})  # bf16 / fp16 weights: who keeps fp32 masters
    objective = UnlearnObjective(model, method, _reference(model, method, is_peft))
    data, sampler, collate, loader = _data(forget, retain, cfg, method, refusals)
    optimizer = make_optimizer(params, precision, lr=cfg.lr, weight_decay=cfg.weight_decay)
    objective.train()
    # the schedule needs the per-process batch count, known only once the loader is sharded: a callable that
    # reads it is fixed here, so the scheduler wraps the plain AdamW (whose param_groups the engines use)
    sched = {}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_lambda(s, sched["warmup"],
                                                                                   sched["total"]) if sched else 1.0)
    objective, optimizer, loader = acc.prepare(objective, optimizer, loader)
    inner = acc.unwrap_model(objective)
    policy = inner.policy

    n_batches = len(loader)
    total = _fix_schedule(scheduler, sched, n_batches, cfg)
    tracker, probes = _g_effect_probes(cfg, method, acc, collate, forget, retain_probe_set)

    log_path = out_dir / "log.jsonl"
    if method is not None and method.ref_kind == "table":
        inner.set_ref(build_reference_table(acc, objective, data, sampler, collate, cfg, start_epoch=0))
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    state, history = _resume(acc, ckpt, log_path, tracker, policy=policy, optimizer=optimizer,
                             scheduler=scheduler, method=method, module=objective)
    acc.wait_for_everyone()  # every process has checked the folder (claim_output_dir) before it is written
    if acc.is_main_process:
        _claim_and_write_log(out_dir, cfg, log_path, history)

    def run_eval(step: int, epoch: int) -> dict:
        if eval_fn is None:
            return {}
        was = objective.training
        objective.eval()
        with torch.no_grad():
            res = eval_fn(model=policy, step=step, epoch=epoch)
        objective.train(was)
        return {f"eval_{k}": float(v) for k, v in (res or {}).items()}

    world = acc.num_processes
    ckpt_args = dict(policy=policy, optimizer=optimizer, scheduler=scheduler, method=method, module=objective)
    # a bar on a terminal, a line every 30 s in a log file (fastweight._progress)
    show = acc.is_main_process and cfg.progress
    bar = progress(total=total, initial=state["global_step"], disable=not show, desc=cfg.method or "fine-tune",
                   unit="step")
    step, skip = state["global_step"], state["batch_in_epoch"]
    resumed_step = step
    for epoch in range(state["epoch"], cfg.epochs):
        if step >= total:
            break
        data.set_epoch(epoch)
        # the prepared loader re-applies its own epoch counter to the sampler on every __iter__: set it too
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else sampler.set_epoch(epoch)
        group: list[dict] = []
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            group.append(_strip(batch))
            group_start = (i // cfg.grad_accum) * cfg.grad_accum
            if i - group_start + 1 < min(cfg.grad_accum, n_batches - group_start):
                continue
            names, sums = _forward_backward(acc, objective, method, group, cfg,
                                            where=f"optimizer step {step + 1} (epoch {epoch}", out_dir=out_dir)
            group = []
            acc.gradient_state._set_sync_gradients(True)
            g_log = {}
            if tracker is not None and acc.is_main_process and tracker.due(step + 1):
                from fastweight.analysis import maybe_record

                scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
                with acc.autocast():
                    res = maybe_record(tracker, step + 1, policy, "grad", *probes, grad_scale=scale)
                g_log = {f"g_effect_{k}": v.total for k, v in res.items()}
            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            grad_norm = None if grad_norm is None else float(grad_norm)
            if cfg.check_finite and grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteError(f"non-finite gradient norm ({grad_norm}) at optimizer step {step + 1} (epoch "
                                     f"{epoch}); stopped before the optimizer step; last checkpoint: "
                                     f"{latest_checkpoint(out_dir)}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            logged = acc.reduce(sums.to(acc.device), reduction="sum").cpu() / world
            entry = {"step": step, "epoch": epoch, "lr": lr, **dict(zip(names, logged.tolist())), **g_log}
            if grad_norm is not None:
                entry["grad_norm"] = grad_norm
            if cfg.eval_every and step % cfg.eval_every == 0:
                entry.update(run_eval(step, epoch))
            history.append(entry)
            if acc.is_main_process and (step % cfg.log_every == 0 or step == total):
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            if on_step is not None:
                on_step(step, entry)
            state = {"global_step": step, "epoch": epoch, "batch_in_epoch": i + 1}
            if step >= total:
                break
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(acc, out_dir, state, **ckpt_args)
        skip = 0
        if cfg.eval_every_epochs and (epoch + 1) % cfg.eval_every_epochs == 0 and history:
            history[-1].update(run_eval(step, epoch))
    bar.close()
    if is_sharded(acc):
        _save_gathered(acc, objective, out_dir)
        if cfg.save_every and state["global_step"] > resumed_step:  # ZeRO-3: per-rank partitions (checkpoint.py)
            save_checkpoint(acc, out_dir, state, **ckpt_args)
    elif state["global_step"] > resumed_step or ckpt is None:
        save_checkpoint(acc, out_dir, state, **ckpt_args)
    g_record = _write_g_effect(tracker, out_dir) if tracker is not None and acc.is_main_process else None
    objective.eval()
    return TrainResult(model=policy, global_step=step, history=history, g_effect=g_record)


# ---------------------------------------------------------------------------------------------------------
# The steps of train(), in the order it runs them
def _method(cfg: TrainConfig, retain):
    """The configured unlearning method (None: plain fine-tuning), with its retain set checked."""
    if cfg.method is None:
        return None
    from fastweight.train.methods import build_method

    method = build_method(cfg.method, **cfg.method_args)
    if method.needs_retain and retain is None:
        raise ValueError(f"method {method.name!r} needs a retain set; pass retain=")
    return method


def _trainable(model, cfg: TrainConfig, method):
    """LoRA (``lora_r``), ``requires_grad`` from the base / adapter, layer and method filters, gradient
    checkpointing. Returns (model, trainable params, is_peft)."""
    model = maybe_lora(model, cfg)
    is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
    if is_peft:
        check_head_without_adapter(model)
    keep_layer = layer_filter(model, cfg.trainable_layers)
    base = {n for n, p in model.named_parameters() if p.requires_grad} if is_peft else None
    for name, p in model.named_parameters():
        p.requires_grad_((base is None or name in base) and keep_layer(name)
                         and (method is None or bool(method.trainable(name))))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (check trainable_layers, lora_targets and the method's "
                         "trainable())")
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, params, is_peft


def _reference(model, method, is_peft: bool):
    """The reference model of methods that read its distribution on fresh batches (``ref_kind == "model"``): the
    PEFT model with adapters disabled, else a frozen copy prepared (and sharded) together with the policy."""
    if method is None or method.ref_kind != "model":
        return None
    if is_peft:
        from fastweight.train.methods import AdapterDisabled

        return AdapterDisabled(model)
    return copy.deepcopy(model)


def _data(forget: QADataset, retain: QADataset | None, cfg: TrainConfig, method, refusals):
    """(dataset, sampler, collate, loader): forget items with their retain item / refusal drawn per (seed, epoch,
    index), independent of the rank layout, in an order that depends only on (seed, epoch)."""
    needs_idk = method is not None and method.needs_idk
    data = ForgetRetainDataset(forget, retain, seed=cfg.seed, rank=0,
                               refusals=(refusals or REFUSALS) if needs_idk else None)
    sampler = EpochSampler(len(data), seed=cfg.seed)
    pad = forget.tokenizer.pad_token_id if forget.tokenizer.pad_token_id is not None else \
        forget.tokenizer.eos_token_id
    collate = partial(pad_collate, pad_token_id=pad)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
    return data, sampler, collate, loader


def _fix_schedule(scheduler, sched: dict, n_batches: int, cfg: TrainConfig) -> int:
    """Fill the warm-up / decay schedule once the prepared loader's per-process batch count is known; returns
    the number of optimizer steps. The loop steps the scheduler once per optimizer step (accelerate's prepared
    scheduler would step it num_processes times, which ties the schedule to the world size)."""
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps,
                                                                         cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(steps_per_epoch, total // 2)
    sched.update(warmup=warmup, total=total)
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * _lr_lambda(0, warmup, total)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    return total


def _g_effect_probes(cfg: TrainConfig, method, acc, collate, forget, retain):
    """(tracker, (forget probe batch, retain probe batch)) for ``g_effect_every``; (None, None) when off."""
    if not cfg.g_effect_every or method is None:
        return None, None
    from fastweight.analysis import GEffectTracker

    def probe(ds):
        if ds is None:
            return None
        items = [ds[i] for i in range(min(cfg.g_effect_probe_size, len(ds)))]
        return {k: v.to(acc.device) for k, v in collate(items).items() if k != "index"}

    return GEffectTracker(every=cfg.g_effect_every, ema=cfg.g_effect_ema), (probe(forget), probe(retain))


def _resume(acc, ckpt, log_path: Path, tracker, **ckpt_args) -> tuple[dict, list[dict]]:
    """(loop state, logged history up to it): from the checkpoint ``ckpt`` (the G-effect record and the log's
    lines up to its step kept; a line torn by a kill repaired), or a fresh start when ``ckpt`` is None."""
    if ckpt is None:
        return {"global_step": 0, "epoch": 0, "batch_in_epoch": 0}, []
    state = load_checkpoint(acc, ckpt, **ckpt_args)
    if tracker is not None:  # the record of the steps before the checkpoint is kept, not truncated
        restore_g_effect(tracker, log_path.parent / "g_effect.json", state["global_step"])
    history: list[dict] = []
    if log_path.is_file():
        if acc.is_main_process:
            repair_log(log_path)  # a line torn by a kill: dropped, the original kept beside it
        acc.wait_for_everyone()
        lines = log_path.read_text().splitlines()
        history = [json.loads(line) for line in lines if line.strip()]
        history = [h for h in history if h["step"] <= state["global_step"]]
    return state, history


def _claim_and_write_log(out_dir: Path, cfg: TrainConfig, log_path: Path, history: list[dict]) -> None:
    """Main process: create and claim the run folder, and rewrite log.jsonl as ``history`` (lines past a resumed
    checkpoint are moved aside, not truncated away)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_output_dir(out_dir, cfg, write=True)
    if log_path.is_file() and len([x for x in log_path.read_text().splitlines() if x.strip()]) > len(history):
        move_aside(log_path, "before-resume")
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, log_path)


def _forward_backward(acc, objective, method, group: list[dict], cfg: TrainConfig, *, where: str,
                      out_dir: Path) -> tuple[list[str], torch.Tensor]:
    """Forward and backward of one optimizer step's micro-batches, each loss term normalised by the step's global
    count of its units (all micro-batches, all processes). Returns (logged names, their sums over the group:
    loss terms added up, other statistics averaged)."""
    world = acc.num_processes
    counts = torch.tensor([sum(c) for c in zip(*(_units(method, b) for b in group))],
                          dtype=torch.float64, device=acc.device)
    counts = acc.reduce(counts, reduction="sum")
    norm = {"forget": float(counts[0]) / world, "retain": float(counts[1]) / world, "local": len(group)}
    sums = torch.zeros(0, dtype=torch.float64)
    names: list[str] = []
    for m, micro in enumerate(group):
        last = m == len(group) - 1
        # what accelerate's accumulate() sets: DeepSpeed's engine steps on the boundary micro-batch
        acc.gradient_state._set_sync_gradients(last)
        with (nullcontext() if last else acc.no_sync(objective)), acc.autocast():
            out = objective(micro["forget"], micro.get("retain"), norm)
            if not names:
                names = ["loss", *sorted(k for k in out["stats"] if k != "loss")]
                sums = torch.zeros(len(names), dtype=torch.float64)
                additive = torch.tensor([n in _ADDITIVE for n in names])
            vals = torch.tensor([float(out["loss"].detach())] + [out["stats"][k] for k in names[1:]],
                                dtype=torch.float64)
            if cfg.check_finite:
                seen = acc.reduce(vals.to(acc.device), reduction="sum").cpu()  # NaN anywhere -> here
                bad = [n for n, v in zip(names, seen.tolist()) if not math.isfinite(v)]
                if bad:
                    raise NonFiniteError(f"non-finite {', '.join(bad)} at {where}, micro-batch {m}); stopped "
                                         f"before its backward; last checkpoint: {latest_checkpoint(out_dir)}")
            # loss terms are already divided by the global count (they add up over micro-batches);
            # other statistics (mean weights, kept tokens) are averaged over the micro-batches
            sums += torch.where(additive, vals, vals / len(group))
            acc.backward(out["loss"] * acc.gradient_accumulation_steps)
    return names, sums


def _write_g_effect(tracker, out_dir: Path) -> dict:
    """Main process: the G-effect record as ``g_effect.json`` (written through a rename) and its plots."""
    from fastweight.analysis.plots import save_g_effect_plots

    g_record = tracker.to_dict()
    tmp = out_dir / "g_effect.json.tmp"
    tmp.write_text(json.dumps(g_record))
    os.replace(tmp, out_dir / "g_effect.json")
    save_g_effect_plots(g_record, out_dir)
    return g_record


def _save_gathered(acc, objective, out_dir: Path) -> None:
    """Under FSDP / ZeRO-3: the full policy weights, gathered by the engine, as ``model.safetensors``."""
    from safetensors.torch import save_file

    full = acc.get_state_dict(objective)
    if acc.is_main_process:
        prefix = "policy."
        weights = {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in full.items() if k.startswith(prefix)}
        tmp = out_dir / "model.safetensors.tmp"
        save_file(weights, str(tmp))
        os.replace(tmp, out_dir / "model.safetensors")
    acc.wait_for_everyone()


__all__ = ["NonFiniteError", "TrainResult", "latest_checkpoint", "layer_filter", "nll_loss", "train"]
