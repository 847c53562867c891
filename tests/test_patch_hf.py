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
    fastweight.patch(model, "satimp", beta1=1.0, beta2=1.0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out.loss.dim() == 0
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
    assert model(input_ids=ids, labels=labels).logits is None
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
    ("satimp", {"beta3": 1.0}, TypeError, "beta3"),
    ("satimp", {"softcap": 1.0}, TypeError, "softcap"),
])
def test_patch_errors(loss, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastweight.patch(_model("llama"), loss, **kwargs)


def test_rescaled_logits_refused():
    model = _model("llama")
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        fastweight.patch(model)
