"""Linear layer y = x @ W.T + b with W [N, K] (rows = output features, GGUF's logical shape)."""
from __future__ import annotations


def linear_forward(x, w, b=None):
    """x [..., K], w [N, K], b [N] or None -> (y [..., N], cache)."""
    y = x.reshape(-1, w.shape[1]) @ w.T      # one [M, K] x [K, N] GEMM, whatever the leading dims
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[0]), (x, w, b is not None)


def linear_backward(dy, cache):
    """dy [..., N] -> (dx [..., K], dw [N, K], db [N] or None)."""
    x, w, has_bias = cache
    dy2 = dy.reshape(-1, w.shape[0])   # [M, N]
    x2 = x.reshape(-1, w.shape[1])     # [M, K]
    dx = (dy2 @ w).reshape(x.shape)
    dw = dy2.T @ x2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dw, db
