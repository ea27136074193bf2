"""Gated linear unit y = act(gate) * up: SwiGLU (act "silu") and GeGLU-tanh (act "gelu_tanh").

  silu(x)      = x * sigmoid(x)                      silu'(x) = s * (1 + x * (1 - s))
  gelu_tanh(x) = 0.5 x (1 + tanh(u)),  u = c (x + 0.044715 x^3),  c = sqrt(2/pi)
  gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2),  t = tanh(u)
sigmoid is written as 0.5 (1 + tanh(x/2)): no exp overflow for large |x|.
"""
from __future__ import annotations

import math

from ...backend import array_module
from ...errors import Q4KError

ACTS = ("silu", "gelu_tanh")
_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _act_and_grad(x, act, need_grad):
    """(act(x), act'(x) or None)."""
    xp = array_module(x)
    if act == "silu":
        s = 0.5 * (1.0 + xp.tanh(0.5 * x))
        return x * s, (s * (1.0 + x * (1.0 - s)) if need_grad else None)
    if act == "gelu_tanh":
        t = xp.tanh(_C * (x + _A * x * x * x))
        y = 0.5 * x * (1.0 + t)
        if not need_grad:
            return y, None
        return y, 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * x * x)
    raise Q4KError(f"unknown activation {act!r} (expected one of {', '.join(ACTS)})")


def glu_forward(gate, up, act):
    """gate, up [..., F] -> (y [..., F], cache)."""
    a, _ = _act_and_grad(gate, act, need_grad=False)
    return a * up, (gate, up, act)


def glu_backward(dy, cache):
    """dy [..., F] -> (dgate [..., F], dup [..., F])."""
    gate, up, act = cache
    a, da = _act_and_grad(gate, act, need_grad=True)
    return dy * up * da, dy * a
