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
def tl_write_row_grad(row_ptr, grad_row_ptr, label, lse, g, V, BLOCK_V: tl.constexpr):
    """grad[v] = g * (onehot(label)[v] - softmax[v]) for one row, tile by tile, cast to the grad dtype.

    Safe when grad_row_ptr == row_ptr (in place): every tile is read before it is overwritten.
    """
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(z - lse)
        d = g * (tl.where(offs == label, 1.0, 0.0) - p)
        tl.store(grad_row_ptr + offs, d.to(grad_row_ptr.dtype.element_ty), mask=mask)
