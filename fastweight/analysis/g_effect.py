"""G-effect: the inner product of an objective's gradient with a probe set's NLL gradient, per layer group.

Definition (``shared/spec/LOSSES.md``, G-effect; Wang et al., ICLR 2025, "Rethinking LLM Unlearning
Objectives: A Gradient Perspective and Go Beyond")::

    G = < grad_theta L_obj , grad_theta NLL(D) >

over the trainable parameters theta (``requires_grad``). One gradient-descent step on ``L_obj`` with step
size eta changes ``NLL(D)`` by ``-eta * G`` to first order, so **G < 0 on the forget probe = forgetting**,
and G near 0 on the retain probe = little collateral damage (G < 0 there = damage). Because the inner
product is a sum over parameters, it splits exactly into per-group parts (embeddings, each decoder block's
attention / MLP / norms, final norm, head) that add up to the total.

Cost and memory:
  * ``objective`` callable: one backward of ``L_obj`` (``torch.autograd.grad``; its gradients are the one
    extra copy) + one backward per probe. Probe gradients are never stored: a hook on each parameter takes
    the dot product the moment that parameter's gradient is ready and hands autograd a stride-0 zero, so
    at any time only one parameter's probe gradient exists.
  * ``objective="grad"``: the gradient already accumulated in ``.grad`` (e.g. right after the training
    step's backward, before ``optimizer.step``) is the objective gradient: no objective pass, no copy,
    one backward per probe.

Nothing observable changes: ``torch.autograd.grad`` never writes ``.grad`` (gradient accumulation in
progress survives) and never runs the ``AccumulateGrad`` nodes that DDP's reducer hooks into; weights and
optimizer state are not touched; the global RNG state is restored and each module's train/eval flag put
back. DDP / DataParallel / ``torch.compile`` wrappers are unwrapped, and ``objective`` and the probe loss
receive the unwrapped module (a DDP forward without its backward would desynchronise the reducer).
Under DDP each rank measures on its own probe batch (the "grad" objective is already all-reduced).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, get_args

import torch

GroupBy = Literal["auto", "block", "kind", "param"]
GROUP_BYS: tuple[str, ...] = get_args(GroupBy)
OBJECTIVE_GRAD = "grad"  # objective= value meaning "use the gradients already accumulated in .grad"

# A decoder block's index in a parameter name: Llama/Mistral/Qwen "layers.3.", GPT-2 "h.3.", others "blocks.3."
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_ATTN_RE = re.compile(r"attn|attention")
_MLP_RE = re.compile(r"mlp|feed_forward|ffn|expert")
_EMBED_RE = re.compile(r"embed|wte|wpe")
_NORM_RE = re.compile(r"norm|ln_")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers (the model itself when unwrapped)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _param_group_auto(name: str, kind_of: Mapping[str, str]) -> str:
    m = _BLOCK_RE.search(name)
    if m is not None:
        # the block's direct child decides: "post_attention_layernorm" is a norm, "self_attn.q_norm" attention
        child = name[m.end():].split(".")[0]
        kind = "norm" if _NORM_RE.search(child) else "attn" if _ATTN_RE.search(child) else \
            "mlp" if _MLP_RE.search(child) else "other"
        return f"layers.{m.group(1)}.{kind}"
    if name in kind_of:  # identified by identity: input / output embedding weights
        return kind_of[name]
    if _EMBED_RE.search(name):
        return "embed"
    if "lm_head" in name or "embed_out" in name:
        return "head"
    if _NORM_RE.search(name):
        return "final_norm"
    return "other"


def merge_groups(values: Mapping[str, float], by: str) -> dict[str, float]:
    """Coarsen ``groups="auto"`` values: ``by="block"`` merges each block's attn/mlp/norm into ``layers.i``;
    ``by="kind"`` sums over blocks into ``attn``, ``mlp``, ``norm`` (the final norm joins ``norm``).
    Other keys (``embed``, ``final_norm``, ``head``, ``other``) pass through. Order of first appearance."""
    if by not in ("block", "kind"):
        raise ValueError(f"by must be 'block' or 'kind', got {by!r}")
    out: dict[str, float] = {}
    for key, v in values.items():
        m = re.fullmatch(r"layers\.(\d+)\.(attn|mlp|norm|other)", key)
        if m is None:
            new = "norm" if (by == "kind" and key == "final_norm") else key
        else:
            new = f"layers.{m.group(1)}" if by == "block" else m.group(2)
        out[new] = out.get(new, 0.0) + float(v)
    return out


def param_groups(model: torch.nn.Module, groups: GroupBy | Callable[[str], str] = "auto") -> dict[str, str]:
    """``{parameter name: group name}`` for the trainable parameters of (the unwrapped) ``model``.

    groups: ``"auto"`` (``embed``, ``layers.<i>.attn`` / ``.mlp`` / ``.norm`` / ``.other``, ``final_norm``,
    ``head``, ``other``), ``"block"`` (``layers.<i>`` instead of the split), ``"kind"`` (``embed``, ``attn``,
    ``mlp``, ``norm``, ``head``, ``other``), ``"param"`` (one group per parameter), or a callable name -> group.
    Inside a block the direct child module's name decides (``self_attn`` / ``attention`` -> attn, ``mlp`` /
    ``feed_forward`` / ``ffn`` / ``experts`` -> mlp, ``*norm*`` / ``ln_*`` -> norm).
    Tied input/output embeddings are one parameter, reported under its first name (``embed`` for Llama).
    """
    model = unwrap_model(model)
    if not callable(groups) and groups not in GROUP_BYS:
        raise ValueError(f"groups must be one of {GROUP_BYS} or a callable name -> group, got {groups!r}")
    kind_of: dict[str, str] = {}
    by_id = {id(p): n for n, p in model.named_parameters()}
    for getter, kind in (("get_output_embeddings", "head"), ("get_input_embeddings", "embed")):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and id(weight) in by_id:
            kind_of[by_id[id(weight)]] = kind  # input last: a tied weight is reported as "embed"
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if callable(groups):
            g = groups(name)
            if not isinstance(g, str):
                raise TypeError(f"groups callable must return a str, got {type(g).__name__} for {name!r}")
        elif groups == "param":
            g = name
        else:
            g = _param_group_auto(name, kind_of)
            if groups != "auto":
                g = next(iter(merge_groups({g: 0.0}, groups)))
        out[name] = g
    return out


@dataclass(frozen=True)
class GEffect:
    """G-effect of one objective on one probe set.

    total: ``<grad L_obj, grad NLL(probe)>`` over all trainable parameters (float, float64-accumulated).
    groups: per-group parts in model order; they sum to ``total``.
    by_param: per-parameter parts (name -> float).
    objective_norm / probe_norm: the two full gradient norms (``cosine`` = total / their product).
    probe_loss: the probe NLL at the measured weights; objective_loss: ``L_obj`` (None for ``"grad"``).
    """

    total: float
    groups: dict[str, float]
    by_param: dict[str, float]
    objective_norm: float
    probe_norm: float
    probe_loss: float
    objective_loss: float | None = None
    auto_group_of: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def cosine(self) -> float:
        den = self.objective_norm * self.probe_norm
        return self.total / den if den > 0 else 0.0

    def regroup(self, groups: GroupBy | Callable[[str], str] | Mapping[str, str]) -> dict[str, float]:
        """Per-group parts under another grouping: a callable name -> group, a ``{name: group}`` mapping, or
        ``"param"`` / ``"block"`` / ``"kind"`` (the last two coarsen ``"auto"`` names)."""
        if groups == "param":
            return dict(self.by_param)
        if groups in ("block", "kind"):
            auto: dict[str, float] = {}
            for name, v in self.by_param.items():
                g = self.auto_group_of.get(name, name)
                auto[g] = auto.get(g, 0.0) + v
            return merge_groups(auto, groups)
        lookup = groups.get if isinstance(groups, Mapping) else groups
        if not callable(lookup):
            raise ValueError(f"groups must be one of {GROUP_BYS}, a callable or a mapping, got {groups!r}")
        out: dict[str, float] = {}
        for name, v in self.by_param.items():
            g = lookup(name)
            out[g] = out.get(g, 0.0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no per-parameter values)."""
        return {"total": self.total, "groups": dict(self.groups), "objective_norm": self.objective_norm,
                "probe_norm": self.probe_norm, "cosine": self.cosine, "probe_loss": self.probe_loss,
                "objective_loss": self.objective_loss}


