"""Device helpers shared by fastweight's Triton kernels (``tl_`` prefix).

All math is float32 whatever the storage dtype of the tensors.
"""
import triton
import triton.language as tl


@triton.jit
def tl_expm1(x):
    """exp(x) - 1 without cancellation for |x| << 1 (Kahan's trick: (u - 1) * x / log(u), u = exp(x)).

    Uses only exp and log, so it runs in the interpreter and on every target without libdevice.
    """
    u = tl.exp(x)
    um1 = u - 1.0
    # u == 1: x is below half an ulp of 1, expm1(x) == x to working precision.
    # u - 1 == -1: x is very negative, expm1(x) == -1.
    safe_log = tl.where(u == 1.0, 1.0, tl.log(u))
    r = tl.where(u == 1.0, x, um1 * x / safe_log)
    return tl.where(um1 == -1.0, -1.0, r)


@triton.jit
def tl_importance_weight(logp, beta1, beta2):
    """w = p**beta1 * (1 - p)**beta2 from log p (float32), with 0**0 == 1.

    (1 - p) is formed as -expm1(log p) so confident tokens (p -> 1) keep their small weight.
    """
    w1 = tl.where(beta1 == 0.0, 1.0, tl.exp(beta1 * logp))
    one_minus_p = -tl_expm1(logp)
    w2 = tl.where(beta2 == 0.0, 1.0, tl.exp(beta2 * tl.log(one_minus_p)))
    return w1 * w2


@triton.jit
def tl_log1p(x):
    """log(1 + x) without cancellation for |x| << 1 (Kahan: log(u) * x / (u - 1), u = 1 + x); x > -1."""
    u = 1.0 + x
    safe_um1 = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / safe_um1))


