"""Token log-likelihood kernels over a logits matrix.

Math (spec symbols, ``shared/spec/LOSSES.md``): for row t with label y_t,
    lse_t  = logsumexp_v z[t, v]
    logp_t = z[t, y_t] - lse_t                      (0 for ignored rows; for p_t > 1/2 computed as
             -log1p(sum_{v != y_t} exp(z[t, v] - z[t, y_t])), exact in relative terms as p_t -> 1)
    w_t    = p_t**beta1 * (1 - p_t)**beta2          (detached importance weight, 1 - p = -expm1(logp))
    dz[t, v] = g_t * (onehot(y_t)[v] - softmax(z[t])[v])

Grid: one program per row, ``(N,)``. Row offsets are int64 (N * V can exceed 2**31).
Constexprs:
    BLOCK_V       tile width over the vocabulary (power of two).
    HAS_WEIGHTS   compute w_t (else w_t = 1).
    COMPUTE_GRAD  forward also writes dz with g_t = grad_scale * w_t * c_t (weights detached, so the upstream
                  coefficient is known in the forward and the backward needs no second kernel). c_t is the
                  caller's token weight read at ``token_weights_ptr + t * stride_token_weights``; without
                  token weights the launcher passes a one-element 1.0 with stride 0 (g_t * 1.0 is exact).
Accumulation is float32 for every storage dtype (fp32, bf16, fp16).
Bytes moved per row: forward reads V elements once (twice with COMPUTE_GRAD, plus V written);
backward reads V and writes V.
"""
import triton
import triton.language as tl

from fastweight.kernels._tl import tl_importance_weight, tl_row_lse_logp, tl_write_row_grad


@triton.jit
def _token_logprobs_fwd(
    logits_ptr, stride_logits_n,
    labels_ptr,
    logp_ptr, lse_ptr, weight_ptr,
    grad_ptr, stride_grad_n,
    grad_scale_ptr,
    token_weights_ptr, stride_token_weights,
    V, ignore_index,
    beta1, beta2,
    HAS_WEIGHTS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_n
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)

    # 1.-2. lse_t and logp_t = z[t, y_t] - lse_t in one online pass; for p_t > 1/2 log p is formed as
    #    -log1p((1 - p) / p) from the sum over v != y_t, so confident rows keep relative precision (see
    #    tl_row_lse_logp). Ignored rows give logp = 0.
    lse, logp = tl_row_lse_logp(row_ptr, safe_label, V, BLOCK_V)
    logp = tl.where(valid, logp, 0.0)

    # 3. Detached weight w_t (0 for ignored rows, where logp is 0 too: w * logp stays 0, never NaN).
    if HAS_WEIGHTS:
        w = tl.where(valid, tl_importance_weight(logp, beta1, beta2), 0.0)
    else:
        w = tl.where(valid, 1.0, 0.0)

    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    tl.store(weight_ptr + row, w)

    # 4. d loss / d z[t] = g_t * (onehot - softmax), g_t = grad_scale * w_t * c_t; ignored rows (and rows
    #    of token weight 0) write zeros.
    if COMPUTE_GRAD:
        c = tl.load(token_weights_ptr + row * stride_token_weights).to(tl.float32)
        g = tl.load(grad_scale_ptr).to(tl.float32) * w * c
        # (w = 0 on ignored rows: tl_write_row_grad selects zeros there, even for NaN / all -inf rows)
        tl_write_row_grad(row_ptr, grad_ptr + row * stride_grad_n, safe_label, lse, g, V, BLOCK_V)


@triton.jit
def _token_logprobs_bwd(
    logits_ptr, stride_logits_n,
    labels_ptr,
    lse_ptr, g_ptr,
    grad_ptr, stride_grad_n,
    V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    # Ignored rows get g = 0, hence an all-zero gradient row (the upstream value is not trusted).
    g = tl.where(valid, tl.load(g_ptr + row).to(tl.float32), 0.0)
    lse = tl.load(lse_ptr + row)
    # g = 0 selects an exact zero row, even when the ignored row holds NaN or is all -inf (0 * NaN = NaN)
    tl_write_row_grad(
        logits_ptr + row * stride_logits_n, grad_ptr + row * stride_grad_n,
        tl.where(valid, label, 0), lse, g, V, BLOCK_V,
    )
