"""Fused-linear KL to a reference model: hidden states of both models and both output projections, no logits.

Math (spec symbols, ``shared/spec/LOSSES.md``, KL retain regulariser / UNDIAL), for row t:
    z[t, v] = cap(s (hidden[t] . lm_head[v] + bias[v]))             (trained model, cap = softcap tanh)
    r[t, v] = cap_r(s_r (ref_hidden[t] . ref_lm_head[v] + ref_bias[v])) - ref_shift * [v == y_t]  (reference)
              (s, s_r = logit_scale, ref_logit_scale: runtime floats, 1 for most models)
    lse = logsumexp_v z,   lse_r = logsumexp_v r,   q = softmax(r),   p = softmax(z)
    KL_t = sum_v q_v (log q_v - log p_v) = C_t / S_r - lse_r + lse,   C_t = sum_v exp(r_v - m_r) (r_v - z_v)
    da[t, v] = g_t * (p_v - q_v) * (1 - (z[t, v] / softcap)**2 if HAS_SOFTCAP)
    d hidden = s da @ lm_head,  d lm_head = s da^T @ hidden,  d bias = s sum_t da[t, :]   (reference: no
               gradient; s is folded into the per-row coefficient g_t)

Kernels and grids:
    _linear_kl_fwd       grid (cdiv(N, BLOCK_N), SPLITS). One program owns BLOCK_N rows and one range of
                         ``v_per_split`` vocabulary columns, walks it in BLOCK_V tiles (two logits tiles per
                         step: z and r, each BLOCK_H-wide tl.dot steps over H) keeping five online float32
                         row scalars (m, s) for z and (m_r, s_r, C) for r (C and s_r rescale together when m_r
                         grows), and writes them to a [5, SPLITS, N] buffer.
    _linear_kl_finalize  grid (cdiv(N, BLOCK_N),): merges the SPLITS partials into kl, lse, lse_r [N].
    _linear_kl_bwd       grid (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)). Recomputes one z and one r tile, forms
                         u = p - q (* softcap derivative) in float32 and back-propagates g * u through the
                         trained model's projection with ``tl_linear_backprop_tile`` (float32 atomics).
Constexprs:
    HAS_LABELS     labels given: ignored rows give KL 0 and no gradient; r[y_t] is lowered by ``ref_shift``.
    HAS_BIAS, HAS_SOFTCAP, HAS_REF_BIAS, HAS_REF_SOFTCAP   per-model bias / final-logit soft-capping.
    BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT, COMPUTE_DH, COMPUTE_DW   as in linear_logprobs.
Accumulation: float32 for fp32 / bf16 / fp16 storage.
Bytes moved: twice linear_logprobs' (both models' hidden rows and projections are streamed).
"""
import triton
import triton.language as tl

from fastweight.kernels._tl import tl_linear_backprop_tile, tl_linear_logits_tile


