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
Regimes (``--regime``, issue 21 item 8; ``REGIMES``): ``fp32`` (the original ladder), ``lora`` (r8 on
q/k/v/o), ``bf16`` (bf16 weights, fp32 masters through ``fastweight.train.precision.MasterWeightAdamW``),
``lora_bf16``, ``ckpt`` (gradient checkpointing), ``seq512`` (2 x 512 tokens), ``zero3x2`` (DeepSpeed
ZeRO-3 on 2 CPU processes, per-rank peak; ``benchmarks/memory_zero3.py``), ``fsdp2x2`` (accelerate's FSDP2
preparation, torch's ``fully_shard``) and ``ddpx2`` (DistributedDataParallel), both on 2 gloo CPU processes
(``benchmarks/memory_dist.py``), measured on the small rungs.

Memory model (``predict``), bytes per rank, for P parameters (P_t trainable), N tokens per micro-batch, L
layers, hidden H, intermediate I, vocabulary V, world size W:
  weights   b_w * P                 (b_w = 4 fp32, 2 bf16; sharded engines: / W, plus two gathered layers)
  gradients b_t * P_t               (b_t: bytes of the trainable parameters, b_w, or 4 for peft's fp32 adapters;
                                    / W under ZeRO-3 and FSDP)
  optimizer 8 * P_t + master, master = 4 * P_t fp32 copy when b_t < 4   (/ W under sharding)
  buffers   the engines' own: DDP's gradient buckets b_t * P_t; ZeRO-3's reduce (H^2) and prefetch (0.9 H^2)
            buckets and the V x H embedding / lm_head gathered whole with its whole gradient ((b_w + b_t) V H);
            FSDP2 (accelerate's units) both V x H matrices, its root unit, gathered with their whole gradients
            (2 (b_w + b_t) V H; hf NPO: + 2 b_w V H of the reference's root); RUNTIME_ZERO3 per ZeRO-3 rank
            (engine, gloo group). Measured: zero3x2, fsdp2x2, ddpx2 (fp32, 2 ranks).
  step      (4 * P_t + master) / W: the multi-tensor AdamW step's fp32 temporary list, plus the fp32 gradient
            copies handed to it when there are masters
  reference b_w * P for a deep copy (hf NPO), 4 * N_forget_tokens for the table (fastweight), / W sharded
  logits    hf: K_LOGITS * 4 * N * V per forward whose logits are alive at the peak; fastweight: 0
            (the fused op works in row chunks: CHUNK_BYTES)
  activations  A_TOK * b_w * N * L * (H + I) per forward kept for the backward (with gradient
            checkpointing: b_w * N * H * L + one layer's worth).
Peak = weights + optimizer + reference + gradients + buffers + max(activations + logits, step): activations
are freed by the time the optimizer steps.
  runtime   RUNTIME: what the process itself adds in the step (autograd graph, allocator, thread pools).
K_LOGITS, A_TOK, RUNTIME (and RUNTIME_ZERO3) are the fitted constants; they are set from every measured case
(all regimes) by least squares on the relative error and written next to the tables with the residuals per
regime, so the fit and its error are reproducible (``python -m benchmarks.memory_scale table --regimes
--json``; ``--from-json`` refits stored measurements). On CPU a ``torch.empty`` bucket counts only where it is
written; on a GPU the allocator holds it whole (the predictions use the whole bucket). A_TOK as measured includes the
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
from dataclasses import dataclass

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
TINY = Rung("llama-tiny", 64, 2, 512, seq=32)  # the probes' own tests only (seconds), never in the fit
BY_NAME = {r.name: r for r in (*LADDER, TINY)}


@dataclass(frozen=True)
class Regime:
    """How a probe trains (issue 21 item 8): LoRA rank on q/k/v/o (fp32 adapters, as peft makes them), weight
    bytes (2 = bf16 weights, fp32 masters via ``MasterWeightAdamW``), gradient checkpointing, a longer sequence
    (tokens per row, replacing the rung's 128), and the engine on ``world`` CPU processes: "single", "zero3"
    (DeepSpeed ZeRO-3, HF-style bucket sizes, the model created partitioned under ``zero.Init``), "fsdp"
    (accelerate's FSDP2 preparation, a unit per decoder layer) or "ddp" (DistributedDataParallel)."""

    name: str
    lora_r: int = 0
    weight_bytes: int = 4
    gradient_checkpointing: bool = False
    seq: int | None = None
    engine: str = "single"
    world: int = 1


REGIMES = {g.name: g for g in (Regime("fp32"), Regime("lora", lora_r=8), Regime("bf16", weight_bytes=2),
                               Regime("lora_bf16", lora_r=8, weight_bytes=2),
                               Regime("ckpt", gradient_checkpointing=True), Regime("seq512", seq=512),
                               Regime("zero3x2", engine="zero3", world=2), Regime("fsdp2x2", engine="fsdp", world=2),
                               Regime("ddpx2", engine="ddp", world=2))}
REGIME_RUNGS = ("llama-h128", "llama-h256")  # the small rungs for the extra regimes (a 2-core shared machine)


def regime_rung(rung: Rung, regime: Regime) -> Rung:
    from dataclasses import replace

    return replace(rung, seq=regime.seq) if regime.seq else rung


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


def _close_ranks(peak_delta: int, **per_rank) -> dict | None:
    """Every rank of a multi-process probe: gather each rank's peak growth (and any ``per_rank`` values), wait
    for all, tear down the process group. Rank 0 gets ``{"rank_peaks": [...], name: [...]}``; others None."""
    import torch.distributed as dist

    world = dist.get_world_size()
    out = {"rank_peaks": [None] * world, **{k: [None] * world for k in per_rank}}
    dist.all_gather_object(out["rank_peaks"], peak_delta)
    for k, v in per_rank.items():
        dist.all_gather_object(out[k], v)
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return out if rank == 0 else None


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


def llama_config(rung: Rung):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=rung.hidden, intermediate_size=rung.intermediate, num_hidden_layers=rung.layers,
                       num_attention_heads=rung.heads, num_key_value_heads=rung.heads, vocab_size=rung.vocab,
                       max_position_embeddings=rung.seq, tie_word_embeddings=False, attn_implementation="sdpa")


def regime_model(model, regime: Regime):
    """``model`` in the regime's weight dtype, with checkpointing and LoRA (peft) as the trainer sets them."""
    import torch

    if regime.weight_bytes == 2:
        model = model.to(torch.bfloat16)
    if regime.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if regime.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=regime.lora_r, lora_alpha=16, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def run_probe(provider: str, method: str, rung: Rung, regime: Regime = REGIMES["fp32"]) -> dict:
    """One optimizer step in this (fresh) process; peak resident growth in bytes."""
    if regime.engine == "zero3":
        from benchmarks.memory_zero3 import run_zero3_probe

        return run_zero3_probe(provider, method, rung, regime)
    if regime.engine in ("fsdp", "ddp"):
        from benchmarks.memory_dist import run_dist_probe

        return run_dist_probe(provider, method, rung, regime)
    import torch
    from transformers import LlamaForCausalLM

    from fastweight.train.methods import build_method
    from fastweight.train.objective import RefLogpTable, UnlearnObjective
    from fastweight.train.precision import make_optimizer, plan_precision

    torch.set_num_threads(int(os.environ.get("FASTWEIGHT_BENCH_THREADS", "1")))
    rung = regime_rung(rung, regime)
    forget, retain = _batch(rung, 0), _batch(rung, 1)
    if regime.lora_r:
        import peft  # noqa: F401 - imported before the baseline, like torch and transformers
    exact = _reset_hwm()
    base, _ = _rss()
    torch.manual_seed(0)
    model = regime_model(LlamaForCausalLM(llama_config(rung)), regime)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, plan_precision({p.dtype for p in params}, engine="local"), lr=1e-5,
                         weight_decay=0.01)
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
    return {"provider": provider, "method": method, "rung": rung.name, "regime": regime.name,
            "peak_bytes": hwm - base, "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params), "exact_hwm": exact, "loss": float(loss)}


def probe(provider: str, method: str, rung: str, regime: str = "fp32", timeout: float = 900) -> dict:
    """``run_probe`` in a fresh subprocess (so nothing of an earlier case stays resident); a multi-process
    regime (ZeRO-3, FSDP2, DDP) runs ``world`` processes under ``torch.distributed.run`` and reports the
    largest per-rank peak."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    args = ["-m", "benchmarks.memory_scale", "probe", provider, method, rung, "--regime", regime]
    g = REGIMES[regime]
    if g.world > 1:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(g.world), "--master_port", str(port), *args]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {provider} {method} {rung} {regime} failed:\n{proc.stderr[-3000:]}")
    return json.loads([ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")][-1])


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
            runtime: float = 0.0, runtime_zero3: float = 0.0) -> dict[str, float]:
    """Bytes per rank of each component and their peak (see the module docstring); ``arch``: ``Rung``/``Arch``."""
    h, L, v, i = arch.hidden, arch.layers, arch.vocab, arch.intermediate
    P = arch.params() if callable(arch.params) else arch.params
    Pt = s.lora_r * L * 4 * 2 * h if s.lora_r else P  # adapters A [r, H], B [H, r] on q, k, v, o
    sharded = s.engine in ("fsdp", "zero3")
    W = s.world if sharded else 1
    bw = s.weight_bytes
    bt = 4 if s.lora_r else bw  # trainable bytes: peft creates the adapters in fp32
    master = 4 * Pt if bt < 4 else 0  # fp32 master copy: MasterWeightAdamW, DeepSpeed's partitions, FSDP2's upcast
    layer = (4 * h * h + 3 * h * i) * bw
    out = {
        "weights": bw * P / W + (2 * layer if sharded else 0),  # the shard + the gathered layer (+ prefetch)
        "optimizer": (8 * Pt + master) / W,  # AdamW moments (fp32) + fp32 master weights
        "reference": (bw * P / W) if (provider == "hf" and method == "npo") else
                     (4 * s.forget_tokens_total if method == "npo" else 0),
        "gradients": bt * Pt / W,
    }
    # the engines' own buffers: DDP's gradient buckets (a flat copy of every gradient, accelerate's default
    # gradient_as_bucket_view=False); ZeRO-3's reduce bucket (H^2 elements, transformers' "auto") and prefetch
    # bucket (0.9 H^2); FSDP's gathered layers are in "weights"
    out["buffers"] = (bt * Pt if s.engine == "ddp" else
                      bt * h * h + bw * 0.9 * h * h if s.engine == "zero3" else 0)
    # V x H matrices gathered whole (and their whole gradients before the reduce-scatter): ZeRO-3 the largest
    # parameter (embedding / lm_head), FSDP2 as accelerate prepares the objective both embed_tokens and
    # lm_head (its root unit, gathered for the whole forward and backward; the reference's too, hf NPO)
    n_vh = 2 if s.engine == "fsdp" else 1
    if sharded and not s.lora_r:
        out["buffers"] += (bw + bt) * v * h * n_vh
    if s.engine == "fsdp" and provider == "hf" and method == "npo":
        out["reference"] += bw * v * h * n_vh
    out["engine_runtime"] = runtime_zero3 if s.engine == "zero3" else 0.0
    fwd, n_logits = _forwards(provider, method)
    n = s.tokens
    out["logits"] = k_logits * 4 * n * v * n_logits / 2 + CHUNK_BYTES
    if bw < 4:  # 16-bit weights: hf's own bf16 logits beside their fp32 upcast; the fused torch path's fp32
        # copy of lm_head (and its fp32 gradient when lm_head trains)
        out["logits"] += bw * n * v * fwd if provider == "hf" else 4 * v * h * (1 if s.lora_r else 2)
    if s.gradient_checkpointing:  # layer inputs kept, one layer's internals recomputed at a time
        out["activations"] = bw * n * h * L * fwd + a_tok * bw * n * (h + i) * fwd
    else:
        out["activations"] = a_tok * bw * n * L * (h + i) * fwd
    # the optimizer step's temporaries: the multi-tensor AdamW's fp32 list (+ the fp32 gradient copies that
    # MasterWeightAdamW hands to it; DeepSpeed converts its gradient partition the same way)
    out["step"] = (4 * Pt + master) / W
    out["runtime"] = runtime
    static = sum(out[k] for k in ("weights", "optimizer", "reference", "gradients", "buffers", "engine_runtime"))
    static += runtime
    out["peak"] = static + max(out["activations"] + out["logits"], out["step"])
    return out


def _rung_setting(rung: Rung, regime: Regime | None = None) -> Setting:
    g = regime or REGIMES["fp32"]
    rung = regime_rung(rung, g)
    n = rung.batch * rung.seq
    return Setting(engine=g.engine, world=g.world, lora_r=g.lora_r, weight_bytes=g.weight_bytes, tokens=n,
                   forget_tokens_total=n, gradient_checkpointing=g.gradient_checkpointing)


def _case(r: dict):
    """(Rung, Setting) of a measured case (cases from before the regimes are fp32)."""
    rung = BY_NAME[r["rung"]]
    regime = REGIMES[r.get("regime", "fp32")]
    return regime_rung(rung, regime), _rung_setting(rung, regime)


def fit(results: list[dict]) -> tuple[float, float, float, float]:
    """(K_LOGITS, A_TOK, RUNTIME, RUNTIME_ZERO3) minimising the squared relative error of ``predict`` on the
    measured cases (RUNTIME_ZERO3, what DeepSpeed's engine and the gloo group add per rank, only from ZeRO-3
    cases; 0 without any)."""
    import numpy as np
    from scipy.optimize import least_squares

    cases = [(r, *_case(r)) for r in results]
    zero3 = any(st.engine == "zero3" for _, _, st in cases)

    def resid(x):
        return np.array([predict(r["provider"], r["method"], rung, st, x[0], x[1], x[2] * 2**20,
                                 x[3] * 2**20)["peak"] / r["peak_bytes"] - 1 for r, rung, st in cases])

    sol = least_squares(resid, x0=[1.0, 4.0, 10.0, 10.0 if zero3 else 0.0],
                        bounds=([0, 0, 0, 0], [20, 200, 1024, 4096 if zero3 else 1e-9]))
    return float(sol.x[0]), float(sol.x[1]), float(sol.x[2]) * 2**20, float(sol.x[3]) * 2**20


# open-unlearning's setting for the predictions (configs/trainer/finetune.yaml, commit 247bd13: bf16,
# per_device_train_batch_size 8, gradient_checkpointing True, 32-bit AdamW; TOFU max_length 512): 8 sequences
# of <= 512 tokens per device and micro-batch; TOFU forget10 = 400 answers for the reference table.
OU_TOKENS, OU_FORGET_TOKENS = 8 * 512, 400 * 512
PREDICTION_SETTINGS = (  # (label, setting, the measured regimes behind it; "" = none)
    ("DDP x8", Setting("ddp", 8, 0, 2, OU_TOKENS, OU_FORGET_TOKENS, True), "ddpx2 (fp32, 2 ranks), bf16, ckpt"),
    ("FSDP x8", Setting("fsdp", 8, 0, 2, OU_TOKENS, OU_FORGET_TOKENS, True), "fsdp2x2 (fp32, 2 ranks), bf16, ckpt"),
    ("ZeRO-3 x8", Setting("zero3", 8, 0, 2, OU_TOKENS, OU_FORGET_TOKENS, True), "zero3x2 (fp32, 2 ranks), bf16, ckpt"),
    ("ZeRO-3 x2", Setting("zero3", 2, 0, 2, OU_TOKENS, OU_FORGET_TOKENS, True), "zero3x2 (fp32), bf16, ckpt"),
    ("LoRA r16, 1 GPU", Setting("single", 1, 16, 2, OU_TOKENS, OU_FORGET_TOKENS, True), "lora_bf16, ckpt"),
    ("LoRA r16, 1 GPU, no ckpt", Setting("single", 1, 16, 2, OU_TOKENS, OU_FORGET_TOKENS, False), "lora_bf16"),
)
REGIME_NOTES = {"fp32": "fp32 full fine-tuning, 1 process (the original ladder)", "lora": "LoRA r8 on q/k/v/o, fp32",
                "bf16": "bf16 weights, fp32 masters (MasterWeightAdamW)", "lora_bf16": "LoRA r8 on a bf16 model",
                "ckpt": "gradient checkpointing, fp32", "seq512": "2 x 512 tokens, fp32",
                "zero3x2": "DeepSpeed ZeRO-3, 2 CPU ranks, fp32 (largest rank)",
                "fsdp2x2": "FSDP2 (accelerate's fully_shard units), 2 CPU ranks, fp32 (largest rank)",
                "ddpx2": "DDP, 2 CPU ranks, fp32 (largest rank)"}


def residuals(results: list[dict], k: float, a: float, c: float, z: float = 0.0) -> dict[str, dict]:
    """Per regime: cases, mean |error| and worst error of the model against the measured peaks (sets each
    result's ``model_bytes`` and ``error``)."""
    by: dict[str, list[float]] = {}
    for r in results:
        rung, st = _case(r)
        r["model_bytes"] = predict(r["provider"], r["method"], rung, st, k, a, c, z)["peak"]
        r["error"] = r["model_bytes"] / r["peak_bytes"] - 1
        by.setdefault(r.get("regime", "fp32"), []).append(r["error"])
    return {g: {"cases": len(e), "mean_abs": sum(map(abs, e)) / len(e), "worst": max(e, key=abs)}
            for g, e in by.items()}


def report(json_path: str | None = None, results: list[dict] | None = None, regimes: bool = False) -> dict:
    """Measure the ladder (unless ``results`` given; ``regimes``: also every extra regime on the small rungs),
    fit, print the markdown tables; returns everything."""
    if results is None:
        results = [probe(p, m, r.name) for r in LADDER for m in METHODS for p in PROVIDERS]
        if regimes:
            results += [probe(p, m, r, g) for g in REGIMES if g != "fp32" for r in REGIME_RUNGS
                        for m in METHODS for p in PROVIDERS]
    k, a, c, z = fit(results)
    gib = 2 ** 30
    summary = residuals(results, k, a, c, z)
    lines = [f"Fit over {len(results)} cases: K_LOGITS={k:.3f}, A_TOK={a:.2f}, RUNTIME={c / 2**20:.0f} MiB, "
             f"RUNTIME_ZERO3={z / 2**20:.0f} MiB", "",
             "| regime | what is measured | cases | mean abs error | worst error |", "|---|---|---|---|---|"]
    lines += [f"| {g} | {REGIME_NOTES.get(g, g)} | {v['cases']} | {v['mean_abs']:.1%} | {v['worst']:+.1%} |"
              for g, v in summary.items()]
    lines += ["", "| regime | rung | params | trainable | method | provider | measured MiB | model MiB | error |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rung, _ = _case(r)
        seq = REGIMES[r.get("regime", "fp32")].seq
        lines.append(f"| {r.get('regime', 'fp32')} | {rung.name}{f' x {seq}' if seq else ''} | "
                     f"{r['params'] / 1e6:.1f}M | {r.get('trainable', r['params']) / 1e6:.2f}M | {r['method']} | "
                     f"{r['provider']} | {r['peak_bytes'] / 2**20:.0f} | {r['model_bytes'] / 2**20:.0f} | "
                     f"{r['error']:+.1%} |")
    lines += ["", "Predicted peak per rank (GiB), bf16 weights, gradient checkpointing unless noted, 8 x 512 tokens "
              "per micro-batch:", "",
              "| model | setting | NPO fastweight | NPO HF + ref copy | SatImp+NLL fastweight | SatImp+NLL HF | "
              "measured regimes behind it |", "|---|---|---|---|---|---|---|"]
    preds = []
    for arch in (LLAMA2_7B, LLAMA31_8B):
        for label, st, behind in PREDICTION_SETTINGS:
            row = {(p, m): predict(p, m, arch, st, k, a, c, z) for m in METHODS for p in PROVIDERS}
            preds.append({"model": arch.name, "setting": label, "measured_behind": behind,
                          **{f"{m}/{p}": v for (p, m), v in row.items()}})
            cells = [f"{row[(p, m)]['peak'] / gib:.1f}" for m in METHODS for p in PROVIDERS]
            lines.append(f"| {arch.name} | {label} | " + " | ".join(cells) + f" | {behind or 'none: unmeasured'} |")
    print("\n".join(lines))
    worst = max(abs(v["worst"]) for v in summary.values())
    out = {"fit": {"K_LOGITS": k, "A_TOK": a, "RUNTIME_BYTES": c, "RUNTIME_ZERO3_BYTES": z, "worst_error": worst},
           "residuals": summary,
           "ladder": results, "predictions": preds}
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
    p.add_argument("--regime", choices=list(REGIMES), default="fp32")
    t = sub.add_parser("table", help="measure the ladder, fit the model, print both tables as markdown")
    t.add_argument("--json", default=None, help="write measurements, fit and predictions here")
    t.add_argument("--from-json", default=None, nargs="+",
                   help="refit and print from earlier --json files or JSON-lines files of probe results (no probes)")
    t.add_argument("--regimes", action="store_true", help="also measure LoRA, bf16, checkpointing, seq 512 and "
                   "2-rank ZeRO-3, FSDP2 and DDP on the two small rungs (72 probes)")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        res = run_probe(args.provider, args.method, BY_NAME[args.rung], REGIMES[args.regime])
        if res is not None:  # ZeRO-3: only rank 0 reports (every rank's peak)
            print(json.dumps(res))
        return
    report(args.json, _load_results(args.from_json) if args.from_json else None, args.regimes)


def _load_results(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        text = open(path).read()
        if path.endswith(".jsonl"):
            out += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            out += json.loads(text)["ladder"]
    return out


if __name__ == "__main__":
    main()
