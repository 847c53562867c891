"""The example CLIs, unchanged, under ``accelerate launch`` on 2 CPU processes (issue 21 items 3 and 7).

Every run is a subprocess started from the repo root, as a user types it: ``python examples/tofu_unlearn.py``
for one process, ``python -m accelerate.commands.launch ... examples/tofu_unlearn.py`` for two (DDP over gloo;
DeepSpeed ZeRO-3 with ``DS_ACCELERATOR=cpu`` and a Hugging Face-style config full of ``"auto"`` values). Tiny
random Llama, tiny generated data. A 2-process run uses half the per-process batch of the one-process run (the
same global batch) and data sizes that are multiples of it, so every optimizer step sees the same rows; the
two runs then agree to fp32 rounding (see ``_assert_same_results``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
# 6 authors x 4 questions: forget10 = 4 rows, retain90 = 20, full = 24 (multiples of the global batches below)
DATA = ["--n-authors", "6", "--questions-per-author", "4", "--n-general", "6", "--max-new-tokens", "4",
        "--max-eval-items", "4", "--mixed-precision", "no", "--ft-epochs", "1", "--epochs", "2", "--lr", "1e-2",
        "--ft-lr", "1e-2", "--save-every", "1", "--eval-every", "2"]
ONE = ["--ft-batch-size", "4", "--batch-size", "2"]      # one process
TWO = ["--ft-batch-size", "2", "--batch-size", "1"]      # per process: the same global batches
DDP = ["--multi_gpu"]
HF_ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto",
                                  "stage3_gather_16bit_weights_on_model_save": True}}
_PORT = [29650]


def _launch_cmd(engine: list[str], script: str, args: list[str]) -> list[str]:
    """``accelerate launch`` of ``script`` (a path relative to the repo root) on 2 processes."""
    _PORT[0] += 1
    return [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_PORT[0]),
            script, *args]


def _run(cmd: list[str], env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _zero3(tmp: Path) -> list[str]:
    cfg = tmp / "ds_zero3.json"
    cfg.write_text(json.dumps(HF_ZERO3))
    return ["--use_deepspeed", "--deepspeed_config_file", str(cfg)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fastweight.data.synth_muse import generate_muse
    from fastweight.data.synth_tofu import generate_tofu
    from fastweight.data.templates import REFUSALS
    from fastweight.train.models import save_tiny_model

    def texts(obj):
        if isinstance(obj, str):
            return [obj]
        if isinstance(obj, dict):
            return [t for v in obj.values() for t in texts(v)]
        if isinstance(obj, (list, tuple)):
            return [t for v in obj for t in texts(v)]
        return []

    words = texts(generate_tofu(seed=0, n_authors=6, questions_per_author=4, n_general=6)) + texts(generate_muse(0))
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), words + ["Question: Answer:", *REFUSALS]))


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The one-process TOFU run every 2-process run is compared with."""
    tmp = tmp_path_factory.mktemp("one")
    _run([sys.executable, "examples/tofu_unlearn.py", "--model", tiny, "--cache-dir", str(tmp / "cache"),
          "--output-dir", str(tmp / "out"), *DATA, *ONE])
    return tmp / "out"


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _assert_same_results(got: Path, want: Path) -> None:
    """Every metric of every column and every logged unlearning loss equal within rel 1e-4 (abs 1e-7): the
    runs differ only in fp32 rounding -- gradients reduced over 2 processes instead of summed in one, rows
    batched (and padded) in other groups -- which moves weights by ~1e-7 and metrics by ~1e-5 relative at most
    here (small truth ratios are ratios of small probabilities); a wrong row order, a missing or doubled row or
    a per-process normalisation changes them by 1e-2 or more."""
    a, b = _results(got)["metrics"], _results(want)["metrics"]
    assert list(a) == list(b)
    for col in b:
        assert set(a[col]) == set(b[col]), col
        for k, v in b[col].items():
            assert a[col][k] == pytest.approx(v, rel=1e-4, abs=1e-7), f"{col} / {k}"
    assert _losses(got) == pytest.approx(_losses(want), rel=1e-5)
    assert len(_losses(got)) == 4
    # --eval-every 2: the evaluations during unlearning (under ZeRO-3 inside the engine) agree too
    da, db = _results(got)["during"], _results(want)["during"]
    assert [d["step"] for d in da] == [d["step"] for d in db] == [2, 4]
    for x, y in zip(da, db):
        assert set(x["metrics"]) == set(y["metrics"])
        for k, v in y["metrics"].items():
            if isinstance(v, (int, float)):
                assert x["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), f"during {x['step']} / {k}"


def _assert_clean(out: Path) -> None:
    """A finished run: status complete, the table and figures written once, no temporary file left behind."""
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert (out / "table.md").is_file()
    left = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not left, left


@pytest.mark.slow
def test_tofu_ddp_two_processes_equal_one_process(tiny, one_process, tmp_path):
    out = tmp_path / "out"
    args = ["--model", tiny, "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), *DATA, *TWO]
    proc = _run(_launch_cmd(DDP, "examples/tofu_unlearn.py", args), env={"ACCELERATE_USE_CPU": "true"})
    _assert_clean(out)
    _assert_same_results(out, one_process)
    assert proc.stdout.count("| forget_es |") == 1  # one table printed: the main process's


@pytest.mark.slow
def test_tofu_zero3_hf_auto_config_two_processes_equal_one_process(tiny, one_process, tmp_path):
    """ZeRO-3 from a Hugging Face-style config with "auto" bucket sizes and batch sizes (before: "Can't find
    model.config"), models created partitioned; fine-tuning (micro-batch 2) and unlearning (micro-batch 1) in
    one process each fill the "auto" values again."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    args = ["--model", tiny, "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), *DATA, *TWO]
    _run(_launch_cmd(_zero3(tmp_path), "examples/tofu_unlearn.py", args))
    _assert_clean(out)
    _assert_same_results(out, one_process)


@pytest.mark.slow
def test_zero3_launch_creates_the_model_partitioned(tiny, tmp_path):
    """Under a ZeRO-3 launch the loader builds the model inside zero.Init: each rank holds about half of every
    parameter (ds_tensor), none whole -- not merely a ds_tensor attribute, which an unsplit parameter has too."""
    pytest.importorskip("deepspeed")
    _run(_launch_cmd(_zero3(tmp_path), "tests/_zero3_load_worker.py", [tiny, str(tmp_path)]))
    from fastweight.train.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny)  # one process, no launch: whole
    full = sum(p.numel() for p in model.parameters())
    reports = [json.loads((tmp_path / f"load-{r}.json").read_text()) for r in (0, 1)]
    for r in reports:
        assert r["full"] == full and r["params"] == len(list(model.parameters()))
        assert r["local"] <= (full + 2 * r["params"]) // 2 < full  # half (+ padding of odd sizes), not the whole
        assert r["largest_whole"] == 0  # no parameter held whole
        assert r["largest_shard"] < max(p.numel() for p in model.parameters())
    assert sum(r["local"] for r in reports) >= full


@pytest.mark.slow
def test_muse_ddp_short_run(tiny, tmp_path):
    out = tmp_path / "out"
    _run(_launch_cmd(DDP, "examples/muse_unlearn.py", ["--model", tiny, "--cache-dir", str(tmp_path / "cache"),
                                              "--output-dir", str(out), "--ft-epochs", "1", "--epochs", "1",
                                              "--max-eval-items", "2", "--verbmem-max-new-tokens", "4",
                                              "--knowmem-max-new-tokens", "4", "--batch-size", "1",
                                              "--ft-batch-size", "2", "--mixed-precision", "no"]),
         env={"ACCELERATE_USE_CPU": "true"})
    _assert_clean(out)
    metrics = _results(out)["metrics"]
    assert {"target (before)", "retrained"} <= set(metrics) and len(metrics) == 3


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_tofu_ddp_resume_after_killing_launcher_and_workers(tiny, one_process, tmp_path):
    """Killed mid-unlearning (SIGKILL: no handler runs), then ``--resume``: the run finishes with the results of
    an uninterrupted run. Killing the launcher alone leaves its workers running (they run in their own process
    groups), which docs/scale.md says; the test checks that and then kills the workers by pid.

    The workers are stopped (SIGSTOP) as soon as the first checkpoint appears: the tiny run's last steps and
    evaluation take about a second on a fast CPU, and had finished before the kill once. Signals the launcher's
    death would send them stay pending while they are stopped, so they are let run for 0.1 s (SIGCONT) before
    the check: a pending SIGTERM or SIGHUP ends them then."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--model", tiny, "--cache-dir", str(cache), "--output-dir", str(out), *DATA, *TWO]
    launcher = subprocess.Popen(_launch_cmd(DDP, "examples/tofu_unlearn.py", args), cwd=ROOT,
                                start_new_session=True, env={**ENV, "ACCELERATE_USE_CPU": "true"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 500
        while not list((out / "checkpoints").glob("step-*")):
            assert launcher.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        workers = _children(launcher.pid)
        assert len(workers) == 2
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        time.sleep(0.5)
        for sig in (signal.SIGCONT, signal.SIGSTOP):
            for w in workers:
                os.kill(w, sig)
            time.sleep(0.1)
        assert all(_alive(w) for w in workers)  # orphaned, not ended by the launcher's death
        assert all(os.getpgid(w) != launcher.pid for w in workers)  # not in the launcher's process group
    finally:
        for w in _children(launcher.pid) + workers:  # whatever happened above: no process is left running
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.kill()
        launcher.wait()
    for _ in range(100):
        if not any(_alive(w) for w in workers):
            break
        time.sleep(0.1)
    assert json.loads((out / "status.json").read_text())["state"] == "running"
    assert not (out / "results.json").exists()
    _run(_launch_cmd(DDP, "examples/tofu_unlearn.py", [*args, "--resume"]), env={"ACCELERATE_USE_CPU": "true"})
    _assert_clean(out)
    _assert_same_results(out, one_process)


def test_fill_auto_fills_bucket_sizes_from_the_hidden_size_as_transformers_trainer():
    from types import SimpleNamespace

    from fastweight.train.zero3 import fill_auto

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=32))
    cfg = json.loads(json.dumps(HF_ZERO3))
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 7  # a number stays
    user = json.loads(json.dumps(cfg))
    fill_auto(cfg, model)
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (32 * 32, int(0.9 * 32 * 32))
    assert zero["stage3_param_persistence_threshold"] == 7
    fill_auto(cfg, SimpleNamespace(config=SimpleNamespace(hidden_size=8)), user=user)  # the next model's
    assert zero["reduce_bucket_size"] == 64 and zero["stage3_param_persistence_threshold"] == 7
    with pytest.raises(ValueError, match="hidden_size"):
        fill_auto(json.loads(json.dumps(HF_ZERO3)), SimpleNamespace(config=SimpleNamespace()))
