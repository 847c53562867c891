"""Engines on 2 CPU processes: DDP (accelerate launch) and DeepSpeed ZeRO-3 end with the weights of one process
with the same global batch; ZeRO-3 really shards; resume under DDP and under ZeRO-3 is bit-exact. FSDP2 (torch's
fully_shard) runs the objective module in tests/test_distributed_fsdp.py. Worker: tests/_dist_worker.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastweight.data.tofu import QADataset
from fastweight.train.checkpoint import _load_tensors, latest_checkpoint
from fastweight.train.config import TrainConfig
from fastweight.train.loop import train
from fastweight.train.models import load_model_and_tokenizer
from helpers import tiny_tofu

DATA = tiny_tofu()  # the tiny TOFU set that the shared `tiny_dir` model (conftest.py) was built on
WORKER = Path(__file__).with_name("_dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}


def _one_process(tiny_dir, tmp, dtype="fp32", **kw):
    model, tok = load_model_and_tokenizer(tiny_dir, dtype)
    forget = QADataset(DATA["full"][:8], tok, "phi", 48)
    retain = QADataset(DATA["full"][8:], tok, "phi", 48)
    base = dict(output_dir=str(tmp), method="npo", method_args={"retain_loss": "nll"}, lr=1e-2, epochs=1,
                progress=False, seed=5)
    return train(model, forget, retain, TrainConfig(**{**base, **kw}))


def _launch(args, tiny_dir, tmp, mode, port, env=()):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(WORKER), tiny_dir, str(tmp), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**ENV, **dict(env)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads((tmp / f"report-{mode}-{r}.json").read_text()) for r in (0, 1)]


def _assert_same_weights(got: dict, want: dict, rtol=1e-4, atol=1e-4):
    """Equal within 1% of one optimizer step (lr 1e-2). Adam's g / sqrt(v) is ~ +-1 for any entry whose gradient
    is far above eps, so fp32 rounding of near-zero gradient entries moves those weights by up to a few 1e-5
    after two steps (2.7e-5 on the tiny TOFU set generated since the holdout split was added, with losses and
    gradient norms equal to 1e-7); the per-micro-batch means this guards against differed by ~5e-2."""
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=rtol, atol=atol, msg=k)


def _assert_exact_resume(reports, tmp_path, files):
    """Both ranks stopped after step 3 (checkpoint at 2), resumed to step 4 with the uninterrupted run's logged
    steps; the checkpoint holds ``files``; no planted pickle ran; final weights equal bit for bit."""
    from safetensors.torch import load_file

    for r in reports:
        assert r["cut_at"] == "step-00000002" and r["resume_steps"] == 4
        assert r["files"] == files
        assert r["history"] == r["full_history"]  # same losses, gradient norms and learning rates, step by step
    assert not list(tmp_path.glob("pwned-*"))
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert set(full) == set(resumed)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
def test_split_invariance_in_one_process(tiny_dir, tmp_path):
    """batch 2 x accumulation 2 == batch 1 x accumulation 4 == batch 4 (the same global batch of 4)."""
    a = _one_process(tiny_dir, tmp_path / "a", batch_size=2, grad_accum=2)
    b = _one_process(tiny_dir, tmp_path / "b", batch_size=1, grad_accum=4)
    c = _one_process(tiny_dir, tmp_path / "c", batch_size=4, grad_accum=1)
    _assert_same_weights(b.model.state_dict(), a.model.state_dict())
    _assert_same_weights(c.model.state_dict(), a.model.state_dict())
    for key in ("loss", "grad_norm"):  # the objective and its gradient agree to fp32 rounding
        assert [h[key] for h in b.history] == pytest.approx([h[key] for h in a.history], rel=1e-6)
        assert [h[key] for h in c.history] == pytest.approx([h[key] for h in a.history], rel=1e-6)


# every position (KL retain, unmasked: the sources' definition) / every slot (UNDIAL) of every sequence
POSITION_TERMS = {"kl": dict(method_args={"retain_loss": "kl"}), "undial": dict(method="undial", method_args={})}


@pytest.mark.parametrize("term", sorted(POSITION_TERMS))
def test_position_terms_split_invariance_in_one_process(tiny_dir, tmp_path, term):
    """batch 2 x accumulation 2 == batch 1 x accumulation 4 for the unmasked KL retain term and UNDIAL: each is
    summed over the positions of the sequences and divided by their global count (batch padding excluded). As
    micro-batch means the two splits' 2-step updates differed by 4.6% (KL; it is 0 at step 1, where the policy
    is the reference) and 74% (UNDIAL) of the update."""
    a = _one_process(tiny_dir, tmp_path / "a", batch_size=2, grad_accum=2, **POSITION_TERMS[term])
    b = _one_process(tiny_dir, tmp_path / "b", batch_size=1, grad_accum=4, **POSITION_TERMS[term])
    assert a.global_step == b.global_step == 2
    _assert_same_weights(b.model.state_dict(), a.model.state_dict())
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_for_position_terms(tiny_dir, tmp_path):
    """2 processes x batch 1 x accumulation 2 == 1 process x batch 2 x accumulation 2 for the unmasked KL
    retain term and UNDIAL (before: 126% of one update apart for KL; the padding of batch 2 counted)."""
    from safetensors.torch import load_file

    reports = _launch(["--multi_gpu"], tiny_dir, tmp_path, "ddp_terms", 29537, env={"ACCELERATE_USE_CPU": "true"})
    for term, kw in POSITION_TERMS.items():
        want = _one_process(tiny_dir, tmp_path / f"one-{term}", batch_size=2, grad_accum=2, **kw)
        _assert_same_weights(load_file(str(tmp_path / f"{term}.safetensors")), want.model.state_dict())
        for key in ("loss", "forget_loss", "grad_norm"):
            assert [h[key] for h in reports[0][term]] == pytest.approx([h[key] for h in want.history], rel=1e-5)
    # bf16 weights: DDP's fp32 masters track the one-process run's (gradients are reduced in bf16, so not to
    # fp32 rounding: within 5% of the update, relative L2)
    _one_process(tiny_dir, tmp_path / "one-bf16", dtype="bf16", batch_size=2, grad_accum=2)
    init, _ = load_model_and_tokenizer(tiny_dir, "bf16")
    init = [p.detach().double() for p in init.parameters()]
    got, want = (_load_tensors(latest_checkpoint(tmp_path / d) / "optimizer.pt")["master_weights"]
                 for d in ("bf16", "one-bf16"))
    assert len(got) == len(want) == len(init)
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float((w.double() - i).pow(2).sum()) for w, i in zip(want, init))
    assert den > 0 and (num / den) ** 0.5 < 0.05


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_and_resume_exactly(tiny_dir, tmp_path):
    reports = _launch(["--multi_gpu"], tiny_dir, tmp_path, "ddp", 29531, env={"ACCELERATE_USE_CPU": "true"})
    from safetensors.torch import load_file

    want = _one_process(tiny_dir, tmp_path / "one", batch_size=2, grad_accum=2)
    _assert_same_weights(load_file(str(tmp_path / "ddp.safetensors")), want.model.state_dict())
    for key in ("loss", "forget_loss", "retain_loss", "grad_norm"):  # logged values are global means too
        assert [h[key] for h in reports[0]["history"]] == pytest.approx([h[key] for h in want.history], rel=1e-5)
    assert reports[0]["history"] == reports[1]["history"]
    for r in reports:
        assert r["cut_at"] == "step-00000002" and r["resume_steps"] == 4 and r["resume_equal"]


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_shard_and_match_one_process(tiny_dir, tmp_path):
    pytest.importorskip("deepspeed")
    reports = _launch(["--use_deepspeed", "--zero_stage", "3", "--gradient_accumulation_steps", "2",
                       "--zero3_save_16bit_model", "true", "--offload_optimizer_device", "none",
                       "--offload_param_device", "none"], tiny_dir, tmp_path, "zero3", 29533)
    from safetensors.torch import load_file

    for r in reports:
        assert 0 < r["local_numel"] < r["full_numel"]  # each rank holds a shard of the policy
    want = _one_process(tiny_dir, tmp_path / "one", batch_size=2, grad_accum=2)
    got = load_file(str(tmp_path / "zero3" / "model.safetensors"))
    _assert_same_weights(got, want.model.state_dict(), rtol=1e-4, atol=1e-5)
    assert [h["loss"] for h in reports[0]["history"]] == pytest.approx([h["loss"] for h in want.history], rel=1e-5)


@pytest.mark.slow
def test_deepspeed_zero3_resume_is_exact_without_pickle(tiny_dir, tmp_path):
    """ZeRO-3, 2 processes: stopped after step 3 (checkpoint at step 2) and resumed, the run ends with the
    uninterrupted run's weights bit for bit; DeepSpeed's pickled files planted in the checkpoint never run; a
    resume with another world size is refused before any step."""
    pytest.importorskip("deepspeed")
    reports = _launch(["--use_deepspeed", "--zero_stage", "3", "--gradient_accumulation_steps", "2",
                       "--zero3_save_16bit_model", "true", "--offload_optimizer_device", "none",
                       "--offload_param_device", "none"], tiny_dir, tmp_path, "zero3_resume", 29535)
    _assert_exact_resume(reports, tmp_path,
                         ["rng-0.safetensors", "rng-1.safetensors", "trainer_state.json", "zero-0.pt", "zero-1.pt"])
    ckpt = latest_checkpoint(tmp_path / "cut")
    for f in ("zero-0.pt", "zero-1.pt"):  # tensors, numbers and strings only
        torch.load(ckpt / f, weights_only=True)
    marker = tmp_path / "pwned-local"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"fp32_flat_groups": [], "x": Planted()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        _load_tensors(tmp_path / "bad.pt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="written by 2 processes"):  # one process resuming a 2-process run
        _one_process(tiny_dir, tmp_path / "cut", batch_size=1, grad_accum=2, epochs=2, save_every=2, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 1])
def test_deepspeed_zero12_resume_is_exact_without_pickle(tiny_dir, tmp_path, stage):
    """ZeRO-1/2, 2 processes: whole weights in model.safetensors, each rank's optimizer partition in
    zero-<rank>.pt (tensors, numbers, strings); stopped after step 3 and resumed, the run ends with the
    uninterrupted run's weights bit for bit and the same logged steps; DeepSpeed's planted pickles never run."""
    pytest.importorskip("deepspeed")
    mode = f"zero{stage}_resume"
    reports = _launch(["--use_deepspeed", "--zero_stage", str(stage), "--gradient_accumulation_steps", "2",
                       "--offload_optimizer_device", "none", "--offload_param_device", "none"],
                      tiny_dir, tmp_path, mode, 29537 + stage)
    from safetensors.torch import load_file

    _assert_exact_resume(reports, tmp_path, ["model.safetensors", "rng-0.safetensors", "rng-1.safetensors",
                                             "trainer_state.json", "zero-0.pt", "zero-1.pt"])
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert json.loads((ckpt / "trainer_state.json").read_text())["engine"] == "zero12"
    for f in ("zero-0.pt", "zero-1.pt"):  # each rank holds its half of the fp32 master weights
        part = torch.load(ckpt / f, weights_only=True)
        assert 0 < sum(t.numel() for t in part["single_partition_of_fp32_groups"]) < sum(
            t.numel() for t in load_file(str(ckpt / "model.safetensors")).values())
