"""Models whose output layer rescales the logits (Granite ``logits / logits_scaling``, Cohere ``logits *
logit_scale``): fastweight's losses and gradients equal the model's own, through every caller of the one head
reader (``fastweight.integrations.transformers.output_head``): ``patch``, ``fastweight.train``'s objective
and methods, and ``UnlearnTrainer``. Tiny random models built from configs (nothing downloaded), float32.

Reference: the unpatched model's own forward (its ``labels=`` loss, or its logits with a naive loss written
here), autograd for the gradients.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import fastweight
from fastweight._constants import IGNORE_INDEX

transformers = pytest.importorskip("transformers")
from helpers import lm_batch  # noqa: E402
from fastweight.integrations.transformers import logit_scale_of, output_head  # noqa: E402
from fastweight.train.methods import build_method, lm_forward  # noqa: E402
from fastweight.train.objective import UnlearnObjective  # noqa: E402

V, T = 89, 9
# Scales far from 1 so that ignoring them changes every loss by a lot (the bug this file guards against).
SCALED = {"granite": 1 / 4.0, "cohere": 0.25}
# Gradient sums run in a different order than the model's own (fused chunks vs full logits): float32 rounding.
TOL = dict(rtol=2e-5, atol=2e-6)


def _model(family: str, seed: int = 0):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if not hasattr(transformers, {"granite": "GraniteForCausalLM", "cohere": "CohereForCausalLM"}[family]):
        pytest.skip(f"this transformers ({transformers.__version__}) has no {family} model")
    if family == "granite":
        cfg, cls = transformers.GraniteConfig(**common, logits_scaling=4.0), transformers.GraniteForCausalLM
    elif family == "cohere":
        cfg, cls = transformers.CohereConfig(**common, logit_scale=0.25), transformers.CohereForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float()
    with torch.no_grad():  # larger output weights than the init so token probabilities are far from uniform
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def _batch(seed: int = 1, B: int = 2):
    return lm_batch(seed, B, T, V)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _hf_loss_and_grads(model, batch):
    """The model's own token-mean cross-entropy (its ``labels=`` loss) and its gradients."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = _grads(model)
    model.zero_grad()
    return loss.detach(), grads


