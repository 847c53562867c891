"""FSDP2 (torch's ``fully_shard``, gloo, 2 CPU processes) on the objective module: parameters are sharded,
the loss -- which reads the sharded ``lm_head`` inside the module's forward -- and the gradients gathered by the
engine's hooks give, after two SGD steps with the global-count normalisation, the weights of one unsharded
process on the whole batch; and a checkpoint of the sharded module and its AdamW state, written and read by
``fastweight.train.checkpoint`` (full tensors gathered on rank 0, broadcast back on resume), continues bit for
bit. (accelerate's FSDP plugin refuses a CPU-only machine, so the engine is driven directly here;
``fastweight.train`` hands the same module to accelerate.)"""
from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastweight._constants import IGNORE_INDEX
from fastweight.train.methods import build_method
from fastweight.train.objective import UnlearnObjective

transformers = pytest.importorskip("transformers")
V, STEPS, LR = 53, 2, 0.05


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _batches(steps=STEPS):
    """Per step: the global forget and retain batches (4 rows each, ragged answers)."""
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        pair = []
        for _ in range(2):
            ids = torch.randint(0, V, (4, 10), generator=g)
            labels = ids.clone()
            labels[:, :3] = IGNORE_INDEX
            for r in range(4):
                labels[r, 10 - r:] = IGNORE_INDEX  # different token counts per row
            pair.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        out.append(pair)
    return out


def _norm(method, forget, retain, world):
    return {"forget": method.count_units(forget, "forget") / world, "retain": method.count_units(retain, "retain")
            / world, "local": 1}


def _in_group(body, rank, world, port, out_dir):
    """Spawned process: join the gloo group, run ``body(rank, world, out_dir)``, leave the group. The body's
    objects (FSDP modules, their meshes) are freed before the group is destroyed, never after."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body(rank, world, out_dir)
        gc.collect()
    finally:
        dist.destroy_process_group()


def _worker(rank, world, out_dir):
    from torch.distributed.fsdp import fully_shard

    method = build_method("ga", retain_loss="nll")
    obj = UnlearnObjective(_model(), method)
    for layer in obj.policy.model.layers:
        fully_shard(layer)
    fully_shard(obj)  # the root group holds embed_tokens, norm and lm_head
    full = sum(p.numel() for p in obj.parameters())
    local = sum(p.to_local().numel() for p in obj.parameters())
    opt = torch.optim.SGD(obj.parameters(), lr=LR)
    for forget, retain in _batches():
        norm = _norm(method, forget, retain, 1)  # global counts (whole batch) ...
        norm = {k: v / world if k != "local" else v for k, v in norm.items()}  # ... per process share
        mine = lambda b: {k: v[rank::world] for k, v in b.items()}  # noqa: E731
        out = obj(mine(forget), mine(retain), norm)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    weights = {n: p.full_tensor().detach().clone() for n, p in obj.policy.named_parameters()}
    torch.save({"local": local, "full": full, "weights": weights}, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn(worker, port, tmp_path, world=2):
    """Run ``worker(rank, world, out_dir)`` on ``world`` spawned gloo processes; all must exit 0."""
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_in_group, args=(worker, r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0

@pytest.mark.slow
def test_fsdp2_objective_sharded_matches_one_process(tmp_path):
    _spawn(_worker, 29561, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    got = results[0]["weights"]
    for r in results:
        assert 0 < r["local"] < r["full"]  # each process holds a shard
    method = build_method("ga", retain_loss="nll")
    obj = UnlearnObjective(_model(), method)
    opt = torch.optim.SGD(obj.parameters(), lr=LR)
    for forget, retain in _batches():
        obj(forget, retain, _norm(method, forget, retain, 1))["loss"].backward()
        opt.step()
        opt.zero_grad()
    for n, p in obj.policy.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)


def _sharded_objective(method):
    from torch.distributed.fsdp import fully_shard

    obj = UnlearnObjective(_model(), method)
    for layer in obj.policy.model.layers:
        fully_shard(layer)
    fully_shard(obj)
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.2 * s)
    return obj, opt, sched


def _resume_worker(rank, world, out_dir):
    """Steps 1-3 uninterrupted, checkpoint after step 1; a fresh sharded module + AdamW resumes from it."""
    from types import SimpleNamespace
    from pathlib import Path

    from fastweight.train.checkpoint import is_fsdp, load_checkpoint, save_checkpoint

    acc = SimpleNamespace(is_main_process=rank == 0, process_index=rank, num_processes=world,
                          wait_for_everyone=dist.barrier)
    method = build_method("ga", retain_loss="nll")
    batches = _batches(3)

    def step(obj, opt, sched, forget, retain):
        norm = {k: v / world if k != "local" else v for k, v in _norm(method, forget, retain, 1).items()}
        mine = lambda b: {k: v[rank::world] for k, v in b.items()}  # noqa: E731
        obj(mine(forget), mine(retain), norm)["loss"].backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    def full(obj):
        return {n: p.full_tensor().detach().clone() for n, p in obj.named_parameters()}

    obj, opt, sched = _sharded_objective(method)
    assert is_fsdp(obj)
    step(obj, opt, sched, *batches[0])
    at_cut = full(obj)
    ckpt = save_checkpoint(acc, Path(out_dir), {"global_step": 1, "epoch": 0, "batch_in_epoch": 1},
                           policy=obj.policy, optimizer=opt, scheduler=sched, method=None, module=obj)
    for b in batches[1:]:
        step(obj, opt, sched, *b)
    uninterrupted = full(obj)

    obj2, opt2, sched2 = _sharded_objective(method)
    state = load_checkpoint(acc, ckpt, policy=obj2.policy, optimizer=opt2, scheduler=sched2, method=None,
                            module=obj2)
    loaded = full(obj2)
    for b in batches[1:]:
        step(obj2, opt2, sched2, *b)
    torch.save({"state": state, "at_cut": at_cut, "loaded": loaded, "uninterrupted": uninterrupted,
                "resumed": full(obj2), "lr": sched2.get_last_lr()[0], "lr_want": sched.get_last_lr()[0]},
               os.path.join(out_dir, f"resume{rank}.pt"))


@pytest.mark.slow
def test_fsdp2_checkpoint_resume_is_exact(tmp_path):
    """FSDP2 on 2 gloo processes, AdamW: the checkpoint holds the full trainable weights and optimizer state
    (safetensors + a weights_only tensor file); a fresh sharded module resumed from it continues bit for bit."""
    from safetensors.torch import load_file

    _spawn(_resume_worker, 29563, tmp_path)
    ckpt = tmp_path / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.pt", "rng-0.safetensors",
                                                      "rng-1.safetensors", "trainer_state.json"]
    weights = load_file(str(ckpt / "model.safetensors"))
    osd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for r in range(2):
        res = torch.load(tmp_path / f"resume{r}.pt", weights_only=True)
        assert res["state"]["global_step"] == 1 and res["lr"] == res["lr_want"]
        assert set(weights) == set(res["at_cut"])  # every trainable tensor, full size
        for n, t in res["at_cut"].items():
            assert torch.equal(weights[n], t) and torch.equal(res["loaded"][n], t), n
        for n, t in res["uninterrupted"].items():
            assert torch.equal(res["resumed"][n], t), n
        assert not torch.equal(res["uninterrupted"]["policy.lm_head.weight"], res["at_cut"]["policy.lm_head.weight"])
    assert {k for s in osd["state"].values() for k in s} >= {"exp_avg", "exp_avg_sq", "step"}


# --- output layer as its own FSDP2 unit (torchtitan's layout) -----------------------------------------------------
def _wrapped(layout):
    """The model sharded as ``layout``: "root" (lm_head in the root unit) or "separate" (fully_shard(lm_head) on
    its own, then the layers, then the root)."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    if layout == "separate":
        fully_shard(model.lm_head)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _route_loss(route, model, forget, retain):
    if route == "patch":  # fastweight.patch: model(..., labels=...).loss
        return model(**forget).loss
    # UnlearnTrainer.compute_loss's call on an FSDP2 model: the method inside the root's forward
    method = build_method("gd", retain_loss="nll")
    return model(fastweight_run=lambda hf: method(hf, forget, retain).loss)["loss"]


