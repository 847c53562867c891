"""Quick timing of the fused-linear SatImp path (torch backend on CPU, or whatever ``--device`` says).

    python benchmarks/quick_linear.py                      # N=4096, H=576, V=49152 fp32 (SmolLM2-135M head)
    python benchmarks/quick_linear.py --n 1024 --dtype bf16

Prints, for forward + backward of ``satimp_loss(hidden, labels, lm_head=W)``:
* time vs the "3-GEMM floor" (3 x one ``hidden @ W.T``, timed in the same process because the CPU is shared),
* peak extra memory (peak RSS of a fresh subprocess minus its RSS after building the inputs; Linux),
* accuracy of loss / d hidden / d lm_head vs a float64 naive reference, next to the naive reference run in
  the test dtype, on the first ``--acc-rows`` rows.
Not a test and not the benchmark suite (benchmarks/bench_*.py): a smoke check of the targets in issue 4/8.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

import fastweight
from fastweight.ops import _gemm
from fastweight.reference.linear_logprobs import linear_weighted_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    W = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, W, labels


def fused_step(hidden, W, labels, backend):
    hl, Wl = hidden.detach().requires_grad_(), W.detach().requires_grad_()
    loss = fastweight.satimp_loss(hl, labels, lm_head=Wl, backend=backend)
    loss.backward()
    return loss.detach(), hl.grad, Wl.grad


def best_of(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_child(args):
    """Runs in a fresh process: peak RSS growth (MB) of one fused forward + backward."""
    hidden, W, labels = inputs(args.n, args.h, args.v, DTYPES[args.dtype], args.device)
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS (Linux)
        f.write("5")
    base = _status_kb("VmRSS")
    fused_step(hidden, W, labels, args.backend)
    print(json.dumps({"peak_extra_mb": (_status_kb("VmHWM") - base) / 1024}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=576)
    p.add_argument("--v", type=int, default=49152)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--acc-rows", type=int, default=256)
    p.add_argument("--_peak", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._peak:
        return peak_child(args)
    dtype = DTYPES[args.dtype]
    hidden, W, labels = inputs(args.n, args.h, args.v, dtype, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    fused_step(hidden[:64], W, labels[:64], args.backend)  # warm-up (Triton compilation on CUDA)

    def floor():  # the torch path's GEMM: oneDNN for float32 on CPU (faster than torch.mm's MKL sgemm there)
        _gemm.linear(hidden, W)
        sync()

    def fused():
        fused_step(hidden, W, labels, args.backend)
        sync()

    t_floor, t_fused = [], []
    for _ in range(args.reps):  # interleaved so a noisy neighbour hits both
        t_floor.append(best_of(floor, 1))
        t_fused.append(best_of(fused, 1))
    gemm = min(t_floor)
    print(f"shape N={args.n} H={args.h} V={args.v} {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"one hidden @ W.T: {gemm * 1e3:.0f} ms   3-GEMM floor: {3 * gemm * 1e3:.0f} ms")
    print(f"fused SatImp fwd+bwd: {min(t_fused) * 1e3:.0f} ms  = {min(t_fused) / (3 * gemm):.3f} x floor")

    if args.device == "cpu":
        cmd = [sys.executable, __file__, "--_peak", "--n", str(args.n), "--h", str(args.h), "--v", str(args.v),
               "--dtype", args.dtype, "--backend", args.backend]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        mb = json.loads(out.strip().splitlines()[-1])["peak_extra_mb"]
        print(f"peak extra memory (fresh process RSS): {mb:.0f} MB "
              f"(logits alone would be {args.n * args.v * 4 / 2**20:.0f} MB)")

    r = slice(0, args.acc_rows)
    h_s, y_s = hidden[r].contiguous(), labels[r].clone()
    # Every other label = the row's argmax, so p_t spans ~1/V to ~1 and the SatImp weights are not all ~0.
    y_s[::2] = (h_s[::2].float() @ W.float().t()).argmax(-1)
    impl = fused_step(h_s, W, y_s, args.backend)

    def ref(dt):
        hl = h_s.detach().to(dt).requires_grad_()
        Wl = W.detach().to(dt).requires_grad_()
        loss = linear_weighted_logprobs(hl, Wl, y_s, beta1=5.0, beta2=0.1)
        loss.backward()
        return loss.detach(), hl.grad, Wl.grad

    gt, naive = ref(torch.float64), ref(dtype)
    for name, a, g, n in zip(("loss", "d hidden", "d lm_head"), impl, gt, naive):
        e_impl = (a.double() - g).abs().max().item()
        e_naive = (n.double() - g).abs().max().item()
        print(f"max |err| vs float64 on {args.acc_rows} rows, {name:9s}: fused {e_impl:.3g}   naive {e_naive:.3g}")


if __name__ == "__main__":
    main()
