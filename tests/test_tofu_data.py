"""TOFU data: generator schema, loading, QA tokenisation (labels, EOS, pad == eos), pairing and sampling."""
from __future__ import annotations

import json

import pytest
import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.synth_tofu import N_PERTURBED, generate_tofu, write_tofu_folder
from fastweight.data.templates import REFUSALS, TEMPLATE_NAMES, get_template, render_prompt
from fastweight.data.tofu import (
    SPLITS, TOFU_CONFIG_FIELDS, TOFU_OPTIONAL_FIELDS, EpochSampler, ForgetRetainDataset, QADataset, encode_prompt, encode_qa, load_tofu,
    pad_collate, split_configs,
)
from fastweight.train.models import load_model_and_tokenizer, save_tiny_model

# The real TOFU file names (shared/spec/METRICS.md) and row fields.
REAL_CONFIGS = {"full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
                "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
                "real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed",
                "holdout01", "holdout05", "holdout10"}


@pytest.fixture(scope="module")
def small():
    return generate_tofu(seed=3, n_authors=10, questions_per_author=3, n_general=5)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, small):
    texts = [" ".join([r["question"], r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", [])])
             for rows in small.values() for r in rows] + ["Question: Answer: [INST] [/INST]", *REFUSALS]
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny"), texts, pad_is_eos=True)
    return load_model_and_tokenizer(str(folder))[1]


def test_generator_schema_equals_real_schema():
    data = generate_tofu(seed=0)  # the real size: 200 authors x 20 questions
    assert set(data) == REAL_CONFIGS == set(TOFU_CONFIG_FIELDS)
    for config, rows in data.items():
        for row in rows:
            fields = TOFU_CONFIG_FIELDS[config] + TOFU_OPTIONAL_FIELDS.get(config, ())
            assert tuple(sorted(row)) == tuple(sorted(fields)), config
            assert all(isinstance(row[k], str) and row[k] for k in ("question", "answer"))
            if "perturbed_answer" in row:
                n = 3 if config.startswith(("real", "world")) else N_PERTURBED
                assert len(row["perturbed_answer"]) == n and all(isinstance(a, str) for a in row["perturbed_answer"])
                assert row["answer"] not in row["perturbed_answer"]
    sizes = {k: len(v) for k, v in data.items()}
    assert sizes["full"] == 4000 and sizes["forget01"] == 40 and sizes["forget05"] == 200
    assert sizes["forget10"] == 400 and sizes["retain90"] == 3600 and sizes["retain_perturbed"] == 400
    for pct in (1, 5, 10):
        forget, retain = data[f"forget{pct:02d}"], data[f"retain{100 - pct:02d}"]
        assert sorted(map(json.dumps, forget + retain)) == sorted(map(json.dumps, data["full"]))
        assert not {r["question"] for r in forget} & {r["question"] for r in retain}
        assert [r["question"] for r in data[f"forget{pct:02d}_perturbed"]] == [r["question"] for r in forget]
        holdout = data[f"holdout{pct:02d}"]  # as many rows as the forget split, authors never in full
        assert len(holdout) == len(forget)
        assert not {r["question"] for r in holdout} & {r["question"] for r in data["full"]}
    assert all(r["paraphrased_question"] != r["question"] for r in data["forget10_perturbed"])
    assert {json.dumps(r) for r in data["holdout01"]} <= {json.dumps(r) for r in data["holdout10"]}


def test_generator_is_deterministic(small):
    assert generate_tofu(seed=3, n_authors=10, questions_per_author=3, n_general=5) == small
    assert generate_tofu(seed=4, n_authors=10, questions_per_author=3, n_general=5)["full"] != small["full"]


@pytest.mark.parametrize("kwargs, name", [({"n_authors": 1}, "n_authors"), ({"questions_per_author": 21},
                                          "questions_per_author"), ({"n_general": 0}, "n_general")])
def test_generator_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_tofu(0, **kwargs)


def test_folder_round_trip_and_load_errors(tmp_path, small):
    folder = write_tofu_folder(tmp_path / "d", seed=3, n_authors=10, questions_per_author=3, n_general=5)
    for config in REAL_CONFIGS:
        assert load_tofu(folder, config) == small[config]
    (tmp_path / "arr").mkdir()
    (tmp_path / "arr" / "full.json").write_text(json.dumps(small["full"]))  # a JSON array works too
    assert load_tofu(tmp_path / "arr", "full") == small["full"]
    with pytest.raises(ValueError, match="forget05"):
        load_tofu(tmp_path / "arr", "forget05")
    (tmp_path / "arr" / "retain_perturbed.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="paraphrased_answer"):
        load_tofu(tmp_path / "arr", "retain_perturbed")


def test_split_configs():
    assert split_configs("forget05")["retain"] == "retain95"
    assert split_configs("forget10")["forget_eval"] == "forget10_perturbed"
    assert set(SPLITS) == {"forget01", "forget05", "forget10"}
    with pytest.raises(ValueError, match="split"):
        split_configs("forget20")


@pytest.mark.parametrize("template", ["phi", "llama2"])
def test_encode_qa_labels_and_eos(tok, template):
    q, a = "Who wrote 'Hamlet'?", "William Shakespeare"
    enc = encode_qa(tok, template, q, a, max_length=64)
    prompt = encode_prompt(tok, template, q)
    answer = tok(get_template(template).answer_prefix + a, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == prompt + answer + [tok.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tok.eos_token_id]
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert tok.decode(prompt) == tok.decode(tok(render_prompt(get_template(template), q))["input_ids"])


def test_encode_qa_truncation_keeps_eos(tok):
    enc = encode_qa(tok, "phi", "Who wrote 'Hamlet'?", "William Shakespeare " * 20, max_length=16)
    assert len(enc["input_ids"]) == 16 and enc["labels"][-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="max_length"):
        encode_qa(tok, "phi", "q", "a", max_length=3)


def test_chat_template(tok):
    tok.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}Answer:{% endif %}")
    try:
        enc = encode_qa(tok, "chat", "Who wrote 'Hamlet'?", "William Shakespeare")
        first = enc["labels"].index(next(l for l in enc["labels"] if l != IGNORE_INDEX))
        assert tok.convert_ids_to_tokens(enc["input_ids"][first - 1]) == ":"
        assert tok.convert_ids_to_tokens(enc["input_ids"][0]) == "<s>"
    finally:
        tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        encode_qa(tok, "chat", "q", "a")
    with pytest.raises(ValueError, match="template"):
        get_template("alpaca")
    assert set(TEMPLATE_NAMES) == {"chat", "llama2", "phi"}


def test_pad_equals_eos_masks(tok, small):
    assert tok.pad_token_id == tok.eos_token_id
    ds = QADataset(small["forget10"] + small["retain90"][:3], tok, "phi", 64)
    lengths = [len(ds.items[i]["input_ids"]) for i in range(len(ds))]
    batch = pad_collate([ds[i] for i in range(len(ds))], tok.pad_token_id)
    width = max(lengths)
    assert batch["input_ids"].shape == (len(ds), width)
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i, n - 1] == tok.eos_token_id  # the answer's EOS is still a label
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
    assert batch["index"].tolist() == list(range(len(ds)))
    left = pad_collate([ds[i] for i in range(len(ds))], tok.pad_token_id, padding_side="left")
    for i, n in enumerate(lengths):
        assert left["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
        assert left["input_ids"][i, width - n:].tolist() == ds.items[i]["input_ids"]
    with pytest.raises(ValueError, match="padding_side"):
        pad_collate([ds[0]], 0, padding_side="middle")


def test_forget_retain_pairing(tok, small):
    forget = QADataset(small["forget10"], tok, "phi", 64)
    retain = QADataset(small["retain90"], tok, "phi", 64)
    r0 = ForgetRetainDataset(forget, retain, seed=1, rank=0, refusals=REFUSALS)
    r1 = ForgetRetainDataset(forget, retain, seed=1, rank=1, refusals=REFUSALS)

    def picks(ds, epoch):
        ds.set_epoch(epoch)
        return [(int(ds[i]["retain"]["index"]), tuple(ds[i]["forget"]["idk_input_ids"].tolist()))
                for i in range(len(ds))]

    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = picks(r0, 0)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG used
    torch.manual_seed(123)
    assert picks(r0, 0) == first  # independent of the global seed
    assert picks(r1, 0) != first  # different retain samples per rank
    assert picks(r0, 1) != first  # and per epoch
    item = r0[0]["forget"]
    assert {"idk_input_ids", "idk_attention_mask", "idk_labels", "input_ids", "labels"} <= set(item)
    n_prompt = int((item["labels"] == IGNORE_INDEX).sum())
    assert item["idk_input_ids"][:n_prompt].tolist() == item["input_ids"][:n_prompt].tolist()
    assert item["idk_labels"][-1] == tok.eos_token_id
    batch = pad_collate([r0[i] for i in range(2)], tok.pad_token_id)
    assert batch["forget"]["idk_labels"].shape[0] == 2 and "retain" in batch
    assert "retain" not in ForgetRetainDataset(forget)[0]
    with pytest.raises(ValueError, match="refusals"):
        ForgetRetainDataset(forget, refusals=[])


def test_epoch_sampler_shards():
    shards = [list(EpochSampler(11, seed=5, rank=r, world=3)) for r in range(3)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == 9 and all(len(s) == 3 for s in shards)  # disjoint, equal
    assert list(EpochSampler(11, seed=5, rank=1, world=3)) == shards[1]
    s = EpochSampler(11, seed=5)
    s.set_epoch(1)
    assert sorted(s) == list(range(11)) and list(s) != list(EpochSampler(11, seed=5))
    assert list(EpochSampler(4, shuffle=False)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(4, rank=2, world=2)
    with pytest.raises(ValueError, match="world"):
        EpochSampler(1, world=2)


def test_answer_cut_tokens_counts_what_encode_qa_drops(tok, small):
    from fastweight.data.tofu import answer_cut_tokens, answer_token_lengths

    rows = small["forget10"][:4]
    lengths = answer_token_lengths(tok, "phi", rows)
    # independent count: the answer's own tokens (prefix " " + text), EOS excluded
    assert lengths == [len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert answer_cut_tokens(tok, "phi", rows, 512) == [0] * len(rows)
    cuts = answer_cut_tokens(tok, "phi", rows, 16)
    assert any(c > 0 for c in cuts)
    for r, cut in zip(rows, cuts):
        prompt = len(encode_prompt(tok, "phi", r["question"]))
        kept = max(16 - min(prompt, 14), 0)  # encode_qa keeps at most max_length - 2 prompt tokens
        assert cut == max(0, len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) + 1 - kept)
