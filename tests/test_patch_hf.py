"""fastweight.patch on tiny random transformers causal LMs (built from configs, nothing downloaded).

Reference: the unpatched model's logits with a naive SatImp written here from the spec (full log-softmax,
causal shift, detached weights, token mean or sum / num_items_in_batch), in float32 like the model.
"""
from __future__ import annotations

import pytest
import torch

import fastweight
from fastweight._constants import IGNORE_INDEX

transformers = pytest.importorskip("transformers")
try:  # recent peft reads torch.distributed.tensor as an attribute; transformers 4.45 does not import it
    import torch.distributed.tensor  # noqa: F401
except ImportError:
    pass

V = 97


def _config(family: str, tied: bool = False):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    if family == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if family == "qwen2":
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    if family == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                                        sliding_window=16)
        return cfg, transformers.Gemma2ForCausalLM
    raise ValueError(family)


def _model(family: str, tied: bool = False, seed: int = 0, layers: int = 2):
    cfg, cls = _config(family, tied)
    cfg.num_hidden_layers = layers
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float()
    # Larger output weights than the init (std 0.02) so p_t varies and the SatImp weights are not ~ 0.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def _batch(seed: int = 1, B: int = 2, T: int = 9):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=gen)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[attention_mask == 0] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def _likely_labels(model, ids, labels):
    """Replace every other valid label by the model's greedy next token, so p_t spans small to large."""
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    out = labels.clone()
    out[:, 1::2] = torch.where(labels[:, 1::2] != IGNORE_INDEX, pred[:, :-1][:, ::2][:, : out[:, 1::2].shape[1]],
                               labels[:, 1::2])
    return out


def naive_satimp(logits, labels, beta1=5.0, beta2=0.1, num_items=None):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    valid = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    p = logp.detach().exp()
    w = torch.where(valid, p ** beta1 * (1 - p) ** beta2, 0.0)
    if num_items is not None:
        return (w * logp).sum() / num_items
    return (w * logp).sum() / valid.sum().clamp(min=1)


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(a, b, rtol=2e-4, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family,tied", [("llama", False), ("gemma2", False), ("qwen2", True)],
                         ids=["llama", "gemma2_softcap", "qwen2_tied"])
def test_patched_loss_and_grads_match_naive(family, tied):
    model = _model(family, tied)
    ids, mask, labels = _batch()
    labels = _likely_labels(model, ids, labels)
    # beta1 = beta2 = 1 keeps the weights p (1 - p) well away from 0 on a random model.
    ref = _loss_and_grads(model, lambda: naive_satimp(model(input_ids=ids, attention_mask=mask).logits, labels,
                                                      beta1=1.0, beta2=1.0))
    plain = model(input_ids=ids, attention_mask=mask).logits.detach()
    fastweight.patch(model, "satimp", beta1=1.0, beta2=1.0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert "logits" not in out and out.loss.dim() == 0  # not formed by the forward ...
    torch.testing.assert_close(out.logits, plain.to(out.logits.dtype), rtol=1e-5, atol=1e-6)  # ... but on access
    assert out["logits"] is out.logits and "logits" in out
    got = _loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    _assert_same(got, ref)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert abs(float(ref[0])) > 1e-4, "test input must give a non-trivial loss"


def test_loss_kwargs_and_positional_labels():
    model = _model("llama")
    ids, mask, labels = _batch(seed=2)
    ref = _loss_and_grads(model, lambda: naive_satimp(model(ids, mask).logits, labels, beta1=1.0, beta2=1.0))
    fastweight.patch(model, "satimp", beta1=1.0, beta2=1.0)
    # labels as the 6th positional argument of LlamaForCausalLM.forward
    got = _loss_and_grads(model, lambda: model(ids, mask, None, None, None, labels).loss)
    _assert_same(got, ref)


def test_num_items_in_batch():
    model = _model("qwen2")
    ids, mask, labels = _batch(seed=3)
    ref = _loss_and_grads(model, lambda: naive_satimp(model(input_ids=ids).logits, labels, num_items=23))
    fastweight.patch(model)
    got = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels, num_items_in_batch=23).loss)
    _assert_same(got, ref)
    got_t = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels,
                                                 num_items_in_batch=torch.tensor(23)).loss)
    _assert_same(got_t, ref)


