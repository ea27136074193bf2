"""Linear layer y = x @ W.T + b with W [N, K] (rows = output features, GGUF's logical shape).

CuPy products go through kernels.blas (one cublasGemmEx each, capturable in a CUDA graph); NumPy's
through ``@``."""
from __future__ import annotations

from kernels.blas import product


def linear_forward(x, w, b=None):
    """x [..., K], w [N, K], b [N] or None -> (y [..., N], cache)."""
    y = product(x.reshape(-1, w.shape[1]), w, trans_b=True)    # one [M, K] x [K, N] GEMM, whatever the leading dims
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[0]), (x, w, b is not None)


def linear_backward(dy, cache):
    """dy [..., N] -> (dx [..., K], dw [N, K], db [N] or None)."""
    x, w, has_bias = cache
    dy2 = dy.reshape(-1, w.shape[0])   # [M, N]
    x2 = x.reshape(-1, w.shape[1])     # [M, K]
    dx = product(dy2, w).reshape(x.shape)
    dw = product(dy2, x2, trans_a=True)
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dw, db
