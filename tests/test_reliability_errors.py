"""Issue 22, parts 2-4: every runtime failure is one line naming the file or step (typed exceptions in the API,
``error:`` + exit 2 in the CLI), silent nonsense is refused, and data / config values are validated (file and line,
field, flag) before any model loads. Each test failed on the code before issue 22."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import fastweight
from fastweight.data.synth_tofu import write_tofu_folder
from fastweight.data.tofu import QADataset, load_tofu
from fastweight.data.wmdp import check_mcq_rows
from fastweight.pipelines import tofu
from fastweight.pipelines.config import cli_main, read_config_file
from fastweight.train.checkpoint import CheckpointError, CheckpointWriteError, latest_checkpoint
from fastweight.train.config import TrainConfig
from fastweight.train.engine import NonFiniteError
from fastweight.train.loop import train
from fastweight.train.models import load_model_and_tokenizer
from helpers import tiny_llama_lm, tiny_tofu

ROOT = Path(__file__).resolve().parents[1]
DATA = tiny_tofu()
FAST = dict(n_authors=6, questions_per_author=2, n_general=6, max_new_tokens=2, mixed_precision="no",
            max_eval_items=1, epochs=1, finetuned=True)




def _train(tiny_dir, out, model=None, **kw):
    loaded, tok = load_model_and_tokenizer(tiny_dir)
    cfg = TrainConfig(**{**dict(output_dir=str(out), lr=5e-3, epochs=1, batch_size=4, grad_accum=1, progress=False,
                                seed=3, max_steps=2, method="ga"), **kw})
    return train(model if model is not None else loaded, QADataset(DATA["retain90"], tok, "phi", 48), None, cfg)


# ---------------------------------------------------------------------------------------------- checkpoints
def _wider(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: torch.zeros(v.shape[0] + 8, *v.shape[1:]) for k, v in load_file(str(file)).items()}, str(file))


@pytest.mark.parametrize("case,file,damage", [
    ("truncated model", "model.safetensors", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
    ("empty model", "model.safetensors", lambda f: f.write_bytes(b"")),
    ("truncated rng", "rng-0.safetensors", lambda f: f.write_bytes(f.read_bytes()[:40])),
    ("state is a list", "trainer_state.json", lambda f: f.write_text("[]")),
    ("wider model", "model.safetensors", _wider),
])
def test_a_corrupt_checkpoint_is_one_typed_error_naming_the_file(tiny_dir, tmp_path, case, file, damage):
    _train(tiny_dir, tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    damage(ckpt / file)
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")) as info:
        _train(tiny_dir, tmp_path, resume=True)
    assert "\n" not in str(info.value) and (ckpt / file).exists(), case  # one line; the file is left in place


def test_resume_with_another_lora_rank_is_refused_by_name(tiny_dir, tmp_path):
    pytest.importorskip("peft")
    _train(tiny_dir, tmp_path, lora_r=2)
    with pytest.raises(ValueError, match="lora_r: 2 -> 4"):
        _train(tiny_dir, tmp_path, lora_r=4, resume=True)


def test_disk_full_during_a_checkpoint_names_the_step_and_keeps_the_partial_files(tiny_dir, tmp_path, monkeypatch):
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError, match="step 2") as info:
        _train(tiny_dir, tmp_path)
    assert isinstance(info.value, OSError) and "\n" not in str(info.value)
    assert (tmp_path / "checkpoints" / ".tmp-step-00000002" / "rng-0.safetensors").is_file()


def _example():
    spec = importlib.util.spec_from_file_location("tofu_unlearn_r", ROOT / "examples" / "tofu_unlearn.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cli_corrupt_checkpoint_is_one_error_line_with_exit_code_2(tiny_dir, tmp_path, capsys):
    argv = ["--model", tiny_dir, "--finetuned", "--epochs", "1", "--max-eval-items", "1", "--max-new-tokens", "2",
            "--n-authors", "6", "--questions-per-author", "2", "--mixed-precision", "no",
            "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert _example().main(argv) == 0
    (model_file,) = (tmp_path / "o" / "checkpoints").glob("step-*/model.safetensors")
    model_file.write_bytes(model_file.read_bytes()[:100])
    capsys.readouterr()
    assert _example().main(argv + ["--resume"]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "rror" in line]  # (progress bars of weight loading aside)
    assert len(err) == 1 and err[0].startswith("error:") and "model.safetensors" in err[0], err
    assert "Traceback" not in stderr
    assert model_file.stat().st_size == 100  # left for inspection


def test_cli_non_finite_stop_is_one_error_line_with_exit_code_2(capsys):
    def run(cfg):
        raise NonFiniteError("non-finite loss at optimizer step 7 (epoch 0, micro-batch 0); stopped before its "
                             "backward; last checkpoint: None")

    assert cli_main(lambda argv: None, run, print, argv=[]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "step 7" in err[0], err


# ---------------------------------------------------------------------------------------------- silent nonsense
def test_patch_refuses_a_masked_lm():
    import transformers

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24)
    with pytest.raises(ValueError, match="causal LM.*BertForMaskedLM|BertForMaskedLM.*causal LM"):
        fastweight.patch(transformers.BertForMaskedLM(cfg), "nll")


def _tofu_folder(tmp_path) -> Path:
    folder = tmp_path / "data"
    write_tofu_folder(folder, 0, n_authors=6, questions_per_author=2, n_general=6)
    return folder


def _edit(file: Path, **fields) -> None:
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    rows[0].update(fields)
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("config,fields,match", [
    ("forget10_perturbed", {"perturbed_answer": []}, "perturbed_answer.*non-empty list"),
    ("full", {"question": ["Who", "is"]}, "'question' must be a string"),
    ("retain_perturbed", {"paraphrased_answer": 3}, "'paraphrased_answer' must be a string"),
])
def test_bad_row_types_are_refused_before_any_model_loads(tmp_path, loader, config, fields, match):
    data = _tofu_folder(tmp_path)
    _edit(data / f"{config}.json", **fields)
    with pytest.raises(ValueError, match=match):
        load_tofu(data, config)
    with pytest.raises(ValueError, match=match):
        tofu.run(tofu.TofuConfig(**{**FAST, "finetuned": False}, data=str(data), output_dir=str(tmp_path / "o"),
                                 cache_dir=str(tmp_path / "c")))
    assert loader == []


def test_wmdp_choices_must_be_a_list_of_four_strings():
    row = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}
    assert check_mcq_rows([row], n_choices=4)
    for choices in ("ABCD", ["a", "b", "c"]):
        with pytest.raises(ValueError, match="choices"):
            check_mcq_rows([{**row, "choices": choices}], n_choices=4)


def test_lora_on_lm_head_is_refused(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="lm_head"):
        TrainConfig(lora_r=2, lora_targets="q_proj,lm_head")
    model, _ = load_model_and_tokenizer(tiny_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        _train(tiny_dir, tmp_path, model=lora)


# ---------------------------------------------------------------------------------------------- validation
def test_parse_errors_name_the_file_and_line(tmp_path):
    data = _tofu_folder(tmp_path)
    lines = (data / "full.json").read_text().splitlines()
    (data / "full.json").write_text("\n".join(lines[:2] + ['{"question": "q", "answer"'] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"full\.json:3: not valid JSON"):
        load_tofu(data, "full")
    (data / "full.json").write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "\xff", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"full\.json:2: not UTF-8"):
        load_tofu(data, "full")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-5\nepochs: [1,\nseed: 2\n")
    with pytest.raises(ValueError, match=r"c\.yaml:\d+: not valid YAML"):
        read_config_file(cfg)
    cfg.write_bytes(b"lr: 1e-5\n# caf\xe9\n")
    with pytest.raises(ValueError, match=r"c\.yaml:2: not UTF-8"):
        read_config_file(cfg)


@pytest.mark.parametrize("kw,match", [
    ({"lora_r": 2, "lora_targets": "q_proj,nosuch_proj"}, "lora-targets nosuch_proj"),
    ({"method": "rmu", "method_args": {"layer": 5, "trainable_layers": [4, 5]}}, "RMU layer 5"),
    ({"_no_gc": True, "gradient_checkpointing": True}, "gradient-checkpointing"),
    ({"_cache_is_file": True}, "cache-dir"),
])
def test_settings_the_model_config_rules_out_fail_before_loading(tiny_dir, tmp_path, loader, monkeypatch, kw, match):
    kw = dict(kw)
    if kw.pop("_no_gc", False):
        import transformers

        monkeypatch.setattr(transformers.LlamaForCausalLM, "supports_gradient_checkpointing", False)
    cache = tmp_path / "c"
    if kw.pop("_cache_is_file", False):
        cache.write_text("not a folder")
    with pytest.raises(ValueError, match=match):
        tofu.run(tofu.TofuConfig(**{**FAST, **kw}, model=tiny_dir, output_dir=str(tmp_path / "o"),
                                 cache_dir=str(cache)))
    assert loader == []


def test_numbers_are_range_checked_and_strings_coerced():
    with pytest.raises(ValueError, match="seed"):
        tofu.TofuConfig(seed=2 ** 32)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        tofu.TofuConfig(lr=float("inf"))
    cfg = TrainConfig(lr="1e-5", epochs="3", max_grad_norm="0.5")
    assert (cfg.lr, cfg.epochs, cfg.max_grad_norm) == (1e-5, 3, 0.5)
    for kw, match in (({"epochs": "three"}, "epochs must be an integer"), ({"lr": "inf"}, "lr must be a finite"),
                      ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_small_integer_labels_are_refused_by_name(dtype):
    hidden, head = torch.randn(2, 3, 8), torch.randn(11, 8)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fastweight.losses.token_logprobs(hidden, torch.ones(2, 3, dtype=dtype), lm_head=head)


def test_input_ids_beyond_the_vocabulary_are_refused_by_name():
    model = tiny_llama_lm(20)
    ids = torch.tensor([[1, 2, 25]])
    fastweight.patch(model, "nll")
    with pytest.raises(ValueError, match="input_ids out of range.*25.*20"):
        model(input_ids=ids, labels=ids)
    from fastweight.train.methods import lm_forward

    with pytest.raises(ValueError, match="input_ids out of range"):
        lm_forward(tiny_llama_lm(20), {"input_ids": ids})


def test_launch_zero_stage_reads_accelerate_environment(monkeypatch, tmp_path):
    """The ZeRO stage of an ``accelerate launch --use_deepspeed`` run, from its config file or the stage variable."""
    import json as _json

    from fastweight.train.zero3 import launch_zero_stage

    ds = tmp_path / "ds.json"
    ds.write_text(_json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    assert launch_zero_stage() == 3
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert launch_zero_stage() == 2


def test_eval_every_with_gradnorm_refused_under_zero3_before_loading(monkeypatch, tmp_path, tiny_dir):
    """--eval-every is supported under ZeRO-3 (tests/test_launch_cli.py), but not with MUSE's gradnorm attack,
    whose gradients would be taken inside the engine: one line before any model loads."""
    from fastweight.pipelines import muse

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    cfg = muse.MuseConfig(output_dir=str(tmp_path / "out"), eval_every=2, mia_attacks="loss,gradnorm",
                          model=str(tiny_dir), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--eval-every with the gradnorm attack"):
        muse.run(cfg)
