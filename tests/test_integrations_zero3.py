"""UnlearnTrainer under DeepSpeed ZeRO-3 on 2 CPU processes equals a one-process UnlearnTrainer run.

Worker: tests/_trainer_zero3_worker.py (tiny Llama, every parameter partitioned: persistence threshold 0, so the
output embedding the fused losses read is a shard outside a forward). 2 processes x batch 1 against 1 process
x batch 1 x accumulation 2 (the same global batch of 2, both a mean of micro-batch means), 2 SGD steps: the
logged step losses and the final weights (gathered from the shards) must agree to fp32 rounding. Before the
loss was taken from the engine's output, ZeRO-3's backward saw an empty lm_head.weight (size-0 RuntimeError).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("_trainer_zero3_worker.py")
CASES = ("ga", "npo_table", "npo_copy", "satimp_nll", "gd_kl")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}


def _run(cmd, out):
    proc = subprocess.run(cmd + [str(WORKER), str(out), *CASES], capture_output=True, text=True, timeout=500,
                          env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


@pytest.mark.slow
def test_zero3_two_processes_match_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"],
         tmp_path)
    env_one = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path), *CASES], capture_output=True, text=True,
                          timeout=500, env=env_one)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for case in CASES:
        two = json.loads((tmp_path / f"{case}-2.json").read_text())
        one = json.loads((tmp_path / f"{case}-1.json").read_text())
        assert 0 < two["local"] < two["full"] == one["full"], case  # each rank held a shard
        assert len(two["losses"]) == len(one["losses"]) == 2, case
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6), case
        got = load_file(str(tmp_path / f"{case}-2.safetensors"))
        want = load_file(str(tmp_path / f"{case}-1.safetensors"))
        assert set(got) == set(want), case
        moved = max(float((want[k] - w0).abs().max()) for k, w0 in _initial().items())
        assert moved > 1e-3, case  # the run trained
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{case}: {k}")
    # the precomputed table comes from the initial model: NPO's first loss is exactly (2 / beta) log 2
    assert json.loads((tmp_path / "npo_table-2.json").read_text())["losses"][0] == pytest.approx(20 * 0.6931472)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    GradientState._reset_state()
    AcceleratorState._reset_state(reset_partial_state=True)


def _initial():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _trainer_zero3_worker as w  # noqa: PLC0415 - the worker's model builder, without running it
    finally:
        sys.path.pop(0)
    return {k: v.detach().clone() for k, v in w.model().named_parameters()}


def _fake_partition(model):
    for i, p in enumerate(model.parameters()):
        p.ds_id = i  # what deepspeed.zero.Init leaves on every parameter it partitions
    return model


@pytest.mark.parametrize("where", ["copy", "given"])
def test_zero3_partitioned_reference_is_refused(where, tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _trainer_zero3_worker as w
    finally:
        sys.path.pop(0)
    from fastweight.integrations.trainer import UnlearnTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    policy = _fake_partition(w.model()) if where == "copy" else w.model()
    ref = "copy" if where == "copy" else _fake_partition(w.model(1))
    with pytest.raises(ValueError, match="ZeRO-3"):
        UnlearnTrainer(model=policy, args=args, train_dataset=w.dataset(), method="npo", ref_model=ref)
    # an unpartitioned reference (a whole copy on every process) is accepted
    UnlearnTrainer(model=w.model(), args=args, train_dataset=w.dataset(), method="npo", ref_model=w.model(1))
