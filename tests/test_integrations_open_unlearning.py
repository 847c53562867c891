"""open-unlearning's trainer losses (transcribed from src/trainer/unlearn/*.py and src/trainer/utils.py of
locuslab/open-unlearning, written out here from their formulas, not imported) against UnlearnTrainer with the
method open_unlearning_method() maps them to: same model, same reference, same batch; loss and gradients.

Run ``python tests/test_integrations_open_unlearning.py`` for the table in docs/integrations.md.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastweight._constants import IGNORE_INDEX
from helpers import tiny_llama_lm

transformers = pytest.importorskip("transformers")
from fastweight.integrations.open_unlearning import OPEN_UNLEARNING_HANDLERS, open_unlearning_method  # noqa: E402
from fastweight.integrations.trainer import UnlearnTrainer  # noqa: E402

V, B, T = 53, 3, 9


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

def _model(seed=0):
    return tiny_llama_lm(V, seed=seed)


def _batch(gen, prompt=3):
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}


def _inputs(seed=0, prompt=3):
    gen = torch.Generator().manual_seed(seed)
    original, alternate, retain = _batch(gen, prompt), _batch(gen, prompt), _batch(gen, 2)
    return {"forget": {"original": original, "alternate": alternate}, "retain": retain}


# --- their formulas (transcribed) ---------------------------------------------------------------------------
def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _token_ce(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none")


def _hf_nll(model, batch):
    ce, valid = _token_ce(_logits(model, batch), batch["labels"]), batch["labels"][:, 1:].reshape(-1) != -100
    return ce.sum() / valid.sum()


def _seq_nll(model, batch):
    return _token_ce(_logits(model, batch), batch["labels"]).view(B, T - 1).sum(-1)


def _kl(model, ref, batch):
    with torch.no_grad():
        ref_logp = F.log_softmax(_logits(ref, batch), -1).view(-1, V)
    cur = F.log_softmax(_logits(model, batch), -1).view(-1, V)
    return F.kl_div(cur, ref_logp, reduction="batchmean", log_target=True)


def _dpo(model, ref, win, lose, beta):
    win_ratio = 0.0
    if win is not None:
        with torch.no_grad():
            win_ref = _seq_nll(ref, win)
        win_ratio = -(_seq_nll(model, win) - win_ref)
    with torch.no_grad():
        lose_ref = _seq_nll(ref, lose)
    lose_ratio = -(_seq_nll(model, lose) - lose_ref)
    return -2 / beta * F.logsigmoid(beta * (win_ratio - lose_ratio)).mean()


def _weighted(model, batch, b1, b2):
    ce, valid = _token_ce(_logits(model, batch), batch["labels"]), batch["labels"][:, 1:].reshape(-1) != -100
    p = (-ce).exp().detach()
    return -((p ** b1) * (1 - p) ** b2 * ce)[valid].mean()


def _undial(model, ref, batch, beta):
    logits, labels = _logits(model, batch)[:, :-1], batch["labels"][:, 1:]
    with torch.no_grad():
        teacher = _logits(ref, batch)[:, :-1]
    mask = torch.zeros_like(teacher)
    mask[torch.arange(B).view(-1, 1, 1), torch.arange(T - 1).view(1, -1, 1), labels.unsqueeze(-1)] = 1.0
    soft = F.softmax(teacher - mask * beta, -1)
    return F.cross_entropy(logits.reshape(-1, V), soft.reshape(-1, V), reduction="none").mean()


# Their configs/trainer/<handler>.yaml method_args (transcribed): what a run gets without overrides.
YAML = {"GradAscent": {}, "GradDiff": dict(gamma=1.0, alpha=1.0, retain_loss_type="NLL"),
        "NPO": dict(beta=0.1, alpha=1.0, gamma=1.0, retain_loss_type="NLL"),
        "DPO": dict(beta=0.1, alpha=1.0, gamma=1.0, retain_loss_type="NLL"),
        "SimNPO": dict(delta=0.0, beta=4.5, alpha=1.0, gamma=0.125, retain_loss_type="NLL"),
        "WGA": dict(beta=1.0, alpha=1.0, gamma=1.0, retain_loss_type="NLL"),
        "SatImp": dict(beta1=5.0, beta2=1.0, alpha=1.0, gamma=0.1, retain_loss_type="NLL"),
        "UNDIAL": dict(gamma=1.0, alpha=0.0, beta=10.0, retain_loss_type="NLL")}


def _undial_entropy(ref, batch, beta):
    """Mean entropy of UNDIAL's target q over the shifted positions: their CE minus fastweight's KL."""
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        z = _logits(ref, batch)[:, :-1] - beta * F.one_hot(labels, V)
        logq = F.log_softmax(z, -1)
        return -(logq.exp() * logq).sum(-1).mean()


def open_unlearning_loss(handler, model, ref, inputs, **overrides):
    """Their compute_loss for ``handler`` with their yaml method_args updated by ``overrides``."""
    args = {**YAML[handler], **overrides}
    forget, retain = inputs["forget"]["original"], inputs["retain"]
    g, a = args.get("gamma"), args.get("alpha")
    retain_term = _kl(model, ref, retain) if args.get("retain_loss_type") == "KL" else _hf_nll(model, retain)
    if handler == "GradAscent":
        return -_hf_nll(model, forget)
    if handler == "GradDiff":
        forget_term = -_hf_nll(model, forget)
    elif handler == "NPO":
        forget_term = _dpo(model, ref, None, forget, args["beta"])
    elif handler == "DPO":
        forget_term = _dpo(model, ref, inputs["forget"]["alternate"], forget, args["beta"])
    elif handler == "SimNPO":
        beta = args["beta"]
        x = _seq_nll(model, forget) / (forget["labels"] != -100).sum(-1) - args["delta"]
        forget_term = -F.logsigmoid(beta * x).mean() * 2 / beta
    elif handler == "WGA":
        forget_term = _weighted(model, forget, args["beta"], 0.0)
    elif handler == "SatImp":
        forget_term = _weighted(model, forget, args["beta1"], args["beta2"])
    elif handler == "UNDIAL":
        forget_term = _undial(model, ref, forget, args["beta"])
    else:
        raise ValueError(handler)
    return g * forget_term + a * retain_term


# --- fastweight through UnlearnTrainer --------------------------------------------------------------------
def fastweight_loss(handler, model, ref, inputs, tmp_path, **args):
    name, options = open_unlearning_method(handler, **args)
    targs = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = UnlearnTrainer(model=model, args=targs, method=name, method_options=options,
                             ref_model=ref if build_needs_ref(name, options) else None)
    return trainer.compute_loss(model, inputs)


def build_needs_ref(name, options):
    from fastweight.train.methods import build_method

    return build_method(name, **options).needs_ref


def _compare(handler, tmp_path, args, prompt=3):
    inputs = _inputs(prompt=prompt)
    ref = _model(seed=1)  # a reference that differs from the policy, so every ratio is non-trivial
    theirs_model, ours_model = _model(), _model()
    theirs = open_unlearning_loss(handler, theirs_model, ref, inputs, **args)
    ours = fastweight_loss(handler, ours_model, ref, inputs, tmp_path, **args)
    theirs.backward()
    ours.backward()
    if handler == "UNDIAL":  # same gradient; the values differ by a constant of the reference (adapter doc)
        theirs = theirs - {**YAML[handler], **args}["gamma"] * _undial_entropy(ref, inputs["forget"]["original"],
                                                                            {**YAML[handler], **args}["beta"])
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(theirs_model.named_parameters(), ours_model.parameters())]
    return theirs.detach(), ours.detach(), grads


# alpha = 0 rows compare the forget term alone (with the retain term on, it can dominate on a random model).
CASES = [("GradAscent", {}), ("GradDiff", {"gamma": 0.8, "alpha": 0.5}), ("NPO", {}), ("NPO", {"alpha": 0.0}),
         ("SimNPO", {}), ("SimNPO", {"beta": 2.5, "delta": 4.5, "alpha": 0.0}), ("DPO", {"beta": 0.5, "alpha": 0.0}),
         ("WGA", {"alpha": 0.0}), ("SatImp", {}), ("SatImp", {"beta1": 1.0, "beta2": 0.5, "gamma": 0.7, "alpha": 0.0}),
         ("UNDIAL", {}), ("UNDIAL", {"beta": 3.0, "alpha": 0.5}),
         # KL retain term: both average over every position (fastweight's unmasked default, as open-unlearning)
         ("GradDiff", {"retain_loss_type": "KL"})]


@pytest.mark.parametrize("handler,args", CASES, ids=[f"{h}-{i}" for i, (h, _) in enumerate(CASES)])
def test_open_unlearning_loss_and_grads_equal(handler, args, tmp_path):
    # UNDIAL: their mean runs over every position, so compare on a batch whose labels are all valid.
    theirs, ours, grads = _compare(handler, tmp_path, args, prompt=0 if handler == "UNDIAL" else 3)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    assert abs(float(theirs)) > 1e-3, "the compared loss must not vanish"
    for n, g_theirs, g_ours in grads:
        assert (g_theirs is None) == (g_ours is None), n
        if g_theirs is not None:
            torch.testing.assert_close(g_ours, g_theirs, rtol=2e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_every_handler_is_covered():
    assert {h for h, _ in CASES} == set(OPEN_UNLEARNING_HANDLERS)


def test_mapping_errors():
    with pytest.raises(ValueError, match="handler"):
        open_unlearning_method("PDU")
    with pytest.raises(ValueError, match="beta3"):
        open_unlearning_method("NPO", beta3=1.0)
    with pytest.raises(ValueError, match="retain_loss_type"):
        open_unlearning_method("NPO", retain_loss_type="EMBED_DIFF")
    assert open_unlearning_method("SatImp") == ("satimp", {"beta1": 5.0, "beta2": 1.0, "forget_coef": 0.1,
                                                           "retain_coef": 1.0, "retain_loss": "nll"})


if __name__ == "__main__":  # the table of docs/integrations.md
    import tempfile
    from pathlib import Path

    rows = CASES
    print("| open-unlearning | args | fastweight method | theirs | fastweight | abs diff | max grad rel diff |")
    print("|---|---|---|---|---|---|---|")
    for handler, args in rows:
        args = dict(args)
        prompt = args.pop("_prompt", 0 if handler == "UNDIAL" else 3)
        theirs, ours, grads = _compare(handler, Path(tempfile.mkdtemp()), args, prompt)
        rel = max(float((g2 - g1).abs().max() / g1.abs().max().clamp(min=1e-12)) for _, g1, g2 in grads
                  if g1 is not None)
        name, opts = open_unlearning_method(handler, **args)
        print(f"| {handler} | {args or 'defaults'}{' (prompt masked)' if prompt and handler == 'UNDIAL' else ''} "
              f"| `{name}` {opts} | {float(theirs):.6f} | {float(ours):.6f} | {abs(float(theirs - ours)):.1e} "
              f"| {rel:.1e} |")
