"""G-effect (fastweight.analysis): against a direct computation (flatten both gradients, dot product in
float64), per-group sums, no side effects (weights, .grad, optimizer state, RNG, train flags), gradient
accumulation, accelerate and DDP, the tracker, the plots, errors, and the example script on a tiny model."""
from __future__ import annotations

import copy
import gc
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_err_close

from fastweight._constants import IGNORE_INDEX
from fastweight.analysis import (
    GEffect, GEffectTracker, g_effect, g_effects, maybe_record, merge_groups, param_groups, probe_nll,
)

V, H, L = 67, 32, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is ~100x faster than two on a loaded 2-core machine (no spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed: int = 0, tie: bool = False, dropout: float = 0.0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
                      attention_dropout=dropout)
    return LlamaForCausalLM(cfg).to(dtype)


def batch(seed: int, B: int = 3, T: int = 11, prompt: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[0, T - 2:] = 0  # right padding on one row
    labels[0, T - 2:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- independent reference: logits + F.cross_entropy, full autograd.grad, flatten, dot ----------------------
def ref_nll(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def ref_ga(model, b) -> torch.Tensor:  # gradient ascent: -NLL
    return -ref_nll(model, b)


def ref_weighted(model, b) -> torch.Tensor:  # a WGA-like objective with detached per-token weights p**2
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = logp.detach().exp() ** 2
    return (w * logp)[valid].sum() / valid.sum()  # = -tokmean(w * ell), minimised to forget


def ref_group(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if name == "model.norm.weight":
        return "final_norm"
    i, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", name).groups()
    kind = {"self_attn": "attn", "mlp": "mlp"}.get(rest.split(".")[0], "norm")
    return f"layers.{i}.{kind}"


def direct_g_effect(model, objective, probe) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """(total, per-group, |g_obj| |g_probe|), dot products in float64 of the two flattened gradients."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    g1 = torch.autograd.grad(objective(model, probe["obj"]), params, allow_unused=True)
    g2 = torch.autograd.grad(ref_nll(model, probe["probe"]), params, allow_unused=True)
    g1 = [torch.zeros_like(p) if g is None else g for g, p in zip(g1, params)]
    g2 = [torch.zeros_like(p) if g is None else g for g, p in zip(g2, params)]
    flat1 = torch.cat([g.reshape(-1) for g in g1]).double()
    flat2 = torch.cat([g.reshape(-1) for g in g2]).double()
    groups: dict[str, torch.Tensor] = {}
    for n, a, b in zip(names, g1, g2):
        key = ref_group(n)
        groups[key] = groups.get(key, 0.0) + (a.double() * b.double()).sum()
    return flat1 @ flat2, groups, float(flat1.norm() * flat2.norm())


@pytest.mark.parametrize("objective", [ref_ga, ref_weighted], ids=["ga", "weighted"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_matches_direct_computation(objective, tie):
    model = tiny_llama(tie=tie)
    forget, probe = batch(1), batch(2)
    r = g_effect(model, lambda m: objective(m, forget), probe)
    inputs = {"obj": forget, "probe": probe}
    gt, gt_groups, scale = direct_g_effect(copy.deepcopy(model).double(), objective, inputs)
    naive, naive_groups, _ = direct_g_effect(model, objective, inputs)
    naive = naive.float().double()  # the fp32 gradients' dot, as a float32 result
    assert list(r.groups) == list(gt_groups), "group names / model order"
    assert_err_close(torch.tensor(r.total, dtype=torch.float64), gt, naive, dtype=torch.float32, k=2.0, c=16.0,
                     scale=scale, name="total")
    impl_g = torch.tensor([r.groups[k] for k in gt_groups], dtype=torch.float64)
    gt_g = torch.stack([gt_groups[k] for k in gt_groups])
    naive_g = torch.stack([naive_groups[k] for k in gt_groups])
    assert_err_close(impl_g, gt_g, naive_g, dtype=torch.float32, k=2.0, c=16.0, scale=scale, name="groups")
    if tie:
        assert "head" not in r.groups  # one tied parameter, reported once under "embed"
    # the norms
    assert r.objective_norm * r.probe_norm == pytest.approx(scale, rel=1e-4)
    assert -1.0 <= r.cosine <= 1.0
    assert r.probe_loss == pytest.approx(float(ref_nll(model, probe).detach()), rel=1e-5)


def test_ga_on_its_own_batch_is_minus_squared_norm():
    """GA probed on its own forget batch: G = -|grad NLL|^2 in every group (the paper's sanity case)."""
    model = tiny_llama()
    b = batch(3)
    r = g_effect(model, lambda m: -probe_nll(m, b), b)
    assert r.total == pytest.approx(-r.probe_norm ** 2, rel=1e-5)
    assert r.objective_norm == pytest.approx(r.probe_norm, rel=1e-5)
    assert r.cosine == pytest.approx(-1.0, abs=1e-5)
    assert all(v <= 0 for v in r.groups.values())


def test_group_sums_add_up():
    model = tiny_llama()
    r = g_effect(model, lambda m: ref_weighted(m, batch(4)), batch(5))
    assert sum(r.groups.values()) == pytest.approx(r.total, rel=1e-12, abs=1e-300)
    assert sum(r.by_param.values()) == pytest.approx(r.total, rel=1e-12)
    for by in ("block", "kind", "param"):
        assert sum(r.regroup(by).values()) == pytest.approx(r.total, rel=1e-12)
    assert list(r.regroup("block")) == ["embed", *(f"layers.{i}" for i in range(L)), "final_norm", "head"]
    assert list(r.regroup("kind")) == ["embed", "attn", "mlp", "norm", "head"]
    assert r.regroup(ref_group) == pytest.approx(r.groups)
    # groups= at measurement time gives the same numbers as regroup afterwards
    rb = g_effect(model, lambda m: ref_weighted(m, batch(4)), batch(5), groups="block")
    assert rb.groups == pytest.approx(r.regroup("block"), rel=1e-6)
    assert merge_groups({"layers.0.attn": 1.0, "layers.0.mlp": 2.0, "final_norm": 4.0}, "kind") == \
        {"attn": 1.0, "mlp": 2.0, "norm": 4.0}


def test_frozen_parameters_are_excluded():
    model = tiny_llama()
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1." in n)
    assert set(param_groups(model).values()) == {"layers.1.attn", "layers.1.mlp", "layers.1.norm"}
    r = g_effect(model, lambda m: ref_ga(m, batch(1)), batch(2))
    assert set(r.by_param) == {n for n, p in model.named_parameters() if p.requires_grad}
    gt, _, _ = direct_g_effect(model, ref_ga, {"obj": batch(1), "probe": batch(2)})
    assert r.total == pytest.approx(float(gt), rel=1e-4)


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
            copy.deepcopy(opt.state_dict()), [m.training for m in model.modules()])


def _assert_same(model, opt, snap):
    weights, grads, opt_state, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), f"weight {k} changed"
    for n, p in model.named_parameters():
        ref, val = grads[n]
        assert p.grad is ref, f"{n}.grad was replaced"
        if val is not None:
            assert torch.equal(p.grad, val), f"{n}.grad changed"
    now = opt.state_dict()
    for i, st in opt_state["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(now["state"][i][k]), torch.as_tensor(v)), f"optimizer state {k}"
    assert [m.training for m in model.modules()] == modes
    assert all(not p._backward_hooks for p in model.parameters()), "hooks left on parameters"


@pytest.mark.parametrize("eval_mode", [True, False], ids=["eval", "train"])
@pytest.mark.parametrize("objective", ["callable", "grad"])
def test_no_side_effects(objective, eval_mode):
    model = tiny_llama(dropout=0.3)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_ga(model, batch(1)).backward()
    opt.step()  # optimizer state exists
    opt.zero_grad(set_to_none=False)
    ref_ga(model, batch(2)).backward()  # accumulated gradient in .grad
    snap = _snapshot(model, opt)
    torch.manual_seed(123)
    expected_rand = torch.rand(5)
    torch.manual_seed(123)
    obj = (lambda m: ref_ga(m, batch(2))) if objective == "callable" else "grad"
    g_effects(model, obj, {"forget": batch(2), "retain": batch(6)}, eval_mode=eval_mode)  # train: dropout draws
    assert torch.equal(torch.rand(5), expected_rand), "global RNG advanced"
    _assert_same(model, opt, snap)
    assert model.training


def test_grad_mode_and_accumulation():
    """Under gradient accumulation: measuring between micro-batches leaves the final .grad bit-identical, and
    ``"grad"`` on the accumulated gradient equals the callable objective (mean of the micro-batch losses)."""
    b1, b2, probe = batch(1), batch(2), batch(7)

    def accumulate(model, measure):
        (ref_ga(model, b1) / 2).backward()
        if measure:
            mid = g_effect(model, "grad", probe)
            assert mid.total == pytest.approx(g_effect(model, lambda m: ref_ga(m, b1) / 2, probe).total, rel=1e-4)
        (ref_ga(model, b2) / 2).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, measured = tiny_llama(), tiny_llama()
    g_plain, g_meas = accumulate(plain, False), accumulate(measured, True)
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_meas))
    from_grad = g_effect(measured, "grad", probe)
    from_fn = g_effect(measured, lambda m: (ref_ga(m, b1) + ref_ga(m, b2)) / 2, probe)
    assert from_grad.total == pytest.approx(from_fn.total, rel=1e-4)
    assert from_grad.objective_loss is None and from_fn.objective_loss is not None
    # fp16-style loss scaling: grads carry a factor, grad_scale divides it out
    for p in measured.parameters():
        p.grad.mul_(1024.0)
    scaled = g_effect(measured, "grad", probe, grad_scale=1024.0)
    assert scaled.total == pytest.approx(from_grad.total, rel=1e-6)
    assert scaled.objective_norm == pytest.approx(from_grad.objective_norm, rel=1e-6)


_RSS_SCRIPT = """
import resource, torch
torch.set_num_threads(1)
from fastweight.analysis import g_effect
torch.manual_seed(0)
width, depth = 1024, 16  # 16 x 4 MiB weights: 64 MiB of parameters, no single one large
model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(depth)])
x = torch.randn(2, width)
loss_fn = lambda m, b: (m(b["x"]) ** 2).mean()
loss_fn(model, {"x": x}).backward()  # .grad present: the "grad" objective
for objective in ("grad", lambda m: (m(x) ** 3).mean()):  # ru_maxrss only grows: the cheaper mode first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g_effect(model, objective, {"x": -x}, probe_loss=loss_fn)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_peak_memory_at_most_one_gradient_copy():
    """Peak RSS growth while measuring, in a fresh process: ~0 gradient copies with "grad", ~1 with a callable
    objective (its gradient), never the probe's gradient as well. A fixed mmap threshold makes glibc return
    freed 4 MiB blocks to the OS, so the peak RSS tracks live memory."""
    import os
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    grad_mb, callable_mb = (float(v) for v in out.stdout.split()[-2:])
    assert grad_mb < 16.0, f"'grad': peak RSS grew by {grad_mb:.1f} MiB (parameters: 64 MiB; expected ~0 copies)"
    assert callable_mb < 80.0, f"callable: peak RSS grew by {callable_mb:.1f} MiB (expected ~1 copy of 64 MiB)"


def test_eval_mode_is_deterministic_with_dropout():
    model = tiny_llama(dropout=0.5).train()
    f = lambda m: ref_ga(m, batch(1))  # noqa: E731
    a, b = g_effect(model, f, batch(2)), g_effect(model, f, batch(2))
    assert a.total == b.total
    assert model.training
    c = g_effect(model, f, batch(2), eval_mode=False)
    assert c.total != a.total  # dropout active: a different (noisy) measurement


def _train(model, opt, acc, batches, probe, measure_at):
    from_grad, from_fn = GEffectTracker(every=1), GEffectTracker(every=1)
    for i, b in enumerate(batches):
        with acc.accumulate(model):
            acc.backward(ref_ga(model, b))
            if i in measure_at:
                maybe_record(from_grad, i + 1, model, "grad", probe, batch(8))
                maybe_record(from_fn, i + 1, model, lambda m: ref_ga(m, b), probe)
            opt.step()
            opt.zero_grad()
    return from_grad, from_fn


def test_accelerate_prepared_model():
    from accelerate import Accelerator

    batches = [batch(s) for s in (1, 2, 3, 4)]
    runs = []
    for measure_at in ((), (0, 1, 2)):
        acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = tiny_llama()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model, opt = acc.prepare(model, opt)
        tracker = _train(model, opt, acc, batches, batch(9), set(measure_at))
        runs.append((acc.unwrap_model(model), tracker))
    for (n, a), b in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b), f"measuring changed training: {n}"
    from_grad, from_fn = (t.to_dict()["probes"] for t in runs[1][1])
    assert from_grad["forget"]["step"] == [1, 2, 3] and from_grad["retain"]["step"] == [1, 2, 3]
    assert "retain" not in from_fn
    # at step 1 (first micro-batch of an accumulation of 2) .grad holds b1's loss / 2; at step 2 it holds both
    assert from_grad["forget"]["total"][0] == pytest.approx(from_fn["forget"]["total"][0] / 2, rel=1e-4)
    assert from_grad["forget"]["total"][1] != pytest.approx(from_fn["forget"]["total"][1] / 2, rel=1e-2)


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    def train(measure):  # DDP objects live in this frame only: freed before the process group is destroyed
        inner = tiny_llama()
        model = DDP(inner)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step, b in enumerate((batch(1), batch(2), batch(3))):
            if step == 1:  # the DDP forward/backward path, then a measurement, then another step
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = F.cross_entropy(out[:, :-1].reshape(-1, V), b["labels"][:, 1:].reshape(-1))
            else:
                loss = ref_ga(model.module, b)
            loss.backward()
            if measure:
                r = g_effect(model, "grad", batch(9))
                assert r.total == pytest.approx(g_effect(inner, "grad", batch(9)).total, rel=1e-12)
            opt.step()
            opt.zero_grad()
        return {k: v.clone() for k, v in inner.state_dict().items()}

    try:
        finals = [train(False), train(True)]
    finally:
        gc.collect()
        dist.destroy_process_group()
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), f"measuring under DDP changed training: {k}"


def test_method_objective_and_fused_probe():
    """A real method from ``build_method`` as the objective (MethodOutput accepted) and ``probe_nll`` (fused
    hidden-state head) equal to the logits + cross-entropy reference."""
    from fastweight.train.methods import build_method

    model = tiny_llama()
    method = build_method("ga")
    forget, probe = batch(1), batch(2)
    r = g_effect(model, lambda m: method(m, forget), probe)
    gt, _, _ = direct_g_effect(model, ref_ga, {"obj": forget, "probe": probe})
    assert r.total == pytest.approx(float(gt), rel=1e-4)
    assert float(probe_nll(model, probe).detach()) == pytest.approx(float(ref_nll(model, probe).detach()), rel=1e-5)
    r2 = g_effect(model, lambda m: method(m, forget).loss, probe)  # a tensor or a MethodOutput: the same
    assert r2.total == r.total


def test_probe_without_labels_is_zero():
    model = tiny_llama()
    empty = dict(batch(2), labels=torch.full((3, 11), IGNORE_INDEX))
    r = g_effect(model, lambda m: ref_ga(m, batch(1)), empty)
    assert r.total == 0.0 and r.probe_norm == 0.0 and all(v == 0.0 for v in r.groups.values())


# ---- tracker --------------------------------------------------------------------------------------------
def _fake(total: float, groups: dict[str, float]) -> GEffect:
    return GEffect(total=total, groups=groups, by_param={}, objective_norm=2.0, probe_norm=1.0, probe_loss=0.5)


def test_tracker_ema_and_dict():
    t = GEffectTracker(every=2, ema=0.6)
    assert [t.due(s) for s in range(5)] == [True, False, True, False, True]
    t.record(2, {"forget": _fake(-1.0, {"a": -1.0}), "retain": _fake(3.0, {"a": 3.0})})
    t.record(4, {"forget": _fake(-2.0, {"a": -1.5, "b": -0.5})})
    d = json.loads(json.dumps(t.to_dict()))
    f = d["probes"]["forget"]
    assert f["step"] == [2, 4] and f["total"] == [-1.0, -2.0]
    assert f["total_ema"] == pytest.approx([-1.0, 0.6 * -1.0 + 0.4 * -2.0])
    assert f["groups"] == {"a": [-1.0, -1.5], "b": [None, -0.5]}
    assert f["groups_ema"]["a"] == pytest.approx([-1.0, -1.2]) and f["groups_ema"]["b"] == [None, -0.5]
    assert f["cosine"] == [-0.5, -1.0]
    assert d["probes"]["retain"]["step"] == [2] and d["ema"] == 0.6 and d["every"] == 2
    with pytest.raises(ValueError, match="step"):
        t.record(4, {"forget": _fake(0.0, {})})
    assert GEffectTracker(ema=0.0)._smooth(5.0, 1.0) == 1.0


def test_maybe_record_skips_when_not_due():
    model = tiny_llama()
    t = GEffectTracker(every=3)
    assert maybe_record(None, 3, model, "grad", batch(1)) is None
    assert maybe_record(t, 2, model, lambda m: ref_ga(m, batch(1)), batch(1), batch(2)) is None
    out = maybe_record(t, 3, model, lambda m: ref_ga(m, batch(1)), batch(1), batch(2))
    assert set(out) == {"forget", "retain"} and t.to_dict()["probes"]["forget"]["step"] == [3]


# ---- plots ----------------------------------------------------------------------------------------------
def test_plots_write_pngs(tmp_path):
    from fastweight.analysis.plots import plot_compare, plot_curves, plot_heatmap, save_g_effect_plots

    model = tiny_llama()
    trackers = {}
    for name, sign in (("ga", 1.0), ("weighted", 0.5)):
        t = GEffectTracker()
        for step in (1, 2, 3):
            maybe_record(t, step, model, lambda m: sign * ref_ga(m, batch(step)), batch(1), batch(2))
        trackers[name] = t.to_dict()
    paths = [plot_curves(trackers, tmp_path / "curves.png"),
             plot_curves(trackers["ga"], tmp_path / "one.png", smoothed=False),
             plot_heatmap(trackers["ga"], tmp_path / "heat.png", probe="retain"),
             plot_compare(trackers, tmp_path / "compare.png"),
             *save_g_effect_plots(trackers["ga"], tmp_path / "run")]
    assert sorted(p.name for p in paths[4:]) == ["g_effect_curves.png", "g_effect_layers_forget.png",
                                                 "g_effect_layers_retain.png"]
    assert save_g_effect_plots(GEffectTracker().to_dict(), tmp_path / "empty") == []
    import matplotlib.image

    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(p).shape[0] > 100
    with pytest.raises(ValueError, match="probe"):
        plot_heatmap(trackers["ga"], tmp_path / "x.png", probe="nope")


def test_compare_figure_reads_right():
    """An overall title, x labels on every panel, and one colour scale for all runs: an objective 1000x weaker
    stays pale instead of being stretched to full colour row by row."""
    from fastweight.analysis.plots import compare_figure

    model = tiny_llama()
    trackers = {}
    for name, sign in (("ga", 1.0), ("weak", 1e-3)):
        t = GEffectTracker()
        for step in (1, 2):
            maybe_record(t, step, model, lambda m: sign * ref_ga(m, batch(step)), batch(1), batch(2))
        trackers[name] = t.to_dict()
    fig = compare_figure(trackers)
    assert fig._suptitle is not None and "G-effect" in fig._suptitle.get_text()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert panels and all(ax.get_xlabel() for ax in panels)
    heat = [ax for ax in panels if ax.images]
    for ax in heat:
        data = ax.images[0].get_array()
        norm = ax.images[0].norm
        strong, weak = abs(data[0]).max(), abs(data[1]).max()
        assert norm.vmax >= strong > 100 * weak  # one shared scale: the weak row is not rescaled to 1


# ---- errors ---------------------------------------------------------------------------------------------
def test_errors():
    model = tiny_llama()
    b = batch(1)
    with pytest.raises(TypeError, match="model"):
        g_effect("not a model", "grad", b)
    with pytest.raises(ValueError, match="objective"):
        g_effect(model, "gradient", b)
    with pytest.raises(ValueError, match="objective"):
        g_effect(model, lambda m: torch.ones(3, requires_grad=True), b)
    with pytest.raises(ValueError, match="probe batch"):
        g_effect(model, "grad", {"input_ids": b["input_ids"]})
    with pytest.raises(ValueError, match="probes"):
        g_effects(model, "grad", {})
    with pytest.raises(ValueError, match="grad_scale"):
        g_effect(model, "grad", b, grad_scale=0.0)
    with pytest.raises(ValueError, match="grad_scale"):
        g_effect(model, lambda m: ref_ga(m, b), b, grad_scale=2.0)
    with pytest.raises(ValueError, match="groups"):
        g_effect(model, "grad", b, groups="layers")
    with pytest.raises(ValueError, match="every"):
        GEffectTracker(every=0)
    with pytest.raises(ValueError, match="ema"):
        GEffectTracker(ema=1.0)
    with pytest.raises(ValueError, match="groups"):
        GEffectTracker(groups="nope")
    with pytest.raises(TypeError, match="results"):
        GEffectTracker().record(1, {"forget": 1.0})
    with pytest.raises(ValueError, match="by"):
        merge_groups({}, "auto")
    with pytest.raises(TypeError, match="groups"):
        param_groups(model, lambda name: 3)
    r = g_effect(model, lambda m: ref_ga(m, b), b)
    with pytest.raises(ValueError, match="groups"):
        r.regroup(42)
    from fastweight.analysis.plots import layer_profile, plot_curves, plot_heatmap

    rec = GEffectTracker().to_dict()
    with pytest.raises(ValueError, match="yscale"):
        plot_curves(rec, "x.png", yscale="log")
    with pytest.raises(ValueError, match="by"):
        layer_profile(rec, "forget", by="layer")
    with pytest.raises(ValueError, match="records"):
        plot_curves({"run": {"no": "probes"}}, "x.png")
    with pytest.raises(ValueError, match="probe"):
        plot_heatmap(rec, "x.png", probe="forget")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        g_effect(model, "grad", b)


# ---- the example, end to end on a tiny saved model ------------------------------------------------------
def test_example_runs_on_tiny_model(tmp_path, monkeypatch):
    from fastweight.data.synth_tofu import generate_tofu
    from fastweight.train.models import save_tiny_model

    data = generate_tofu(seed=0, n_authors=2, questions_per_author=1)
    texts = [r["question"] + " " + r["answer"] for k in ("real_authors", "world_facts") for r in data[k]]
    folder = save_tiny_model(tmp_path / "tiny", texts)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import g_effect_compare
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    g_effect_compare.main(["--model", str(folder), "--steps", "2", "--n-forget", "3",
                           "--n-retain", "3", "--methods", "ga,wga,satimp,npo", "--output-dir", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert set(res["g_effect"]) == {"ga", "wga", "satimp", "npo"}
    ga = res["g_effect"]["ga"]["probes"]["forget"]
    assert ga["step"] == [1, 2] and ga["total"][0] < 0  # GA on its own forget set: G = -|grad|^2 < 0
    assert (out / "g_effect_compare.png").read_bytes()[:4] == b"\x89PNG"
