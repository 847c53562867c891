"""The one accelerate training loop: plain fine-tuning and unlearning (STYLE.md section 4).

``train(model, forget, retain, config)``:
  * ``Accelerator(mixed_precision=...)``, ``prepare(optimizer)``; AdamW over the trainable parameters;
    linear warm-up (``config.warmup_steps``, default one epoch) then linear decay to 0.
  * Data: ``ForgetRetainDataset`` (forget item + a retain item drawn per ``(seed, rank, epoch, index)``) read
    through ``EpochSampler`` (same shuffled order on every rank, disjoint equal shares: no duplicated data).
    Each process builds its own loader, so a rank never waits on another for a missing batch.
  * Gradient accumulation by hand: ``grad_accum`` micro-batches per optimizer step (the last group of an
    epoch may be shorter; each group's loss is averaged over its micro-batches). Gradients are averaged over
    processes with one all-reduce per optimizer step (no DDP wrapper, so methods may call any model
    attribute), then clipped to ``max_grad_norm``.
  * A multi-process CPU run needs ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N``:
    with accelerate 1.x, ``accelerate launch --cpu --num_processes N`` starts one process unless MPI is installed.
  * The objective: ``method(model, forget, retain, ref_model)`` from
    ``fastweight.train.methods.build_method(config.method, **config.method_args)``; with ``method=None`` the
    token-mean NLL of the forget (= training) batch (fine-tuning the target or retain model). A frozen copy
    of the model is made only when ``method.needs_ref``; parameters are frozen where
    ``method.trainable(name)`` is False or outside ``config.trainable_layers``.
  * Logging: one JSON line per optimizer step in ``output_dir/log.jsonl`` (loss, lr, grad_norm, the method's
    statistics such as token-weight means), tqdm on the main process.
  * G-effect (``config.g_effect_every``): after the last backward of every N-th optimizer step, the inner
    product of the accumulated objective gradient with the forget / retain probe NLL gradients, per layer
    group (``fastweight.analysis``), smoothed by an EMA; written to ``output_dir/g_effect.json`` with plots,
    and returned in ``TrainResult.g_effect``. Measuring changes neither weights, gradients nor optimizer state.
  * Checkpoints: ``accelerator.save_state`` (model, optimizer, scheduler, RNG states) into a temporary folder
    renamed to ``checkpoints/step-XXXXXXXX`` once complete, with ``trainer_state.json`` (step, epoch, batches
    consumed). ``resume=True`` loads the latest and skips the consumed batches: on CPU the resumed run ends
    with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import fastweight
from fastweight._constants import IGNORE_INDEX
from fastweight.data.templates import REFUSALS
from fastweight.data.tofu import EpochSampler, ForgetRetainDataset, QADataset, pad_collate
from fastweight.train.config import TrainConfig

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class TrainResult:
    """``model``: the trained (unwrapped) model; ``history``: one dict per optimizer step (also in log.jsonl)."""

    model: Any
    global_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    g_effect: dict | None = None


def nll_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean NLL of the labelled tokens (fine-tuning objective), from the last hidden states and the
    output embedding through the fused-linear path (no logits tensor)."""
    from fastweight.train.methods import lm_forward

    out = lm_forward(model, batch)
    loss = fastweight.nll_loss(out.hidden, batch["labels"], lm_head=out.lm_head, bias=out.bias,
                               softcap=out.softcap, shift=True)
    return loss, {"nll": float(loss.detach())}


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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/step-*`` folder (one with ``trainer_state.json``), or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
            and (p / "trainer_state.json").is_file()]
    return max(done)[1] if done else None


def _save_checkpoint(acc, output_dir: Path, state: dict, keep: int = 1) -> None:
    root = output_dir / "checkpoints"
    final = root / f"step-{state['global_step']:08d}"
    tmp = root / f".tmp-step-{state['global_step']:08d}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a checkpoint folder exists only once complete
        older = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))[:-keep]
        for _, p in older:
            shutil.rmtree(p)
    acc.wait_for_everyone()


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items() if k != "index"}
    return batch.to(device)


