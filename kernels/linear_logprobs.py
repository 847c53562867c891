"""Fused-linear token log-likelihood kernels: hidden states and the output projection, never the logits.

Math (spec symbols, ``shared/spec/LOSSES.md``), for row t with label y_t:
    a[t, v]  = s * (hidden[t] . lm_head[v] + bias[v])           (H-long dot products, float32 accumulation;
                                                                  s = logit_scale, a runtime float, 1 usually)
    z[t, v]  = softcap * tanh(a[t, v] / softcap)                 (HAS_SOFTCAP, Gemma-2; else z = a)
    lse_t    = logsumexp_v z[t, v]
    logp_t   = z[t, y_t] - lse_t                                  (0 for ignored rows)
    w_t      = p_t**beta1 * (1 - p_t)**beta2                      (detached, 1 - p = -expm1(logp))
    da[t, v] = g_t * (onehot(y_t)[v] - softmax(z[t])[v]) * (1 - (z[t, v] / softcap)**2 if HAS_SOFTCAP)
               (at v = y_t, 1 - p_t = -expm1(logp_t) from the forward's logp)
    d hidden = s da @ lm_head,  d lm_head = s da^T @ hidden,  d bias = s sum_t da[t, :]
               (the backward folds s into the per-row coefficient: g_t <- s g_t)

Kernels and grids:
    _linear_logprobs_fwd       grid (cdiv(N, BLOCK_N), SPLITS). One program owns BLOCK_N rows and one
                               contiguous range of ``v_per_split`` vocabulary columns; it walks that range
                               in BLOCK_V tiles (each tile = BLOCK_H-wide tl.dot steps over H) with an online
                               max / sum-of-exp, and writes its partial (max, sum) to [SPLITS, N] buffers and
                               z[t, y_t] to z_y [N] when y_t falls in its range (exactly one program does).
                               Splitting V fills the GPU when N / BLOCK_N is small, without atomics.
    _linear_logprobs_finalize  grid (cdiv(N, BLOCK_N),): merges the SPLITS partials into lse, forms logp and w.
    _linear_logprobs_bwd       grid (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)). One program recomputes one
                               [BLOCK_N, BLOCK_V] logits tile, forms u = da / g in float32 (CCE-style
                               recompute: no [N, V] tensor ever exists), casts it to the storage dtype for
                               the tensor cores and atomically adds g * (u @ lm_head[tile]) into d hidden
                               [N, H] and g_max * ((u g / g_max)^T @ hidden[rows]) into d lm_head [V, H]
                               (and the column sums of da into d bias), all float32 accumulators. Keeping
                               g outside the 16-bit operands stops small coefficients from underflowing.
                               Row blocks whose g is all zero (ignored rows) do nothing.
Constexprs:
    HAS_BIAS       add bias [V] to the logits (and produce d bias in the backward when COMPUTE_DW).
    HAS_SOFTCAP    final-logit soft-capping; ``softcap`` is a runtime float.
    HAS_WEIGHTS    finalize computes w_t (else w_t = 1 on valid rows).
    COMPUTE_DH     backward writes d hidden.  COMPUTE_DW  backward writes d lm_head (and d bias).
                   Constexprs, not runtime flags: a runtime flag keeps both branches' registers live (the
                   bf16 backward spilled 136 B on sm_80 that way) and Triton would specialise an int 1
                   into a constant anyway, so each combination is its own build either way.
    BLOCK_N, BLOCK_V, BLOCK_H  tile sizes (powers of two, >= 16 for tl.dot).
    DOT_PRECISION  tl.dot input precision: "ieee" for float32 inputs (matches torch's default fp32 matmul),
                   ignored for bf16/fp16 inputs.
    UPCAST_DOT     feed tl.dot float32 operands; only emitted for bf16 under TRITON_INTERPRET=1 (the
                   interpreter's numpy dot has no bfloat16), never on a GPU.
Accumulation: float32 for fp32/bf16/fp16 storage; d hidden / d lm_head / d bias accumulate in float32
buffers and are cast by the launcher.
Bytes moved: forward reads each row block's hidden [BLOCK_N, H] once per V tile (from L2) and lm_head once
per row block: ~ (N / BLOCK_N) * V * H + N * H elements; backward the same plus float32 atomics of
(V / BLOCK_V) * N * H + (N / BLOCK_N) * V * H elements.
"""
import triton
import triton.language as tl

from fastweight.kernels._tl import (
    tl_expm1, tl_importance_weight, tl_linear_backprop_tile, tl_linear_logits_tile,
)


