"""open-unlearning's own trainers (transcribed in ``_open_unlearning_ref.py`` from locuslab/open-unlearning at
commit d3d7cf9, not imported) against fastweight:

* the trainer route: for every handler, the class ``register()`` puts in their registry computes, on the same
  model, reference and batch, their loss value (rel 1e-5, UNDIAL / RMU / CE-U / PDU included) and gradients;
* their ``src/train.py`` flow (``load_trainer`` on their registry, their FinetuneTrainer/UnlearnTrainer bases,
  finetune.yaml's ``eval_on_start`` + ``eval_strategy: epoch`` + ``do_eval``) trains and runs their evaluators;
* the patch route: their own losses on a ``fastweight.patch``-ed model (``outputs.logits`` formed on access)
  equal the unpatched values.

Run ``python tests/test_integrations_open_unlearning.py`` for the table in docs/integrations.md.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from helpers import tiny_llama_lm

transformers = pytest.importorskip("transformers")
import _open_unlearning_ref as ou  # noqa: E402
from fastweight.integrations import open_unlearning as fw_ou  # noqa: E402
from fastweight.integrations.open_unlearning import OPEN_UNLEARNING_HANDLERS, open_unlearning_method  # noqa: E402

V, B, T = 53, 3, 9
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _vocab(handler):  # their UNDIAL indexes the vocabulary with -100: it needs V >= 100 when labels are masked
    return 128 if handler == "UNDIAL" else V


def _model(seed=0, vocab=V):
    return tiny_llama_lm(vocab, seed=seed)


def _batch(gen, prompt=3, vocab=V):
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    labels[1, T - 2:] = IGNORE_INDEX  # ragged answers
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}


def _inputs(handler, seed=0, prompt=3):
    gen = torch.Generator().manual_seed(seed)
    v = _vocab(handler)
    original, alternate, retain = _batch(gen, prompt, v), _batch(gen, prompt, v), _batch(gen, 2, v)
    forget = {"original": original, "alternate": alternate} if handler == "DPO" else original
    return {"forget": forget, "retain": retain}


def _args(handler, args):
    extra = {"RMU": {"module_regex": r"model\.layers\.1"}, "PDU": {"retain_loss_eps": 0.5}}.get(handler, {})
    return {**extra, **args}


def _their_trainer(handler, model, tmp_path, **method_args):
    """The class register() puts in their registry, built as their load_trainer builds it."""
    registry = ou.make_registry()
    fw_ou.register(registry)
    targs = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    return registry[handler](model=model, args=targs, train_dataset=None, eval_dataset=None, tokenizer=None,
                             data_collator=None, evaluators=None, template_args=None, **method_args)


def _compare(handler, tmp_path, args, calls=1):
    """(their losses, fastweight's losses, [(name, their grad, our grad)]) over ``calls`` consecutive calls."""
    args = _args(handler, args)
    inputs = _inputs(handler)
    v = _vocab(handler)
    theirs_model, ours_model = _model(vocab=v), _model(vocab=v)
    ref = _model(seed=1, vocab=v)  # a reference that differs from the policy, so every ratio is non-trivial
    theirs_fn = ou.TheirLoss(handler, ref, **args)
    trainer = _their_trainer(handler, ours_model, tmp_path, **args)
    if trainer.ref_model is not None:
        trainer.ref_model = copy.deepcopy(ref)
    theirs, ours = [], []
    for _ in range(calls):
        torch.manual_seed(123)  # RMU's control vector comes from the global RNG in both
        theirs.append(theirs_fn(theirs_model, inputs))
        torch.manual_seed(123)
        ours.append(trainer.compute_loss(ours_model, inputs))
    sum(theirs).backward()
    sum(ours).backward()
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(theirs_model.named_parameters(), ours_model.parameters())]
    return torch.stack(theirs).detach(), torch.stack(ours).detach(), grads


# alpha = 0 rows compare the forget term alone (with the retain term on, it can dominate on a random model).
CASES = [("GradAscent", {}), ("GradDiff", {"gamma": 0.8, "alpha": 0.5}), ("NPO", {}), ("NPO", {"alpha": 0.0}),
         ("SimNPO", {}), ("SimNPO", {"beta": 2.5, "delta": 4.5, "alpha": 0.0}), ("DPO", {"beta": 0.5, "alpha": 0.0}),
         ("WGA", {"alpha": 0.0}), ("SatImp", {}), ("SatImp", {"beta1": 1.0, "beta2": 0.5, "gamma": 0.7, "alpha": 0.0}),
         ("UNDIAL", {}), ("UNDIAL", {"beta": 3.0, "alpha": 0.5}), ("GradDiff", {"retain_loss_type": "KL"}),
         ("CEU", {}), ("CEU", {"ignore_first_n_answer_tokens": 0}), ("PDU", {}),
         ("PDU", {"primal_dual": False, "gamma": 0.5}), ("RMU", {}), ("RMU", {"steering_coeff": 5, "alpha": 3.0})]


