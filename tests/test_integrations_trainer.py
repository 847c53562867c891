"""UnlearnTrainer (transformers.Trainer) against a plain loop over fastweight.train.methods.build_method.

Same model, same micro-batches (recorded from the Trainer's own dataloader), gradient accumulation 2, SGD with
a constant learning rate: the per-micro-batch loss and the final weights must agree within float32 rounding.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from helpers import tiny_llama_lm

transformers = pytest.importorskip("transformers")
try:  # recent peft reads torch.distributed.tensor as an attribute; transformers 4.45 does not import it
    import torch.distributed.tensor  # noqa: F401
except ImportError:
    pass
from fastweight.integrations.trainer import UnlearnTrainer, add_reference_logprobs  # noqa: E402
from fastweight.train.methods import METHODS, build_method  # noqa: E402

V, T, N = 61, 8, 8
LR, ACCUM, BATCH, STEPS = 0.05, 2, 2, 2
OPTIONS = {"rmu": dict(layer=1, trainable_layers=(1,), alpha=2.0, steering_coef=2.0),
           "satimp_hard": dict(k=0.5),
           # sequence-level weights q_b^beta1 underflow to 0 on a random model: beta1 = 0 keeps them nonzero
           "satimp_instance": dict(beta1=0.0), "satimp_batch": dict(beta1=0.0)}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

def _model(seed=0, **config):
    return tiny_llama_lm(V, seed=seed, **config)


def _seq(gen, prompt=3):
    ids = torch.randint(0, V, (T,), generator=gen)
    labels = ids.clone()
    labels[:prompt] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long), "labels": labels}


def _dataset(seed=0, n=N, token_weights=False):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        forget = _seq(gen)
        forget.update({"idk_" + k: v for k, v in _seq(gen, prompt=3).items()})
        if token_weights:  # an importance mask (the *_imp methods need one)
            forget["token_weights"] = (torch.rand(T, generator=gen) < 0.5).float()
        items.append({"forget": forget, "retain": _seq(gen, prompt=2)})
    return items


class _Recorder(UnlearnTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.losses = [], []

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append(copy.deepcopy(inputs))
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self.losses.append(float(loss.detach()))
        return loss


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                max_steps=STEPS, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                weight_decay=0.0, warmup_steps=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _plain_loop(model, name, options, batches, ref):
    method = build_method(name, **options)
    params = []
    for pname, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and method.trainable(pname))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.SGD(params, lr=LR)
    model.train()
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        for micro in batches[step * ACCUM:(step + 1) * ACCUM]:
            out = method(model, micro["forget"], micro.get("retain"), ref)
            (out.loss / ACCUM).backward()
            losses.append(float(out.loss.detach()))
        opt.step()
    return losses


@pytest.mark.parametrize("name", METHODS)
def test_trainer_equals_plain_loop(name, tmp_path):
    options = OPTIONS.get(name, {})
    model = _model()
    initial = copy.deepcopy(model)
    needs_ref = build_method(name, **options).needs_ref
    trainer = _Recorder(model=model, args=_args(tmp_path), train_dataset=_dataset(token_weights=name.endswith("_imp")),
                        method=name, method_options=options, ref_model="copy" if needs_ref else None)
    trainer.train()
    assert len(trainer.losses) == STEPS * ACCUM
    expected = _plain_loop(initial, name, options, trainer.seen,
                           copy.deepcopy(_model()).eval() if needs_ref else None)
    torch.testing.assert_close(torch.tensor(trainer.losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    got = dict(model.named_parameters())
    changed = 0
    for pname, p in initial.named_parameters():
        torch.testing.assert_close(got[pname].detach(), p.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{pname}: {m}")
        changed += not torch.equal(p.detach(), _model().state_dict()[pname])
    assert changed > 0, "the run must update some weights"
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step_means = [sum(expected[i:i + ACCUM]) / ACCUM for i in range(0, len(expected), ACCUM)]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(step_means), rtol=1e-4, atol=1e-4)


def test_npo_reference_is_not_the_policy(tmp_path):
    model = _model()
    trainer = _Recorder(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset(), method="npo",
                        ref_model="copy")
    assert trainer.ref_model is not None and trainer.ref_model is not model
    trainer.train()
    beta = trainer.method.config.beta
    # Step 1: policy == reference, so every sequence gives (2/beta) log 2; afterwards they differ.
    assert abs(trainer.losses[0] - 2 / beta * torch.log(torch.tensor(2.0)).item()) < 1e-5
    assert all(abs(x - trainer.losses[0]) > 1e-6 for x in trainer.losses[2:])
    fresh = _model()
    for (pname, p), q in zip(trainer.ref_model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"reference weight {pname} changed"
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    batch = {k: v[None] for k, v in _dataset()[0]["forget"].items()}
    ref_out = trainer.ref_model(input_ids=batch["input_ids"], labels=batch["labels"], fastweight_loss="nll")
    own = fresh(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ref_out.loss, own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["npo", "idkdpo", "wtnpo"])
def test_precomputed_reference_equals_live_reference(name, tmp_path):
    ref = _model()
    data = []
    for item in _dataset():
        forget = add_reference_logprobs(ref, {k: v[None] for k, v in item["forget"].items()}, idk=True)
        data.append({"forget": {k: v[0] for k, v in forget.items()}, "retain": item["retain"]})
    live = _Recorder(model=_model(), args=_args(tmp_path / "a"), train_dataset=data, method=name, ref_model="copy")
    live.train()
    pre = _Recorder(model=_model(), args=_args(tmp_path / "b"), train_dataset=data, method=name,
                    ref_model="precomputed")
    pre.train()
    assert pre.ref_model is None
    torch.testing.assert_close(torch.tensor(pre.losses), torch.tensor(live.losses), rtol=1e-5, atol=1e-6)
    for p, q in zip(pre.model.parameters(), live.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_and_lora(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0, init_lora_weights=False))
    plain = copy.deepcopy(lora)
    trainer = _Recorder(model=lora, args=_args(tmp_path, gradient_checkpointing=True, max_steps=1),
                        train_dataset=_dataset(), method="gd")
    trainer.train()
    expected = _plain_loop(plain, "gd", {}, trainer.seen, None)[:ACCUM]
    torch.testing.assert_close(torch.tensor(trainer.losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(lora.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


# --- bad input: each a clear error naming the fix -----------------------------------------------------------
def test_missing_reference(tmp_path):
    with pytest.raises(ValueError, match="ref_model='copy'"):
        UnlearnTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(), method="npo")
    with pytest.raises(ValueError, match="precomputed"):
        UnlearnTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(), method="undial",
                       ref_model="precomputed")
    with pytest.raises(ValueError, match="ref_model must be"):
        UnlearnTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(), method="npo",
                       ref_model="self")


def test_missing_precomputed_logprobs(tmp_path):
    trainer = UnlearnTrainer(model=_model(), args=_args(tmp_path), train_dataset=_dataset(), method="npo",
                             ref_model="precomputed")
    with pytest.raises(ValueError, match="add_reference_logprobs"):
        trainer.train()


def test_missing_retain_and_idk(tmp_path):
    forget_only = [{"forget": item["forget"]} for item in _dataset()]
    trainer = UnlearnTrainer(model=_model(), args=_args(tmp_path), train_dataset=forget_only, method="gd")
    with pytest.raises(ValueError, match="retain"):
        trainer.train()
    no_idk = [{"forget": {k: v for k, v in item["forget"].items() if not k.startswith("idk_")}}
              for item in _dataset()]
    trainer = UnlearnTrainer(model=_model(), args=_args(tmp_path), train_dataset=no_idk, method="flat")
    with pytest.raises(ValueError, match="idk_labels"):
        trainer.train()


def test_rescaled_logits_and_lora_head_refused(tmp_path):
    model = _model()
    model.config.logit_scale = 0.25
    with pytest.raises(ValueError, match="logit_scale"):
        UnlearnTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), method="ga")
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="target_modules"):
        UnlearnTrainer(model=lora, args=_args(tmp_path), train_dataset=_dataset(), method="ga")


def test_ddp_wrapper_runs_the_method_inside_its_forward(tmp_path):
    """A DDP-wrapped model (one gloo process) goes through the wrapper's forward and gives the direct values."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    items = _dataset()[:2]
    inputs = {"forget": {k: torch.stack([i["forget"][k] for i in items]) for k in items[0]["forget"]},
              "retain": {k: torch.stack([i["retain"][k] for i in items]) for k in items[0]["retain"]}}
    model, twin = _model(), _model()
    trainer = UnlearnTrainer(model=model, args=_args(tmp_path), method="gd")
    direct = trainer.compute_loss(model, inputs)
    direct.backward()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(twin)
        calls = []
        handle = wrapped.register_forward_pre_hook(lambda m, a, kw: calls.append(sorted(kw)), with_kwargs=True)
        trainer2 = UnlearnTrainer(model=twin, args=_args(tmp_path), method="gd")
        out = trainer2.compute_loss(wrapped, inputs)
        out.backward()
        handle.remove()
        loss = out.detach()
        # the DDP reducer must go before its process group: freed after destroy_process_group, its gloo group's
        # destructor joined worker threads that never returned (a CI run hung here)
        del out, wrapped, trainer2
        gc.collect()
    finally:
        dist.destroy_process_group()
    assert calls == [["fastweight_run"]], "the method must run inside the wrapper's forward"
    torch.testing.assert_close(loss, direct, rtol=1e-6, atol=1e-7)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