@triton.jit
def _linear_logprobs_fwd(
    hidden_ptr, stride_hidden_n,
    lm_head_ptr, stride_lm_head_v,
    bias_ptr,
    labels_ptr,
    part_max_ptr, part_sum_ptr, z_y_ptr,
    N, V, H, ignore_index,
    softcap, logit_scale, v_per_split,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)

    # 1. Online max / sum-of-exp over this program's vocabulary range [v_lo, v_hi).
    v_lo = pid_s.to(tl.int64) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    hit_any = tl.zeros([BLOCK_N], dtype=tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        z = tl_linear_logits_tile(hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v, bias_ptr, softcap,
                                  logit_scale, offs_n, offs_v, mask_n, mask_v, H,
                                  HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        # Every tile holds >= 1 real column, so m_new is finite and exp(-inf - m_new) == 0 on the first tile.
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        # 2. The target logit z[t, y_t] lives in exactly one tile of one program.
        hit = offs_v[None, :] == labels[:, None]
        z_y += tl.sum(tl.where(hit, z, 0.0), 1)
        hit_any += tl.sum(hit.to(tl.int32), 1)

    part = pid_s.to(tl.int64) * N + offs_n
    tl.store(part_max_ptr + part, m, mask=mask_n)
    tl.store(part_sum_ptr + part, s, mask=mask_n)
    tl.store(z_y_ptr + offs_n, z_y, mask=mask_n & (hit_any > 0))


@triton.jit
def _linear_logprobs_finalize(
    part_max_ptr, part_sum_ptr, stride_part_k, z_y_ptr,
    labels_ptr,
    logp_ptr, lse_ptr, weight_ptr,
    N, num_splits, ignore_index,
    beta1, beta2,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = labels != ignore_index

    # 1. lse_t = log sum_s exp(m_s) * sum_s  (the same online merge as inside a split).
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(0, num_splits):
        m_k = tl.load(part_max_ptr + k * stride_part_k + offs_n, mask=mask_n, other=0.0)
        s_k = tl.load(part_sum_ptr + k * stride_part_k + offs_n, mask=mask_n, other=0.0)
        m_new = tl.maximum(m, m_k)
        s = s * tl.exp(m - m_new) + s_k * tl.exp(m_k - m_new)
        m = m_new
    lse = m + tl.log(s)

    # 2. logp_t and the detached weight; ignored rows give logp = 0 and w = 0 (never NaN).
    logp = tl.where(valid, tl.load(z_y_ptr + offs_n, mask=mask_n, other=0.0) - lse, 0.0)
    if HAS_WEIGHTS:
        w = tl.where(valid, tl_importance_weight(logp, beta1, beta2), 0.0)
    else:
        w = tl.where(valid, 1.0, 0.0)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(logp_ptr + offs_n, logp, mask=mask_n)
    tl.store(weight_ptr + offs_n, w, mask=mask_n)


@triton.jit
def _linear_logprobs_bwd(
    hidden_ptr, stride_hidden_n,
    lm_head_ptr, stride_lm_head_v,
    bias_ptr,
    labels_ptr, lse_ptr, logp_ptr, g_ptr,
    dh_ptr, stride_dh_n,
    dw_ptr, stride_dw_v,
    db_ptr,
    N, V, H, ignore_index,
    softcap, logit_scale,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    valid = mask_n & (labels != ignore_index)
    # Ignored rows get g = 0 whatever the upstream value (it is not trusted there).
    # d a / d (hidden @ lm_head.T + bias) = logit_scale: folded into the per-row coefficient (exact for 1.0).
    g = tl.where(valid, tl.load(g_ptr + offs_n, mask=mask_n, other=0.0), 0.0) * logit_scale
    if tl.max(tl.abs(g), 0) > 0.0:  # a row block of ignored rows contributes nothing
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        # 1 - p_y from the forward's log p: exp(z_y - lse) would carry lse's rounding times p_y / (1 - p_y).
        one_minus_p_y = -tl_expm1(tl.load(logp_ptr + offs_n, mask=mask_n, other=0.0))

        # 1. Recompute the logits tile; da = g * u with u = onehot - softmax (* softcap derivative).
        z = tl_linear_logits_tile(hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v, bias_ptr, softcap,
                                  logit_scale, offs_n, offs_v, mask_n, mask_v, H,
                                  HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        p = tl.exp(z - lse[:, None])
        # u = (onehot - p) (* softcap derivative) lies in [-1, 1]; g is applied outside the 16-bit dot
        # operands so tiny per-row coefficients (mean over many tokens, p**beta weights) do not underflow.
        u = tl.where(offs_v[None, :] == labels[:, None], one_minus_p_y[:, None], -p)
        if HAS_SOFTCAP:
            # d/da [c tanh(a / c)] = 1 - tanh^2 = 1 - (z / c)^2
            zc = z / softcap
            u = u * (1.0 - zc * zc)
        u = tl.where(valid[:, None] & mask_v[None, :], u, 0.0)

        # 2. d hidden[rows] += g * (u @ lm_head[tile]);  d lm_head[tile] += da^T @ hidden[rows];  d bias.
        tl_linear_backprop_tile(u, g, offs_n, offs_v, mask_n, mask_v, H,
                                hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v,
                                dh_ptr, stride_dh_n, dw_ptr, stride_dw_v, db_ptr,
                                HAS_BIAS, BLOCK_H, DOT_PRECISION, UPCAST_DOT, COMPUTE_DH, COMPUTE_DW)
