"""Membership-inference attacks and Exact Memorization (fastweight.eval.attacks).

Hand-computed cases for each score, float64 full-softmax transcriptions (written here, from the papers' and
open-unlearning's definitions) for every model-facing attack on a tiny random Llama, Min-K%++'s moments against
float64 with the error-relative helper, and the AUC orientation on a model that memorised its members.
"""
from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.eval import attacks as A
from helpers import DTYPES, DTYPE_IDS, assert_err_close

V = 37


# ----------------------------------------------------------------------------------------------- hand-computed
def test_loss_and_min_k_hand():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert A.loss_score(lp) == pytest.approx(3.0)
    assert A.min_k_score(lp, k=0.4) == pytest.approx(4.5)  # floor(0.4 * 5) = 2 lowest: -5, -4
    assert A.min_k_score(lp, k=0.5) == pytest.approx(4.5)  # floor(2.5) = 2
    assert A.min_k_score(lp, k=0.1) == pytest.approx(5.0)  # floor(0.5) = 0 -> guarded to 1
    assert A.min_k_score(lp, k=1.0) == pytest.approx(3.0)


def test_min_k_plus_plus_hand():
    lp, mu, var = [-1.0, -2.0, -0.5], [-0.5, -1.0, -0.5], [0.25, 4.0, 1.0]
    # z = (-0.5 / 0.5, -1 / 2, 0 / 1) = (-1, -0.5, 0)
    assert A.min_k_plus_plus_score(lp, mu, var, k=0.4) == pytest.approx(1.0)   # m = 1
    assert A.min_k_plus_plus_score(lp, mu, var, k=0.7) == pytest.approx(0.75)  # m = 2
    assert A.min_k_plus_plus_score(lp, mu, var, k=1.0) == pytest.approx(0.5)
    # variance floor 1e-6 (open-unlearning's clamp): z = -1e-3 / 1e-3 = -1
    assert A.min_k_plus_plus_score([-0.001], [0.0], [0.0], k=1.0) == pytest.approx(1.0)


def test_zlib_and_reference_hand():
    text = "naïve café " * 3  # non-ASCII: UTF-8 and Latin-1 byte counts differ
    c = len(zlib.compress(text.encode("utf-8")))
    assert c != len(zlib.compress(text.encode("latin-1")))
    assert A.zlib_score([-2.0, -4.0], text) == pytest.approx(3.0 / c)
    assert A.reference_score([-2.0, -4.0], [-1.0, -1.0]) == pytest.approx(3.0 - 1.0)


@pytest.mark.parametrize("forget,holdout,expected", [
    ([0.1, 0.2, 0.5], [0.3, 0.9], 5 / 6),  # holdout above forget in 5 of 6 pairs
    ([1.0], [1.0], 0.5),                   # a tie counts 1/2
    ([0.0, 0.0], [1.0, 2.0], 1.0),
    ([3.0, 4.0], [1.0, 2.0], 0.0),
])
def test_mia_auc_hand(forget, holdout, expected):
    assert A.mia_auc(forget, holdout) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------- Min-K%++ moments
def moments_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full softmax, the formula as written: mu = sum q log q, var = sum q (log q)^2 - mu^2."""
    logq = torch.log_softmax(logits, dim=-1)
    q = logq.exp()
    t = torch.where(q > 0, q * logq, torch.zeros_like(q))
    t2 = torch.where(q > 0, q * logq * logq, torch.zeros_like(q))
    mu = t.sum(-1)
    return mu, t2.sum(-1) - mu * mu


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("N,Vm,chunk", [(1, 1013, 1 << 22), (9, 1013, 2000), (6, 4097, 4097), (5, 7, 1)])
def test_logprob_moments_vs_float64(dtype, N, Vm, chunk):
    g = torch.Generator().manual_seed(N * Vm)
    x = torch.randn(N, Vm, generator=g) * 3
    x[0, 3 % Vm] = x[0].max() + 10  # confident row
    if N > 2:
        x[1] += 1e3                  # large logits
        x[2, ::2] = float("-inf")    # masked vocabulary entries
    x = x.to(dtype)
    mu, var = A.logprob_moments(x, chunk_elements=chunk)
    assert mu.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gt_mu, gt_var = moments_ref(x.double())
    naive_mu, naive_var = moments_ref(x)
    if dtype == torch.float64:
        torch.testing.assert_close(mu, gt_mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, gt_var, rtol=1e-10, atol=1e-12)
        return
    assert_err_close(mu, gt_mu, naive_mu, dtype=dtype, name="mu")
    assert_err_close(var, gt_var, naive_var, dtype=dtype, name="var")


def test_logprob_moments_uniform_and_onehot():
    mu, var = A.logprob_moments(torch.tensor([[0.0] * 8, [0.0] + [float("-inf")] * 7]))
    torch.testing.assert_close(mu, torch.tensor([-math.log(8), 0.0]))
    torch.testing.assert_close(var, torch.tensor([0.0, 0.0]))


# ----------------------------------------------------------------------------------------------- tiny models
def tiny_llama(seed: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=0.5, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


class WordTokenizer:
    """decode() only: token i -> "é<i>" (non-ASCII, so the UTF-8 encoding matters); 0 and 1 are special."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"é{i}" for i in ids if not (skip_special_tokens and i in (0, 1)))


