"""fastweight.eval.robustness: the RTN quantizer against a naive float64 loop, its error bound, quantize_model,
relearning through the training loop, probes and option parsing."""
from __future__ import annotations

import copy

import pytest
import torch

from fastweight.eval import robustness as R


def naive_rtn(w, bits, group_size, symmetric):
    """Element by element, in float64: one group at a time (the last one shorter)."""
    w = w.double()
    out = torch.empty_like(w)
    n_in = w.shape[1]
    g = n_in if group_size is None else min(group_size, n_in)
    for r in range(w.shape[0]):
        for start in range(0, n_in, g):
            vals = [float(v) for v in w[r, start:start + g]]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = max(max(abs(v) for v in vals) / qmax, 1e-12)
                q = [min(max(round(v / s), -qmax - 1), qmax) * s for v in vals]
            else:
                qmax = 2 ** bits - 1
                s = max((max(vals) - min(vals)) / qmax, 1e-12)
                z = round(-min(vals) / s)
                q = [(min(max(round(v / s) + z, 0), qmax) - z) * s for v in vals]
            out[r, start:start + g] = torch.tensor(q, dtype=torch.float64)
    return out, g


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 8, 5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_weight_matches_naive_and_bound(bits, group_size, symmetric):
    torch.manual_seed(bits + (group_size or 0))
    w = torch.randn(6, 24, dtype=torch.float64) * torch.rand(6, 1, dtype=torch.float64)
    got = R.quantize_weight(w, bits, group_size, symmetric=symmetric)
    ref, g = naive_rtn(w, bits, group_size, symmetric)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # error bound: at most half a step of the entry's group
    levels = 2 ** bits - 1 if not symmetric else 2 ** (bits - 1) - 1
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], g):
            grp = w[r, start:start + g]
            step = (grp.max() - grp.min()) / levels if not symmetric else grp.abs().max() / levels
            assert (got[r, start:start + g] - grp).abs().max() <= step / 2 + 1e-12
    # distinct values per group: at most 2^bits
    assert len(set(got[0, :g].tolist())) <= 2 ** bits
    assert R.quantize_weight(w.float(), bits, group_size, symmetric=symmetric).dtype == torch.float32


def test_quantize_weight_fp32_close_to_float64_and_errors():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    ref, _ = naive_rtn(w, 4, 8, False)
    torch.testing.assert_close(R.quantize_weight(w, 4, 8).double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(R.quantize_weight(torch.full((2, 4), 0.25), 4), torch.full((2, 4), 0.25))  # constant group
    with pytest.raises(ValueError, match="bits"):
        R.quantize_weight(w, 1)
    with pytest.raises(ValueError, match="group_size"):
        R.quantize_weight(w, 4, 0)
    with pytest.raises(ValueError, match="2-D"):
        R.quantize_weight(w[0], 4)


def test_quantize_model_skips_output_layer_and_copies():
    from helpers import tiny_llama_lm

    model = tiny_llama_lm(40)
    before = copy.deepcopy(model.state_dict())
    q = R.quantize_model(model, 4, 8)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    qs = q.state_dict()
    assert torch.equal(qs["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(qs["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    w = before["model.layers.0.mlp.up_proj.weight"]
    torch.testing.assert_close(qs["model.layers.0.mlp.up_proj.weight"], R.quantize_weight(w, 4, 8))
    assert not torch.equal(qs["model.layers.0.mlp.up_proj.weight"], w)


def test_relearn_trains_and_evaluates_at_each_step(tmp_path):
    from fastweight.data.tofu import QADataset
    from fastweight.eval.metrics import answer_token_stats
    from fastweight.data.tofu import pad_collate
    from fastweight.train.config import TrainConfig
    from fastweight.train.models import load_model_and_tokenizer
    from helpers import save_tiny_tofu_model, tiny_tofu

    model, tok = load_model_and_tokenizer(save_tiny_tofu_model(tmp_path / "m"))
    rows = tiny_tofu()["forget10"]
    ds = QADataset(rows, tok, "phi", 48)
    batch = pad_collate([ds[i] for i in range(len(ds))], tok.pad_token_id)
    batch.pop("index")

    def evaluate(m):
        return {"avg_logp": sum(s["avg_logp"] for s in answer_token_stats(m, batch)) / len(ds)}

    base = evaluate(model)["avg_logp"]
    calls = []
    res = R.relearn(model, ds, "1,3", lambda m: calls.append(1) or evaluate(m),
                    train_config=TrainConfig(output_dir=str(tmp_path / "run"), lr=5e-3, batch_size=2, grad_accum=1,
                                             progress=False))
    assert sorted(res) == [1, 3] and len(calls) == 2
    assert res[3]["avg_logp"] > res[1]["avg_logp"] > base  # relearning brings the answers back
    assert evaluate(model)["avg_logp"] == pytest.approx(base)  # on a copy
    assert not (tmp_path / "run").exists()


def test_parsing_recovery_and_templates():
    assert R.parse_attacks("relearn,quant4,relearn") == ("relearn", "quant4")
    assert R.parse_attacks(None) == ()
    with pytest.raises(ValueError, match="unknown attack"):
        R.parse_attacks("quant3")
    assert R.parse_steps("8,2,4,2") == (2, 4, 8)
    for bad in ("0", "a", ""):
        with pytest.raises(ValueError, match="relearn_steps"):
            R.parse_steps(bad)
    assert R.recovery({"p": 0.2, "q": 1.0}, {"p": 0.5, "q": 1.0}, {"p": 0.8, "q": 1.0}) == {"p": pytest.approx(0.5)}
    rows = R.with_template([{"question": "Who?", "answer": "A"}], "prefix_injection")
    assert rows[0]["question"].startswith("Who? ") and rows[0]["answer"] == "A"
    assert all(src for _, src in R.PROBE_TEMPLATES.values())
    with pytest.raises(ValueError, match="template"):
        R.with_template(rows, "no placeholder")
