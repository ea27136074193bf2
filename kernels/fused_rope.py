"""Rotary position embedding applied in place, forward and backward, both pairings.

x [B, T, H, D] (C-contiguous; D even). Pair i of a head at sequence index t turns by theta:
    style "norm": (x[2i], x[2i+1])      style "neox": (x[i], x[i + D/2])
    y0 = x0 cos - x1 sin,  y1 = x0 sin + x1 cos
The backward is the same kernel turning by -theta (``inverse``): a rotation's transpose is its inverse.

theta comes either from tables cos/sin [T, D/2] (float32 or float64, e.g. ops.rope_tables), or is
computed on the fly in float64 from positions [T] and the base: theta = pos * base^(-2i/D), then
cos/sin rounded to float32 (float32 angles would lose ~5e-4 rad at position 8191).
One thread per pair (it reads both members before writing either, so in place is safe), a
grid-stride loop over the B*T*H*D/2 pairs. Math in float32 on fp32 / bf16 / fp16 storage.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from q4kdistill.backend import array_module
from q4kdistill.errors import Q4KError

from ._device import SIMULATOR
from .fused_io import F, code_of, launch_shared, loader, storage, storer

STYLES = ("norm", "neox")
THREADS = 256


@functools.lru_cache(maxsize=None)
def rope_kernel(x_code, y_code, neox, tables, inverse):
    ld, st = loader(x_code), storer(y_code)
    SIGN = F(-1.0 if inverse else 1.0)

    @cuda.jit
    def kernel(x, T, H, D, cos, sin, positions, base, y):   # x, y [B*T*H*D]; cos, sin [T*D/2]; positions [T]
        half = D // 2
        n = x.shape[0] // 2                               # pairs
        start, step = cuda.grid(1), cuda.gridsize(1)
        for e in range(start, n, step):
            i = e % half
            rest = e // half                              # (b, t, h) flattened
            t = (rest // H) % T
            if tables:
                c = F(cos[t * half + i])
                s = F(sin[t * half + i])
            else:
                theta = np.float64(positions[t]) * math.pow(base, -2.0 * np.float64(i) / np.float64(D))
                c = F(math.cos(theta))
                s = F(math.sin(theta))
            s = s * SIGN
            if neox:
                a, b = rest * D + i, rest * D + i + half
            else:
                a, b = rest * D + 2 * i, rest * D + 2 * i + 1
            x0, x1 = ld(x, a), ld(x, b)
            st(y, a, x0 * c - x1 * s)
            st(y, b, x0 * s + x1 * c)

    return kernel


def rope_apply(x, style, cos=None, sin=None, positions=None, base=None, inverse=False, out=None):
    """Rotate x [B, T, H, D] -> out (x itself by default: in place). Give cos, sin [T, D/2], or
    positions [T] (default 0..T-1) and base. ``inverse`` turns the other way (the backward)."""
    if style not in STYLES:
        raise Q4KError(f"unknown rope style {style!r} (expected one of {', '.join(STYLES)})")
    if x.ndim != 4 or x.shape[-1] % 2:
        raise Q4KError(f"rope: x must be [B, T, H, D] with D even, got {tuple(x.shape)}")
    xp = array_module(x)
    B, T, H, D = (int(v) for v in x.shape)
    out = x if out is None else out
    if tuple(out.shape) != tuple(x.shape):
        raise Q4KError(f"rope: out has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    tables = cos is not None
    if tables:
        if sin is None or tuple(cos.shape) != (T, D // 2) or tuple(sin.shape) != (T, D // 2):
            raise Q4KError(f"rope: cos/sin must both be [T, D/2] = {(T, D // 2)}")
        cos, sin = xp.ascontiguousarray(cos).reshape(-1), xp.ascontiguousarray(sin).reshape(-1)
        positions = xp.zeros(1, dtype=np.int64)
        base = 1.0
    else:
        if base is None:
            raise Q4KError("rope: give cos/sin tables or the rope base")
        positions = xp.arange(T, dtype=np.int64) if positions is None else xp.asarray(positions, dtype=np.int64)
        if positions.shape != (T,):
            raise Q4KError(f"rope: positions must be [T] = [{T}], got {tuple(positions.shape)}")
        cos = sin = xp.zeros(1, dtype=np.float32)
    pairs = x.size // 2
    if pairs == 0:
        return out
    blocks = min((pairs + THREADS - 1) // THREADS, 8 if SIMULATOR else 65535)
    threads = 32 if SIMULATOR else THREADS
    kernel = rope_kernel(code_of(x), code_of(out), style == "neox", tables, bool(inverse))
    launch_shared(kernel, blocks, threads, storage(x), T, H, D, cos, sin, positions, np.float64(base), storage(out))
    return out
