"""FSDP2 (torch's ``fully_shard``, gloo, 2 CPU processes) on the objective module: parameters are sharded,
the loss -- which reads the sharded ``lm_head`` inside the module's forward -- and the gradients gathered by the
engine's hooks give, after two SGD steps with the global-count normalisation, the weights of one unsharded
process on the whole batch. (accelerate's FSDP plugin refuses a CPU-only machine, so the engine is driven
directly here; ``fastweight.train`` hands the same module to accelerate.)"""
from __future__ import annotations

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


def _batches():
    """Per step: the global forget and retain batches (4 rows each, ragged answers)."""
    out = []
    for step in range(STEPS):
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


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_objective_sharded_matches_one_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, 29561, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
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
