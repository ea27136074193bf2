"""Rotary position embedding, in the two pairings GGUF models use.

  style "norm" (llama in GGUF): rotate adjacent pairs  (x[2i], x[2i+1])
  style "neox" (qwen2, gemma3): rotate the two halves  (x[i],  x[i + D/2])

  pair i at position t turns by theta = t * base^(-2i/D):
      y0 = x0 cos - x1 sin
      y1 = x0 sin + x1 cos
The backward turns by -theta (a rotation's transpose is its inverse).
"""
from __future__ import annotations

from ...backend import array_module
from ...errors import Q4KError

STYLES = ("norm", "neox")


def rope_tables(positions, dim, base, xp):
    """positions [T] int -> (cos, sin), each float64 [T, dim//2] (cast to the input dtype on use)."""
    inv_freq = base ** (-xp.arange(0, dim // 2, dtype=xp.float64) * 2.0 / dim)   # [dim/2]
    angles = xp.asarray(positions, dtype=xp.float64)[:, None] * inv_freq[None, :]  # [T, dim/2]
    return xp.cos(angles), xp.sin(angles)


def _pairs(x, style):
    """The (first, second) members of every rotated pair, as views of x [..., D]."""
    if style == "norm":
        return x[..., 0::2], x[..., 1::2]
    if style == "neox":
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    raise Q4KError(f"unknown rope style {style!r} (expected one of {', '.join(STYLES)})")


def _rotate(x, cos, sin, style):
    xp = array_module(x)
    c = cos.astype(x.dtype, copy=False)[:, None, :]  # [T, 1, D/2] broadcasts over [B, T, H, D/2]
    s = sin.astype(x.dtype, copy=False)[:, None, :]
    x0, x1 = _pairs(x, style)
    y = xp.empty_like(x)
    y0, y1 = _pairs(y, style)
    y0[...] = x0 * c - x1 * s
    y1[...] = x0 * s + x1 * c
    return y


def rope_forward(x, cos, sin, style):
    """x [B, T, H, D], cos/sin [T, D/2] -> y [B, T, H, D]."""
    return _rotate(x, cos, sin, style)


def rope_backward(dy, cos, sin, style):
    """dy [B, T, H, D] -> dx [B, T, H, D] (rotation by the opposite angle)."""
    return _rotate(dy, cos, -sin, style)
