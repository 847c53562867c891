"""The ZeRO-3 probe of ``benchmarks.memory_scale`` (issue 21 item 8): one rank of a DeepSpeed ZeRO-3 step on CPU.

Run by ``memory_scale.probe(..., regime="zero3x2")`` under ``torch.distributed.run`` with ``DS_ACCELERATOR=cpu``:
every rank builds the rung's Llama inside ``deepspeed.zero.Init`` (partitioned as it is created, as
transformers' ``HfDeepSpeedConfig`` does), hands the objective module and a torch AdamW to
``deepspeed.initialize`` (what ``accelerate.prepare`` does under DeepSpeed) and runs two optimizer steps.
Bucket sizes are the values transformers' Trainer fills for ``"auto"``: ``reduce_bucket_size`` H^2,
``stage3_prefetch_bucket_size`` 0.9 H^2, ``stage3_param_persistence_threshold`` 10 H. Each rank's peak
resident growth is gathered; rank 0 prints them (the others print nothing).
"""
from __future__ import annotations

import os


def zero3_config(rung, micro_batch: int) -> dict:
    h = rung.hidden
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": False}, "fp16": {"enabled": False},
            "zero_optimization": {"stage": 3, "reduce_bucket_size": h * h,
                                  "stage3_prefetch_bucket_size": int(0.9 * h * h),
                                  "stage3_param_persistence_threshold": 10 * h}}


def run_zero3_probe(provider: str, method: str, rung, regime) -> dict | None:
    import torch
    import torch.distributed as dist

    from benchmarks.memory_scale import _batch, _close_ranks, _hf_loss, _reset_hwm, _rss, llama_config, regime_rung

    if regime.lora_r or regime.weight_bytes != 4 or regime.gradient_checkpointing:
        raise ValueError("the ZeRO-3 probe measures fp32 full fine-tuning only")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import deepspeed
    from transformers import LlamaForCausalLM

    from fastweight.train.methods import build_method
    from fastweight.train.objective import RefLogpTable, UnlearnObjective

    rung = regime_rung(rung, regime)
    forget, retain = _batch(rung, 0), _batch(rung, 1)
    config = zero3_config(rung, rung.batch)
    exact = _reset_hwm()
    base, _ = _rss()
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = LlamaForCausalLM(llama_config(rung))
        ref = LlamaForCausalLM(llama_config(rung)) if provider == "hf" and method == "npo" else None

    class HFStep(torch.nn.Module):  # the Hugging Face way; the reference copy sharded like the policy
        def __init__(self):
            super().__init__()
            self.policy, self.ref = model, ref
            if ref is not None:
                ref.requires_grad_(False).eval()

        def forward(self, f, r):
            return {"loss": _hf_loss(self.policy, self.ref, f, r, method)}

    if provider == "hf":
        module = HFStep()
    else:
        module = UnlearnObjective(model, build_method("npo") if method == "npo" else
                                  build_method("satimp", retain_loss="nll"))
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(params, lr=1e-5), config=config)
    if provider == "fastweight" and method == "npo":  # the reference table, by the engine's forward
        table = RefLogpTable()
        with torch.no_grad():
            table.add(forget, "", engine(forget, mode="ref_logp")["logp"])
        module.set_ref(table)
    for _ in range(2):
        loss = engine(forget, retain)["loss"] if provider == "hf" or method != "npo" else engine(forget)["loss"]
        engine.backward(loss)
        engine.step()
    rss, hwm = _rss()
    numel = sum(p.ds_numel for p in model.parameters())
    ranks = _close_ranks(hwm - base)
    if ranks is None:
        return None
    peaks = ranks["rank_peaks"]
    return {"provider": provider, "method": method, "rung": rung.name, "regime": regime.name,
            "peak_bytes": max(peaks), "rank_peaks": peaks, "params": numel, "trainable": numel,
            "exact_hwm": exact, "loss": float(loss), "world": len(peaks),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "1"))}
