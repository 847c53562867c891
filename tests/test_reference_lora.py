"""Reference log-prob table (NPO/TNPO/WTNPO/IdkDPO), LoRA runs, and configuration errors raised before training."""
from __future__ import annotations

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.templates import REFUSALS
from fastweight.data.tofu import EpochSampler, ForgetRetainDataset, QADataset, pad_collate
from fastweight.train.config import TrainConfig
from fastweight.train.engine import build_reference_table, make_accelerator
from fastweight.train.loop import _lr_lambda, train
from fastweight.train.methods import AdapterDisabled, build_method, lm_forward, ref_token_logp
from fastweight.train.models import load_model_and_tokenizer
from fastweight.train.objective import UnlearnObjective
from helpers import tiny_tofu

DATA = tiny_tofu()  # the tiny TOFU set that the shared `tiny_dir` model (conftest.py) was built on


def _naive_logp(model, batch, prefix=""):
    """float64 log p(label) of the shifted labels from the model's own logits (0 where ignored)."""
    with torch.no_grad():
        logits = model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).logits
    labels = batch[prefix + "labels"]
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    y = labels[:, 1:]
    out = torch.zeros(labels.shape, dtype=torch.float64)
    got = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    out[:, :-1] = torch.where(y != IGNORE_INDEX, got, 0.0)
    return out


def test_reference_table_equals_live_reference(tiny_dir, tmp_path):
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget = QADataset(DATA["full"][:5], tok, "phi", 48)
    cfg = TrainConfig(output_dir=str(tmp_path), method="idkdpo", batch_size=2, epochs=2, progress=False)
    data = ForgetRetainDataset(forget, None, seed=0, refusals=REFUSALS)
    collate = lambda items: pad_collate(items, tok.pad_token_id)  # noqa: E731
    acc = make_accelerator(cfg)
    obj = UnlearnObjective(model, build_method("idkdpo"))
    table = build_reference_table(acc, obj, data, EpochSampler(len(data)), collate, cfg)
    assert len(table) >= 5 and table.nbytes < 4 * 48 * len(table)  # O(tokens), float32
    for epoch in range(2):  # every drawn refusal of every epoch is in the table, in any batch composition
        data.set_epoch(epoch)
        batch = pad_collate([data[i]["forget"] for i in (4, 0, 2)], tok.pad_token_id)
        for prefix in ("", "idk_"):
            got = ref_token_logp(table, batch, prefix)
            live = ref_token_logp(model, batch, prefix)
            torch.testing.assert_close(got, live, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.double(), _naive_logp(model, batch, prefix), rtol=1e-4, atol=1e-4)
    other = pad_collate([QADataset(DATA["full"][6:7], tok, "phi", 48)[0]], tok.pad_token_id)
    with pytest.raises(KeyError, match="not in the reference table"):
        table.token_logp(other)