def _average_gradients(acc, params: list[torch.Tensor]) -> None:
    """Mean of the gradients over processes (one flat all-reduce); a no-op for one process."""
    if acc.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = acc.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model, forget: QADataset, retain: QADataset | None = None, config: TrainConfig | None = None, *,
          refusals: Sequence[str] | None = None, on_step: Callable[[int, dict], None] | None = None,
          ) -> TrainResult:
    """Fine-tune (``config.method`` None) or unlearn ``model``; see the module docstring.

    Args:
        model: a causal LM (``transformers`` ``PreTrainedModel`` or any module returning ``.logits``).
        forget: the forget set (the training set when fine-tuning), a ``QADataset``.
        retain: the retain set, used only when the method needs it (``method.needs_retain``).
        config: ``TrainConfig``.
        refusals: refusal answers for FLAT / IdkDPO forget batches (``idk_*`` keys); default ``REFUSALS``
            when the method declares ``needs_idk`` or is named "flat" / "idkdpo".
        on_step: called on every process after each optimizer step with ``(global_step, log dict)``.
    Returns:
        ``TrainResult`` with the unwrapped model (trained in place).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    out_dir = Path(cfg.output_dir)
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != cfg.mixed_precision:
        # one process may fine-tune in bf16 and unlearn in fp32: the mixed-precision choice lives in the
        # process-wide AcceleratorState; the PartialState (process group) is kept
        AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)

    retain_probe_set = retain  # G-effect probes the retain set even for methods without a retain term
    method = None
    if cfg.method is not None:
        from fastweight.train.methods import build_method

        method = build_method(cfg.method, **cfg.method_args)
        if method.needs_retain and retain is None:
            raise ValueError(f"method {method.name!r} needs a retain set; pass retain=")
        if not method.needs_retain:
            retain = None
    else:
        retain = None
    needs_idk = method is not None and getattr(method, "needs_idk", method.name.lower() in ("flat", "idkdpo"))
    ref_model = None
    if method is not None and method.needs_ref:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False).to(acc.device)
    keep_layer = layer_filter(model, cfg.trainable_layers)
    for name, p in model.named_parameters():
        p.requires_grad_(keep_layer(name) and (method is None or bool(method.trainable(name))))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (check trainable_layers and the method's trainable())")

    data = ForgetRetainDataset(forget, retain, seed=cfg.seed, rank=acc.process_index,
                               refusals=(refusals or REFUSALS) if needs_idk else None)
    sampler = EpochSampler(len(data), seed=cfg.seed, rank=acc.process_index, world=acc.num_processes)
    pad = forget.tokenizer.pad_token_id if forget.tokenizer.pad_token_id is not None else \
        forget.tokenizer.eos_token_id
    tracker = probes = None
    if cfg.g_effect_every and method is not None:
        from fastweight.analysis import GEffectTracker

        tracker = GEffectTracker(every=cfg.g_effect_every, ema=cfg.g_effect_ema)

        def probe(ds):
            if ds is None:
                return None
            items = [ds[i] for i in range(min(cfg.g_effect_probe_size, len(ds)))]
            return _to(pad_collate(items, pad_token_id=pad), acc.device)

        probes = (probe(forget), probe(retain_probe_set))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=partial(pad_collate, pad_token_id=pad))
    n_batches = len(loader)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps,
                                                                         cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(steps_per_epoch, total // 2)

    model.to(acc.device).train()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_lr_lambda, warmup=warmup, total=total))
    # The model is not wrapped in DistributedDataParallel: methods call model attributes (get_decoder, ...) a
    # wrapper hides; gradients are averaged across processes by one all-reduce per optimizer step instead.
    optimizer = acc.prepare(optimizer)
    acc.register_for_checkpointing(model, scheduler)

    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0}
    log_path = out_dir / "log.jsonl"
    history: list[dict] = []
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if ckpt is not None:
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if log_path.is_file():
            history = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
            history = [h for h in history if h["step"] <= state["global_step"]]
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = log_path.with_name(log_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
        os.replace(tmp, log_path)

    def step_loss(batch) -> tuple[torch.Tensor, dict[str, float]]:
        if method is None:
            return nll_loss(model, batch["forget"])
        out = method(model, batch["forget"], batch.get("retain"), ref_model)
        return out.loss, dict(out.stats)

    bar = tqdm(total=total, initial=state["global_step"], disable=not (acc.is_main_process and cfg.progress),
               desc=cfg.method or "fine-tune")
    step, skip = state["global_step"], state["batch_in_epoch"]
    resumed_step = step
    sums: dict[str, float] = {}
    for epoch in range(state["epoch"], cfg.epochs):
        if step >= total:
            break
        data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            group_start = (i // cfg.grad_accum) * cfg.grad_accum
            group_len = min(cfg.grad_accum, n_batches - group_start)
            last = i - group_start == group_len - 1
            with acc.autocast():
                loss, stats = step_loss(_to(batch, acc.device))
                acc.backward(loss / group_len)
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / group_len
            if not last:
                continue
            _average_gradients(acc, params)
            g_log = {}
            if tracker is not None and acc.is_main_process and tracker.due(step + 1):
                from fastweight.analysis import maybe_record

                scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
                with acc.autocast():
                    res = maybe_record(tracker, step + 1, model, "grad", *probes, grad_scale=scale)
                g_log = {f"g_effect_{k}": v.total for k, v in res.items()}
            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            entry = {"step": step, "epoch": epoch, "lr": lr, **sums, **g_log}
            if grad_norm is not None:
                entry["grad_norm"] = float(grad_norm)
            sums = {}
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
                _save_checkpoint(acc, out_dir, state)
        skip = 0
    bar.close()
    if state["global_step"] > resumed_step or ckpt is None:
        _save_checkpoint(acc, out_dir, state)
    g_record = None
    if tracker is not None and acc.is_main_process:
        from fastweight.analysis.plots import save_g_effect_plots

        g_record = tracker.to_dict()
        tmp = out_dir / "g_effect.json.tmp"
        tmp.write_text(json.dumps(g_record))
        os.replace(tmp, out_dir / "g_effect.json")
        save_g_effect_plots(g_record, out_dir)
    acc.free_memory()
    return TrainResult(model=model, global_step=step, history=history, g_effect=g_record)


__all__ = ["TrainResult", "latest_checkpoint", "layer_filter", "nll_loss", "train"]