@triton.jit
def tl_row_lse(row_ptr, V, BLOCK_V: tl.constexpr):
    """Online log-sum-exp of one row of V logits, read in BLOCK_V tiles; returns a float32 scalar."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        # Rescale the running sum to the new max; exp(-inf - m_new) == 0 on the first tile.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def tl_row_lse_logp(row_ptr, label, V, BLOCK_V: tl.constexpr):
    """One online pass over a row: (lse, log p_label), float32 scalars.

    Besides the running max m and s = sum_v exp(z[v] - m) it keeps s_rest = sum_{v != label} exp(z[v] - m),
    so that for p > 1/2 log p = -log1p(s_rest / exp(z_y - m)) = -log1p((1 - p) / p) with ~eps *relative*
    error. z_y - lse (or even (z_y - m) - log s) has ~eps absolute error, which is all of log p on
    confident rows (log p -> 0) and would spoil the weight (1 - p) = -expm1(log p).
    """
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    s_rest = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, 0)
        s_rest = s_rest * alpha + tl.sum(tl.where(offs == label, 0.0, e), 0)
        m = m_new
    log_s = tl.log(s)
    zy_m = tl.load(row_ptr + label).to(tl.float32) - m
    ratio = s_rest / tl.exp(zy_m)  # (1 - p) / p; inf when exp underflows, then the other branch is used
    logp = tl.where(ratio < 1.0, -tl_log1p(ratio), zy_m - log_s)
    return m + log_s, logp


@triton.jit
def tl_write_row_grad(row_ptr, grad_row_ptr, label, lse, g, V, BLOCK_V: tl.constexpr):
    """grad[v] = g * (onehot(label)[v] - softmax[v]) for one row, tile by tile, cast to the grad dtype.

    g == 0 (ignored rows) writes an exact zero row even when the row holds NaN or is all -inf: the zero is
    selected, never formed as 0 * NaN (a select costs no registers, unlike a second store loop).
    Safe when grad_row_ptr == row_ptr (in place): every tile is read before it is overwritten.
    """
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(z - lse)
        d = tl.where(g != 0.0, g * (tl.where(offs == label, 1.0, 0.0) - p), 0.0)
        tl.store(grad_row_ptr + offs, d.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tl_tanh(x):
    """tanh(x) in float32 through expm1 of a non-positive argument: no overflow, no cancellation near 0."""
    e = tl_expm1(-2.0 * tl.abs(x))  # in (-1, 0]
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def tl_linear_logits_tile(hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v, bias_ptr, softcap,
                          logit_scale, offs_n, offs_v, mask_n, mask_v, H,
                          HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          UPCAST_DOT: tl.constexpr):
    """Logits tile z[offs_n, offs_v] = cap(logit_scale * (hidden[offs_n] @ lm_head[offs_v].T + bias[offs_v])),
    float32.

    The H loop feeds tl.dot with the storage dtype (tensor cores for bf16/fp16) and accumulates in float32;
    masked rows/columns read zeros. ``cap(x) = softcap * tanh(x / softcap)`` when HAS_SOFTCAP.
    UPCAST_DOT casts both operands to float32 first (the interpreter's numpy dot has no bfloat16).
    Offsets must be int64 (row offsets times strides can exceed 2**31).
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        h = tl.load(hidden_ptr + offs_n[:, None] * stride_hidden_n + offs_h[None, :],
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        w = tl.load(lm_head_ptr + offs_v[:, None] * stride_lm_head_v + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        if UPCAST_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    # A runtime float, always applied: x * 1.0 == x exactly, so unscaled models keep their bits without a
    # constexpr that would double every build (Granite 1 / logits_scaling, Cohere logit_scale).
    acc = acc * logit_scale
    if HAS_SOFTCAP:
        acc = softcap * tl_tanh(acc / softcap)
    return acc


@triton.jit
def tl_linear_backprop_tile(u, g, offs_n, offs_v, mask_n, mask_v, H,
                            hidden_ptr, stride_hidden_n, lm_head_ptr, stride_lm_head_v,
                            dh_ptr, stride_dh_n, dw_ptr, stride_dw_v, db_ptr,
                            HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            UPCAST_DOT: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr):
    """Back-propagate the logits-gradient tile da = g[:, None] * u through z = hidden @ lm_head.T + bias.

    u [BLOCK_N, BLOCK_V] float32 (|u| <= 1, zero on masked / ignored entries), g [BLOCK_N] float32 with
    max |g| > 0. Float32 atomics: d hidden[rows] += g * (u @ lm_head[tile]), d lm_head[tile] +=
    g_max * ((u * g / g_max)^T @ hidden[rows]), d bias[tile] += sum_rows g * u. g stays outside the 16-bit
    dot operands (and d lm_head's rows are scaled relative to the block's largest |g|) so small per-row
    coefficients do not underflow in bf16 / fp16.
    """
    if HAS_BIAS:
        if COMPUTE_DW:
            tl.atomic_add(db_ptr + offs_v, tl.sum(u * g[:, None], 0), mask=mask_v)
    g_max = tl.max(tl.abs(g), 0)
    if UPCAST_DOT:
        u_in = u
        ug_in = u * (g / g_max)[:, None]
    else:
        u_in = u.to(hidden_ptr.dtype.element_ty)
        ug_in = (u * (g / g_max)[:, None]).to(hidden_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        if COMPUTE_DH:
            w = tl.load(lm_head_ptr + offs_v[:, None] * stride_lm_head_v + offs_h[None, :],
                        mask=mask_v[:, None] & mask_h[None, :], other=0.0)
            if UPCAST_DOT:
                w = w.to(tl.float32)
            dh = tl.dot(u_in, w, input_precision=DOT_PRECISION) * g[:, None]
            tl.atomic_add(dh_ptr + offs_n[:, None] * stride_dh_n + offs_h[None, :], dh,
                          mask=mask_n[:, None] & mask_h[None, :])
        if COMPUTE_DW:
            h = tl.load(hidden_ptr + offs_n[:, None] * stride_hidden_n + offs_h[None, :],
                        mask=mask_n[:, None] & mask_h[None, :], other=0.0)
            if UPCAST_DOT:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(ug_in), h, input_precision=DOT_PRECISION) * g_max
            tl.atomic_add(dw_ptr + offs_v[:, None] * stride_dw_v + offs_h[None, :], dw,
                          mask=mask_v[:, None] & mask_h[None, :])
