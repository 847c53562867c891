"""Worker for tests/test_integrations_zero3.py: ``UnlearnTrainer`` under DeepSpeed ZeRO-3 on CPU processes.

Run with ``DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 <this file> OUT CASE...``
(or with one process and no launcher for the reference run, ``WORLD_SIZE`` unset: no DeepSpeed). Each case
trains a tiny Llama for 2 optimizer steps (per-device batch 1; 2 processes x accumulation 1, or 1 process x
accumulation 2: the same global batch) and writes ``OUT/<case>-<world>.json`` (logged step losses) and
``OUT/<case>-<world>.safetensors`` (final weights, gathered from the ZeRO-3 shards).
"""
import json
import os
import sys
from pathlib import Path

import torch

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
if WORLD > 1:
    # CPU-only DeepSpeed (as tests/_dist_worker.py): the gloo process group first, then the Trainer's
    # Accelerator reads the DeepSpeed config from TrainingArguments.
    # TrainingArguments(deepspeed=...) would rebuild the state without cpu=True (no gloo group, world size 1):
    # it reuses this one with use_configured_state, which must read as DeepSpeed.
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED

import transformers  # noqa: E402

from fastweight._constants import IGNORE_INDEX  # noqa: E402
from fastweight.integrations.trainer import UnlearnTrainer, add_reference_logprobs  # noqa: E402
from helpers import tiny_llama_lm  # noqa: E402  (tests/ is this script's folder, first on sys.path)

V, T, N, STEPS = 61, 8, 4, 2
CASES = {  # name: (method, method_options, ref_model)
    "ga": ("ga", {}, None),
    "npo_table": ("npo", {"retain_loss": "none"}, "precomputed"),
    "npo_copy": ("npo", {"retain_loss": "nll"}, "copy"),
    "satimp_nll": ("satimp", {"retain_loss": "nll"}, None),
    "gd_kl": ("gd", {"retain_loss": "kl"}, "copy"),
}
DS_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,  # shard every parameter
                          "stage3_prefetch_bucket_size": 0},
    "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto",
}


def model(seed=0):
    return tiny_llama_lm(V, seed=seed)


def dataset(seed=0, ref=None):
    gen = torch.Generator().manual_seed(seed)

    def seq(prompt):
        ids = torch.randint(0, V, (T,), generator=gen)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long), "labels": labels}

    items = [{"forget": seq(3), "retain": seq(2)} for _ in range(N)]
    if ref is not None:  # precomputed reference log-probabilities, row by row
        for it in items:
            batch = {k: v[None] for k, v in it["forget"].items()}
            it["forget"]["ref_token_logprobs"] = add_reference_logprobs(ref, batch)["ref_token_logprobs"][0]
    return items


def run(out: Path, case: str) -> None:
    method, options, ref = CASES[case]
    policy = model()
    data = dataset(ref=model() if ref == "precomputed" else None)
    args = transformers.TrainingArguments(
        output_dir=str(out / f"run-{case}-{WORLD}"), per_device_train_batch_size=1,
        gradient_accumulation_steps=2 // WORLD, max_steps=STEPS, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=3,
        dataloader_drop_last=True, use_cpu=WORLD == 1, deepspeed=DS_CONFIG if WORLD > 1 else None,
        accelerator_config={"use_configured_state": WORLD > 1})
    trainer = UnlearnTrainer(model=policy, args=args, train_dataset=data, method=method, method_options=options,
                             ref_model=ref)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = dict(trainer.accelerator.unwrap_model(trainer.model_wrapped).named_parameters())
    if WORLD > 1:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            weights = {k: v.detach().clone() for k, v in params.items()}
        local = sum(p.ds_tensor.numel() for p in params.values())
        full = sum(p.ds_numel for p in params.values())
    else:
        weights = {k: v.detach().clone() for k, v in params.items()}
        local = full = sum(v.numel() for v in weights.values())
    if int(os.environ.get("RANK", "0")) == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"{case}-{WORLD}.safetensors"))
        (out / f"{case}-{WORLD}.json").write_text(json.dumps({"losses": losses, "local": local, "full": full}))
    from accelerate.state import AcceleratorState, GradientState

    GradientState._reset_state()
    AcceleratorState._reset_state(reset_partial_state=False)


if __name__ == "__main__":
    for name in sys.argv[2:]:
        run(Path(sys.argv[1]), name)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # leave the process group before interpreter exit: a gloo group torn down by exit while its threads still
        # run aborts the process ("terminate called without an active exception", seen once in CI)
        dist.barrier()
        dist.destroy_process_group()