@triton.jit
def _linear_kl_fwd(
    hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v, bias_ptr,
    ref_hidden_ptr, stride_ref_hidden_n, ref_lm_head_ptr, stride_ref_lm_head_v, ref_bias_ptr,
    labels_ptr, part_ptr,
    N, V, H, ignore_index,
    softcap, ref_softcap, logit_scale, ref_logit_scale, ref_shift, v_per_split, num_splits,
    HAS_LABELS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    HAS_REF_SOFTCAP: tl.constexpr,
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
    if HAS_LABELS:
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)

    v_lo = pid_s.to(tl.int64) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_r = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_r = tl.zeros([BLOCK_N], dtype=tl.float32)
    c = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        # 1. Both models' logits tiles (float32).
        z = tl_linear_logits_tile(hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v, bias_ptr, softcap,
                                  logit_scale, offs_n, offs_v, mask_n, mask_v, H,
                                  HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        r = tl_linear_logits_tile(ref_hidden_ptr, stride_ref_hidden_n, ref_lm_head_ptr, stride_ref_lm_head_v,
                                  ref_bias_ptr, ref_softcap, ref_logit_scale, offs_n, offs_v, mask_n, mask_v, H,
                                  HAS_REF_BIAS, HAS_REF_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                                  UPCAST_DOT)
        if HAS_LABELS:  # an ignored label never equals a column index >= 0 here; its row is zeroed later
            r = tl.where(offs_v[None, :] == labels[:, None], r - ref_shift, r)
        # 2. Online (m, s) of z; (m_r, s_r, C) of r with C = sum exp(r - m_r) (r - z). Every tile holds a
        # real column, so the new maxima are finite and exp(-inf - m_new) == 0 on the first tile.
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        r = tl.where(mask_v[None, :], r, float("-inf"))
        mr_new = tl.maximum(m_r, tl.max(r, 1))
        alpha = tl.exp(m_r - mr_new)
        e = tl.exp(r - mr_new[:, None])
        s_r = s_r * alpha + tl.sum(e, 1)
        c = c * alpha + tl.sum(tl.where(mask_v[None, :], e * (r - z), 0.0), 1)  # no 0 * (-inf - -inf)
        m_r = mr_new

    stride_k = num_splits * N
    part = part_ptr + pid_s.to(tl.int64) * N + offs_n
    tl.store(part, m, mask=mask_n)
    tl.store(part + stride_k, s, mask=mask_n)
    tl.store(part + 2 * stride_k, m_r, mask=mask_n)
    tl.store(part + 3 * stride_k, s_r, mask=mask_n)
    tl.store(part + 4 * stride_k, c, mask=mask_n)


@triton.jit
def _linear_kl_finalize(
    part_ptr, labels_ptr, kl_ptr, lse_ptr, lse_r_ptr,
    N, num_splits, ignore_index,
    HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    stride_k = num_splits * N
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_r = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_r = tl.zeros([BLOCK_N], dtype=tl.float32)
    c = tl.zeros([BLOCK_N], dtype=tl.float32)
    # 1. The same online merges as inside a split, over the SPLITS partials.
    for k in range(0, num_splits):
        part = part_ptr + k * N + offs_n
        m_k = tl.load(part, mask=mask_n, other=0.0)
        s_k = tl.load(part + stride_k, mask=mask_n, other=0.0)
        mr_k = tl.load(part + 2 * stride_k, mask=mask_n, other=0.0)
        sr_k = tl.load(part + 3 * stride_k, mask=mask_n, other=0.0)
        c_k = tl.load(part + 4 * stride_k, mask=mask_n, other=0.0)
        m_new = tl.maximum(m, m_k)
        s = s * tl.exp(m - m_new) + s_k * tl.exp(m_k - m_new)
        m = m_new
        mr_new = tl.maximum(m_r, mr_k)
        a, b = tl.exp(m_r - mr_new), tl.exp(mr_k - mr_new)
        s_r = s_r * a + sr_k * b
        c = c * a + c_k * b
        m_r = mr_new
    # 2. KL = C / S_r - lse_r + lse; ignored rows give 0.
    lse = m + tl.log(s)
    lse_r = m_r + tl.log(s_r)
    kl = c / s_r - lse_r + lse
    if HAS_LABELS:
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
        kl = tl.where(labels != ignore_index, kl, 0.0)
    tl.store(kl_ptr + offs_n, kl, mask=mask_n)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(lse_r_ptr + offs_n, lse_r, mask=mask_n)


@triton.jit
def _linear_kl_bwd(
    hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v, bias_ptr,
    ref_hidden_ptr, stride_ref_hidden_n, ref_lm_head_ptr, stride_ref_lm_head_v, ref_bias_ptr,
    labels_ptr, lse_ptr, lse_r_ptr, g_ptr,
    dh_ptr, stride_dh_n, dw_ptr, stride_dw_v, db_ptr,
    N, V, H, ignore_index,
    softcap, ref_softcap, logit_scale, ref_logit_scale, ref_shift,
    HAS_LABELS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    HAS_REF_SOFTCAP: tl.constexpr,
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
    if HAS_LABELS:
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
        valid = mask_n & (labels != ignore_index)
    else:
        valid = mask_n
    # d z / d (hidden @ lm_head.T + bias) carries logit_scale: folded into g (exact for 1.0).
    g = tl.where(valid, tl.load(g_ptr + offs_n, mask=mask_n, other=0.0), 0.0) * logit_scale
    if tl.max(tl.abs(g), 0) > 0.0:  # a row block with no counted row (or zero upstream) does nothing
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        lse_r = tl.load(lse_r_ptr + offs_n, mask=mask_n, other=0.0)
        # 1. Recompute both tiles; u = p - q (* softcap derivative of the trained model's logits).
        z = tl_linear_logits_tile(hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v, bias_ptr, softcap,
                                  logit_scale, offs_n, offs_v, mask_n, mask_v, H,
                                  HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT)
        r = tl_linear_logits_tile(ref_hidden_ptr, stride_ref_hidden_n, ref_lm_head_ptr, stride_ref_lm_head_v,
                                  ref_bias_ptr, ref_softcap, ref_logit_scale, offs_n, offs_v, mask_n, mask_v, H,
                                  HAS_REF_BIAS, HAS_REF_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
                                  UPCAST_DOT)
        if HAS_LABELS:
            r = tl.where(offs_v[None, :] == labels[:, None], r - ref_shift, r)
        u = tl.exp(z - lse[:, None]) - tl.exp(r - lse_r[:, None])
        if HAS_SOFTCAP:
            zc = z / softcap
            u = u * (1.0 - zc * zc)
        u = tl.where(valid[:, None] & mask_v[None, :], u, 0.0)
        # 2. d hidden, d lm_head, d bias of the trained model (float32 atomics).
        tl_linear_backprop_tile(u, g, offs_n, offs_v, mask_n, mask_v, H,
                                hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v,
                                dh_ptr, stride_dh_n, dw_ptr, stride_dw_v, db_ptr,
                                HAS_BIAS, BLOCK_H, DOT_PRECISION, UPCAST_DOT, COMPUTE_DH, COMPUTE_DW)