@pytest.mark.parametrize("name", ["npo", "tnpo"])
def test_table_run_equals_live_reference_run(tiny_dir, tmp_path, name):
    """A training run with the table ends where the same run with a live frozen copy ends."""
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget = QADataset(DATA["full"][:4], tok, "phi", 48)
    res = train(model, forget, None, TrainConfig(output_dir=str(tmp_path), method=name, lr=1e-2, epochs=2,
                                                 batch_size=2, grad_accum=1, progress=False))
    ref, tok = load_model_and_tokenizer(tiny_dir)
    policy = load_model_and_tokenizer(tiny_dir)[0]
    method = build_method(name)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_lambda(s, warmup=2, total=4))
    data = ForgetRetainDataset(forget, None, seed=0)
    sampler = EpochSampler(len(data), seed=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for s in range(0, 4, 2):
            batch = pad_collate([data[i]["forget"] for i in order[s:s + 2]], tok.pad_token_id)
            batch = {k: v for k, v in batch.items() if k != "index"}
            method(policy, batch, None, ref.eval()).loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    for (n, a), b in zip(res.model.named_parameters(), policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_lora_trains_adapters_only_with_adapter_disabled_reference(tiny_dir, tmp_path):
    pytest.importorskip("peft")
    model, tok = load_model_and_tokenizer(tiny_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    forget = QADataset(DATA["full"][:4], tok, "phi", 48)
    retain = QADataset(DATA["full"][4:], tok, "phi", 48)
    res = train(model, forget, retain, TrainConfig(
        output_dir=str(tmp_path), method="satimp", method_args={"retain_loss": "kl"}, lr=5e-2, epochs=1,
        batch_size=2, grad_accum=1, progress=False, lora_r=4, lora_targets=("q_proj", "v_proj")))
    peft_model = res.model
    assert hasattr(peft_model, "peft_config")
    changed = []
    for name, p in peft_model.named_parameters():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            changed.append(name) if "lora_B" in name and p.abs().sum() > 0 else None
            continue
        assert torch.equal(p.detach(), base[key]), name  # base weights untouched
    assert changed  # the adapters trained
    batch = pad_collate([forget[i] for i in range(4)], tok.pad_token_id)
    batch = {k: v for k, v in batch.items() if k != "index"}
    fresh, _ = load_model_and_tokenizer(tiny_dir)
    with torch.no_grad():
        off = lm_forward(AdapterDisabled(peft_model), batch)
        want = lm_forward(fresh, batch)
        on = lm_forward(peft_model, batch)
    torch.testing.assert_close(off.hidden, want.hidden)  # adapters off == the base model (no copy was made)
    assert not torch.allclose(on.hidden, want.hidden)
    assert not any(isinstance(m, type(fresh)) for m in res.model.modules() if m is not res.model.base_model.model)


@pytest.mark.parametrize("kw,match", [
    (dict(method="nosuch"), "nosuch"),
    (dict(method="npo", method_args={"beta": 0}), "beta"),
    (dict(method="npo", method_args={"bogus": 1}), "bogus"),
    (dict(lora_r=-1), "lora_r"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_targets=()), "lora_targets"),
    (dict(eval_every=-1), "eval_every"),
    (dict(gradient_checkpointing="yes"), "gradient_checkpointing"),
])
def test_config_errors_at_construction(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig(**kw)


def test_build_method_beta_zero_is_rejected_where_it_divides():
    for name in ("npo", "simnpo", "tnpo", "wtnpo", "idkdpo"):
        with pytest.raises(ValueError, match="beta"):
            build_method(name, beta=0)
    assert build_method("wga", beta=0).config.beta == 0.0  # p**0: allowed (GA)


def test_ref_kinds_and_units():
    assert build_method("npo").ref_kind == "table" and build_method("npo", retain_loss="kl").ref_kind == "model"
    assert build_method("undial").ref_kind == "model" and build_method("ga").ref_kind == "none"
    assert build_method("satimp").forget_unit == "tokens" and build_method("satimp_batch").forget_unit == "local"
    assert build_method("flat").forget_unit == "pairs" and build_method("simnpo").forget_unit == "sequences"


def test_gradient_checkpointing_and_eval_hook(tiny_dir, tmp_path):
    model, tok = load_model_and_tokenizer(tiny_dir)
    forget = QADataset(DATA["full"][:4], tok, "phi", 48)
    calls = []

    def eval_fn(model, step, epoch):
        calls.append((step, epoch, model.training, torch.is_grad_enabled()))
        return {"n": step}

    plain = train(load_model_and_tokenizer(tiny_dir)[0], forget, None,
                  TrainConfig(output_dir=str(tmp_path / "a"), method="ga", epochs=2, batch_size=2, grad_accum=1,
                              progress=False))
    res = train(model, forget, None, TrainConfig(output_dir=str(tmp_path / "b"), method="ga", epochs=2,
                                                 batch_size=2, grad_accum=1, progress=False,
                                                 gradient_checkpointing=True, eval_every=3, eval_every_epochs=1),
                eval_fn=eval_fn)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert calls == [(2, 0, False, False), (3, 1, False, False), (4, 1, False, False)]
    assert res.history[2]["eval_n"] == 3
    for (n, a), b in zip(res.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)  # recomputation changes nothing


def test_load_dtype(tiny_dir):
    from fastweight.train.models import parse_dtype

    model, _ = load_model_and_tokenizer(tiny_dir, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert parse_dtype("fp16") == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("int8")


def test_logged_mean_statistics_are_not_summed_over_micro_batches(tiny_dir, tmp_path):
    model, tok = load_model_and_tokenizer(tiny_dir)
    res = train(model, QADataset(DATA["full"][:8], tok, "phi", 48), None,
                TrainConfig(output_dir=str(tmp_path), method="ga", epochs=1, batch_size=1, grad_accum=4,
                            progress=False))
    assert [h["mean_weight"] for h in res.history] == pytest.approx([1.0, 1.0])  # GA's weights are all 1


def _fake_acc(kind, zero_stage=3, **ds):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config={"gradient_accumulation_steps": "auto",
                                                             "train_micro_batch_size_per_gpu": "auto", **ds})
    return SimpleNamespace(distributed_type=getattr(DistributedType, kind), num_processes=2,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("kind,ds,kw,match", [
    ("DEEPSPEED", {}, dict(g_effect_every=1, method="ga"), "g_effect_every"),
    ("FSDP", {}, dict(g_effect_every=1, method="ga"), "g_effect_every"),
    ("FSDP", {}, dict(save_every=2), "save_every"),  # ZeRO-1/2/3 resume (test_distributed)
    ("FSDP", {}, dict(resume=True), "resume"),
    ("DEEPSPEED", {"gradient_accumulation_steps": 8}, dict(grad_accum=4), "gradient_accumulation_steps"),
    ("DEEPSPEED", {"train_micro_batch_size_per_gpu": 2}, dict(batch_size=4), "train_micro_batch_size_per_gpu"),
    ("DEEPSPEED", {"gradient_clipping": 0.5}, dict(max_grad_norm=1.0), "gradient_clipping"),
    ("DEEPSPEED", {"optimizer": {"type": "Adam"}}, {}, "optimizer"),
    ("MULTI_CPU", {}, dict(method="rmu", lora_r=4, lora_targets=("q_proj",)), "lora_targets"),
])
def test_engine_settings_the_trainer_cannot_honour(kind, ds, kw, match):
    from fastweight.train.engine import check_engine

    cfg = TrainConfig(**kw)
    method = build_method(cfg.method) if cfg.method else None
    with pytest.raises(ValueError, match=match):
        check_engine(_fake_acc(kind, **ds), cfg, method)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_checkpoints_are_accepted_at_every_zero_stage(stage):
    from fastweight.train.engine import check_engine

    check_engine(_fake_acc("DEEPSPEED", zero_stage=stage), TrainConfig(save_every=2, resume=True), None)


def test_fsdp2_checkpoints_are_accepted_fsdp1_refused():
    from types import SimpleNamespace

    from fastweight.train.engine import check_engine

    acc = _fake_acc("FSDP")
    acc.state.fsdp_plugin = SimpleNamespace(fsdp_version=2)
    check_engine(acc, TrainConfig(save_every=2, resume=True), None)  # tests/test_distributed_fsdp.py resumes it
    acc.state.fsdp_plugin = SimpleNamespace(fsdp_version=1)
    with pytest.raises(ValueError, match="fsdp_version 2"):
        check_engine(acc, TrainConfig(save_every=2), None)


def test_deepspeed_auto_values_are_filled_from_the_config():
    from fastweight.train.engine import check_engine

    acc = _fake_acc("DEEPSPEED", gradient_clipping="auto")
    check_engine(acc, TrainConfig(batch_size=3, grad_accum=5, max_grad_norm=0.7), None)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (3, 5, 30, 0.7)