def probe_nll(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean NLL ``tokmean(ell)`` of the labelled tokens of ``batch`` (the G-effect's ``NLL(D)``).

    batch: ``input_ids`` [B, T] int, optional ``attention_mask`` [B, T], ``labels`` [B, T] unshifted with
    ``IGNORE_INDEX`` on prompt and padding (the causal shift is applied here). Runs the decoder and the fused
    token log-prob head on hidden states (``fastweight.train.methods.lm_forward``), never [B, T, V] logits.
    Returns a float32 scalar; 0 when no token is labelled.
    """
    from fastweight.losses import nll_loss
    from fastweight.train.methods import lm_forward

    if not isinstance(batch, Mapping) or "labels" not in batch or "input_ids" not in batch:
        raise ValueError(f"probe batch must be a dict with 'input_ids' and 'labels', got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    out = lm_forward(model, dict(batch))
    return nll_loss(out.hidden, batch["labels"], shift=True, **out.head())


def _scalar(name: str, value: Any) -> torch.Tensor:
    loss = getattr(value, "loss", value)  # accept MethodOutput-like objects
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{name} must return a floating scalar tensor (or an object with .loss), got {shape}")
    return loss


@contextlib.contextmanager
def _measuring(model: torch.nn.Module, eval_mode: bool):
    """Eval mode (if asked), grad enabled, RNG state restored, train flags restored per module."""
    modes = [(m, m.training) for m in model.modules()]
    devices = []
    if torch.cuda.is_available():
        devices = sorted({p.device.index for p in model.parameters() if p.is_cuda and p.device.index is not None})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            if eval_mode:
                model.eval()
            yield
    finally:
        for m, was in modes:
            m.training = was


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 dot of two same-shaped tensors (blocked summation inside torch.dot)."""
    return torch.dot(a.reshape(-1).float(), b.reshape(-1).float())


def _floats(ts: list[torch.Tensor]) -> list[float]:
    if not ts:
        return []
    dev = ts[0].device
    return torch.stack([t.detach().to(dev, torch.float64) for t in ts]).cpu().tolist()  # one sync


def g_effects(model: torch.nn.Module, objective: Callable[[torch.nn.Module], Any] | str,
              probes: Mapping[str, Mapping[str, torch.Tensor]], *,
              groups: GroupBy | Callable[[str], str] = "auto",
              probe_loss: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
              eval_mode: bool = True, grad_scale: float = 1.0) -> dict[str, GEffect]:
    """G-effect of one objective on several probe sets, sharing the objective gradient.

    Args:
        model: the trained model; DDP / DataParallel / compiled wrappers are unwrapped.
        objective: a callable ``unwrapped model -> scalar loss`` (or an object with ``.loss``, e.g. a
            ``MethodOutput``), e.g. ``lambda m: method(m, forget, retain, ref).loss``; or ``"grad"`` to use
            the gradients in ``.grad`` (parameters with ``.grad`` None count as 0).
        probes: ``{name: batch}``, each batch as in ``probe_nll``.
        groups: see ``param_groups``.
        probe_loss: ``(model, batch) -> scalar`` replacing ``probe_nll``.
        eval_mode: measure with dropout off (``model.eval()``; the flags are restored afterwards).
        grad_scale: ``"grad"`` only: the factor the ``.grad`` values carry (fp16 loss scaling), divided out.
    Returns:
        ``{name: GEffect}`` in the order of ``probes``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (callable(objective) or objective == OBJECTIVE_GRAD):
        raise ValueError(f"objective must be a callable model -> loss or {OBJECTIVE_GRAD!r}, got {objective!r}")
    if not isinstance(probes, Mapping) or not probes:
        raise ValueError("probes must be a non-empty mapping {name: batch}")
    if not (isinstance(grad_scale, (int, float)) and grad_scale > 0):
        raise ValueError(f"grad_scale must be a positive number, got {grad_scale!r}")
    if grad_scale != 1.0 and objective != OBJECTIVE_GRAD:
        raise ValueError(f"grad_scale applies to objective={OBJECTIVE_GRAD!r} only, got grad_scale={grad_scale}")
    probe_loss = probe_nll if probe_loss is None else probe_loss
    module = unwrap_model(model)
    auto_of = param_groups(module, "auto")
    group_of = auto_of if isinstance(groups, str) and groups == "auto" else param_groups(module, groups)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    names, params = [n for n, _ in named], [p for _, p in named]

    with _measuring(module, eval_mode):
        objective_loss = None
        if objective == OBJECTIVE_GRAD:
            obj = [p.grad for p in params]  # references, not copies
        else:
            loss = _scalar("objective", objective(module))
            objective_loss = float(loss.detach())
            # a loss with no graph (e.g. no labelled token) has a zero gradient
            obj = list(torch.autograd.grad(loss, params, allow_unused=True)) if loss.requires_grad else \
                [None] * len(params)
            del loss
        obj_sq = _floats([_dot(g, g) if g is not None else torch.zeros(()) for g in obj])
        inv = 1.0 / grad_scale
        obj_norm = sum(obj_sq) ** 0.5 * inv
        results = {}
        from fastweight._progress import progress

        # a bar over the probes on a terminal, a line every 30 s in a log file
        for probe_name, batch in progress(probes.items(), desc="G-effect probes", unit="probe"):
            results[probe_name] = _one_probe(module, probe_loss, batch, names, params, obj, obj_norm, inv,
                                             group_of, auto_of, objective_loss, probe_name)
    return results


def _one_probe(module, probe_loss, batch, names, params, obj, obj_norm, inv, group_of, auto_of, objective_loss,
               probe_name) -> GEffect:
    dots: dict[int, torch.Tensor] = {}
    sqs: dict[int, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            # dot now, then hand autograd a stride-0 zero: the probe gradient is never kept
            if obj[i] is not None:
                dots[i] = _dot(grad, obj[i])
            sqs[i] = _dot(grad, grad)
            return grad.new_zeros(()).expand_as(grad)
        return hook

    handles = [p.register_hook(make_hook(i)) for i, p in enumerate(params)]
    try:
        loss = _scalar(f"probe loss on {probe_name!r}", probe_loss(module, batch))
        if loss.requires_grad:  # otherwise the probe gradient is 0 (nothing labelled)
            torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    idx = sorted(dots)
    vals = dict(zip(idx, _floats([dots[i] for i in idx])))
    by_param = {n: vals.get(i, 0.0) * inv for i, n in enumerate(names)}
    grouped: dict[str, float] = {}
    for n, v in by_param.items():
        grouped[group_of[n]] = grouped.get(group_of[n], 0.0) + v
    probe_norm = sum(_floats(list(sqs.values()))) ** 0.5
    return GEffect(total=sum(by_param.values()), groups=grouped, by_param=by_param, objective_norm=obj_norm,
                   probe_norm=probe_norm, probe_loss=float(loss.detach()), objective_loss=objective_loss,
                   auto_group_of=dict(auto_of))


def g_effect(model: torch.nn.Module, objective: Callable[[torch.nn.Module], Any] | str,
             probe_batch: Mapping[str, torch.Tensor], *, groups: GroupBy | Callable[[str], str] = "auto",
             probe_loss: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
             eval_mode: bool = True, grad_scale: float = 1.0) -> GEffect:
    """G-effect ``<grad L_obj, grad NLL(probe_batch)>`` overall and per layer group (module docstring).

    ``probe_batch``: ``input_ids`` [B, T], optional ``attention_mask`` [B, T], ``labels`` [B, T] unshifted
    (``IGNORE_INDEX`` on prompt/padding). Other arguments as in ``g_effects``. Returns a ``GEffect``.
    Cost: one backward of ``objective`` (none for ``"grad"``) plus one of the probe NLL.
    """
    return g_effects(model, objective, {"probe": probe_batch}, groups=groups, probe_loss=probe_loss,
                     eval_mode=eval_mode, grad_scale=grad_scale)["probe"]


class GEffectTracker:
    """Per-step G-effect on named probes (``forget``, ``retain``, ...) with EMA smoothing, JSON-ready.

    every: measure when ``step % every == 0`` (``due``); ema: weight of the running value,
    ``smoothed_t = ema * smoothed_{t-1} + (1 - ema) * value_t`` (0.6 / 0.4 as in the G-effect paper's plots;
    0 = no smoothing), the first record starts the average. groups, probe_loss, eval_mode: passed to
    ``g_effects``. Values are stored per probe with their own step list, so a probe may be skipped.
    """

    def __init__(self, every: int = 1, *, ema: float = 0.6, groups: GroupBy | Callable[[str], str] = "auto",
                 probe_loss: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                 eval_mode: bool = True) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not (isinstance(ema, (int, float)) and 0.0 <= ema < 1.0):
            raise ValueError(f"ema must be a number in [0, 1), got {ema!r}")
        if not callable(groups) and groups not in GROUP_BYS:
            raise ValueError(f"groups must be one of {GROUP_BYS} or a callable name -> group, got {groups!r}")
        self.every, self.ema, self.groups = every, float(ema), groups
        self.probe_loss, self.eval_mode = probe_loss, eval_mode
        self.probes: dict[str, dict[str, Any]] = {}

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def _smooth(self, prev: float | None, value: float) -> float:
        return value if prev is None else self.ema * prev + (1.0 - self.ema) * value

    def record(self, step: int, results: Mapping[str, GEffect]) -> None:
        """Append one measurement per probe (``{probe name: GEffect}``, e.g. from ``g_effects``)."""
        for name, r in results.items():
            if not isinstance(r, GEffect):
                raise TypeError(f"results[{name!r}] must be a GEffect, got {type(r).__name__}")
            rec = self.probes.setdefault(name, {"step": [], "total": [], "total_ema": [], "cosine": [],
                                                "probe_loss": [], "groups": {}, "groups_ema": {}})
            if rec["step"] and step <= rec["step"][-1]:
                raise ValueError(f"step must increase: got {step} after {rec['step'][-1]} for probe {name!r}")
            n = len(rec["step"])
            rec["step"].append(int(step))
            rec["total_ema"].append(self._smooth(rec["total_ema"][-1] if n else None, r.total))
            rec["total"].append(r.total)
            rec["cosine"].append(r.cosine)
            rec["probe_loss"].append(r.probe_loss)
            for g in [*rec["groups"], *(g for g in r.groups if g not in rec["groups"])]:  # model order
                raw, ema = rec["groups"].setdefault(g, [None] * n), rec["groups_ema"].setdefault(g, [None] * n)
                value = r.groups.get(g, 0.0)
                ema.append(self._smooth(ema[-1] if n and ema[-1] is not None else None, value))
                raw.append(value)

    def to_dict(self) -> dict[str, Any]:
        """``{"every", "ema", "groups", "probes": {name: {"step", "total", "total_ema", "cosine", "probe_loss",
        "groups": {group: [...]}, "groups_ema": {...}}}}``, JSON-safe (for ``results.json``)."""
        return {"every": self.every, "ema": self.ema,
                "groups": self.groups if isinstance(self.groups, str) else getattr(self.groups, "__name__", "custom"),
                "probes": {k: {**v, "groups": {g: list(x) for g, x in v["groups"].items()},
                               "groups_ema": {g: list(x) for g, x in v["groups_ema"].items()}}
                           for k, v in self.probes.items()}}


def maybe_record(tracker: GEffectTracker | None, step: int, model: torch.nn.Module,
                 objective: Callable[[torch.nn.Module], Any] | str,
                 forget_probe: Mapping[str, torch.Tensor] | None,
                 retain_probe: Mapping[str, torch.Tensor] | None = None,
                 grad_scale: float = 1.0) -> dict[str, GEffect] | None:
    """The trainer's ``--g-effect-every N`` hook: when ``tracker`` is set and ``tracker.due(step)``, measure
    the G-effect of ``objective`` on the forget and retain probes (None ones skipped) and record it.

    Returns the ``{"forget": GEffect, "retain": GEffect}`` measured, or None when nothing was due.
    With ``objective="grad"`` call it after the step's last backward and before ``clip_grad_norm_`` /
    ``optimizer.step`` (see README.md, "G-effect").
    """
    if tracker is None or not tracker.due(step):
        return None
    probes = {k: v for k, v in (("forget", forget_probe), ("retain", retain_probe)) if v is not None}
    if not probes:
        return None
    results = g_effects(model, objective, probes, groups=tracker.groups, probe_loss=tracker.probe_loss,
                        eval_mode=tracker.eval_mode, grad_scale=grad_scale)
    tracker.record(step, results)
    return results


__all__ = ["GEffect", "GEffectTracker", "GROUP_BYS", "GroupBy", "OBJECTIVE_GRAD", "g_effect", "g_effects",
           "maybe_record", "merge_groups", "param_groups", "probe_nll", "unwrap_model"]
