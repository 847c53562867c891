"""What the training loop asks of accelerate's engines: the Accelerator, the checks of what an engine config
can honour (before any training), LoRA wrapping, and the reference log-probability table.

Engines (``accelerator.distributed_type``): one process / DDP keep full parameters on every rank; FSDP and
DeepSpeed shard them ("sharded" here: the loop then saves the final weights gathered by the engine, and
features that read full weights or gradients outside a forward are refused up front).
"""
from __future__ import annotations

import copy
import math

import torch

from fastweight.train.config import TrainConfig
from fastweight.train.objective import RefLogpTable
from fastweight.train.zero3 import fill_auto


class NonFiniteError(FloatingPointError):
    """A loss term or the gradient norm is NaN/inf; raised before the optimizer step and any checkpoint."""


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != cfg.mixed_precision:
        # one process may fine-tune in bf16 and unlearn in fp32: the mixed-precision choice lives in the
        # process-wide AcceleratorState; the PartialState (process group) is kept
        AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    set_seed(cfg.seed)
    return acc


def is_sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def engine_name(acc) -> str:
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage}"
    return str(acc.distributed_type.value)


def check_engine(acc, cfg: TrainConfig, method, model=None) -> None:
    """ValueError, before any model work, for engine settings this trainer cannot honour. Under DeepSpeed the
    config's "auto" values are filled: batch sizes and clipping from ``cfg``, bucket sizes from ``model``'s
    hidden size (as transformers' Trainer does; ``zero3.fill_auto``)."""
    from accelerate.utils import DistributedType

    name = engine_name(acc)
    if is_sharded(acc):
        if cfg.g_effect_every:
            raise ValueError(f"g_effect_every={cfg.g_effect_every} reads full gradients outside a forward, which "
                             f"{name} shards; set g_effect_every=0 or run with one process / DDP")
        fsdp1 = (acc.distributed_type == DistributedType.FSDP
                 and getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", 1) != 2)
        if (cfg.resume or cfg.save_every) and fsdp1:
            raise ValueError(f"resume / save_every are implemented with pickle-free checkpoints for one process, "
                             f"DDP, FSDP2 and DeepSpeed ZeRO-1/2/3; under {name} (FSDP1) launch with "
                             f"--fsdp_version 2, or set save_every=0 and resume=False (the final weights are written "
                             f"gathered to output_dir/model.safetensors)")
    if acc.distributed_type == DistributedType.DEEPSPEED:
        plugin = acc.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        # the config as the user wrote it: the plugin outlives one train() (a pipeline fine-tunes, then
        # unlearns with another batch size), and the "auto" values filled for one run must not bind the next
        if not hasattr(plugin, "_fastweight_user_config"):
            plugin._fastweight_user_config = copy.deepcopy(ds)
        user = plugin._fastweight_user_config
        for key, want in (("gradient_accumulation_steps", cfg.grad_accum),
                          ("train_micro_batch_size_per_gpu", cfg.batch_size)):
            got = user.get(key, "auto")
            if got != "auto" and int(got) != want:
                raise ValueError(f"DeepSpeed config {key}={got} disagrees with the TrainConfig ({want}); set it "
                                 f"to \"auto\" or to {want}")
            ds[key] = want
        ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * acc.num_processes
        clip = user.get("gradient_clipping", "auto")
        want_clip = cfg.max_grad_norm or 0.0
        if clip == "auto":
            ds["gradient_clipping"] = want_clip
        elif not math.isclose(float(clip), want_clip):
            raise ValueError(f"DeepSpeed config gradient_clipping={clip} disagrees with max_grad_norm="
                             f"{cfg.max_grad_norm}; set it to \"auto\"")
        if model is not None:
            fill_auto(ds, model, user=user)
        if ds.get("optimizer") or ds.get("scheduler"):
            raise ValueError("the DeepSpeed config must not define 'optimizer' or 'scheduler': fastweight.train "
                             "passes its own AdamW and learning-rate schedule")
    if cfg.lora_r and method is not None and method.name == "rmu" and cfg.lora_targets is not None:
        keys = method.config.param_keys
        if not any(any(k.endswith(t) or t in k for t in cfg.lora_targets) for k in keys):
            raise ValueError(f"RMU trains only {list(keys)} but lora_targets={list(cfg.lora_targets)} puts no "
                             f"adapter there; add one of them to lora_targets")


def maybe_lora(model, cfg: TrainConfig):
    """``model`` wrapped with LoRA adapters when ``cfg.lora_r`` > 0 (peft), else unchanged."""
    if not cfg.lora_r:
        return model
    if hasattr(model, "peft_config"):
        raise ValueError("lora_r > 0 but the model already is a PEFT model; pass lora_r=0 to train its adapters")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("lora_r > 0 needs peft: pip install 'fastweight[lora]'") from e
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                    target_modules=list(cfg.lora_targets) if cfg.lora_targets else None)
    return get_peft_model(model, lc)


def _reference_items(data, epochs: int) -> list[dict]:
    """Every distinct sequence whose reference log-probabilities a run reads: the forget answers and, for
    IdkDPO, the refusal drawn for each (item, epoch). Items are {input_ids, attention_mask, labels}."""
    seen, items = set(), []
    draws = range(epochs) if data.idk is not None else range(1)
    keep_epoch = data.epoch
    try:
        for epoch in draws:
            data.set_epoch(epoch)
            for i in range(len(data)):
                f = data[i]["forget"]
                for prefix in ("", "idk_") if data.idk is not None else ("",):
                    item = {k: f[prefix + k] for k in ("input_ids", "attention_mask", "labels")}
                    key = (tuple(item["input_ids"].tolist()), tuple(item["labels"].tolist()))
                    if key not in seen:
                        seen.add(key)
                        items.append(item)
    finally:
        data.set_epoch(keep_epoch)
    return items


def build_reference_table(acc, objective, data, sampler, collate, cfg: TrainConfig, start_epoch: int = 0
                          ) -> RefLogpTable:
    """The reference log-probability table, computed by the prepared policy before its first update.

    Each process takes every W-th sequence (its share padded by wrapping, so all processes run the same
    number of forwards, as FSDP / ZeRO-3 require), runs micro-batches of ``cfg.batch_size`` through the
    engine's forward (``mode="ref_logp"``, fused token log-probabilities, no gradients) and the shares are
    gathered into one table on every process.
    """
    from accelerate.utils import gather_object

    items = _reference_items(data, cfg.epochs)
    world, rank = acc.num_processes, acc.process_index
    per_rank = math.ceil(len(items) / world)
    mine = [items[(rank + world * j) % len(items)] for j in range(per_rank)]
    table = RefLogpTable()
    was = objective.training
    objective.eval()
    with torch.no_grad():
        for s in range(0, len(mine), cfg.batch_size):
            batch = {k: v.to(acc.device) for k, v in collate(mine[s:s + cfg.batch_size]).items()}
            with acc.autocast():
                out = objective(batch, mode="ref_logp")
            table.add(batch, "", out["logp"])
    objective.train(was)
    if world > 1:
        merged = RefLogpTable()
        for part in gather_object([table.state()]):
            merged.update(RefLogpTable.from_state(part))
        table = merged
    return table


__all__ = ["NonFiniteError", "build_reference_table", "check_engine", "engine_name", "is_sharded", "make_accelerator",
           "maybe_lora"]