def test_generate_and_inference_unchanged():
    model = _model("llama")
    ids, mask, _ = _batch(seed=4)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        fastweight.patch(model, "wga")
        assert fastweight.integrations.transformers.is_patched(model)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits, rtol=0, atol=0)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0), gen)


def test_unpatch_restores():
    model = _model("llama")
    ids, _, labels = _batch(seed=5)
    fastweight.patch(model, "ga")
    assert "logits" not in model(input_ids=ids, labels=labels)
    fastweight.unpatch(model)
    assert "forward" not in vars(model)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (*ids.shape, V)
    fastweight.unpatch(model)  # no-op


def test_ga_matches_negated_hf_cross_entropy():
    # GA = -tokmean(NLL): the patched loss must be exactly minus the model's own causal LM loss.
    model = _model("llama")
    ids, mask, labels = _batch(seed=6)
    hf_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    fastweight.patch(model, "ga")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss, -hf_loss,
                               rtol=1e-5, atol=1e-6)


def test_peft_lora():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    ids, mask, labels = _batch(seed=7)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                      init_lora_weights=False))
    ref = _loss_and_grads(lora, lambda: naive_satimp(lora(input_ids=ids, attention_mask=mask).logits, labels))
    fastweight.patch(lora, "satimp")
    got = _loss_and_grads(lora, lambda: lora(input_ids=ids, attention_mask=mask, labels=labels).loss)
    _assert_same(got, ref)
    assert any("lora_A" in n for n in got[1]) and not any("lm_head" in n for n in got[1])
    fastweight.unpatch(lora)
    assert lora(input_ids=ids, labels=labels).logits is not None


def test_peft_lora_on_lm_head_refused():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="adapter"):
        fastweight.patch(lora)


def test_torch_compile():
    model = _model("llama", layers=1)
    ids, mask, labels = _batch(seed=8)
    expected = naive_satimp(model(input_ids=ids, attention_mask=mask).logits, labels).detach()
    fastweight.patch(model, "satimp", backend="torch")
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss.detach(), expected, rtol=2e-4, atol=1e-6)
    loss.backward()
    assert model.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("loss,kwargs,exc,match", [
    ("nope", {}, ValueError, "unknown loss"),
    ("npo", {}, ValueError, "reference model"),
    ("ga_imp", {}, ValueError, "per-token weights"),
    ("satimp", {"beta3": 1.0}, TypeError, "beta3"),
    ("satimp", {"softcap": 1.0}, TypeError, "softcap"),
])
def test_patch_errors(loss, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastweight.patch(_model("llama"), loss, **kwargs)


def test_unknown_logit_scale_refused():
    # Granite's and Cohere's scales are applied (tests/test_logit_scale_hf.py); a scale attribute on a family
    # whose meaning of it is unknown (the same name multiplies in one family and divides in another) is refused.
    model = _model("llama")
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="model_type='llama'.* logit_scale=0.5"):
        fastweight.patch(model)


# --- copies keep their own weights (issue #13 item 1) -------------------------------------------------------
def _perturbed_copy_loss(copy_fn):
    """Loss of the patched policy, of a patched copy whose weights were then changed, and of the copy's own
    weights computed independently (unpatched, GA = -HF cross-entropy)."""
    model = _model("llama")
    ids, mask, labels = _batch(seed=11)
    fastweight.patch(model, "ga")
    clone = copy_fn(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    policy = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = clone(input_ids=ids, attention_mask=mask, labels=labels).loss
    fastweight.unpatch(clone)
    own = -clone(input_ids=ids, attention_mask=mask, labels=labels).loss
    return policy, got, own


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_compute_with_their_own_weights(how):
    import copy
    import pickle

    fn = copy.deepcopy if how == "deepcopy" else (lambda m: pickle.loads(pickle.dumps(m)))
    policy, got, own = _perturbed_copy_loss(fn)
    torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-6)
    assert abs(float(got.detach() - policy.detach())) > 1e-2, "the copy must not compute with the policy's weights"


