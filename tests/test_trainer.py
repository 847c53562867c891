"""The accelerate loop: resume equality, schedule, freezing, methods, config, and a 2-process CPU launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.tofu import QADataset, pad_collate
from fastweight.train.config import TrainConfig, read_config_file, train_config_from
from fastweight.train.loop import _lr_lambda, latest_checkpoint, layer_filter, train
from fastweight.train.models import load_model_and_tokenizer
from helpers import tiny_tofu

DATA = tiny_tofu()  # the tiny TOFU set that the shared `tiny_dir` model (conftest.py) was built on


def _sets(tok):
    return (QADataset(DATA["forget10"], tok, "phi", 48), QADataset(DATA["retain90"], tok, "phi", 48))


def _cfg(tmp, **kw):
    base = dict(output_dir=str(tmp), lr=5e-3, epochs=3, batch_size=2, grad_accum=2, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def _forget_nll(model, ds) -> float:
    batch = pad_collate([ds[i] for i in range(len(ds))], 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                   ignore_index=IGNORE_INDEX))


def test_resume_equals_uninterrupted(tiny_dir, tmp_path):
    model, tok = load_model_and_tokenizer(tiny_dir)
    _, retain = _sets(tok)
    full = train(model, retain, None, _cfg(tmp_path / "a", save_every=2))
    assert full.global_step == 3 * 3  # 10 items / 2 per batch = 5 batches -> 3 steps per epoch (2 + 2 + 1)
    want = {k: v.clone() for k, v in full.model.state_dict().items()}

    class Stop(Exception):
        pass

    def stop(step, _):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(load_model_and_tokenizer(tiny_dir)[0], retain, None, _cfg(tmp_path / "b", save_every=2), on_step=stop)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"
    resumed = train(load_model_and_tokenizer(tiny_dir)[0], retain, None,
                    _cfg(tmp_path / "b", save_every=2, resume=True))
    assert resumed.global_step == 9
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    logged = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged] == list(range(1, 10))
    assert full.history[-1]["loss"] < full.history[0]["loss"]  # fine-tuning learns


def test_lr_schedule_warmup_then_decay(tiny_dir, tmp_path):
    lrs = [_lr_lambda(s, warmup=3, total=9) for s in range(9)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[-1] == pytest.approx(1 / 6)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    model, tok = load_model_and_tokenizer(tiny_dir)
    res = train(model, _sets(tok)[1], None, _cfg(tmp_path, epochs=2))
    logged = [h["lr"] for h in res.history]  # warm-up over the first epoch (3 steps), then decay
    assert logged[:3] == pytest.approx([5e-3 * f for f in (0.25, 0.5, 0.75)])
    assert logged[3] == pytest.approx(5e-3) and logged[-1] < logged[3]


def test_trainable_layers_freeze(tiny_dir, tmp_path):
    model, tok = load_model_and_tokenizer(tiny_dir)
    keep = layer_filter(model, 1)
    assert keep("model.layers.1.mlp.up_proj.weight") and keep("model.norm.weight")
    assert not keep("model.layers.0.mlp.up_proj.weight") and not keep("model.embed_tokens.weight")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(model, _sets(tok)[1], None, _cfg(tmp_path, epochs=1, trainable_layers=1))
    after = res.model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == keep(k) or "rotary" in k, k


def test_satimp_unlearning_with_retain(tiny_dir, tmp_path):
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget, retain = _sets(tok)
    train(model, QADataset(DATA["full"], tok, "phi", 48), None, _cfg(tmp_path / "ft", epochs=4, lr=1e-2))
    nll0 = _forget_nll(model, forget)
    res = train(model, forget, retain, _cfg(tmp_path / "u", method="satimp", epochs=4, lr=1e-2,
                                             method_args={"beta1": 0.0, "retain_loss": "nll"}))
    assert {"mean_weight", "retain_loss", "forget_loss", "grad_norm", "lr"} <= set(res.history[0])
    assert _forget_nll(res.model, forget) > nll0 + 0.5


@pytest.mark.parametrize("method", ["npo", "flat"])
def test_ref_and_idk_methods_run(tiny_dir, tmp_path, method):
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget, retain = _sets(tok)
    res = train(model, forget, retain, _cfg(tmp_path, method=method, epochs=1))
    assert res.global_step == 1 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)


def test_train_errors(tiny_dir, tmp_path):
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget, _ = _sets(tok)
    with pytest.raises(ValueError, match="retain"):
        train(model, forget, None, _cfg(tmp_path, method="gd"))
    with pytest.raises(ValueError, match="trainable"):  # rmu trains layers 5-7 by default; the model has 2
        train(model, forget, forget, _cfg(tmp_path, method="rmu"))
    for kw, name in [({"lr": 0.0}, "lr"), ({"epochs": 0}, "epochs"), ({"mixed_precision": "fp8"},
                     "mixed_precision"), ({"max_steps": 0}, "max_steps"), ({"method_args": []}, "method_args")]:
        with pytest.raises((ValueError, TypeError), match=name):
            TrainConfig(**kw)


def test_config_files(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nepochs: 2\nmethod: satimp\nunrelated: 1\n")
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.002}))
    cfg = train_config_from(read_config_file(tmp_path / "c.yaml"))
    assert (cfg.lr, cfg.epochs, cfg.method) == (0.001, 2, "satimp")
    assert read_config_file(tmp_path / "c.json") == {"lr": 0.002}
    (tmp_path / "c.txt").write_text("lr: 1")
    with pytest.raises(ValueError, match="config file"):
        read_config_file(tmp_path / "c.txt")


_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from accelerate import PartialState
    from fastweight.data.synth_tofu import generate_tofu
    from fastweight.data.tofu import QADataset
    from fastweight.train.config import TrainConfig
    from fastweight.train.loop import train
    from fastweight.train.models import load_model_and_tokenizer
    model_dir, out = sys.argv[1], sys.argv[2]
    data = generate_tofu(seed=1, n_authors=6, questions_per_author=2, n_general=2)
    model, tok = load_model_and_tokenizer(model_dir)
    forget = QADataset(data["forget05"] + data["retain95"][:5], tok, "phi", 48)  # 7 items
    retain = QADataset(data["retain95"][5:], tok, "phi", 48)
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].tolist()), with_kwargs=True)
    res = train(model, forget, retain, TrainConfig(output_dir=out, method="gd", epochs=1, batch_size=1,
                                                   grad_accum=2, lr=1e-2, progress=False, seed=5))
    rank = PartialState().process_index
    f_ids = {json.dumps([t for t in it["input_ids"].tolist()]) for it in (forget[i] for i in range(len(forget)))}
    rows = [json.dumps([t for t in r if t != tok.pad_token_id]) for b in seen for r in b]
    json.dump({"forget": [r for r in rows if r in f_ids], "retain": [r for r in rows if r not in f_ids],
               "steps": res.global_step, "checksum": float(sum(p.double().sum() for p in model.parameters()))},
              open(f"{out}/rank{rank}.json", "w"))
""")