@pytest.mark.parametrize("handler,args", CASES, ids=[f"{h}-{i}" for i, (h, _) in enumerate(CASES)])
def test_their_trainer_values_and_grads_equal(handler, args, tmp_path):
    # PDU: 3 consecutive calls with the dual step at every call after the warm-up (dual_warmup_epochs=0)
    calls, extra = (3, {"dual_warmup_epochs": 0}) if handler == "PDU" else (1, {})
    theirs, ours, grads = _compare(handler, tmp_path, {**args, **extra}, calls)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert float(theirs.abs().min()) > 1e-3, "the compared loss must not vanish"
    for n, g_theirs, g_ours in grads:
        assert (g_theirs is None) == (g_ours is None), n
        if g_theirs is not None:
            torch.testing.assert_close(g_ours, g_theirs, rtol=2e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_every_handler_is_covered():
    assert {h for h, _ in CASES} == set(OPEN_UNLEARNING_HANDLERS) == set(ou.YAML)


def test_pdu_dual_variable_moves_as_theirs(tmp_path):
    theirs, ours, _ = _compare("PDU", tmp_path, {"dual_warmup_epochs": 0, "dual_step_size": 0.5}, calls=3)
    assert len(set(theirs.tolist())) == 3  # the retain weight changed between calls
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_rmu_trainable_set_is_their_regex(tmp_path):
    trainer = _their_trainer("RMU", _model(), tmp_path, **_args("RMU", {
        "trainable_params_regex": [r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"]}))
    trained = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert trained == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def test_empty_forget_row_warns_and_is_finite(tmp_path):
    """A forget row with no answer token: their NPO counts it ((2/beta) log 2), their SimNPO gives NaN; fastweight
    warns naming the row, NPO equals theirs, SimNPO drops the row (= theirs on the other rows)."""
    inputs = _inputs("NPO")
    inputs["forget"]["labels"][2] = IGNORE_INDEX
    ref = _model(seed=1)
    for handler, args in (("NPO", {"alpha": 0.0}), ("SimNPO", {"alpha": 0.0})):
        trainer = _their_trainer(handler, _model(), tmp_path, **args)
        if trainer.ref_model is not None:
            trainer.ref_model = copy.deepcopy(ref)
        with pytest.warns(RuntimeWarning, match=r"row\(s\) \[2\] have no answer token"):
            ours = trainer.compute_loss(trainer.model, inputs)
        theirs = ou.TheirLoss(handler, ref, **args)(_model(), inputs)
        if handler == "SimNPO":
            assert torch.isnan(theirs)
            kept = {"forget": {k: v[:2] for k, v in inputs["forget"].items()}, "retain": inputs["retain"]}
            theirs = ou.TheirLoss(handler, ref, **args)(_model(), kept)
        assert torch.isfinite(ours)
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)


class _ProbEvaluator:
    """Stands in for their TOFU/MUSE evaluators: evaluate_probability on a fixed batch (reads outputs.logits)."""

    def __init__(self, batch):
        self.batch, self.calls = batch, []

    def evaluate(self, model, output_dir=None, **kwargs):
        model.eval()
        probs = [r["prob"] for r in ou.evaluate_probability(model, self.batch)]
        self.calls.append(probs)
        return {"forget_Q_A_Prob": sum(probs) / len(probs)}


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, handler, n=4):
        self.items = []
        for i in range(n):
            one = _inputs(handler, seed=i)
            pick = lambda d: {k: (pick(v) if isinstance(v, dict) else v[0]) for k, v in d.items()}  # noqa: E731
            self.items.append(pick(one))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


FLOW = [h if h in ("NPO", "PDU", "RMU") else pytest.param(h, marks=pytest.mark.slow)
        for h in OPEN_UNLEARNING_HANDLERS]  # about 13 s each on a loaded 2-core machine


@pytest.mark.parametrize("handler", FLOW)
def test_their_train_py_flow_with_default_trainer_args(handler, tmp_path):
    """load_trainer on their registry + register(): finetune.yaml's eval_on_start, eval_strategy epoch and do_eval
    run their evaluators (on the patched model, through outputs.logits) at start, per epoch and at the end."""
    from fastweight.integrations.trainer import collate_unlearn

    model = _model(vocab=_vocab(handler))
    probe = _inputs(handler, seed=9)["retain"]
    before = [r["prob"] for r in ou.evaluate_probability(copy.deepcopy(model), probe)]
    evaluator = _ProbEvaluator(probe)
    registry = ou.make_registry()
    fw_ou.register(registry)
    cfg = {"handler": handler, "method_args": _args(handler, {}),
           "args": {**ou.FINETUNE_ARGS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                    "num_train_epochs": 2, "learning_rate": 1e-2, "output_dir": str(tmp_path), "report_to": [],
                    "use_cpu": True, "logging_steps": 1}}
    trainer, targs = ou.load_trainer(registry, cfg, model, train_dataset=_Pairs(handler),
                                     data_collator=collate_unlearn, evaluators={"tofu": evaluator})
    assert type(trainer).__mro__[2] is ou.UnlearnTrainer  # their base: evaluate / prediction_step are theirs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    trainer.evaluate(metric_key_prefix="eval")  # their train.py, do_eval
    assert len(evaluator.calls) == 4  # start, 2 epochs, do_eval
    torch.testing.assert_close(torch.tensor(evaluator.calls[0]), torch.tensor(before), rtol=1e-5, atol=1e-7)
    assert evaluator.calls[-1] != evaluator.calls[0]  # training moved the model
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_pdu_epoch_dual_update_after_warmup(tmp_path):
    """PDU with dual_update_upon="epoch", dual_warmup_epochs=1: at the end of epoch 1 the dual variable becomes
    max(0, alpha + step * (mean retain NLL over the training data - eps)), their post_epoch_dual_param_update."""
    from fastweight.integrations.trainer import collate_unlearn

    registry = ou.make_registry()
    fw_ou.register(registry)
    data = _Pairs("PDU")
    args = {"retain_loss_eps": 0.5, "dual_update_upon": "epoch", "dual_warmup_epochs": 1, "dual_step_size": 0.7}
    cfg = {"handler": "PDU", "method_args": args,
           "args": {**ou.FINETUNE_ARGS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                    "num_train_epochs": 1, "eval_strategy": "no", "eval_on_start": False, "do_eval": False,
                    "output_dir": str(tmp_path), "report_to": [], "use_cpu": True}}
    trainer, _ = ou.load_trainer(registry, cfg, _model(), train_dataset=data, data_collator=collate_unlearn)
    assert not trainer.method.dual_active
    trainer.train()
    with torch.no_grad():
        batches = [collate_unlearn([data[i], data[i + 1]]) for i in (0, 2)]
        mean = sum(float(trainer.model(**b["retain"]).loss) for b in batches) / 2
    assert trainer.method.retain_weight == pytest.approx(max(0.0, 1.0 + 0.7 * (mean - 0.5)), rel=1e-5)
    assert any("retain_preference" in h for h in trainer.state.log_history)


PATCH_CASES = [c for c in CASES if c[0] != "PDU" or "primal_dual" in c[1]]


@pytest.mark.parametrize("handler,args", PATCH_CASES, ids=[f"{h}-{i}" for i, (h, _) in enumerate(PATCH_CASES)])
def test_their_losses_on_a_patched_model(handler, args):
    """The patch route: their compute_loss on ``fastweight.patch(model, "nll")`` (and a patched reference) gives
    their unpatched value and gradients: outputs.loss is the NLL, outputs.logits formed on access."""
    import fastweight

    args = _args(handler, args)
    inputs = _inputs(handler)
    v = _vocab(handler)
    plain, patched = _model(vocab=v), fastweight.patch(_model(vocab=v), "nll")
    ref = _model(seed=1, vocab=v)
    torch.manual_seed(5)
    want = ou.TheirLoss(handler, ref, **args)(plain, inputs)
    torch.manual_seed(5)
    got = ou.TheirLoss(handler, fastweight.patch(copy.deepcopy(ref), "nll"), **args)(patched, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    want.backward()
    got.backward()
    for (n, p), q in zip(plain.named_parameters(), patched.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_mapping_errors():
    with pytest.raises(ValueError, match="handler"):
        open_unlearning_method("FinetuneTrainer")
    with pytest.raises(ValueError, match="beta3"):
        open_unlearning_method("NPO", beta3=1.0)
    with pytest.raises(ValueError, match="retain_loss_type"):
        open_unlearning_method("NPO", retain_loss_type="EMBED_DIFF")
    with pytest.raises(ValueError, match="retain_loss_eps"):
        open_unlearning_method("PDU")
    with pytest.raises(ValueError, match="EMBED_DIFF"):
        open_unlearning_method("RMU", retain_loss_type="NLL")
    with pytest.raises(ValueError, match="module_regex"):
        open_unlearning_method("RMU", module_regex="model.norm")
    assert open_unlearning_method("SatImp") == ("satimp", {"beta1": 5.0, "beta2": 1.0, "forget_coef": 0.1,
                                                           "retain_coef": 1.0, "retain_loss": "nll"})
    with pytest.raises(ValueError, match="TRAINER_REGISTRY"):
        fw_ou.register({"Trainer": transformers.Trainer})


if __name__ == "__main__":  # the table of docs/integrations.md
    import tempfile
    from pathlib import Path

    print("| open-unlearning | args | fastweight method | theirs | fastweight | rel diff | max grad rel diff |")
    print("|---|---|---|---|---|---|---|")
    for handler, args in CASES:
        theirs, ours, grads = _compare(handler, Path(tempfile.mkdtemp()), args)
        rel = max(float((g2 - g1).abs().max() / g1.abs().max().clamp(min=1e-12)) for _, g1, g2 in grads
                  if g1 is not None)
        name, opts = open_unlearning_method(handler, **_args(handler, args))
        t, o = float(theirs[0]), float(ours[0])
        shown = {k: v for k, v in _args(handler, args).items()}
        print(f"| {handler} | {shown or 'defaults'} | `{name}` {opts} | {t:.6f} | {o:.6f} "
              f"| {abs(t - o) / abs(t):.1e} | {rel:.1e} |")
