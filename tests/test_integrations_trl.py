"""TRL with a fastweight-patched model (docs/integrations.md, "TRL"): what holds and what does not.

* ``trl.create_reference_model`` (a deep copy) of a patched model computes with the copy's own weights.
* TRL's trainers (SFT, DPO, KTO, GRPO, RLOO in TRL 1.x) install their own fused LM head
  (``trl.trainer.utils.add_fused_lm_head``) and compute their losses from ``model(..., fused_lm_head=True)``:
  that path never calls the fastweight loss, so a patch is bypassed there (silently, by TRL's design). Calls
  without ``fused_lm_head`` still reach the patched forward.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastweight
from fastweight._constants import IGNORE_INDEX
from helpers import tiny_llama_lm

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

V, T = 37, 9


def _model():
    return tiny_llama_lm(V).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (3, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _mean_nll(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).double(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def test_create_reference_model_of_a_patched_model_computes_with_its_own_weights():
    try:
        from trl.experimental.utils import create_reference_model  # TRL >= 1.0
    except ImportError:
        from trl import create_reference_model

    model, batch = _model(), _batch()
    fastweight.patch(model, "satimp")
    ref = create_reference_model(model)
    with torch.no_grad():
        before = ref(**batch).loss
        policy_before = model(**batch).loss
        model.lm_head.weight.mul_(3.0)  # change the policy only
        model.model.layers[0].mlp.down_proj.weight.add_(0.5)
        assert torch.equal(ref(**batch).loss, before)
        assert not torch.allclose(model(**batch).loss, policy_before)
    assert not any(p.requires_grad for p in ref.parameters())


def test_trl_fused_lm_head_bypasses_the_fastweight_loss():
    from trl.trainer.utils import add_fused_lm_head

    model, batch = _model(), _batch()
    plain = copy.deepcopy(model)
    fastweight.patch(model, "satimp", beta1=1.0, beta2=1.0)
    with torch.no_grad():
        satimp = model(**batch).loss
        nll = _mean_nll(plain, batch)
        assert not torch.allclose(satimp.double(), nll, rtol=1e-3)
        add_fused_lm_head(model)  # what TRL's trainers do to the model they are given
        assert torch.equal(model(**batch).loss, satimp)  # a plain call still reaches the patched forward
        fused = model(**batch, fused_lm_head=True)  # what their compute_loss calls: TRL's own head
    assert fused.loss is not None
    torch.testing.assert_close(fused.loss.double(), nll, rtol=1e-5, atol=1e-6)  # plain NLL, not SatImp