def test_save_pretrained_roundtrip(tmp_path):
    model = _model("qwen2", tied=True)
    ids, mask, labels = _batch(seed=12)
    fastweight.patch(model, "satimp", beta1=1.0, beta2=1.0)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).float()
    assert not fastweight.integrations.transformers.is_patched(loaded)  # the patch is runtime state
    fastweight.patch(loaded, "satimp", beta1=1.0, beta2=1.0)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, labels=labels).loss, expected,
                               rtol=1e-6, atol=1e-7)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_options_validated_at_patch_time():
    model = _model("llama")
    with pytest.raises(ValueError, match="beta1"):
        fastweight.patch(model, "satimp", beta1=-1)
    with pytest.raises(ValueError, match="granularity"):
        fastweight.patch(model, "satimp", granularity="words")
    with pytest.raises(ValueError, match="backend"):
        fastweight.patch(model, "satimp", backend="cuda")
    assert not fastweight.integrations.transformers.is_patched(model)


# --- mixture of experts: the router loss is kept ------------------------------------------------------------
def _moe(family):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
                  output_router_logits=True, router_aux_loss_coef=0.37)
    if family == "mixtral":
        cfg, cls = transformers.MixtralConfig(**common, num_local_experts=4), transformers.MixtralForCausalLM
    else:
        cfg = transformers.Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=16, decoder_sparse_step=1)
        cls = transformers.Qwen2MoeForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg).float()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_router_aux_loss(family):
    model = _moe(family)
    ids, mask, labels = _batch(seed=13)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert ref.aux_loss is not None and float(ref.aux_loss) > 0
    ref_grads = _loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    fastweight.patch(model, "nll")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-6, atol=1e-7)
    assert out.router_logits is not None
    _assert_same(_loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss),
                 ref_grads)
    # Switched off per call, exactly like the model's own forward: no aux term, no aux_loss.
    plain = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False)
    hf_plain = fastweight.unpatch(model)(input_ids=ids, attention_mask=mask, labels=labels,
                                         output_router_logits=False)
    assert plain.aux_loss is None
    torch.testing.assert_close(plain.loss, hf_plain.loss, rtol=1e-5, atol=1e-6)
    # The forget loss gets the same router term.
    fastweight.patch(model, "satimp")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                               naive_satimp(ref.logits, labels) + 0.37 * ref.aux_loss, rtol=1e-5, atol=1e-6)


# --- per-call loss choice and outputs for trainers (issue #13 item 2) --------------------------------------
def test_per_call_nll_and_default_forget_loss():
    model = _model("llama")
    ids, mask, labels = _batch(seed=14)
    hf = _loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    logits = model(input_ids=ids, attention_mask=mask).logits.detach()
    fastweight.patch(model, "satimp", beta1=1.0, beta2=1.0)
    got = _loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels,
                                                fastweight_loss="nll").loss)
    _assert_same(got, hf)
    default = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(default, naive_satimp(logits, labels, beta1=1.0, beta2=1.0), rtol=2e-4, atol=1e-6)
    assert abs(float(default - hf[0])) > 1e-2
    assert model(input_ids=ids, labels=labels, fastweight_loss="none").loss is None


def test_token_logprobs_and_sequence_nll():
    model = _model("qwen2")
    ids, mask, labels = _batch(seed=15)
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    fastweight.patch(model, "ga")
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fastweight_loss="none",
                fastweight_token_logprobs=True)
    assert out.loss is None and "logits" not in out
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.where(valid, target, 0)[..., None]).squeeze(-1)
    ref = torch.where(valid, ref, 0.0)
    assert out.token_logprobs.shape == labels.shape and out.token_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.token_logprobs[:, :-1].double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(out.token_logprobs[:, -1] == 0)
    torch.testing.assert_close(out.sequence_nll.double(), -ref.sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.num_tokens, valid.sum(-1))
    out.sequence_nll.sum().backward()  # differentiable
    assert model.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"fastweight_loss": "npo"}, ValueError, "fastweight_loss"),
    ({"fastweight_loss": "bogus"}, ValueError, "fastweight_loss"),
])
def test_per_call_errors(kwargs, exc, match):
    model = fastweight.patch(_model("llama"), "ga")
    ids, mask, labels = _batch(seed=16)
    with pytest.raises(exc, match=match):
        model(input_ids=ids, labels=labels, **kwargs)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, fastweight_loss="nll")
