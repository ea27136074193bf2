"""RMSNorm over the last axis: y = x / sqrt(mean(x^2) + eps) * w.

GGUF gemma norms already carry gemma's "+1", so one formula serves every family.
"""
from __future__ import annotations

from ...backend import array_module


def rmsnorm_forward(x, w, eps):
    """x [..., D], w [D] -> (y [..., D], cache)."""
    xp = array_module(x)
    rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + float(eps))  # [..., 1]
    y = x * rstd * w
    return y, (x, w, rstd)


def rmsnorm_backward(dy, cache):
    """dy [..., D] -> (dx [..., D], dw [D])."""
    x, w, rstd = cache
    xhat = x * rstd                                  # [..., D]
    g = dy * w                                       # dL/dxhat
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(axis=0)
    return dx, dw
