"""Peak memory of one unlearning step (issue 12 item 6): measured ladder on CPU and a memory model.

Probe (``python -m benchmarks.memory_scale probe PROVIDER METHOD RUNG``, a fresh process): after the imports,
reset the kernel's resident high-water mark (``/proc/self/clear_refs``), build a random Llama of the rung,
and run TWO optimizer steps of the method (the second is the steady state: AdamW's moments already exist
while activations are alive); report VmHWM - VmRSS(before the model): weights, gradients, AdamW state,
reference, logits, activations and the optimizer step's temporaries, all of it. Providers:
  * ``fastweight`` -- ``fastweight.train``'s objective module: fused hidden-state losses (no [N, V] logits),
    NPO's reference as the precomputed log-prob table (no reference model);
  * ``hf`` -- the same step the Hugging Face way: ``model(...).logits`` (upcast to fp32) and the loss on them,
    NPO's reference a ``copy.deepcopy`` of the model (open-unlearning's setup).
Methods: ``npo`` (forget only, reference) and ``satimp_nll`` (SatImp + retain NLL, two forwards).

Memory model (``predict``), bytes per rank, for P parameters (P_t trainable), N tokens per micro-batch, L
layers, hidden H, intermediate I, vocabulary V, world size W:
  weights   b_w * P                 (b_w = 4 fp32, 2 bf16; sharded engines: / W, plus one gathered layer)
  gradients b_g * P_t               (same dtype as the weights; / W under ZeRO-2/3 and FSDP)
  optimizer 8 * P_t (+ 4 * P_t fp32 master copy when the weights are bf16)   (/ W under sharding)
  step      4 * P_t / W: the multi-tensor AdamW step's temporary (one fp32 tensor list the size of P_t)
  reference b_w * P for a deep copy (hf NPO), 4 * N_forget_tokens for the table (fastweight), / W sharded
  logits    hf: K_LOGITS * 4 * N * V per forward whose logits are alive at the peak; fastweight: 0
            (the fused op works in row chunks: CHUNK_BYTES)
  activations  A_TOK * b_w * N * L * (H + I) per forward kept for the backward (with gradient
            checkpointing: b_w * N * H * L + one layer's worth).
Peak = weights + optimizer + reference + gradients + max(activations + logits, step): activations are freed
by the time the optimizer steps.
  runtime   RUNTIME: what the process itself adds in the step (autograd graph, allocator, thread pools).
K_LOGITS, A_TOK and RUNTIME are the three constants of the model; they are set from the measured CPU ladder
(fp32, 16 cases) by least squares on the relative error and written next to the table, so the fit and its
error are reproducible (``python -m benchmarks.memory_scale table --json``). A_TOK as measured includes the
CPU attention's saved [B, heads, T, T] probabilities; a GPU flash-attention kernel keeps none, so the
activation part of the 7B/8B predictions is an upper bound.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDERS = ("fastweight", "hf")
METHODS = ("npo", "satimp_nll")
CHUNK_BYTES = 0  # the fused op's row chunk is a few MB at most: below the model's resolution


@dataclass(frozen=True)
class Rung:
    """A Llama config of the ladder, and the step's micro-batch (batch x seq tokens)."""

    name: str
    hidden: int
    layers: int
    vocab: int
    batch: int = 2
    seq: int = 128

    @property
    def intermediate(self) -> int:
        return 2 * self.hidden + (self.hidden // 2)  # roughly Llama's 8/3 H rounded

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)

    def params(self) -> int:
        h, i, L, v = self.hidden, self.intermediate, self.layers, self.vocab
        return L * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


LADDER = (Rung("llama-h128", 128, 4, 32000), Rung("llama-h256", 256, 4, 32000), Rung("llama-h384", 384, 6, 32000),
          Rung("llama-h512", 512, 6, 32000))
BY_NAME = {r.name: r for r in LADDER}


