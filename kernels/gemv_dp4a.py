"""Q4_K GEMV with 8-bit activations and dp4a (as llama.cpp's q8_1 path), M = 1..16. GPU-first;
the simulator runs it through Python stand-ins of dp4a and the 16-byte loads.

Step 1, quantize x per 32 values (one thread per block of 32):
    d = max|x| / 127,  q = round(x / d) in int8 (packed 4 per uint32),  s = d * sum(q)
Step 2, for weight sub-block s (32 weights, w = D*q_w - Dm with D = d*sc, Dm = dmin*m) and the
x block under it (same 32 positions; Q4_K sub-blocks are 32-aligned):
    sum_i w_i x_i ~= D * d_x * sum_i q_w,i q_x,i  -  Dm * s_x,   the integer sum by 8 dp4a.
Thread layout as gemv_chunk.py: a thread takes a 64-weight chunk (sub-blocks 2j, 2j+1) of ROWS rows.

Error: x is rounded to 8 bits per 32 values, ||out - ref|| / ||ref|| <= 2e-2 (typically ~4e-3);
the weights are used exactly.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from ._device import F, I, U, launch, warp_rows_store
from ._ptx import dp4a, ld4, st4
from .decode import Q4K_BYTES, Q4K_QS, q4_k_chunk_scales
from .gemv import m_tile
from .weights import address, device_views, padded_bytes

QUANT_THREADS = 128


@cuda.jit(device=True, inline=True)
def _q8(v, inv):
    """round(v * inv) as an int8 in the low byte of a uint32."""
    return U(np.int32(round(v * inv)) & np.int32(0xFF))


@cuda.jit
def quantize_x_kernel(x, xq, xd, xs):
    """x [M*K] f32 -> xq [M*K/4] uint32 (int8 x4), xd, xs [M*K/32] f32; one thread per 32 values."""
    b = cuda.grid(1)
    if b < xd.shape[0]:
        v = cuda.local.array(32, F)
        for t in range(8):
            v[4 * t], v[4 * t + 1], v[4 * t + 2], v[4 * t + 3] = ld4(x, I(32 * b + 4 * t))
        amax = F(0)
        for t in range(32):
            amax = max(amax, abs(v[t]))
        d = amax / F(127)
        inv = F(127) / amax if amax > F(0) else F(0)
        total = 0
        words = cuda.local.array(8, U)
        for t in range(8):
            q0, q1, q2, q3 = _q8(v[4 * t], inv), _q8(v[4 * t + 1], inv), _q8(v[4 * t + 2], inv), _q8(v[4 * t + 3], inv)
            words[t] = q0 | (q1 << U(8)) | (q2 << U(16)) | (q3 << U(24))
            total += dp4a(words[t], U(0x01010101), np.int32(0))
        st4(xq, I(8 * b), words[0], words[1], words[2], words[3])
        st4(xq, I(8 * b + 4), words[4], words[5], words[6], words[7])
        xd[b] = d
        xs[b] = d * F(total)


def _chunk(R, MT):
    R8, R4 = 8 * R, 4 * R

    @cuda.jit(device=True, inline=True)
    def chunk(xq, xd, xs, K, M, w32, row_bytes, n_out, row0, c, acc):
        j = I(c & 3)
        q = cuda.local.array(R8, U)
        cf = cuda.local.array(R4, F)             # D0, Dm0, D1, Dm1 of row r
        for r in range(R):
            wo = (I(min(row0 + r, n_out - 1)) * I(row_bytes) + I(c >> 2) * I(Q4K_BYTES)) >> I(2)
            h0, h1, h2, h3 = ld4(w32, wo)                       # d | dmin, 12 scale bytes
            qw = wo + I(Q4K_QS // 4) + I(8) * j                  # the chunk's 32 qs bytes
            q[8 * r], q[8 * r + 1], q[8 * r + 2], q[8 * r + 3] = ld4(w32, qw)
            q[8 * r + 4], q[8 * r + 5], q[8 * r + 6], q[8 * r + 7] = ld4(w32, qw + I(4))
            cf[4 * r], cf[4 * r + 1], cf[4 * r + 2], cf[4 * r + 3] = q4_k_chunk_scales(h0, h1, h2, h3, j)
        for m in range(MT):
            mm = I(min(m, M - 1))
            xb = mm * I(K >> 5) + I(2 * c)        # x blocks 2c (low nibbles) and 2c+1 (high)
            xw = mm * I(K >> 2) + I(16 * c)       # their 16 words of int8
            a0, a1, a2, a3 = ld4(xq, xw)
            a4, a5, a6, a7 = ld4(xq, xw + I(4))
            b0, b1, b2, b3 = ld4(xq, xw + I(8))
            b4, b5, b6, b7 = ld4(xq, xw + I(12))
            d0, d1, s0, s1 = xd[xb], xd[xb + I(1)], xs[xb], xs[xb + I(1)]
            for r in range(R):
                lo, hi = U(0x0F0F0F0F), U(0xF0F0F0F0)
                i0 = dp4a(q[8 * r] & lo, a0, np.int32(0))
                i0 = dp4a(q[8 * r + 1] & lo, a1, i0)
                i0 = dp4a(q[8 * r + 2] & lo, a2, i0)
                i0 = dp4a(q[8 * r + 3] & lo, a3, i0)
                i0 = dp4a(q[8 * r + 4] & lo, a4, i0)
                i0 = dp4a(q[8 * r + 5] & lo, a5, i0)
                i0 = dp4a(q[8 * r + 6] & lo, a6, i0)
                i0 = dp4a(q[8 * r + 7] & lo, a7, i0)
                i1 = dp4a((q[8 * r] & hi) >> U(4), b0, np.int32(0))
                i1 = dp4a((q[8 * r + 1] & hi) >> U(4), b1, i1)
                i1 = dp4a((q[8 * r + 2] & hi) >> U(4), b2, i1)
                i1 = dp4a((q[8 * r + 3] & hi) >> U(4), b3, i1)
                i1 = dp4a((q[8 * r + 4] & hi) >> U(4), b4, i1)
                i1 = dp4a((q[8 * r + 5] & hi) >> U(4), b5, i1)
                i1 = dp4a((q[8 * r + 6] & hi) >> U(4), b6, i1)
                i1 = dp4a((q[8 * r + 7] & hi) >> U(4), b7, i1)
                v = cf[4 * r] * d0 * F(i0) - cf[4 * r + 1] * s0 + cf[4 * r + 2] * d1 * F(i1) - cf[4 * r + 3] * s1
                acc[r * MT + m] += v

    return chunk


@functools.lru_cache(maxsize=None)
def dp4a_kernel(rows: int, warps: int, m_tile: int):
    chunk = _chunk(rows, m_tile)
    R, MT = rows, m_tile
    NACC = R * MT
    store = warp_rows_store(rows, m_tile, warps)

    @cuda.jit
    def kernel(xq, xd, xs, K, w32, row_bytes, n_out, out):
        tid = cuda.threadIdx.x
        lane = tid & 31
        row0 = (cuda.blockIdx.x * warps + (tid >> 5)) * R
        M = xd.shape[0] // (K >> 5)
        acc = cuda.local.array(NACC, F)
        for i in range(NACC):
            acc[i] = F(0)
        for c in range(lane, K >> 6, 32):
            chunk(xq, xd, xs, K, M, w32, row_bytes, n_out, row0, c, acc)
        store(acc, tid, lane, row0, M, n_out, out)

    return kernel


def quantize_x(x):
    """(xq uint32 [M*K/4], xd, xs float32 [M*K/32]) for x float32 [M, K] (K % 32 == 0)."""
    from q4kdistill.backend import array_module

    xp = array_module(x)
    if address(x) % 16:
        x = x.copy()
    n = x.size // 32
    xq = xp.empty(x.size // 4, dtype=np.uint32)
    xd, xs = xp.empty(n, dtype=np.float32), xp.empty(n, dtype=np.float32)
    launch(quantize_x_kernel, (n + QUANT_THREADS - 1) // QUANT_THREADS, QUANT_THREADS, x.reshape(-1), xq, xd, xs)
    return xq, xd, xs


def gemv_dp4a(x, w_raw, qtype, n_out, out, rows=2, warps=4):
    """out[:] ~= x @ W.T for Q4_K, M <= 16, x rounded to int8 per 32 values."""
    w32, _, stride = device_views(w_raw, align=16)
    xq, xd, xs = quantize_x(x)
    kernel = dp4a_kernel(rows, warps, m_tile(x.shape[0]))
    per_block = rows * warps
    launch(kernel, (n_out + per_block - 1) // per_block, 32 * warps, xq, xd, xs, x.shape[1], w32, stride, n_out, out)
    return out


def gemv_dp4a_workspace(qtype, M, N, K, x_dtype, rows=2, warps=4):
    """gemv_dp4a's buffers, all alive during the GEMV: quantize_x's int8 x and its two float32
    arrays per 32 values, and the padded copy of rows not a multiple of 16 bytes."""
    return {"x int8": M * K, "x scales": M * K // 32 * 4, "x scaled sums": M * K // 32 * 4,
            "padded rows": padded_bytes(qtype, N, K, 16)}
