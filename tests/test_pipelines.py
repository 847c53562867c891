"""fastweight.pipelines on a tiny random model: TOFU's run(config), equal to its example's output (MUSE and WMDP
run through their examples in test_muse.py / test_wmdp.py);
--eval-every, trackers, results provenance, real-data defaults and truncation warnings (issue 14 item 4)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fastweight.data.synth_muse import generate_muse
from fastweight.data.synth_tofu import generate_tofu, write_tofu_folder
from fastweight.data.synth_wmdp import generate_wmdp
from fastweight.data.templates import REFUSALS
from fastweight.pipelines import common as C
from fastweight.pipelines import tofu
from fastweight.train.models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TOFU_FAST = dict(n_authors=6, questions_per_author=2, n_general=6, ft_epochs=1, epochs=2, max_new_tokens=4,
                 mixed_precision="no", max_eval_items=2)


def _texts(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _texts(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _texts(v)]
    return []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = _texts(generate_tofu(seed=0, n_authors=6, questions_per_author=2, n_general=6))
    for gen in (lambda: generate_muse(0), lambda: generate_wmdp(0)):
        try:
            texts += _texts(gen())
        except TypeError:
            pass
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), texts + ["Question: Answer:", *REFUSALS]))


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_tofu_run_end_to_end_with_eval_every_and_tracker(tiny, cache, tmp_path):
    tb = importlib.util.find_spec("tensorboard") is not None
    cfg = tofu.TofuConfig(model=tiny, output_dir=str(tmp_path / "lib"), cache_dir=cache, eval_every=1,
                          report_to="tensorboard" if tb else "none", **{**TOFU_FAST, "epochs": 1})
    res = tofu.run(cfg)
    assert list(res.metrics) == ["target (before)", "satimp (after)", "retain model"]
    assert [d["step"] for d in res.during] == list(range(1, len(res.history) + 1)) and res.during
    assert set(res.during[0]["metrics"]) >= {"forget_es", "forget_prob"}
    # the during-training evaluations see the model being trained: the last one is an evaluation of the final
    # model (computed again, in another folder, after train() returned) and differs from the target's
    assert res.during[-1]["step"] == len(res.history)
    # the columns also hold open-unlearning's metrics (not evaluated during training); the names both evaluators
    # have (forget_truth_ratio, model_utility, forget_quality) hold open-unlearning's value, equal up to its 1e-10s
    from fastweight.eval.tofu_metrics import ALL_METRICS

    after = res.metrics["satimp (after)"]
    during = {k: v for k, v in res.during[-1]["metrics"].items() if k not in ALL_METRICS}
    assert during == {k: after[k] for k in during}
    assert during != {k: res.metrics["target (before)"][k] for k in during}
    for k in set(res.during[-1]["metrics"]) & set(ALL_METRICS):
        assert res.during[-1]["metrics"][k] == pytest.approx(after[k], rel=1e-5, abs=1e-9)
    saved = json.loads((tmp_path / "lib" / "results.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(res.metrics))
    prov = saved["provenance"]
    assert prov["versions"]["torch"] and prov["config"]["method"] == "satimp" and len(prov["fingerprints"]["data"]) == 16
    assert "git_commit" in prov
    assert json.loads((tmp_path / "lib" / "status.json").read_text())["state"] == "complete"
    for name in ("table.md", "training.png", "es.png", "fq_mu.png", "eval/step-000001/TOFU_SUMMARY.json"):
        assert (tmp_path / "lib" / name).is_file(), name
    if tb:  # TensorBoard event files with the expected scalar tags
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = set()
        for f in (tmp_path / "lib" / "tensorboard").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(f.parent))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        assert {"train/loss", "train/lr", "train/grad_norm", "eval/target/forget_es", "eval/unlearned/forget_es",
                "eval/during/forget_es"} <= tags


def test_example_output_equals_library_run(tiny, cache, tmp_path, capsys):
    fast = {**TOFU_FAST, "eval_only": True}
    res = tofu.run(tofu.TofuConfig(model=tiny, output_dir=str(tmp_path / "lib"), cache_dir=cache, **fast))
    args = ["--model", tiny, "--output-dir", str(tmp_path / "cli"), "--cache-dir", cache]
    for k, v in fast.items():
        args += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    capsys.readouterr()
    assert _example("tofu_unlearn").main(args) == 0
    printed = capsys.readouterr().out
    assert "[target] cached" in printed and "[retain] cached" in printed and res.table in printed
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["metrics"] == \
        json.loads(json.dumps(res.metrics))


def test_real_data_defaults_are_the_papers():
    assert tofu.resolved_lengths(tofu.TofuConfig()) == (64, 24)
    assert tofu.resolved_lengths(tofu.TofuConfig(data="locuslab/TOFU")) == (512, 200)
    assert tofu.resolved_lengths(tofu.TofuConfig(data="x", max_length=128)) == (128, 200)
    from fastweight.pipelines import muse

    assert muse.generation_lengths(muse.MuseConfig()) == (64, 16)
    assert muse.generation_lengths(muse.MuseConfig(data="news")) == (128, 32)
    assert tofu.family_template("open-unlearning/tofu_Llama-2-7b-chat-hf_full") == "llama2"
    assert tofu.family_template("microsoft/phi-1_5") == "phi"
    assert tofu.family_template("org/other", tokenizer=type("T", (), {"chat_template": "x"})()) == "chat"


def test_data_with_truncating_max_length_warns_with_counts(tiny, tmp_path):
    data = tmp_path / "tofu"
    write_tofu_folder(data, 0, n_authors=6, questions_per_author=2, n_general=6)
    cfg = tofu.TofuConfig(model=tiny, data=str(data), max_length=12, max_new_tokens=4, finetuned=True,
                          eval_only=True, max_eval_items=1, output_dir=str(tmp_path / "o"), mixed_precision="no")
    with pytest.warns(C.PipelineWarning, match=r"max_length 12 cuts \d+ of \d+ forget10 answers") as rec:
        res = tofu.run(cfg)
    assert any("max_new_tokens 4 is shorter than" in str(w.message) for w in rec)
    assert res.extra["truncation"]["forget10"]["cut_by_max_length"] > 0


def test_finetuned_with_retain_model_never_fine_tunes(tiny, tmp_path, monkeypatch):
    calls = []
    real = C.train
    monkeypatch.setattr(C, "train", lambda *a, **k: calls.append(a[3].method) or real(*a, **k))
    res = tofu.run(tofu.TofuConfig(model=tiny, retain_model=tiny, finetuned=True, output_dir=str(tmp_path / "o"),
                                   cache_dir=str(tmp_path / "c"), **{**TOFU_FAST, "eval_only": True}))
    assert calls == []  # no fine-tuning of the target or the retain model
    assert "forget_quality" in res.metrics["target (before)"] and "retain model" in res.metrics
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("target-*"))


def test_evaluation_progress_bar_on_a_terminal_lines_in_a_log(monkeypatch, capsys):
    import io

    calls = []
    monkeypatch.setattr(tofu, "evaluate_tofu", lambda *a, splits, **k: calls.append(splits) or {"n": len(calls)})
    sets = {"forget": [1], "retain": [1], "real_authors": [], "world_facts": [1]}
    assert tofu._evaluate(None, None, sets, None, Path("."), None, "target") == {"n": 3}
    assert calls == [["forget"], ["retain"], ["world_facts"]]  # one split per call, empty splits skipped
    err = capsys.readouterr().err  # not a terminal: [progress] lines, no bar
    assert "\r" not in err and "[progress] TOFU eval target: 0/3 split" in err and err.rstrip().endswith("done")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    fake = Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    tofu._evaluate(None, None, sets, None, Path("."), None, "target")
    assert "TOFU eval target" in fake.getvalue()


def test_eval_hook_evaluates_the_model_train_passes_in():
    seen, during = [], []
    hook = C.eval_hook(C.Reporter("none", Path("."), "x", {}), lambda m, step: seen.append((m, step)) or {"a": 1.0},
                       during)
    trained = object()
    assert hook(model=trained, step=3, epoch=0) == {"a": 1.0}  # logged as eval_a in log.jsonl
    assert seen == [(trained, 3)] and during == [{"step": 3, "metrics": {"a": 1.0}}]


def test_trainer_flags_reach_the_unlearning_train_config(tmp_path):
    cfg = tofu.parse_args(["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lora-targets",
                           "q_proj, v_proj", "--gradient-checkpointing", "--torch-dtype", "bf16", "--eval-every", "3"])
    assert cfg.torch_dtype == "bf16"
    tc = C.unlearn_train_config(cfg, tmp_path, {})
    assert (tc.lora_r, tc.lora_alpha, tc.lora_dropout, tc.lora_targets) == (4, 8.0, 0.1, ("q_proj", "v_proj"))
    assert tc.gradient_checkpointing and tc.eval_every == 3
    assert C.train_key(tc)["eval_every"] is None  # another evaluation cadence reuses the checkpoints
    assert C.model_fingerprint("org/name", "bf16") != C.model_fingerprint("org/name")


@pytest.mark.parametrize("kw,match", [({"lora_r": -1}, "lora_r"), ({"lora_alpha": 0}, "lora_alpha"),
                                      ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_targets": "q_proj,"},
                                                                                "lora_targets"),
                                      ({"torch_dtype": "fp8"}, "torch_dtype"),
                                      ({"torch_dtype": "fp16", "mixed_precision": "fp16"}, "fp16"),
                                      ({"torch_dtype": "fp16", "unlearn_mixed_precision": "fp16"}, "fp16")])
def test_trainer_options_fail_at_config_time(kw, match):
    with pytest.raises(ValueError, match=match):
        tofu.TofuConfig(**kw)


def test_lora_pipeline_run_trains_adapters_only(tiny, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from fastweight.train.models import load_model_and_tokenizer

    runs = []

    def spy(*args, **kwargs):
        runs.append(C_train(*args, **kwargs))
        return runs[-1]

    C_train = C.train
    monkeypatch.setattr(C, "train", spy)
    cfg = tofu.TofuConfig(model=tiny, output_dir=str(tmp_path / "lora"), cache_dir=str(tmp_path / "cache"),
                          finetuned=True, lora_r=2, lora_targets="q_proj,v_proj", trainable_layers=0, eval_every=2,
                          **{**TOFU_FAST, "epochs": 2, "max_steps": 2})
    res = tofu.run(cfg)
    (trained,) = [r.model for r in runs]
    assert hasattr(trained, "peft_config") and len(res.history) == 2 and [d["step"] for d in res.during] == [2]
    # evaluated the PeftModel being trained: the during-training metrics (fastweight's set) equal the final
    # evaluation's, which adds open-unlearning's metrics, up to float32 summation order
    during, after = res.during[-1]["metrics"], res.metrics["satimp (after)"]
    assert set(during) <= set(after)
    assert all(during[k] == pytest.approx(after[k], rel=1e-6, abs=1e-9) for k in during), (during, after)
    fresh = dict(load_model_and_tokenizer(tiny)[0].named_parameters())
    n_lora = 0
    for name, p in trained.named_parameters():
        if "lora_" in name:
            n_lora += 1
            assert p.requires_grad
            if "lora_B" in name:  # initialised to zero, moved by training
                assert p.detach().abs().sum() > 0, name
        else:
            base = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert not p.requires_grad and torch.equal(p.detach(), fresh[base].detach()), name
    assert n_lora == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_muse_mia_attacks_added_to_results(tiny, tmp_path):
    from fastweight.pipelines import muse

    cfg = muse.MuseConfig(model=tiny, retrain_model=tiny, finetuned=True, output_dir=str(tmp_path / "m"),
                          cache_dir=str(tmp_path / "c"), mia_attacks="loss, zlib,min_k,min_k_plus_plus,reference",
                          epochs=1, max_steps=1, n_articles=3, verbmem_max_new_tokens=4, knowmem_max_new_tokens=4,
                          mixed_precision="no")
    res = muse.run(cfg)
    target, retrained = res.metrics["target (before)"], res.metrics["retrained"]
    keys = {"mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"}
    assert keys | {"mia_reference"} <= set(target) and keys <= set(res.metrics["satimp (after)"])
    assert keys <= set(retrained) and "mia_reference" not in retrained  # no reference for the reference itself
    assert all(0 <= v <= 1 for c in res.metrics.values() for k, v in c.items() if k.startswith("mia_"))
    # the target is the retrained model here: every reference score is 0, so the AUC is exactly 1/2
    assert target["mia_reference"] == 0.5
    # MUSE's PrivLeak AUC labels the other way round over the same Min-K% scores (docs/attacks.md)
    assert target["mia_min_k"] == pytest.approx(1 - target["privleak_auc"], abs=1e-9)
    assert "mia_min_k_plus_plus" in res.table
    saved = json.loads((tmp_path / "m" / "eval" / "target" / "MUSE_MIA.json").read_text())
    assert saved["results"]["mia_loss"]["agg_value"] == target["mia_loss"]
    assert len(saved["results"]["mia_loss"]["forget"]["value_by_index"]) == 3


@pytest.mark.parametrize("kw,match", [({"mia_attacks": "loss,bogus"}, "mia_attacks"),
                                      ({"mia_attacks": "loss,loss"}, "mia_attacks"),
                                      ({"mia_attacks": "reference", "finetuned": True}, "retrain-model")])
def test_muse_mia_attacks_fail_at_config_time(kw, match):
    from fastweight.pipelines import muse

    with pytest.raises(ValueError, match=match):
        muse.MuseConfig(**kw)


@pytest.mark.slow
def test_tofu_open_unlearning_metrics_and_robustness(tiny, cache, tmp_path):
    from fastweight.eval import tofu_metrics as TM

    cfg = tofu.TofuConfig(model=tiny, output_dir=str(tmp_path / "rob"), cache_dir=cache, metrics="all",
                          robustness="relearn,quant4,quant8,paraphrase,templates", relearn_steps="1,2",
                          **{**TOFU_FAST, "epochs": 1})
    res = tofu.run(cfg)
    cols = list(res.metrics)
    assert cols[:2] == ["target (before)", "satimp (after)"] and cols[-1] == "retain model"
    assert {"relearn@0", "relearn@1", "relearn@2", "quant4", "quant8", "paraphrase",
            "templates:prefix_injection", "templates:role_play", "templates:context_hint"} == set(cols[2:-1])
    after = res.metrics["satimp (after)"]
    assert set(TM.ALL_METRICS) <= set(after)  # forget_quality and privleak from the retain model's own log
    retain_log = json.loads((tmp_path / "rob" / "eval" / "retain" / "open-unlearning" / "TOFU_EVAL.json").read_text())
    assert after["privleak"] == pytest.approx(
        ((1 - after["mia_min_k"]) - (1 - retain_log["mia_min_k"]["agg_value"])) /
        (1 - retain_log["mia_min_k"]["agg_value"] + 1e-10) * 100)
    assert set(res.metrics["quant4"]) == {"forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
                                          "extraction_strength", "model_utility"}
    assert res.metrics["quant8"] != res.metrics["quant4"]
    saved = json.loads((tmp_path / "rob" / "results.json").read_text())
    assert saved["extra"]["robustness"]["relearn"]["steps"].keys() == {"1", "2"}
    assert saved["extra"]["robustness"]["templates"]["role_play"]["source"]
    assert (tmp_path / "rob" / "robustness.png").is_file()
    assert "| quant4 |" in res.table.splitlines()[0] and "| relearn@2 |" in res.table.splitlines()[0]
    assert "| privleak |" in res.table and "| mia_gradnorm |" in res.table
    # another run reads the first run's retain log (open-unlearning's layout) with --retain-logs, no retain model
    res2 = tofu.run(tofu.TofuConfig(model=tiny, output_dir=str(tmp_path / "logs"), cache_dir=cache, finetuned=True,
                                    eval_only=True, retain_logs=str(tmp_path / "rob" / "eval" / "retain" /
                                                                    "open-unlearning" / "TOFU_EVAL.json"),
                                    **{k: v for k, v in TOFU_FAST.items() if k != "epochs"}))
    assert "forget_quality" in res2.metrics["target (before)"] and list(res2.metrics) == ["target (before)"]


@pytest.mark.parametrize("kw, match", [
    ({"metrics": "forget_Q_A_Prob,bogus"}, "unknown metric 'bogus'"),
    ({"question_key": "q"}, "question_key"),
    ({"truth_ratio_agg": "mean"}, "tr_aggregator"),
    ({"holdout_split": "holdout20"}, "holdout_split"),
    ({"retain_logs": "/nonexistent/TOFU_EVAL.json"}, "retain_logs"),
    ({"robustness": "quant3"}, "unknown attack"),
    ({"relearn_steps": "0"}, "relearn_steps"),
    ({"quant_group_size": -1}, "quant_group_size"),
    ({"metrics": "mia_reference", "finetuned": True}, "reference model"),
])
def test_tofu_metric_and_robustness_options_fail_at_config_time(kw, match):
    with pytest.raises(ValueError, match=match):
        tofu.TofuConfig(**kw)


def test_muse_robustness_columns_beside_the_attacked_model(tiny, tmp_path):
    from fastweight.pipelines import muse

    cfg = muse.MuseConfig(model=tiny, finetuned=True, eval_only=True, output_dir=str(tmp_path / "m"),
                          cache_dir=str(tmp_path / "c"), robustness="quant8,relearn", relearn_steps="1",
                          n_articles=3, verbmem_max_new_tokens=4, knowmem_max_new_tokens=4, mixed_precision="no")
    res = muse.run(cfg)
    assert list(res.metrics) == ["target (before)", "quant8", "relearn@0", "relearn@1"]
    assert set(res.metrics["quant8"]) >= {"forget_verbmem", "forget_knowmem"}
    # relearn@0 is the attacked model itself, evaluated again
    assert res.metrics["relearn@0"]["forget_verbmem"] == pytest.approx(res.metrics["target (before)"]["forget_verbmem"])
    saved = json.loads((tmp_path / "m" / "results.json").read_text())
    assert saved["extra"]["robustness"]["quant8"]["bits"] == 8


@pytest.mark.parametrize("bench", ["muse", "wmdp"])
def test_probe_attacks_refused_before_loading_a_model(bench, tmp_path, monkeypatch):
    import importlib

    from fastweight.pipelines import common as C

    mod = importlib.import_module(f"fastweight.pipelines.{bench}")
    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg_cls = mod.MuseConfig if bench == "muse" else mod.WmdpConfig
    with pytest.raises(ValueError, match="no paraphrase attack"):
        mod.run(cfg_cls(robustness="quant4,paraphrase", output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c")))