@dataclass(frozen=True)
class Arch:
    """A full-size model for the predictions (public configs)."""

    name: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    params: int


LLAMA2_7B = Arch("Llama-2-7B", 4096, 32, 32000, 11008, 6_738_415_616)
LLAMA31_8B = Arch("Llama-3.1-8B", 4096, 32, 128256, 14336, 8_030_261_248)


def _rss() -> tuple[int, int]:
    text = open("/proc/self/status").read()
    get = lambda k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _batch(rung: Rung, seed: int):
    import torch

    from fastweight._constants import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rung.vocab, (rung.batch, rung.seq), generator=g)
    labels = ids.clone()
    labels[:, : rung.seq // 4] = IGNORE_INDEX  # the question part
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _hf_loss(model, ref, forget, retain, method: str):
    """The step the Hugging Face way: full [B, T, V] logits upcast to fp32, losses on them."""
    import torch
    import torch.nn.functional as F

    from fastweight._constants import IGNORE_INDEX

    def logp_of(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        y = b["labels"][:, 1:]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(y != IGNORE_INDEX, lp, 0.0), y != IGNORE_INDEX

    if method == "npo":
        with torch.no_grad():
            ref_s = logp_of(ref, forget)[0].sum(-1)
        lp, _ = logp_of(model, forget)
        return -(2 / 0.1) * F.logsigmoid(0.1 * (ref_s - lp.sum(-1))).mean()
    lp, valid = logp_of(model, forget)
    p = lp.detach().exp()
    forget_term = -((p ** 5.0 * (1 - p) ** 0.1) * lp).sum() / valid.sum()
    logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits.float()
    retain_term = F.cross_entropy(logits[:, :-1].transpose(1, 2), retain["labels"][:, 1:], ignore_index=IGNORE_INDEX)
    return -forget_term + retain_term


def run_probe(provider: str, method: str, rung: Rung) -> dict:
    """One optimizer step in this (fresh) process; peak resident growth in bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastweight.train.methods import build_method
    from fastweight.train.objective import RefLogpTable, UnlearnObjective

    torch.set_num_threads(int(os.environ.get("FASTWEIGHT_BENCH_THREADS", "1")))
    forget, retain = _batch(rung, 0), _batch(rung, 1)
    exact = _reset_hwm()
    base, _ = _rss()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=rung.hidden, intermediate_size=rung.intermediate, num_hidden_layers=rung.layers,
                      num_attention_heads=rung.heads, num_key_value_heads=rung.heads, vocab_size=rung.vocab,
                      max_position_embeddings=rung.seq, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if provider == "hf" and method == "npo":
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    table = None
    if provider == "fastweight" and method == "npo":
        table = RefLogpTable()
        table.add(forget, "", UnlearnObjective(model)(forget, mode="ref_logp")["logp"])

    def step():
        if provider == "fastweight":
            if method == "npo":
                return UnlearnObjective(model, build_method("npo"), table)(forget)["loss"]
            return UnlearnObjective(model, build_method("satimp", retain_loss="nll"))(forget, retain)["loss"]
        return _hf_loss(model, ref if method == "npo" else None, forget, retain, method)

    for _ in range(2):
        loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    rss, hwm = _rss()
    return {"provider": provider, "method": method, "rung": rung.name, "peak_bytes": hwm - base,
            "params": sum(p.numel() for p in model.parameters()), "exact_hwm": exact, "loss": float(loss)}


def probe(provider: str, method: str, rung: str, timeout: float = 900) -> dict:
    """``run_probe`` in a fresh subprocess (so nothing of an earlier case stays resident)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.memory_scale", "probe", provider, method, rung]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {provider} {method} {rung} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# The memory model
@dataclass(frozen=True)
class Setting:
    """One training setting for ``predict``: engine ("single", "ddp", "fsdp", "zero3"), world size, LoRA
    rank (0 = full fine-tuning; adapters on q/k/v/o), weight bytes, tokens per micro-batch, checkpointing."""

    engine: str = "single"
    world: int = 1
    lora_r: int = 0
    weight_bytes: int = 4
    tokens: int = 256
    forget_tokens_total: int = 0
    gradient_checkpointing: bool = False


def _forwards(provider: str, method: str) -> tuple[int, int]:
    """(forwards whose activations are kept for the backward, logits tensors alive at the peak)."""
    if method == "npo":
        return 1, (2 if provider == "hf" else 0)  # policy logits + their log-softmax (ref's freed by then)
    return 2, (4 if provider == "hf" else 0)  # forget + retain, each logits + log-softmax


def predict(provider: str, method: str, arch, s: Setting, k_logits: float, a_tok: float,
            runtime: float = 0.0) -> dict[str, float]:
    """Bytes per rank of each component and their peak (see the module docstring); ``arch``: ``Rung``/``Arch``."""
    h, L, v, i = arch.hidden, arch.layers, arch.vocab, arch.intermediate
    P = arch.params() if callable(arch.params) else arch.params
    Pt = s.lora_r * L * 4 * 2 * h if s.lora_r else P  # adapters A [r, H], B [H, r] on q, k, v, o
    sharded = s.engine in ("fsdp", "zero3")
    W = s.world if sharded else 1
    bw = s.weight_bytes
    layer = (4 * h * h + 3 * h * i) * bw
    out = {
        "weights": bw * P / W + (2 * layer if sharded else 0),  # the shard + the gathered layer (+ prefetch)
        "optimizer": (8 * Pt + (4 * Pt if bw < 4 else 0)) / W,  # AdamW moments (+ fp32 master weights)
        "reference": (bw * P / W) if (provider == "hf" and method == "npo") else
                     (4 * s.forget_tokens_total if method == "npo" else 0),
        "gradients": bw * Pt / W,
    }
    fwd, n_logits = _forwards(provider, method)
    n = s.tokens
    out["logits"] = k_logits * 4 * n * v * n_logits / 2 + CHUNK_BYTES
    if s.gradient_checkpointing:  # layer inputs kept, one layer's internals recomputed at a time
        out["activations"] = bw * n * h * L * fwd + a_tok * bw * n * (h + i) * fwd
    else:
        out["activations"] = a_tok * bw * n * L * (h + i) * fwd
    out["step"] = 4 * Pt / W
    out["runtime"] = runtime
    static = out["weights"] + out["optimizer"] + out["reference"] + out["gradients"] + runtime
    out["peak"] = static + max(out["activations"] + out["logits"], out["step"])
    return out


def _rung_setting(rung: Rung) -> Setting:
    n = rung.batch * rung.seq
    return Setting(tokens=n, forget_tokens_total=n)


def fit(results: list[dict]) -> tuple[float, float, float]:
    """(K_LOGITS, A_TOK, RUNTIME) minimising the squared relative error of ``predict`` on the measured ladder."""
    import numpy as np
    from scipy.optimize import least_squares

    def resid(x):
        return np.array([predict(r["provider"], r["method"], BY_NAME[r["rung"]], _rung_setting(BY_NAME[r["rung"]]),
                                 x[0], x[1], x[2] * 2**20)["peak"] / r["peak_bytes"] - 1 for r in results])

    sol = least_squares(resid, x0=[1.0, 4.0, 10.0], bounds=([0, 0, 0], [20, 200, 1024]))
    return float(sol.x[0]), float(sol.x[1]), float(sol.x[2]) * 2**20


# open-unlearning's setting for the predictions (configs/trainer/finetune.yaml, commit 247bd13: bf16,
# per_device_train_batch_size 8, gradient_checkpointing True, 32-bit AdamW; TOFU max_length 512): 8 sequences
# of <= 512 tokens per device and micro-batch; TOFU forget10 = 400 answers for the reference table.
OU_TOKENS, OU_FORGET_TOKENS = 8 * 512, 400 * 512
PREDICTION_SETTINGS = (
    ("DDP x8", Setting("ddp", 8, 0, 2, OU_TOKENS, OU_FORGET_TOKENS, True)),
    ("FSDP x8", Setting("fsdp", 8, 0, 2, OU_TOKENS, OU_FORGET_TOKENS, True)),
    ("ZeRO-3 x8", Setting("zero3", 8, 0, 2, OU_TOKENS, OU_FORGET_TOKENS, True)),
    ("ZeRO-3 x2", Setting("zero3", 2, 0, 2, OU_TOKENS, OU_FORGET_TOKENS, True)),
    ("LoRA r16, 1 GPU", Setting("single", 1, 16, 2, OU_TOKENS, OU_FORGET_TOKENS, True)),
    ("LoRA r16, 1 GPU, no ckpt", Setting("single", 1, 16, 2, OU_TOKENS, OU_FORGET_TOKENS, False)),
)


def report(json_path: str | None = None, results: list[dict] | None = None) -> dict:
    """Measure the ladder (unless ``results`` given), fit, print the two markdown tables; returns everything."""
    if results is None:
        results = [probe(p, m, r.name) for r in LADDER for m in METHODS for p in PROVIDERS]
    k, a, c = fit(results)
    gib = 2 ** 30
    lines = [f"Measured peak per step (CPU, fp32, fresh process; fit K_LOGITS={k:.3f}, A_TOK={a:.2f}, "
             f"RUNTIME={c / 2**20:.0f} MiB):", "",
             "| rung | params | method | provider | measured MiB | model MiB | error |", "|---|---|---|---|---|---|---|"]
    worst = 0.0
    for r in results:
        rung = BY_NAME[r["rung"]]
        pred = predict(r["provider"], r["method"], rung, _rung_setting(rung), k, a, c)["peak"]
        err = pred / r["peak_bytes"] - 1
        worst = max(worst, abs(err))
        r["model_bytes"], r["error"] = pred, err
        lines.append(f"| {rung.name} | {rung.params() / 1e6:.1f}M | {r['method']} | {r['provider']} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {pred / 2**20:.0f} | {err:+.1%} |")
    lines += ["", f"worst error {worst:.1%}", "", "Predicted peak per rank (GiB), bf16 weights, gradient checkpointing "
              "unless noted, 8 x 512 tokens per micro-batch:", "",
              "| model | setting | NPO fastweight | NPO HF + ref copy | SatImp+NLL fastweight | SatImp+NLL HF |",
              "|---|---|---|---|---|---|"]
    preds = []
    for arch in (LLAMA2_7B, LLAMA31_8B):
        for label, st in PREDICTION_SETTINGS:
            row = {(p, m): predict(p, m, arch, st, k, a, c) for m in METHODS for p in PROVIDERS}
            preds.append({"model": arch.name, "setting": label, **{f"{m}/{p}": v for (p, m), v in row.items()}})
            cells = [f"{row[(p, m)]['peak'] / gib:.1f}" for m in METHODS for p in PROVIDERS]
            lines.append(f"| {arch.name} | {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    out = {"fit": {"K_LOGITS": k, "A_TOK": a, "RUNTIME_BYTES": c, "worst_error": worst}, "ladder": results, "predictions": preds}
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("provider", choices=PROVIDERS)
    p.add_argument("method", choices=METHODS)
    p.add_argument("rung", choices=list(BY_NAME))
    t = sub.add_parser("table", help="measure the ladder, fit the model, print both tables as markdown")
    t.add_argument("--json", default=None, help="write measurements, fit and predictions here")
    t.add_argument("--from-json", default=None, help="refit and print from an earlier --json file (no probes)")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        print(json.dumps(run_probe(args.provider, args.method, BY_NAME[args.rung])))
        return
    report(args.json, json.load(open(args.from_json))["ladder"] if args.from_json else None)


if __name__ == "__main__":
    main()
