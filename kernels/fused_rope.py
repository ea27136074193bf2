"""Rotary position embedding applied in place, forward and backward, both pairings.

x [B, T, H, D] (C-contiguous; D even). Pair i of a head at sequence index t turns by theta:
    style "norm": (x[2i], x[2i+1])      style "neox": (x[i], x[i + D/2])
    y0 = x0 cos - x1 sin,  y1 = x0 sin + x1 cos
The backward is the same kernel turning by -theta (``inverse``): a rotation's transpose is its inverse.

theta comes either from tables cos/sin [T, D/2] (float32 or float64, e.g. ops.rope_tables), or is
computed on the fly in float64 from positions [T] and the base: theta = pos * base^(-2i/D), then
cos/sin rounded to float32 (float32 angles would lose ~5e-4 rad at position 8191).
One thread per pair (it reads both members before writing either, so in place is safe): a block strides
over the B*T tokens; its thread k turns pair k % (D/2) of heads k // (D/2), + threads/(D/2), ..., with
that pair's cos/sin read once per token (the per-pair divisions of a 1-D loop over all pairs ran it at
~1.2 TB/s on the H200). Math in float32 on fp32 / bf16 / fp16 storage.
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
    def kernel(x, T, H, D, cos, sin, positions, base, y, NT):   # x, y [NT*H*D], NT = B*T tokens; cos, sin [T*D/2]
        half = D // 2
        i = cuda.threadIdx.x % half                       # this thread's pair of every head ...
        h0, hstep = cuda.threadIdx.x // half, cuda.blockDim.x // half    # ... of heads h0, h0 + hstep, ...
        for tok in range(cuda.blockIdx.x, NT, cuda.gridDim.x):
            t = tok % T                                   # once per token: no division per element
            if tables:
                c = F(cos[t * half + i])
                s = F(sin[t * half + i])
            else:
                theta = np.float64(positions[t]) * math.pow(base, -2.0 * np.float64(i) / np.float64(D))
                c = F(math.cos(theta))
                s = F(math.sin(theta))
            s = s * SIGN
            for h in range(h0, H, hstep):
                rb = (tok * H + h) * D
                if neox:
                    a, b = rb + i, rb + i + half
                else:
                    a, b = rb + 2 * i, rb + 2 * i + 1
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
    half = D // 2
    threads = half * max(1, (32 if SIMULATOR else THREADS) // half)   # a multiple of D/2: whole pairs of heads
    blocks = min(B * T, 4 if SIMULATOR else 65535)
    kernel = rope_kernel(code_of(x), code_of(out), style == "neox", tables, bool(inverse))
    launch_shared(kernel, blocks, threads, storage(x), T, H, D, cos, sin, positions, np.float64(base), storage(out), B * T)
    return out


# -- the stacked q, k, v product's epilogue -------------------------------------------------------
@functools.lru_cache(maxsize=None)
def qkv_kernel(y_code, o_code, neox, has_bias):
    ld, st = loader(y_code), storer(o_code)

    @cuda.jit(device=True, inline=True)
    def put(out, bias, h, n, tok, D, a, b, x0, x1, c, s, rotate):
        """Pair (a, b) of head h (of n) of token tok: biased, turned when ``rotate``, stored in out."""
        if has_bias:
            x0 += F(bias[h * D + a])
            x1 += F(bias[h * D + b])
        dst = (tok * n + h) * D
        if rotate:
            st(out, dst + a, x0 * c - x1 * s)
            st(out, dst + b, x0 * s + x1 * c)
        else:
            st(out, dst + a, x0)
            st(out, dst + b, x1)

    @cuda.jit
    def kernel(y, T, H, KV, D, cos, sin, bq, bk, bv, q, k, v, NT):
        # y [NT, G*D], G = H + 2 KV heads: q's, k's, v's; q [NT*H*D], k, v [NT*KV*D]; cos, sin [T*D/2]
        half = D // 2
        G = H + 2 * KV
        i = cuda.threadIdx.x % half
        g0, gstep = cuda.threadIdx.x // half, cuda.blockDim.x // half
        if neox:
            a, b = i, i + half
        else:
            a, b = 2 * i, 2 * i + 1
        for tok in range(cuda.blockIdx.x, NT, cuda.gridDim.x):
            t = tok % T
            c = F(cos[t * half + i])
            s = F(sin[t * half + i])
            for g in range(g0, G, gstep):
                src = (tok * G + g) * D
                x0, x1 = ld(y, src + a), ld(y, src + b)
                if g < H:
                    put(q, bq, g, H, tok, D, a, b, x0, x1, c, s, True)
                elif g < H + KV:
                    put(k, bk, g - H, KV, tok, D, a, b, x0, x1, c, s, True)
                else:
                    put(v, bv, g - H - KV, KV, tok, D, a, b, x0, x1, c, s, False)

    return kernel


def qkv_rope_split(y, T, H, KV, D, style, cos, sin, biases=(None, None, None), outs=None, dtype=None):
    """The epilogue of a stacked q, k, v product: y [NT, (H + 2 KV) * D] (NT = B x T tokens, each
    row q's H heads, then k's KV, then v's KV) -> (q [NT/T, T, H, D], k, v [NT/T, T, KV, D]): the
    biases (float arrays [H*D], [KV*D], [KV*D], or None) added, q and k rotated by cos/sin [T, D/2] as
    rope_apply does, all written in ``dtype`` (outs: three arrays to write instead). One pass: each
    element read once, written once, rounded once."""
    xp = array_module(y)
    if style not in STYLES:
        raise Q4KError(f"unknown rope style {style!r} (expected one of {', '.join(STYLES)})")
    G = H + 2 * KV
    if y.ndim != 2 or y.shape[1] != G * D or D % 2 or y.shape[0] % T:
        raise Q4KError(f"qkv_rope_split: y must be [B*T, {G * D}] with T = {T} and D even, got {tuple(y.shape)}")
    NT = y.shape[0]
    B = NT // T
    shapes = ((B, T, H, D), (B, T, KV, D), (B, T, KV, D))
    if outs is None:
        outs = tuple(xp.empty(s, dtype=dtype or y.dtype) for s in shapes)
    if any(tuple(o.shape) != s for o, s in zip(outs, shapes)) or len({code_of(o) for o in outs}) != 1:
        raise Q4KError(f"qkv_rope_split: outs must be {shapes} of one dtype")
    if tuple(cos.shape) != (T, D // 2) or tuple(sin.shape) != (T, D // 2):
        raise Q4KError(f"qkv_rope_split: cos/sin must both be [T, D/2] = {(T, D // 2)}")
    has_bias = biases[0] is not None
    if has_bias and [int(b.size) for b in biases] != [H * D, KV * D, KV * D]:
        raise Q4KError("qkv_rope_split: biases must be float32 [H*D], [KV*D], [KV*D]")
    if has_bias:
        bq, bk, bv = (xp.ascontiguousarray(b).reshape(-1) for b in biases)
    else:
        bq = bk = bv = xp.zeros(1, dtype=np.float32)           # never read
    if NT == 0:
        return outs
    half = D // 2
    threads = half * max(1, (32 if SIMULATOR else THREADS) // half)
    blocks = min(NT, 4 if SIMULATOR else 65535)
    kernel = qkv_kernel(code_of(y), code_of(outs[0]), style == "neox", has_bias)
    launch_shared(kernel, blocks, threads, storage(xp.ascontiguousarray(y)), T, H, KV, D,
                  xp.ascontiguousarray(cos).reshape(-1), xp.ascontiguousarray(sin).reshape(-1), bq, bk, bv,
                  *(storage(o) for o in outs), NT)
    return outs
