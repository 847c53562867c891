"""The released methods (``*_imp``, hard-sampling GD / NPO, KTO, FLAT's added divergences, LLMU) through
``build_method`` on a tiny random Llama: each total loss equals the released code's computation
(reference/released.py) on the model's own logits; ``token_weights`` in a batch reach every token-level method."""
from __future__ import annotations

import math

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.losses import LOSSES
from fastweight.reference import released as ref
from fastweight.reference import retain as retain_ref
from fastweight.reference import reweighted as rw_ref
from fastweight.train.methods import METHODS, build_method
from helpers import METHOD_LM, lm_batch, tiny_llama_lm

transformers = pytest.importorskip("transformers")

B, T, V = 3, 8, 67


def _model(seed):
    return tiny_llama_lm(V, seed=seed, num_hidden_layers=2, **METHOD_LM).eval()


@pytest.fixture(scope="module")
def models():
    return _model(0), _model(1)


def _batch(seed, prefix=""):
    return lm_batch(seed, B, T, V, prefix)


IMP = (torch.rand(B, T, generator=torch.Generator().manual_seed(7)) < 0.5).float()
FORGET = {**_batch(0), **_batch(1, "idk_"), "token_weights": IMP}
RETAIN = _batch(2)


def _z(model, batch, prefix=""):
    return model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).logits.double()


def _expected(name, model, refm, cfg):
    y, ye, yr = FORGET["labels"], FORGET["idk_labels"], RETAIN["labels"]
    z, zr_retain = _z(model, FORGET), _z(model, RETAIN)
    with torch.no_grad():
        zref, zref_e, zref_r = _z(refm, FORGET), _z(refm, FORGET, "idk_"), _z(refm, RETAIN)
    if name == "ga_imp":
        return ref.ga_imp(z, y, IMP)
    if name == "gd_imp":
        return sum(ref.gd_imp_terms(z, y, IMP, zr_retain, yr))
    if name.startswith("npo") and name.endswith("imp"):
        forget = ref.npo_imp(z, y, zref, IMP, cfg["beta"])
        if name == "npo_gd_imp":
            return forget + rw_ref.ga_loss(zr_retain, yr, shift=True) * -1
        if name == "npo_kl_imp":
            return forget + retain_ref.kl_loss(zr_retain, zref_r, yr, shift=True)
        return forget
    if name.startswith("gd_"):
        return ref.gd_hard(z, y, zr_retain, yr, cfg["k"], cfg["sampling"])
    if name.startswith("npo_gd_"):
        forget = ref.npo_hard(z, y, zref, cfg["k"], cfg["sampling"], cfg["beta"])
        return 0.1 * forget - rw_ref.ga_loss(zr_retain, yr, shift=True)
    if name.startswith("npo_"):
        return ref.npo_hard(z, y, zref, cfg["k"], cfg["sampling"], cfg["beta"])
    if name.startswith("kto"):
        with torch.no_grad():
            ze = _z(model, FORGET, "idk_")
        forget = ref.kto(z, y, zref, ze, zref_e, ye, cfg["beta"], cfg["form"])
        return forget - rw_ref.ga_loss(zr_retain, yr, shift=True) if name.endswith("_gd") else forget
    if name.startswith("flat_"):
        return ref.flat_divergence(z, y, _z(model, FORGET, "idk_"), ye, cfg["divergence"])
    if name == "llmu":
        return ref.llmu(z, y, _z(model, FORGET, "idk_"), ye) + retain_ref.kl_loss(zr_retain, zref_r, yr, shift=True)
    raise KeyError(name)


RELEASED = ["ga_imp", "gd_imp", "npo_imp", "npo_gd_imp", "npo_kl_imp", "gd_topk", "gd_bottomk", "npo_topk",
            "npo_bottomk", "npo_gd_topk", "kto_sigmoid", "kto_logsigmoid", "kto_logsigmoid_gd", "flat_reverse_kl",
            "flat_hellinger", "flat_neyman", "llmu"]


@pytest.mark.parametrize("name", RELEASED)
def test_released_method_equals_released_code(models, name):
    model, refm = models
    method = build_method(name)
    cfg = dict(LOSSES[name].defaults)
    # only the *_imp methods read an importance mask as released; the others would apply it as extra weights
    forget = FORGET if name.endswith("_imp") else {k: v for k, v in FORGET.items() if k != "token_weights"}
    out = method(model, forget, RETAIN, refm)
    expected = _expected(name, model, refm, cfg)
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=2e-5, abs_tol=2e-6), (out.loss.item(), expected)


def test_every_registry_method_builds():
    for name in METHODS:
        assert build_method(name).name == name


def test_imp_methods_need_token_weights(models):
    model, refm = models
    forget = {k: v for k, v in FORGET.items() if k != "token_weights"}
    for name in ("ga_imp", "gd_imp", "npo_imp"):
        with pytest.raises(ValueError, match="token_weights"):
            build_method(name)(model, forget, RETAIN, refm)


def test_batch_token_weights_reach_token_methods(models):
    model, refm = models
    out = build_method("ga")(model, FORGET, RETAIN, refm)
    z = _z(model, FORGET)
    expected = ref.weighted_token_loss(z, FORGET["labels"], IMP.double(), shift=True)
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=2e-5, abs_tol=1e-7)
    # ones leave the method unchanged, exactly
    ones = {**FORGET, "token_weights": torch.ones(B, T)}
    plain = {k: v for k, v in FORGET.items() if k != "token_weights"}
    for name in ("satimp", "npo", "tnpo", "flat"):
        a = build_method(name)(model, ones, RETAIN, refm).loss
        b = build_method(name)(model, plain, RETAIN, refm).loss
        assert torch.equal(a, b), name


def test_npo_with_batch_weights_weights_policy_and_reference(models):
    from fastweight.reference.token_logprobs import token_logprobs

    model, refm = models
    y = FORGET["labels"]
    out = build_method("npo", beta=0.5)(model, FORGET, RETAIN, refm)
    tw = ref.shifted_weights(IMP.double())
    S = -(token_logprobs(_z(model, FORGET), y, shift=True) * tw).sum(-1)
    with torch.no_grad():
        S_ref = -(token_logprobs(_z(refm, FORGET), y, shift=True) * tw).sum(-1)
    keep = (y[:, 1:] != IGNORE_INDEX).any(-1)
    expected = (-(2 / 0.5) * torch.nn.functional.logsigmoid(0.5 * (S - S_ref)))[keep].mean()
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=2e-5, abs_tol=1e-7)


@pytest.mark.parametrize("first", ["methods_released", "methods_logit", "methods", "method_configs"])
def test_any_methods_module_imports_first(first):
    """A program may import any of the method modules first (methods_released and methods_logit build on
    methods' classes): a fresh interpreter imports it, then builds a released, a logit-row and a plain method."""
    import subprocess
    import sys

    code = (f"import fastweight.train.{first}\n"
            "from fastweight.train.methods import build_method\n"
            "print(*(type(build_method(n)).__name__ for n in ('ga_imp', 'ceu', 'satimp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ImpGAMethod", "CEUMethod", "TokenLossMethod"]