def make_items(seed: int, lengths, prompt_len: int = 2):
    g = torch.Generator().manual_seed(seed)
    items = []
    for L in lengths:
        ids = torch.randint(2, V, (L,), generator=g)
        labels = ids.clone()
        labels[:prompt_len] = IGNORE_INDEX  # a prompt that is not scored
        items.append({"input_ids": ids, "labels": labels, "index": torch.tensor(len(items))})
    return items


def greedy_items(model, seed: int, lengths, prompt_len: int = 2):
    """Items whose tokens after the prompt are the model's greedy continuation with one random token swapped
    in, so Exact Memorization is strictly between 0 and 1."""
    items = make_items(seed, lengths, prompt_len)
    g = torch.Generator().manual_seed(seed + 1)
    for it in items:
        ids = it["input_ids"]
        with torch.no_grad():
            for t in range(prompt_len, ids.numel()):
                ids[t] = model(input_ids=ids[None, :t]).logits[0, -1].argmax()
        j = int(torch.randint(prompt_len, ids.numel(), (1,), generator=g))
        ids[j] = (ids[j] + 1 + int(torch.randint(0, V - 3, (1,), generator=g))) % (V - 2) + 2
        it["labels"][prompt_len:] = ids[prompt_len:]
    return items


def naive_token_stats(model, item):
    """Float64 full softmax on one unpadded sequence: (log p_t, mu_t, var_t, argmax == label) at scored t."""
    ids = item["input_ids"][None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    target = item["labels"][1:]
    keep = target != IGNORE_INDEX
    logq = torch.log_softmax(logits[keep], dim=-1)
    q = logq.exp()
    mu = (q * logq).sum(-1)
    var = (q * logq * logq).sum(-1) - mu * mu
    lp = logq.gather(1, target[keep][:, None]).squeeze(1)
    return lp, mu, var, logits[keep].argmax(-1) == target[keep]


def naive_scores(model, ref, items, k, drop_last=False):
    out = {a: [] for a in A.ATTACKS if a != "gradnorm"} | {"em": []}
    for it in items:
        lp, mu, var, correct = naive_token_stats(model, it)
        rlp = naive_token_stats(ref, it)[0]
        out["loss"].append(-lp.mean().item())
        text = WordTokenizer().decode(it["labels"][it["labels"] != IGNORE_INDEX].tolist(), skip_special_tokens=True)
        out["zlib"].append(-lp.mean().item() / len(zlib.compress(text.encode("utf-8"))))
        out["reference"].append(-lp.mean().item() + rlp.mean().item())
        if drop_last:
            lp, mu, var, correct = lp[:-1], mu[:-1], var[:-1], correct[:-1]
        m = max(1, math.floor(k * lp.numel()))
        out["min_k"].append(-lp.sort().values[:m].mean().item())
        z = (lp - mu) / var.clamp_min(1e-6).sqrt()
        out["min_k_plus_plus"].append(-z.sort().values[:m].mean().item())
        out["em"].append(correct.double().mean().item())
    return out


def values(res):
    return [res["value_by_index"][str(i)]["score"] for i in range(len(res["value_by_index"]))]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("k", [0.4, 1.0])
def test_token_attacks_match_float64_transcription(drop_last, k, monkeypatch):
    monkeypatch.setattr(A, "MOMENT_CHUNK_ELEMENTS", 2 * V)  # Min-K%++ moments gathered 2 rows at a time
    model, ref = tiny_llama(0), tiny_llama(1)
    items = greedy_items(model, 0, [5, 9, 12, 4, 7])
    cfg = A.AttackConfig(k=k, batch_size=3, drop_last_label=drop_last)  # padded batches of 3 and 2
    got = A.attack_scores(model, items, [a for a in A.ATTACKS if a != "gradnorm"], tokenizer=WordTokenizer(),
                          reference_model=ref, config=cfg)
    want = naive_scores(model, ref, items, k, drop_last)
    for a, res in got.items():
        torch.testing.assert_close(torch.tensor(values(res), dtype=torch.float64),
                                   torch.tensor(want[a], dtype=torch.float64), rtol=2e-5, atol=2e-6, msg=a)
        assert res["agg_value"] == pytest.approx(sum(want[a]) / len(want[a]), rel=2e-5, abs=2e-6)
    em = A.exact_memorization(model, items, config=cfg)
    assert values(em) == pytest.approx(want["em"])
    assert any(0 < v < 1 for v in want["em"])  # the case is not trivially all-right or all-wrong


def test_exact_memorization_hand():
    """A bigram model whose table makes token a predict (a + 1) % V: EM counts the matching labels."""
    model = Bigram(V, scale=0.0)
    with torch.no_grad():
        for a in range(V):
            model.table[a, (a + 1) % V] = 5.0
    ids = torch.tensor([3, 4, 5, 9, 10, 2])  # predictions 4, 5, 6, 10, 11 vs labels 4, 5, 9, 10, 2
    labels = ids.clone()
    labels[0] = IGNORE_INDEX
    res = A.exact_memorization(model, [{"input_ids": ids, "labels": labels}])
    assert res["agg_value"] == pytest.approx(3 / 5)
    res = A.exact_memorization(model, [{"input_ids": ids, "labels": labels}],
                               config=A.AttackConfig(drop_last_label=True))
    assert res["agg_value"] == pytest.approx(3 / 4)


def naive_gradnorm(model, item, p, drop_last=False):
    ids = item["input_ids"][None]
    target = item["labels"][1:]
    keep = target != IGNORE_INDEX
    if drop_last:
        keep[keep.nonzero().max()] = False
    params = [w for w in model.parameters() if w.requires_grad]
    logq = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    loss = -logq[keep].gather(1, target[keep][:, None]).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.stack([g.double().norm(p) for g in grads if g is not None]).mean().item()


@pytest.mark.parametrize("p,drop_last", [(1, False), (2, False), (math.inf, False), (2, True)])
def test_gradnorm_matches_float64_autograd(p, drop_last):
    model = tiny_llama(2, torch.float64)
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen tensors are not averaged in
    items = make_items(1, [6, 9])
    marker = torch.full_like(model.lm_head.weight, 7.0)
    model.lm_head.weight.grad = marker.clone()
    model.train()
    cfg = A.AttackConfig(p=p, drop_last_label=drop_last)
    got = values(A.attack_scores(model, items, ["gradnorm"], config=cfg)["gradnorm"])
    assert model.training  # mode restored
    assert torch.equal(model.lm_head.weight.grad, marker)  # the caller's .grad is untouched
    model.eval()
    want = [naive_gradnorm(model, it, p, drop_last) for it in items]
    assert got == pytest.approx(want, rel=1e-10)


# ----------------------------------------------------------------------------------------------- AUC orientation
class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: a model whose "memory" is a table of next-token preferences."""

    def __init__(self, vocab: int, scale: float = 0.5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * scale)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_auc_orientation_memorised_members():
    members = make_items(10, [16] * 6, prompt_len=1)
    holdout = make_items(11, [16] * 6, prompt_len=1)
    ref = Bigram(V, seed=5)
    model = Bigram(V, seed=5)
    with torch.no_grad():  # memorise every member bigram
        for it in members:
            ids = it["input_ids"]
            model.table[ids[:-1], ids[1:]] += 8.0
    kw = {"tokenizer": WordTokenizer(), "reference_model": ref}
    res = A.run_attacks(model, members, holdout, A.ATTACKS, **kw)
    assert set(res) == {f"mia_{a}" for a in A.ATTACKS}
    for name, r in res.items():
        assert r["agg_value"] > 0.9, (name, r["agg_value"])
        assert len(r["forget"]["value_by_index"]) == len(members) and r["value_by_index"] == {}
        # loss orientation: members score lower than non-members
        assert r["forget"]["agg_value"] < r["holdout"]["agg_value"], name
    swapped = A.run_attacks(model, holdout, members, A.ATTACKS, **kw)
    for name, r in swapped.items():
        assert r["agg_value"] == pytest.approx(1.0 - res[name]["agg_value"])
    assert A.exact_memorization(model, members)["agg_value"] > A.exact_memorization(model, holdout)["agg_value"]


def test_encode_texts_labels_every_token(tmp_path):
    from fastweight.train.models import load_model_and_tokenizer, save_tiny_model

    texts = ["the cat sat on the mat", "a dog ran"]
    _, tok = load_model_and_tokenizer(str(save_tiny_model(tmp_path / "m", texts)))
    items = A.encode_texts(tok, texts, max_length=4)
    for it, t in zip(items, texts):
        ids = list(tok(t)["input_ids"])[:4]
        assert it["input_ids"].tolist() == ids and it["labels"].tolist() == ids
        assert it["attention_mask"].tolist() == [1] * len(ids)


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0.0}, "k"), ({"k": 1.5}, "k"), ({"p": 3}, "p"), ({"batch_size": 0}, "batch_size"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.AttackConfig(**kwargs)
    with pytest.raises(TypeError, match="drop_last_label"):
        A.AttackConfig(drop_last_label=1)


def test_attack_errors():
    model = Bigram(V)
    items = make_items(0, [5, 6])
    with pytest.raises(ValueError, match="attacks"):
        A.attack_scores(model, items, ["nope"])
    with pytest.raises(ValueError, match="attacks"):
        A.attack_scores(model, items, "loss")
    with pytest.raises(ValueError, match="tokenizer"):
        A.attack_scores(model, items, ["zlib"])
    with pytest.raises(ValueError, match="reference_model"):
        A.run_attacks(model, items, items, ["reference"])
    with pytest.raises(ValueError, match="items"):
        A.attack_scores(model, [], ["loss"])
    with pytest.raises(ValueError, match="holdout"):
        A.run_attacks(model, items, [], ["loss"])
    with pytest.raises(ValueError, match=r"items\[0\] has no scored token"):
        A.attack_scores(model, [{"input_ids": [3, 4], "labels": [3, IGNORE_INDEX]}], ["loss"])
    with pytest.raises(ValueError, match=r"items\[0\].*one length"):
        A.attack_scores(model, [{"input_ids": [3, 4, 5], "labels": [3, 4]}], ["loss"])
    with pytest.raises(ValueError, match=r"items\[0\].*'labels'"):
        A.attack_scores(model, [{"input_ids": [3, 4, 5]}], ["loss"])
    with pytest.raises(ValueError, match="drop_last_label"):
        A.attack_scores(model, [{"input_ids": [3, 4], "labels": [3, 4]}], ["min_k"],
                        config=A.AttackConfig(drop_last_label=True))
    with pytest.raises(ValueError, match="drop_last_label"):
        A.attack_scores(model, [{"input_ids": [3, 4], "labels": [3, 4]}], ["gradnorm"],
                        config=A.AttackConfig(drop_last_label=True))
    with pytest.raises(ValueError, match="items"):
        A.exact_memorization(model, [])
    frozen = Bigram(V).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        A.attack_scores(frozen, items, ["gradnorm"])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="one sequence"):
        A.gradient_norm(model, batch)


def test_score_and_helper_errors():
    with pytest.raises(ValueError, match="token_logp"):
        A.loss_score([])
    with pytest.raises(TypeError, match="text"):
        A.zlib_score([-1.0], b"bytes")
    with pytest.raises(ValueError, match="k"):
        A.min_k_score([-1.0], k=2.0)
    with pytest.raises(ValueError, match="one shape"):
        A.min_k_plus_plus_score([-1.0, -2.0], [0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="ref_token_logp"):
        A.reference_score([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="forget_scores"):
        A.mia_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        A.mia_auc([float("nan")], [1.0])
    with pytest.raises(TypeError, match="logits"):
        A.logprob_moments(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        A.logprob_moments(torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_elements"):
        A.logprob_moments(torch.zeros(2, 3), chunk_elements=0)
    with pytest.raises(ValueError, match="max_length"):
        A.encode_texts(None, ["x"], max_length=1)
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        A.encode_texts(None, [3])
