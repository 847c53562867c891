"""The FSDP2 and DDP probes of ``benchmarks.memory_scale`` (issue 21 item 8): one rank of a step on CPU (gloo).

Run by ``memory_scale.probe(..., regime="fsdp2x2" | "ddpx2")`` under ``torch.distributed.run``: every rank
builds the rung's Llama (fp32, full fine-tuning), wraps the module the trainer hands to ``accelerator.prepare``
(``fastweight``: the ``UnlearnObjective``; ``hf``: the policy with its deep-copied reference and the loss on
fp32 logits, as in the ZeRO-3 probe) and runs two AdamW steps (DDP: three, below) on the rung's batch (the
same batch on every rank, so the update is the one-process update; every step's loss is reported).
Each rank's peak resident growth is gathered; rank 0 prints them.

* ``fsdp``: accelerate's own ``fsdp2_prepare_model`` (``accelerate/utils/fsdp_utils.py``, accelerate 1.16),
  i.e. what ``accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
  --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer`` does to the objective: each decoder layer
  ``fully_shard``-ed as a unit (reshard after forward), then the root unit, which holds what is left:
  ``embed_tokens``, the final norm and ``lm_head`` (the objective has no ``get_input_embeddings``, so
  accelerate's embedding / tail carving does not apply). The plugin refuses a CPU-only machine in
  ``Accelerator()``, so the probe hands the function a minimal accelerator (plugin, no device mesh, no mixed
  precision). ``FSDP_WRAP=no_wrap`` measures the plugin's default instead (no auto-wrap policy: the whole
  objective one unit).
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` with accelerate's defaults (25 MiB buckets,
  ``gradient_as_bucket_view=False``, ``find_unused_parameters=False``), three steps: DDP rebuilds its buckets
  once, in the second step's forward (``Reducer._rebuild_buckets``, in the order the first backward's
  gradients became ready), and a fresh CPU buffer is resident only where written, so in the second step the
  buckets are not yet resident while the activations and logits are; from the third step on they are (the
  steady state, and what a GPU's caching allocator holds from the start).
"""
from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import torch


class HFStep(torch.nn.Module):
    """The Hugging Face way: the policy, its deep-copied reference (or None) and the loss on fp32 logits."""

    def __init__(self, model, ref, method: str):
        super().__init__()
        self.policy, self.ref, self.method = model, ref, method

    def forward(self, forget, retain=None):
        from benchmarks.memory_scale import _hf_loss

        return {"loss": _hf_loss(self.policy, self.ref, forget, retain, self.method)}


def fsdp2_shard(module, wrap: str = "transformer_based_wrap"):
    """``module`` sharded by accelerate's ``fsdp2_prepare_model`` with a plugin as the launcher builds it."""
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    kw = {"transformer_cls_names_to_wrap": ["LlamaDecoderLayer"]} if wrap == "transformer_based_wrap" else {}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=wrap, reshard_after_forward=True,
                                            cpu_ram_efficient_loading=False, **kw)
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, mixed_precision="no",
                          is_main_process=dist.get_rank() == 0, device=torch.device("cpu"))
    return fsdp2_prepare_model(acc, module)


def run_dist_probe(provider: str, method: str, rung, regime) -> dict | None:
    import torch.distributed as dist

    from benchmarks.memory_scale import _batch, _close_ranks, _reset_hwm, _rss, llama_config, regime_rung

    if regime.lora_r or regime.weight_bytes != 4 or regime.gradient_checkpointing:
        raise ValueError("the FSDP2 / DDP probes measure fp32 full fine-tuning only")
    if regime.engine not in ("fsdp", "ddp"):
        raise ValueError(f"regime.engine must be 'fsdp' or 'ddp', got {regime.engine!r}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import accelerate.utils.fsdp_utils  # noqa: F401 - imported before the baseline, like transformers
    from transformers import LlamaForCausalLM

    from fastweight.train.methods import build_method
    from fastweight.train.objective import RefLogpTable, UnlearnObjective

    rung = regime_rung(rung, regime)
    forget, retain = _batch(rung, 0), _batch(rung, 1)
    exact = _reset_hwm()
    base, _ = _rss()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(rung))
    numel = sum(p.numel() for p in model.parameters())
    if provider == "hf":
        ref = copy.deepcopy(model).eval().requires_grad_(False) if method == "npo" else None
        module = HFStep(model, ref, method)
    else:
        module = UnlearnObjective(model, build_method("npo") if method == "npo" else
                                  build_method("satimp", retain_loss="nll"))
    if regime.engine == "fsdp":
        wrapped = fsdp2_shard(module, os.environ.get("FSDP_WRAP", "transformer_based_wrap"))
        local = sum(p.to_local().numel() for p in model.parameters())
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(module, bucket_cap_mb=25, gradient_as_bucket_view=False)
        local = numel
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    if provider == "fastweight" and method == "npo":  # the reference table, by the wrapped module's forward
        table = RefLogpTable()
        with torch.no_grad():
            table.add(forget, "", wrapped(forget, mode="ref_logp")["logp"])
        module.set_ref(table)
    steps = 3 if regime.engine == "ddp" else 2  # DDP's steady state is its third step (module docstring)
    losses = []
    for _ in range(steps):
        loss = wrapped(forget, retain)["loss"] if method != "npo" or provider == "hf" else wrapped(forget)["loss"]
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    rss, hwm = _rss()
    del wrapped, module, model, opt, params, loss
    ranks = _close_ranks(hwm - base, local_params=local)
    if ranks is None:
        return None
    peaks = ranks["rank_peaks"]
    return {"provider": provider, "method": method, "rung": rung.name, "regime": regime.name,
            "peak_bytes": max(peaks), "rank_peaks": peaks, "params": numel, "trainable": numel,
            "local_params": ranks["local_params"], "steps": steps, "exact_hwm": exact, "loss": losses[-1],
            "losses": losses, "world": len(peaks), "threads": int(os.environ.get("OMP_NUM_THREADS", "1"))}
