"""Worker for tests/test_distributed.py, run under ``accelerate launch`` (DDP or DeepSpeed ZeRO on CPU).

argv: model_dir out_dir mode, mode in {"ddp", "ddp_terms", "zero3", "zero3_resume", "zero2_resume", "zero1_resume"}. Writes
out_dir/<run>/... and a JSON report per rank.
"""
import json
import sys
from pathlib import Path

import torch
import os

from fastweight.data.synth_tofu import generate_tofu
from fastweight.data.tofu import QADataset
from fastweight.train.checkpoint import latest_checkpoint
from fastweight.train.config import TrainConfig
from fastweight.train.loop import train
from fastweight.train.models import load_model_and_tokenizer

model_dir, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if mode.startswith("zero"):
    # CPU-only DeepSpeed: accelerate sets up the gloo process group only for cpu=True, which in turn disables
    # its DeepSpeed path; creating the process group first (cpu=True) and then the Accelerator (reading
    # ACCELERATE_USE_DEEPSPEED) gives DeepSpeed on 2 CPU processes. On GPUs none of this is needed.
    from accelerate import PartialState

    PartialState(cpu=True)
data = generate_tofu(seed=1, n_authors=6, questions_per_author=2, n_general=2)
rank = int(os.environ.get("RANK", "0"))  # PartialState() here would initialise it without cpu=True
report = {}


def sets(tok):
    return QADataset(data["full"][:8], tok, "phi", 48), QADataset(data["full"][8:], tok, "phi", 48)


def run(name, on_step=None, dtype="fp32", **kw):
    model, tok = load_model_and_tokenizer(model_dir, dtype)
    forget, retain = sets(tok)
    base = dict(output_dir=str(out / name), method="npo", method_args={"retain_loss": "nll"}, lr=1e-2, epochs=1,
                batch_size=1, grad_accum=2, progress=False, seed=5)
    res = train(model, forget, retain, TrainConfig(**{**base, **kw}), on_step=on_step)
    return res, model


class Stop(Exception):
    pass


def cut_after_step_3():
    """Run "cut" for 2 epochs with save_every=2, stopped after step 3; returns its latest checkpoint (step 2)."""
    def stop(step, _):
        if step == 3:
            raise Stop

    try:
        run("cut", epochs=2, save_every=2, on_step=stop)
    except Stop:
        pass
    return latest_checkpoint(out / "cut")


if mode == "ddp":
    res, model = run("ddp")
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "ddp.safetensors"))
    report["history"] = res.history
    # resume under DDP: stop after step 3 (checkpoint at 2), resume, compare with an uninterrupted run
    full, _ = run("full", epochs=2, save_every=2)
    report["cut_at"] = cut_after_step_3().name
    resumed, _ = run("cut", epochs=2, save_every=2, resume=True)
    want = full.model.state_dict()
    report["resume_equal"] = all(torch.equal(v, want[k]) for k, v in resumed.model.state_dict().items())
    report["resume_steps"] = resumed.global_step
elif mode == "ddp_terms":
    # the unmasked KL retain term and UNDIAL (every position / slot of every sequence, global count)
    from safetensors.torch import save_file

    for name, kw in (("kl", dict(method_args={"retain_loss": "kl"})), ("undial", dict(method="undial",
                                                                                        method_args={}))):
        res, model = run(name, **kw)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
        report[name] = res.history
    run("bf16", dtype="bf16")  # bf16 weights under DDP: fp32 masters (MasterWeightAdamW) in the checkpoint
elif mode.endswith("_resume"):
    # ZeRO-3 (or ZeRO-1/2) resume: an uninterrupted 2-epoch run and one stopped after step 3 (checkpoint at 2), resumed with
    # DeepSpeed's own (pickle-based) checkpoint files planted in the checkpoint folder
    import pickle

    class Planted:
        def __reduce__(self):
            return (open, (str(out / f"pwned-{rank}"), "w"))

    full, _ = run("full", epochs=2, save_every=2)
    ckpt = cut_after_step_3()
    report["cut_at"] = ckpt.name
    report["files"] = sorted(p.name for p in ckpt.iterdir())
    torch.distributed.barrier()  # both ranks have listed the folder before rank 0 plants files in it
    if rank == 0:
        for name in ("random_states_0.pkl", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            with open(ckpt / name, "wb") as fh:
                pickle.dump(Planted(), fh)
    torch.distributed.barrier()
    resumed, _ = run("cut", epochs=2, save_every=2, resume=True)
    report["resume_steps"] = resumed.global_step
    report["history"], report["full_history"] = resumed.history, full.history
else:
    res, model = run("zero3")
    report["history"] = res.history
    params = list(res.model.parameters())
    report["local_numel"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    report["full_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
(out / f"report-{mode}-{rank}.json").write_text(json.dumps(report))
if torch.distributed.is_available() and torch.distributed.is_initialized():
    torch.distributed.barrier()  # leave the process group before interpreter exit tears its threads down
    torch.distributed.destroy_process_group()
