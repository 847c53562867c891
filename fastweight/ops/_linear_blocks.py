"""The fused-linear ops' torch path on a multi-core CPU: each chunk's vocabulary in blocks, a thread per block.

``fastweight.ops._linear_chunks`` runs a chunk as a dozen PyTorch ops (three GEMMs, exp, sums, scatters), each
split statically over the intra-op (OpenMP) threads and each ending in a barrier. On a quiet machine that is
fine; when another process competes for the cores, every barrier waits for whichever thread the OS has
descheduled, so the chunk runs at the pace of the slowest core share (docs/performance.md, "Contended cores").

Here the chunk's ``[c, V]`` logits are cut into vocabulary blocks ``[c, V_b]`` and a pool of Python threads,
as many as ``torch.get_num_threads()``, takes the blocks from one queue; while the op runs, PyTorch's intra-op
pool is set to one thread, so each block's ops run whole on the thread that took it (PyTorch releases the GIL
inside them). A thread that the OS deschedules takes fewer blocks and nobody waits for it, except at the two
joins of a chunk:

    1. per block b:  z_b = h_c W_b^T (+ b_b),  E_b = exp(z_b) with the targets' entries zeroed,  s_b = sum E_b
       join: rest = sum_b s_b, log p, lse, the weights and the gradient factor coef (per row, O(c))
    2. per block b:  E_b[t, y_t - v_b] = -rest_t;  dW[b] += E_b^T (coef * h_c);  db[b] += E_b^T coef;
                     P_b = E_b W_b
       join: dh_c = coef * sum_b P_b

The backward of the unfused ops (the factor g known in advance) needs only the second step, with
``E_b = exp(z_b - lse)``. Nothing depends on which thread ran a block: every block writes its own rows of dW
and entries of db, and the partial sums (``s_b``, ``P_b``) are added in block order, so results are the same
from run to run and whatever the OS did. The arithmetic is that of the chunk path (the same exact target
logits, the same fallback to a max-shifted pass, subnormal flush and live-row compaction per block); only the
GEMMs' summation splits differ, within float32 rounding (the tests compare both to float64).

Memory: the blocks of a chunk together hold ``c * V`` floats as the chunk path's buffer does, plus the
partial products ``P_b`` (``n_blocks * c * H`` floats, 7 MiB at c = 256, H = 576, 12 blocks).
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from fastweight.ops._common import flush_tiny_rows_, live_rows, move_rows_
from fastweight.ops._gemm import add_linear_t_, linear, new_products, tensor_cores
from fastweight.ops._linear_chunks import (
    LIVE_MIN_DEAD_FRACTION, _cast_grads, _Chunker, _grad_buffers, grad_factor, row_logp, row_weights,
    sums_in_range,
)

# Vocabulary columns per block: a [256, 4096] float32 block (4 MiB) is a 1.2 GFLOP product at H = 576 (about
# 10 ms on one core), long enough that handing it to a thread costs nothing measurable, short enough that
# V = 49152 gives 12 blocks to share. Vocabularies smaller than 2 blocks of 1024 columns keep the chunk path.
BLOCK_COLUMNS = 4096
MIN_BLOCKED_VOCAB = 2048
# Blocks per thread at least, so a descheduled thread's share can move to the others.
BLOCKS_PER_THREAD = 2


def block_bounds(V: int, workers: int) -> list[tuple[int, int]]:
    """Column ranges [v0, v1) of the vocabulary blocks: at least ``BLOCKS_PER_THREAD`` per worker and at most
    ``BLOCK_COLUMNS`` wide, widths a multiple of 16 (the last one takes the rest)."""
    def ceil_div(a, b):
        return -(-a // b)

    n = max(BLOCKS_PER_THREAD * workers, ceil_div(V, BLOCK_COLUMNS), 1)
    width = 16 * max(1, ceil_div(ceil_div(V, n), 16))
    return [(v, min(V, v + width)) for v in range(0, V, width)]


def blocked_workers(hidden: torch.Tensor, lm_head: torch.Tensor) -> int:
    """Threads for the blocked path, or 0 to use the chunk path.

    The blocked path runs on CPU tensors whenever PyTorch has 2 or more intra-op threads and the vocabulary has
    at least ``MIN_BLOCKED_VOCAB`` entries. ``FASTWEIGHT_CPU_BLOCKS=0`` turns it off (the chunk path's OpenMP
    ops instead); ``FASTWEIGHT_CPU_BLOCKS=<n>`` sets the number of threads.
    """
    setting = os.environ.get("FASTWEIGHT_CPU_BLOCKS", "auto").strip().lower()
    if setting in ("0", "off", "false", "") or hidden.device.type != "cpu" or tensor_cores(lm_head):
        return 0
    if setting == "auto":
        workers = torch.get_num_threads()
    elif setting.isdigit():
        workers = int(setting)
    else:
        raise ValueError(f"FASTWEIGHT_CPU_BLOCKS must be 'auto', 0 or a number of threads, got {setting!r}")
    if workers < 2 or lm_head.shape[0] < MIN_BLOCKED_VOCAB or not parallel_backend_is_openmp():
        return 0
    return workers


_POOL_LOCK = threading.Lock()
_POOL: dict[str, object] = {"pool": None, "pid": None, "size": 0}


@contextlib.contextmanager
def _one_thread_each(workers: int):
    """A pool of ``workers`` threads, with PyTorch's intra-op pool set to one thread until the block ends.

    One op at a time holds the pool (a second caller waits). A pool created before a ``fork`` is not reused in
    the child (its threads do not exist there).
    """
    with _POOL_LOCK:
        if _POOL["pool"] is None or _POOL["pid"] != os.getpid() or _POOL["size"] != workers:
            if _POOL["pool"] is not None and _POOL["pid"] == os.getpid():
                _POOL["pool"].shutdown(wait=True)
            _POOL.update(pool=ThreadPoolExecutor(workers, thread_name_prefix="fastweight-block"),
                         pid=os.getpid(), size=workers)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield _POOL["pool"]
        finally:
            torch.set_num_threads(threads)


def _no_grad_call(fn, *args):
    # grad mode is per thread and on in a new one: without this, the blocks' ops would record an autograd
    # graph whenever hidden or lm_head requires grad (keeping every block alive, and off oneDNN)
    with torch.no_grad():
        return fn(*args)


def _run(pool, fn, items):
    """fn(item) for every item on the pool, grad mode off; the results in item order (an error is raised after
    all ended)."""
    futures = [pool.submit(_no_grad_call, fn, *item) for item in items]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:  # nothing of this op may run on after it returned or raised
            f.cancel()
        for f in futures:
            if not f.cancelled():
                f.exception()


class _Blocks:
    """A chunker's operands cut into vocabulary blocks, and the per-block steps of a chunk."""

    def __init__(self, ch: _Chunker, workers: int):
        self.ch = ch
        self.bounds = block_bounds(ch.W.shape[0], workers)
        self.width = self.bounds[0][1] - self.bounds[0][0]
        self.W = [ch.W[v0:v1] for v0, v1 in self.bounds]
        self.b = [None if ch.b_s is None else ch.b_s[v0:v1] for v0, v1 in self.bounds]
        self.bufs = None  # torch.mm's reused output blocks (float64); oneDNN returns new tensors
        if not new_products(ch.W):
            self.bufs = [torch.empty(ch.c, v1 - v0, dtype=ch.acc, device=ch.W.device) for v0, v1 in self.bounds]

    def chunk(self, h, y):
        """The chunk's GEMM operand (h scaled by s) and, per block, the (rows, columns) of its targets."""
        hs = h if self.ch.scale == 1.0 else h * self.ch.scale
        which = torch.div(y, self.width, rounding_mode="floor")
        targets = []
        for b, (v0, _) in enumerate(self.bounds):
            rows = (which == b).nonzero().squeeze(1)
            targets.append((rows, y.index_select(0, rows) - v0))
        return hs, targets

    def target_logits(self, h, y):
        """z_y [c] computed exactly (``_Chunker.target_logits``), soft-capped like the blocks."""
        ch = self.ch
        z_y = ch.target_logits(h, y).to(ch.acc)
        return z_y if ch.cap is None else torch.tanh(z_y / ch.cap) * ch.cap

    def logits(self, b, hs, want_deriv):
        """(z_b [c, V_b], 1 - t^2 of the soft-cap or None) of block b."""
        out = None if self.bufs is None else self.bufs[b][: hs.shape[0]]
        z = linear(hs, self.W[b], self.b[b], out=out)
        deriv = None
        cap = self.ch.cap
        if cap is not None:
            z.mul_(1.0 / cap).tanh_()
            if want_deriv:
                deriv = torch.mul(z, z).neg_().add_(1.0)
            z.mul_(cap)
        return z, deriv

    def exp_sum(self, b, hs, target, shift, want_deriv):
        """Step 1 of block b: (E_b = exp(z_b - shift) with the targets' entries 0, its row sums, deriv)."""
        z, deriv = self.logits(b, hs, want_deriv)
        if shift is not None:
            z.sub_(shift[:, None])
        z.exp_()
        z.index_put_(target, torch.zeros((), dtype=z.dtype, device=z.device))
        return z, z.sum(1), deriv

    def grads(self, b, E, deriv, target, target_value, live, want_dh, dW, db):
        """Step 2 of block b: the target entries become ``target_value`` of their rows; dW and db get the
        block's rows; returns P_b = E_b W_b over the live rows (None without d hidden).

        ``live``: (keep, coef, coef * h_c) of the chunk (``_live``)."""
        keep, coef, h_coef = live
        rows, _ = target
        E.index_put_(target, target_value.index_select(0, rows))
        if deriv is not None:
            E.mul_(deriv)
        if keep is not None:
            move_rows_(E, keep)
            E = E[: keep.numel()]
        v0, v1 = self.bounds[b]
        if dW is not None:
            add_linear_t_(dW[v0:v1], E, h_coef)
        if db is not None:
            db[v0:v1].addmv_(E.t(), coef)
        return linear(E, self.W[b].t()) if want_dh else None


