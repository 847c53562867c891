"""Row-wise KL divergence to a reference distribution, from two logit rows in one online pass.

Math (spec symbols, ``shared/spec/LOSSES.md``, KL retain regulariser / UNDIAL): for row t with logits
z = z[t, :] (trained model) and reference logits r = r[t, :] (optionally with the label logit lowered,
r[y_t] -= ref_shift, UNDIAL's target),
    lse   = logsumexp(z),   lse_r = logsumexp(r),   q = softmax(r)
    KL_t  = sum_v q_v (log q_v - log p_v) = sum_v q_v (r_v - z_v) - lse_r + lse
    dz[t, v] = g_t * (softmax(z)[v] - q_v)
Forward keeps five float32 scalars per row — (m, s) for z, (m_r, s_r, c) for r with
c = sum_v exp(r_v - m_r) (r_v - z_v) rescaled with s_r whenever m_r grows — so neither softmax exists.

Grid: one program per row, ``(N,)``; row offsets are int64.
Constexprs:
    BLOCK_V     tile width over the vocabulary (power of two).
    HAS_LABELS  a label per row: ignored rows give KL 0 and a zero gradient row, and ``ref_shift`` is
                subtracted from r[y_t] on the fly (0.0 for a plain KL).
Accumulation is float32 for every storage dtype (fp32, bf16, fp16).
Saved per row: stats = (m, log s, m_r, log s_r) float32 (lse split so large logits keep full precision).
Bytes moved per row: forward reads 2V elements; backward reads 2V and writes V.
"""
import triton
import triton.language as tl


@triton.jit
def _kl_div_fwd(
    logits_ptr, stride_logits_n,
    ref_ptr, stride_ref_n,
    labels_ptr,
    kl_ptr, stats_ptr,
    V, ignore_index, ref_shift,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_logits_n
    r_row = ref_ptr + row * stride_ref_n
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
    else:
        label = -1

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    m_r = tl.full([], float("-inf"), tl.float32)
    s_r = tl.full([], 0.0, tl.float32)
    c = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        r = tl.load(r_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        # 1. UNDIAL target: lower the reference logit of the label by ref_shift.
        r = tl.where(offs == label, r - ref_shift, r)
        # 2. Online lse of z.
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        # 3. Online lse of r and the cross term c = sum exp(r - m_r) (r - z), both rescaled to the new max.
        #    Lanes with exp(r - m_r) == 0 (padding, -inf logits) contribute 0, never 0 * inf.
        m_r_new = tl.maximum(m_r, tl.max(r, 0))
        scale = tl.exp(m_r - m_r_new)
        e = tl.exp(r - m_r_new)
        live = e > 0.0
        d = tl.where(live, r, 0.0) - tl.where(live, z, 0.0)
        s_r = s_r * scale + tl.sum(e, 0)
        c = c * scale + tl.sum(e * d, 0)
        m_r = m_r_new

    # 4. KL = E_q[r - z] - lse_r + lse, with lse = m + log s kept split: the maxima are exact, so
    #    (m - m_r) does not round even when both logsumexps are large (|z| ~ 1e3 has an ulp of 6e-5).
    log_s = tl.log(s)
    log_s_r = tl.log(s_r)
    kl = c / s_r + (m - m_r) + (log_s - log_s_r)
    if HAS_LABELS:
        kl = tl.where(label != ignore_index, kl, 0.0)
    tl.store(kl_ptr + row, kl)
    # stats[row] = (m, log s, m_r, log s_r): the backward forms softmax as exp((z - m) - log s).
    tl.store(stats_ptr + row * 4, m)
    tl.store(stats_ptr + row * 4 + 1, log_s)
    tl.store(stats_ptr + row * 4 + 2, m_r)
    tl.store(stats_ptr + row * 4 + 3, log_s_r)


@triton.jit
def _kl_div_bwd(
    logits_ptr, stride_logits_n,
    ref_ptr, stride_ref_n,
    labels_ptr,
    stats_ptr, g_ptr,
    grad_ptr, stride_grad_n,
    V, ignore_index, ref_shift,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_logits_n
    r_row = ref_ptr + row * stride_ref_n
    g_row = grad_ptr + row * stride_grad_n
    g = tl.load(g_ptr + row).to(tl.float32)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        # Ignored rows get g = 0, hence an all-zero gradient row (the upstream value is not trusted).
        g = tl.where(label != ignore_index, g, 0.0)
    else:
        label = -1
    m = tl.load(stats_ptr + row * 4)
    log_s = tl.load(stats_ptr + row * 4 + 1)
    m_r = tl.load(stats_ptr + row * 4 + 2)
    log_s_r = tl.load(stats_ptr + row * 4 + 3)
    # dz = g * (softmax(z) - softmax(r)), tile by tile from the saved log-normalisers.
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        r = tl.load(r_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        r = tl.where(offs == label, r - ref_shift, r)
        d = g * (tl.exp((z - m) - log_s) - tl.exp((r - m_r) - log_s_r))
        if HAS_LABELS:
            # An ignored row may hold NaN or all -inf logits: 0 * NaN is NaN, so select, do not multiply.
            d = tl.where(label != ignore_index, d, 0.0)
        tl.store(g_row + offs, d.to(g_row.dtype.element_ty), mask=mask)
