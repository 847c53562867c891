"""fastweight.pipelines on a tiny random model: each benchmark's run(config), equal to its example's output;
--eval-every, trackers, results provenance, real-data defaults and truncation warnings (issue 14 item 4)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastweight.data.synth_muse import generate_muse
from fastweight.data.synth_tofu import generate_tofu, write_tofu_folder
from fastweight.data.synth_wmdp import generate_wmdp
from fastweight.data.templates import REFUSALS
from fastweight.pipelines import common as C
from fastweight.pipelines import muse, tofu, wmdp
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


def test_tofu_run_equals_example_and_records_provenance(tiny, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    cfg = tofu.TofuConfig(model=tiny, output_dir=str(tmp_path / "lib"), cache_dir=cache, eval_every=1,
                          **TOFU_FAST)
    res = tofu.run(cfg)
    assert list(res.metrics) == ["target (before)", "satimp (after)", "retain model"]
    assert [d["step"] for d in res.during] == [1, 2]
    assert set(res.during[0]["metrics"]) >= {"forget_es", "forget_prob"}
    saved = json.loads((tmp_path / "lib" / "results.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(res.metrics))
    prov = saved["provenance"]
    assert prov["versions"]["torch"] and prov["config"]["method"] == "satimp" and len(prov["fingerprints"]["data"]) == 16
    assert "git_commit" in prov
    assert json.loads((tmp_path / "lib" / "status.json").read_text())["state"] == "complete"
    for name in ("table.md", "training.png", "es.png", "fq_mu.png", "eval/step-000001/TOFU_SUMMARY.json"):
        assert (tmp_path / "lib" / name).is_file(), name
    # the example is a thin shell: same options -> same numbers (fine-tuned models come from the cache)
    args = ["--model", tiny, "--output-dir", str(tmp_path / "cli"), "--cache-dir", cache, "--eval-every", "1"]
    for k, v in TOFU_FAST.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    capsys.readouterr()
    assert _example("tofu_unlearn").main(args) == 0
    printed = capsys.readouterr().out
    assert "[target] cached" in printed and res.table in printed
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["metrics"] == saved["metrics"]


def test_muse_and_wmdp_run_in_three_lines(tiny, tmp_path):
    r = muse.run(muse.MuseConfig(model=tiny, output_dir=str(tmp_path / "m"), cache_dir=str(tmp_path / "c"),
                                 n_articles=2, ft_epochs=1, epochs=1, max_steps=2, verbmem_max_new_tokens=4,
                                 knowmem_max_new_tokens=4, max_eval_items=2, window=32))
    assert list(r.metrics) == ["target (before)", "satimp (after)", "retrained"]
    assert "privleak" in r.metrics["satimp (after)"] and (tmp_path / "m" / "muse.png").is_file()
    w = wmdp.run(wmdp.WmdpConfig(model=tiny, output_dir=str(tmp_path / "w"), cache_dir=str(tmp_path / "c"),
                                 n_entities=2, n_general=2, ft_epochs=1, max_steps=2, max_eval_items=3, window=32,
                                 method="ga", method_args={"retain_loss": "nll"}))
    assert list(w.metrics) == ["target (before)", "ga (after)"]
    assert 0.0 <= w.metrics["ga (after)"]["wmdp_acc"] <= 1.0 and "| wmdp_acc |" in w.table


def test_tensorboard_tracker_writes_expected_tags(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tofu.run(tofu.TofuConfig(model=tiny, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                             report_to="tensorboard", eval_only=False, finetuned=True, **{**TOFU_FAST, "epochs": 1}))
    runs = list((tmp_path / "o" / "tensorboard").rglob("events.out.tfevents.*"))
    assert runs
    tags = set()
    for f in runs:
        acc = EventAccumulator(str(f.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/target/forget_es", "eval/unlearned/forget_es"} <= tags


def test_real_data_defaults_are_the_papers():
    assert tofu.resolved_lengths(tofu.TofuConfig()) == (64, 24)
    assert tofu.resolved_lengths(tofu.TofuConfig(data="locuslab/TOFU")) == (512, 200)
    assert tofu.resolved_lengths(tofu.TofuConfig(data="x", max_length=128)) == (128, 200)
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
                                   cache_dir=str(tmp_path / "c"), **{**TOFU_FAST, "epochs": 1}))
    assert calls == ["satimp"]  # only the unlearning run, no fine-tuning of target or retain model
    assert "forget_quality" in res.metrics["satimp (after)"]
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("target-*"))