def _head_unit_worker(rank, world, out_dir):
    import fastweight

    forget, retain = _batches(1)[0]
    out = {}
    for layout in ("root", "separate"):
        for route in ("patch", "method"):
            model = _wrapped(layout)
            fastweight.patch(model, "satimp")  # the trainer patches too (the fastweight_run hook)
            for _ in range(2):  # a second step: the lm_head unit was resharded after the first backward
                model.zero_grad()
                loss = _route_loss(route, model, forget, retain)
                loss.backward()
            out[f"{layout}-{route}"] = {"loss": loss.detach(), "grads": {
                n: p.grad.full_tensor().detach().clone() for n, p in model.named_parameters()}}
            del model
    torch.save(out, os.path.join(out_dir, f"head{rank}.pt"))


@pytest.mark.slow
def test_fsdp2_output_layer_as_its_own_unit(tmp_path):
    """patch and the method path (what UnlearnTrainer runs) under FSDP2 with lm_head in the root unit and as its
    own unit: the loss and the gradients gathered from the shards equal one unsharded process (same batch on
    both ranks, so the averaged gradient is the single-process one). The separate unit failed with 'mixed
    torch.Tensor and DTensor' before the fused loss gathered lm_head through the unit's own unshard()."""
    import fastweight

    _spawn(_head_unit_worker, 29565, tmp_path)
    forget, retain = _batches(1)[0]
    for route in ("patch", "method"):
        model = fastweight.patch(_model(), "satimp")
        loss = _route_loss(route, model, forget, retain)
        loss.backward()
        for r in range(2):
            res = torch.load(tmp_path / f"head{r}.pt", weights_only=True)
            for layout in ("root", "separate"):
                got = res[f"{layout}-{route}"]
                torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
                for n, p in model.named_parameters():
                    torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{layout}-{route} {n}: {m}")


def test_transformer_based_wrap_without_a_class_wraps_each_decoder_layer():
    """``--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP`` without a layer class: accelerate reads the prepared
    module's ``_no_split_modules``; the objective carries its policy's, so each decoder layer becomes a unit
    (before: no attribute, nothing wrapped but the root, the whole model one unit on every rank)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from helpers import tiny_llama_lm

    model = tiny_llama_lm(50)
    objective = UnlearnObjective(model, build_method("npo"))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, objective)
    wrapped = [m for m in objective.modules() if policy(m)]
    assert wrapped == list(model.model.layers)
    assert UnlearnObjective(torch.nn.Linear(2, 2)).__dict__.get("_no_split_modules") is None