def _live(ch, h, g, dW):
    """(keep, coef, coef * h_c) of a chunk: its live rows (None: all rows), the gradient GEMMs' per-row factor
    -s g of those rows and, for d lm_head, the scaled [k, H] operand (subnormal entries flushed)."""
    coef = ch.factor(g)
    keep = live_rows(coef, min_dead=coef.numel() // LIVE_MIN_DEAD_FRACTION)
    if keep is not None:
        coef, h = coef[keep], h.index_select(0, keep)
    return keep, coef, None if dW is None else flush_tiny_rows_(h * coef[:, None], coef)


def _add_dh(partials, live, idx, dh):
    """dh[idx] = coef * sum_b P_b, added in block order, on the live rows (dead rows stay 0)."""
    keep, coef, _ = live
    total = partials[0]
    for p in partials[1:]:
        total += p
    rows = flush_tiny_rows_(total.mul_(coef[:, None]), coef)
    if keep is not None:
        idx = keep + idx.start if isinstance(idx, slice) else idx[keep]
    dh[idx] = rows


def parallel_backend_is_openmp() -> bool:
    """True when PyTorch's intra-op pool is OpenMP's, whose thread count ``torch.set_num_threads`` may change
    at any time (the native pool refuses a change after its first parallel op)."""
    if "openmp" not in _PARALLEL:
        _PARALLEL["openmp"] = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    return _PARALLEL["openmp"]


_PARALLEL: dict[str, bool] = {}


def linear_logprobs_forward_blocked(hidden, lm_head, bias, labels, opts, *, workers, grad_scale=None,
                                    needs=(True, True, True), token_weights=None):
    """``linear_logprobs_forward_torch``'s contract, the chunks' vocabulary in blocks on ``workers`` threads."""
    ch = _Chunker(hidden, lm_head, bias, labels, opts, buffer=False)
    blk = _Blocks(ch, workers)
    N, acc, dev = hidden.shape[0], ch.acc, hidden.device
    logp, lse, w = (torch.zeros(N, dtype=acc, device=dev) for _ in range(3))
    fused = grad_scale is not None
    dh, dW, db = grads = _grad_buffers(hidden, lm_head, bias, needs, acc) if fused else (None, None, None)
    any_grad = fused and any(t is not None for t in grads)
    blocks = [(b,) for b in range(len(blk.bounds))]
    with _one_thread_each(workers) as pool:
        for idx, h, y in ch:
            hs, targets = blk.chunk(h, y)
            z_y = blk.target_logits(h, y)
            shift = torch.zeros_like(z_y)
            step1 = _run(pool, lambda b: blk.exp_sum(b, hs, targets[b], None, any_grad), blocks)
            rest = torch.stack([s for _, s, _ in step1]).sum(0)
            if not sums_in_range(rest + torch.exp(z_y)):
                # Rare (logits beyond ~ +-40): the chunk again with the row max subtracted.
                del step1
                shift = torch.stack(_run(pool, lambda b: blk.logits(b, hs, False)[0].amax(1), blocks))
                shift = torch.maximum(shift.amax(0), z_y)
                step1 = _run(pool, lambda b: blk.exp_sum(b, hs, targets[b], shift, any_grad), blocks)
                rest = torch.stack([s for _, s, _ in step1]).sum(0)
            logp_c, ssum = row_logp(z_y, shift, torch.exp(z_y - shift), rest)
            w_c = row_weights(logp_c, opts)
            lse[idx], logp[idx], w[idx] = z_y - logp_c, logp_c, w_c
            if any_grad:
                # da = -(g / sum) * E' with E'[t, y_t] = -rest_t, as in ``linear_logprobs_forward_torch``
                live = _live(ch, h, grad_factor(grad_scale, w_c, token_weights, idx) / ssum, dW)
                if live[0] is None or live[0].numel():
                    partials = _run(pool, lambda b, E, deriv: blk.grads(
                        b, E, deriv, targets[b], -rest, live, dh is not None, dW, db),
                        [(b, E, deriv) for b, (E, _, deriv) in enumerate(step1)])
                    if dh is not None:
                        _add_dh(partials, live, idx, dh)
            del step1  # free this chunk's blocks before the next chunk's are formed
    return logp, lse, w, (grads if fused else None)


def linear_logprobs_backward_blocked(hidden, lm_head, bias, labels, lse, logp, g, opts, *, workers,
                                     needs=(True, True, True)):
    """``linear_logprobs_backward_torch``'s contract, the chunks' vocabulary in blocks on ``workers`` threads:
    one step per block (recompute z_b, E_b = exp(z_b - lse), the gradients), then d hidden."""
    ch = _Chunker(hidden, lm_head, bias, labels, opts, buffer=False)
    dh, dW, db = grads = _grad_buffers(hidden, lm_head, bias, needs, ch.acc)
    if all(t is None for t in grads):
        return grads
    blk = _Blocks(ch, workers)

    def block(b, hs, lse_c, targets, target_value, live):
        z, deriv = blk.logits(b, hs, True)
        E = z.sub_(lse_c[:, None]).exp_()
        return blk.grads(b, E, deriv, targets[b], target_value, live, dh is not None, dW, db)

    with _one_thread_each(workers) as pool:
        for idx, h, y in ch:
            live = _live(ch, h, g[idx].to(ch.acc), dW)
            if live[0] is not None and live[0].numel() == 0:
                continue
            hs, targets = blk.chunk(h, y)
            # p'_y = -(1 - p_y) = expm1(log p) from the forward's log p (``linear_logprobs_backward_torch``)
            target_value = torch.expm1(logp[idx].to(ch.acc))
            lse_c = lse[idx].to(ch.acc)
            partials = _run(pool, block, [(b, hs, lse_c, targets, target_value, live) for b in range(len(blk.bounds))])
            if dh is not None:
                _add_dh(partials, live, idx, dh)
    return _cast_grads(grads, hidden, lm_head, bias)
