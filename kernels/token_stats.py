"""Teacher-forced evaluation statistics of a logits matrix, one pass, no probability tensor.

Math (spec symbols), for row t with label y_t, d[v] = z[t, v] - m_t (m_t the row max) and p = softmax(z[t]):
    s0 = sum_v exp(d[v]),  s1 = sum_v exp(d[v]) d[v],  s2 = sum_v exp(d[v]) d[v]**2
    lse_t      = m_t + log s0
    logp_t     = z[t, y_t] - lse_t                          (0 on ignored rows)
    mean_t     = E_{v~p}[log p_v] = s1 / s0 - log s0          (Min-K%++'s mu)
    var_t      = Var_{v~p}[log p_v] = s2 / s0 - (s1 / s0)**2  (Min-K%++'s sigma**2; clamped at 0)
    argmax_t   = y_t == first index of the row maximum        (torch.argmax's tie rule; False when ignored)
When the running max grows from m to m' (delta = m - m' <= 0, alpha = exp(delta)), the sums move to the new
origin as s2 <- alpha (s2 + 2 delta s1 + delta**2 s0), s1 <- alpha (s1 + delta s0), s0 <- alpha s0.

Grid: one program per row, ``(N,)``; row offsets int64. Forward only (evaluation: no gradient).
Constexprs: BLOCK_V, the tile width over the vocabulary (power of two).
Accumulation float32 for every storage dtype. Bytes moved per row: V elements read once, 4 scalars written.
"""
import triton
import triton.language as tl


@triton.jit
def _token_stats_fwd(
    logits_ptr, stride_logits_n,
    labels_ptr,
    logp_ptr, mean_ptr, var_ptr, argmax_ptr,
    V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_n
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index

    # 1. One online pass: running max, the three shifted sums, and the first index of the maximum.
    m = tl.full([], float("-inf"), tl.float32)
    s0 = tl.full([], 0.0, tl.float32)
    s1 = tl.full([], 0.0, tl.float32)
    s2 = tl.full([], 0.0, tl.float32)
    best_i = tl.full([], 0, tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        tile_max = tl.max(z, 0)
        tile_i = start + tl.argmax(z, 0, tie_break_left=True).to(tl.int64)
        best_i = tl.where(tile_max > m, tile_i, best_i)  # strict: an equal later maximum keeps the first index
        m_new = tl.maximum(m, tile_max)
        # 2. Move the sums to the new origin (nothing to move on the first tile, where m = -inf).
        delta = tl.where(s0 > 0.0, m - m_new, 0.0)
        alpha = tl.exp(delta)
        s2 = alpha * (s2 + 2.0 * delta * s1 + delta * delta * s0)
        s1 = alpha * (s1 + delta * s0)
        s0 = alpha * s0
        d = tl.where(mask, z - m_new, 0.0)
        e = tl.where(mask, tl.exp(d), 0.0)
        s0 += tl.sum(e, 0)
        s1 += tl.sum(e * d, 0)
        s2 += tl.sum(e * d * d, 0)
        m = m_new

    # 3. The four statistics; ignored rows write zeros and False.
    log_s0 = tl.log(s0)
    mean_d = s1 / s0
    z_y = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32)
    logp = z_y - m - log_s0
    var = tl.maximum(s2 / s0 - mean_d * mean_d, 0.0)
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(mean_ptr + row, tl.where(valid, mean_d - log_s0, 0.0))
    tl.store(var_ptr + row, tl.where(valid, var, 0.0))
    tl.store(argmax_ptr + row, (valid & (best_i == label)).to(tl.int8))