def _assert_grads(got, want, sign=1.0):
    assert set(got) == set(want) and got
    for name in want:
        torch.testing.assert_close(got[name], sign * want[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", list(SCALED))
def test_output_head_reads_the_scale(family):
    model = _model(family)
    head = output_head(model)
    assert head.logit_scale == pytest.approx(SCALED[family])
    assert head.weight is model.get_output_embeddings().weight
    # The head reproduces the model's logits: s * (h @ W.T) with s from the config.
    batch = _batch()
    with torch.no_grad():
        h = lm_forward(model, batch).hidden
        torch.testing.assert_close(head.logit_scale * h @ head.weight.T, model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_logit_scale_rules():
    ns = SimpleNamespace
    assert logit_scale_of(ns(model_type="granitemoe", logits_scaling=8.0)) == 0.125
    assert logit_scale_of(ns(model_type="hyperclovax", logits_scaling=8.0)) == 8.0  # multiplies, unlike Granite
    assert logit_scale_of(ns(model_type="cohere2", logit_scale=0.5)) == 0.5
    assert logit_scale_of(ns(model_type="mpt", logit_scale=0.5)) == 1.0  # carried by the config, never applied
    assert logit_scale_of(ns(model_type="llama")) == 1.0
    assert logit_scale_of(ns(model_type="llama", logit_scale=1.0)) == 1.0
    # a composite model (Aya Vision: a Cohere2 text model) applies its text_config's scale
    assert logit_scale_of(ns(model_type="aya_vision", text_config=ns(model_type="cohere2", logit_scale=0.25))) == 0.25
    with pytest.raises(ValueError, match="logit_scale"):  # a family whose meaning of the attribute is unknown
        logit_scale_of(ns(model_type="llama", logit_scale=0.5))
    with pytest.raises(ValueError, match="logits_scaling"):
        logit_scale_of(ns(model_type="granite", logits_scaling=0.0))


@pytest.mark.parametrize("family", list(SCALED))
def test_patch_nll_equals_model_loss(family):
    model = _model(family)
    batch = _batch()
    want, want_grads = _hf_loss_and_grads(model, batch)
    fastweight.patch(model, "nll")
    loss = model(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), want, **TOL)
    _assert_grads(_grads(model), want_grads)
    # ignoring the scale would be far off (Granite: the 32.9 vs 5.75)
    fastweight.unpatch(model)
    with torch.no_grad():
        unscaled = fastweight.nll_loss(lm_forward(model, batch).hidden, batch["labels"], shift=True,
                                       lm_head=model.get_output_embeddings().weight)
    assert abs(float(unscaled) - float(want)) > 0.05 * float(want)


@pytest.mark.parametrize("family", list(SCALED))
def test_patch_satimp_equals_naive_on_model_logits(family):
    """The weighted fused path (gradient formed in the forward) against a naive SatImp on the model's logits."""
    model = _model(family)
    twin = copy.deepcopy(model)
    batch = _batch(seed=2)
    logits = twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    p = logp.detach().exp()
    want = ((p ** 2.0 * (1 - p) ** 0.5) * logp).sum() / valid.sum()  # -tokmean(sg[w] * ell), ell = -log p
    want.backward()
    fastweight.patch(model, "satimp", beta1=2.0, beta2=0.5)
    loss = model(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), **TOL)
    _assert_grads(_grads(model), _grads(twin))


@pytest.mark.parametrize("family", list(SCALED))
def test_train_objective_and_ga_method(family):
    model = _model(family)
    batch = _batch(seed=3)
    want, want_grads = _hf_loss_and_grads(model, batch)
    out = UnlearnObjective(model)(batch)  # no method: the retain/forget NLL of fastweight.train
    out["loss"].backward()
    torch.testing.assert_close(out["loss"].detach(), want, **TOL)
    _assert_grads(_grads(model), want_grads)
    model.zero_grad()
    ga = build_method("ga")(model, batch, None, None).loss  # GA minimises -NLL
    ga.backward()
    torch.testing.assert_close(ga.detach(), -want, **TOL)
    _assert_grads(_grads(model), want_grads, sign=-1.0)


@pytest.mark.parametrize("family", list(SCALED))
def test_kl_to_reference_uses_both_scales(family):
    """KL(p_ref || p) through the head reader of both models equals the KL of the models' own logits."""
    model, ref = _model(family, seed=0), _model(family, seed=5)
    batch = _batch(seed=4)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        log_q = torch.log_softmax(ref(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, -1)
    log_p = torch.log_softmax(twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    want = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    want.backward()
    out, r = lm_forward(model, batch), lm_forward(ref, batch)
    got = fastweight.kl_loss(out.hidden, r.hidden.detach(), batch["labels"], masked=False, **out.head(),
                             **{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in r.ref_head().items()})
    got.backward()
    torch.testing.assert_close(got.detach(), want.detach(), **TOL)
    _assert_grads(_grads(model), _grads(twin))


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("family", list(SCALED))
def test_unlearn_trainer_loss_and_grads(family, tmp_path):
    from fastweight.integrations.trainer import UnlearnTrainer

    model = _model(family)
    batch = _batch(seed=6)
    want, want_grads = _hf_loss_and_grads(copy.deepcopy(model), batch)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                                          use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = UnlearnTrainer(model=model, args=args, method="ga")
    loss = trainer.compute_loss(model, {"forget": batch})
    loss.backward()
    torch.testing.assert_close(loss.detach(), -want, **TOL)
    _assert_grads(_grads(model), want_grads, sign=-1.0)


def test_patch_custom_loss_needs_logit_scale():
    model = _model("cohere")

    def custom(hidden, labels, *, lm_head, bias=None, softcap=None, shift=False, backend="auto"):
        return fastweight.nll_loss(hidden, labels, lm_head=lm_head, shift=shift)

    with pytest.raises(ValueError, match="logit_scale"):
        fastweight.patch(model, custom)
    with pytest.raises(TypeError, match="logit_scale"):  # set from the model, never by the caller
        fastweight.patch(model, "nll", logit_scale=2.0)


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_evaluation_statistics_equal_the_models_own_logits(family):
    """TOFU/MUSE evaluation (answer_token_stats: fused statistics from hidden states) on a rescaling model gives
    the log p and greedy flags of the model's own logits."""
    from fastweight.eval.metrics import answer_token_stats

    model, batch = _model(family), _batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    got = answer_token_stats(model, batch)
    lp = torch.log_softmax(logits, -1)
    for b, row in enumerate(got):
        keep = labels[b] != IGNORE_INDEX
        want = lp[b][keep].gather(-1, labels[b][keep][:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(row["token_logp"], dtype=torch.float64), want, rtol=1e-4, atol=1e-5)
        assert row["correct"] == (logits[b][keep].argmax(-1) == labels[b][keep]).tolist()
