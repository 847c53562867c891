"""Low-precision weights that train: fp32 master weights for AdamW, or a clear refusal before any step.

With weights loaded in bf16 (``--torch-dtype bf16``), plain AdamW would update the bf16 tensors in place: at
lr 1e-5 most updates are below half a bf16 ulp of the weight and round away (on a tiny Llama only 7% of the
trainable elements changed in 4 steps). Mixed-precision trainers keep an fp32 master copy instead: the forward
and backward run in the low precision, AdamW updates the fp32 master (its moments in fp32 too) and the result is
cast back into the model's parameters (accelerate with fp32 weights under autocast; DeepSpeed's bf16 / fp16
optimizers and ZeRO's fp32 partitions, ``runtime/bf16_optimizer.py`` and ``runtime/zero/stage_1_and_2.py`` in
deepspeedai/DeepSpeed). ``plan_precision`` decides, per engine, who keeps that master copy:

  * one process / DDP: ``MasterWeightAdamW`` below (fp32 master weights and AdamW state for every
    non-fp32 trainable parameter; fp32 parameters are stepped in place as before);
  * DeepSpeed: the engine itself (its bf16 / fp16 sections, or ZeRO's fp32 partitions); its config must enable
    the precision of the weights, so its master copy and, for fp16, its dynamic loss scaler are active;
  * FSDP2 with ``mixed_precision`` bf16/fp16: accelerate upcasts the trainable parameters to fp32 itself
    (``fsdp2_prepare_model``); other FSDP set-ups with low-precision trainable weights are refused.

fp16 weights outside DeepSpeed are refused: without loss scaling fp16 gradients underflow and AdamW's
``exp_avg_sq`` overflows (every weight NaN after one step), and torch's ``GradScaler`` cannot unscale fp16
gradients.
"""
from __future__ import annotations

import torch

_LOW = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over fp32 master copies of the low-precision parameters it is given.

    ``param_groups`` hold the model's own parameters (so ``zero_grad``, gradient clipping, accelerate's wrapper
    and learning-rate schedulers work on them as on any optimizer); ``step`` copies their gradients to fp32,
    runs ``torch.optim.AdamW`` over the fp32 masters, and casts the masters back into the parameters. An fp32
    parameter is its own master (stepped in place, no copy). ``state_dict`` is AdamW's over the masters plus
    ``"master_weights"`` (a list of fp32 tensors): tensors and numbers only, loadable with ``weights_only=True``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.masters: list[list[torch.Tensor]] = [
            [p if p.dtype == torch.float32 else p.detach().to(torch.float32).clone() for p in g["params"]]
            for g in self.param_groups]
        self.inner = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"}, "params": m}
                                        for g, m in zip(self.param_groups, self.masters)])

    def _pairs(self):
        for group, masters in zip(self.param_groups, self.masters):
            yield from zip(group["params"], masters)

    def _sync_hyper(self) -> None:
        for g, ig in zip(self.param_groups, self.inner.param_groups):
            ig.update({k: v for k, v in g.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyper()
        for p, m in self._pairs():
            if m is not p:
                m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
        self.inner.step()
        for p, m in self._pairs():
            if m is not p and m.grad is not None:
                p.copy_(m)  # round to the parameter's dtype once, from the fp32 master
                m.grad = None
        return loss

    def state_dict(self) -> dict:
        self._sync_hyper()
        sd = self.inner.state_dict()
        sd["master_weights"] = [m.detach().clone() for _, m in self._pairs()]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        masters = sd.pop("master_weights", None)
        have = [m for _, m in self._pairs()]
        if not isinstance(masters, list) or [tuple(getattr(t, "shape", ())) for t in masters] != \
                [tuple(m.shape) for m in have]:
            raise ValueError("optimizer state has no fp32 master weights matching the trainable parameters "
                             "(written by a run with other weights' dtype, trainable parameters or model?)")
        with torch.no_grad():
            for (p, m), saved in zip(self._pairs(), masters):
                m.copy_(saved.to(device=m.device, dtype=torch.float32))
                if m is not p:
                    p.copy_(m)
        self.inner.load_state_dict(sd)
        for g, ig in zip(self.param_groups, self.inner.param_groups):
            g.update({k: v for k, v in ig.items() if k != "params"})

    def master_weights(self) -> list[torch.Tensor]:
        """The fp32 master of each parameter, in ``param_groups`` order (the parameter itself when fp32)."""
        return [m for _, m in self._pairs()]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def plan_precision(dtypes, *, engine: str, mixed_precision: str = "no", ds_config: dict | None = None,
                   fsdp_version: int = 1) -> str:
    """Who keeps the fp32 master weights of trainable parameters with these ``dtypes``: ``"plain"`` (all fp32 /
    fp64: torch AdamW as is), ``"master"`` (``MasterWeightAdamW``), ``"engine"`` (DeepSpeed / FSDP2 do it).

    engine: ``"local"`` (one process or DDP), ``"deepspeed"`` or ``"fsdp"``. ValueError, before any step, for
    set-ups that would train low-precision weights without an fp32 master copy or fp16 without loss scaling.
    """
    low = sorted({d for d in dtypes if d in _LOW}, key=str)
    if not low:
        return "plain"
    names = "/".join(_dtype_name(d) for d in low)
    if engine == "deepspeed":
        for d in low:
            section = _dtype_name(d)
            enabled = str((ds_config or {}).get(section, {}).get("enabled", False)).lower()
            if enabled == "auto":
                enabled = str(mixed_precision == section).lower()
            if enabled != "true":
                raise ValueError(f"trainable weights are {section} (--torch-dtype {section}) but the DeepSpeed config "
                                 f"does not enable \"{section}\": set {{\"{section}\": {{\"enabled\": true}}}} (or "
                                 f"\"auto\" with --mixed-precision {section}) so DeepSpeed keeps fp32 master weights"
                                 f"{' and scales the loss' if section == 'fp16' else ''}")
        return "engine"
    if torch.float16 in low:
        raise ValueError("trainable weights are fp16 (--torch-dtype fp16): AdamW on fp16 weights without loss "
                         "scaling turns them into NaN; load them with --torch-dtype bf16 (or fp32), or train under "
                         "DeepSpeed with \"fp16\": {\"enabled\": true} (fp32 master weights, dynamic loss scaling)")
    if engine == "fsdp":
        if fsdp_version == 2 and mixed_precision != "no":
            return "engine"  # accelerate's fsdp2_prepare_model upcasts trainable parameters to fp32
        raise ValueError(f"trainable weights are {names} (--torch-dtype {names}) under FSDP: launch with "
                         f"--fsdp_version 2 and --mixed-precision bf16 (accelerate then keeps the trainable "
                         f"parameters in fp32 and computes in bf16), or load them in fp32")
    return "master"


def plan_for(acc, dtypes) -> str:
    """``plan_precision`` for the engine of the accelerator ``acc``."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return plan_precision(dtypes, engine="deepspeed", mixed_precision=acc.mixed_precision,
                              ds_config=acc.state.deepspeed_plugin.deepspeed_config)
    if kind == DistributedType.FSDP:
        version = getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", 1)
        return plan_precision(dtypes, engine="fsdp", mixed_precision=acc.mixed_precision, fsdp_version=version)
    return plan_precision(dtypes, engine="local", mixed_precision=acc.mixed_precision)


def make_optimizer(params, plan: str, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``MasterWeightAdamW`` for plan ``"master"``, else ``torch.optim.AdamW``."""
    cls = MasterWeightAdamW if plan == "master" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=weight_decay)


__all__ = ["MasterWeightAdamW", "make_optimizer", "plan_for", "plan_precision"]