def test_two_process_accelerate_launch(tiny_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    # accelerate 1.x: `launch --cpu --num_processes 2` starts ONE process unless MPI is installed; the torchrun
    # path (`--multi_gpu`) with ACCELERATE_USE_CPU=true starts two gloo CPU processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(script), tiny_dir, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 2  # 7 items -> 8 batches of 1 (wrapped) -> 4 per rank -> 2 steps
    assert len(r0["forget"]) == len(r1["forget"]) == 4
    assert len(set(r0["forget"]) | set(r1["forget"])) == 7  # no forget item dropped; one seen twice (wrap)
    assert r0["retain"] != r1["retain"]  # different retain samples per rank
    assert r0["checksum"] == r1["checksum"]  # gradients averaged: identical weights on both ranks


def test_mixed_precision_can_change_between_runs(tiny_dir, tmp_path):
    # the example fine-tunes in bf16 and unlearns in fp32 in one process (AcceleratorState is process-wide)
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget, retain = _sets(tok)
    train(model, retain, None, _cfg(tmp_path / "a", epochs=1, mixed_precision="bf16"))
    res = train(model, forget, retain, _cfg(tmp_path / "b", epochs=1, method="ga", mixed_precision="no"))
    assert res.global_step == 1


def test_g_effect_every_records_without_changing_training(tiny_dir, tmp_path):
    """--g-effect-every: probes are measured every N steps, saved with plots, and the trained weights are
    bit-identical to a run that does not measure."""
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget, retain = _sets(tok)
    plain = train(model, forget, retain, _cfg(tmp_path / "a", method="satimp", epochs=2))
    want = {k: v.clone() for k, v in plain.model.state_dict().items()}
    model, tok = load_model_and_tokenizer(tiny_dir)
    res = train(model, forget, retain, _cfg(tmp_path / "b", method="satimp", epochs=2, g_effect_every=1,
                                            g_effect_probe_size=3))
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert plain.g_effect is None and res.g_effect is not None
    assert set(res.g_effect["probes"]) == {"forget", "retain"}  # retain probed although satimp has no retain term
    assert all("g_effect_forget" in h and "g_effect_retain" in h for h in res.history)
    saved = json.loads((tmp_path / "b" / "g_effect.json").read_text())
    assert saved == json.loads(json.dumps(res.g_effect))
    assert (tmp_path / "b" / "g_effect_curves.png").is_file()
    with pytest.raises(ValueError, match="g_effect_every"):
        TrainConfig(g_effect_every=-1)
