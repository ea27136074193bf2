"""Chunked GEMV for the K-quants (Q4_K, Q6_K), M = 1..16: one thread decodes 64 weights at a time.

    x [M, K] float32 (flat)    out [M, N] float32    W [N, K] as raw Q4_K / Q6_K super-blocks

gemv.py decodes 8 weights per call and so re-reads and re-decodes the block header (scales, d)
for every 8 weights; here a thread takes a 64-weight chunk (a quarter super-block) and decodes
its header once:

    Q4_K chunk j of a super-block: 16-byte header + qs bytes 32j..32j+31 (three 16-byte loads);
         low nibbles -> weights 64j+l (sub-block 2j), high nibbles -> 64j+32+l (sub-block 2j+1)
    Q6_K chunk (n, l0): ql/qh bytes for l = l0..l0+15 of half n, four lines (q4kdistill/formats/block_layouts.py),
         four scales; blocks are 2-byte aligned, so 16-byte fields come through load16.

Each warp owns ROWS weight rows; lane c walks chunks c, c+32, ... of K (a warp reads 8 Q4_K
super-blocks = 1152 contiguous bytes per row per step). x is read with 16-byte loads, once per
activation row and reused for the ROWS weight rows. Partial sums: warp shuffles at the end
(shared memory under the simulator). Warps of a block are independent (WARPS rows groups).
"""
from __future__ import annotations

import functools

from numba import cuda

from ._device import F, I, U, launch, warp_rows_store
from ._ptx import ld4, load16
from .decode import Q4K_BYTES, Q4K_QS, Q6K_BYTES, Q6K_D, Q6K_QH, Q6K_QL, Q6K_SCALES, fma4, q4_k_chunk_scales
from .gemv import _dot8, m_tile
from .weights import address, device_views, padded_bytes


def _q4_k_chunk(R, MT):
    R8, R4, X8 = 8 * R, 4 * R, 8 * MT              # local array sizes must be plain constants

    @cuda.jit(device=True, inline=True)
    def chunk(x, K, M, w32, w16, row_bytes, n_out, row0, c, acc):
        j = I(c & 3)
        q = cuda.local.array(R8, U)            # q[8r + i]: qs word i of the chunk, row r
        cf = cuda.local.array(R4, F)           # A0, C0, A1, C1 of row r: w = A * unit + C
        for r in range(R):
            wo = (I(min(row0 + r, n_out - 1)) * I(row_bytes) + I(c >> 2) * I(Q4K_BYTES)) >> I(2)
            h0, h1, h2, h3 = ld4(w32, wo)                       # d | dmin, 12 scale bytes
            qw = wo + I(Q4K_QS // 4) + I(8) * j                  # the chunk's 32 qs bytes
            q[8 * r], q[8 * r + 1], q[8 * r + 2], q[8 * r + 3] = ld4(w32, qw)
            q[8 * r + 4], q[8 * r + 5], q[8 * r + 6], q[8 * r + 7] = ld4(w32, qw + I(4))
            D0, M0, D1, M1 = q4_k_chunk_scales(h0, h1, h2, h3, j)
            # 16 * (d*sc) is exact, so these are the FMA form w = A * (1 + q/16) + C of d*sc*q - dmin*m
            cf[4 * r], cf[4 * r + 1] = F(16) * D0, -(F(16) * D0 + M0)
            cf[4 * r + 2], cf[4 * r + 3] = F(16) * D1, -(F(16) * D1 + M1)
        xv = cuda.local.array(X8, F)          # xv[8m + t]: the x values of word i's 8 weights
        for i in range(8):
            for m in range(MT):
                xm = I(min(m, M - 1)) * I(K) + I(64 * c + 4 * i)
                xv[8 * m], xv[8 * m + 1], xv[8 * m + 2], xv[8 * m + 3] = ld4(x, xm)
                xv[8 * m + 4], xv[8 * m + 5], xv[8 * m + 6], xv[8 * m + 7] = ld4(x, xm + I(32))
            for r in range(R):
                wq = q[8 * r + i]
                w = (fma4(wq & U(0x0F0F0F0F), 4, cf[4 * r], cf[4 * r + 1])
                     + fma4((wq >> U(4)) & U(0x0F0F0F0F), 4, cf[4 * r + 2], cf[4 * r + 3]))
                for m in range(MT):
                    acc[r * MT + m] = _dot8(w, xv, 8 * m, acc[r * MT + m])

    return chunk


@cuda.jit(device=True, inline=True)
def _q6_line_scale(s_lo, s_hi, e):
    """int8 scale byte e (0..7) of the 8 scales of a half, from its two words, as float32."""
    b = (s_lo if e < 4 else s_hi) >> U(8 * (e & 3))
    return F(int((b & U(0xFF)) ^ U(0x80)) - 128)


@cuda.jit(device=True, inline=True)
def _dot16(w, xv, b, acc):
    return _dot8(w[8:], xv, b + 8, _dot8(w[:8], xv, b, acc))


def _q6_k_chunk(R, MT):
    R8, R4, X16 = 8 * R, 4 * R, 16 * MT

    @cuda.jit(device=True, inline=True)
    def chunk(x, K, M, w32, w16, row_bytes, n_out, row0, c, acc):
        n, l0 = I((c >> 1) & 1), I(16 * (c & 1))
        ql = cuda.local.array(R8, U)          # ql[8r + i]: lines 0/2 word i; ql[8r + 4 + i]: lines 1/3
        qh = cuda.local.array(R4, U)
        A = cuda.local.array(R4, F)            # per line qd: w = A * (1 + q/64) - 1.5 A
        for r in range(R):
            o = I(min(row0 + r, n_out - 1)) * I(row_bytes) + I(c >> 2) * I(Q6K_BYTES)
            qlo = o + I(Q6K_QL) + I(64) * n + l0
            ql[8 * r], ql[8 * r + 1], ql[8 * r + 2], ql[8 * r + 3] = load16(w32, qlo)
            ql[8 * r + 4], ql[8 * r + 5], ql[8 * r + 6], ql[8 * r + 7] = load16(w32, qlo + I(32))
            qh[4 * r], qh[4 * r + 1], qh[4 * r + 2], qh[4 * r + 3] = load16(w32, o + I(Q6K_QH) + I(32) * n + l0)
            s0, s1, s2, s3 = load16(w32, o + I(Q6K_SCALES))          # the 16 int8 scales
            s_lo, s_hi = (s0, s1) if n == I(0) else (s2, s3)          # the 8 of half n
            d64 = F(64) * F(w16[(o + I(Q6K_D)) >> I(1)])
            for qd in range(4):
                A[4 * r + qd] = d64 * _q6_line_scale(s_lo, s_hi, (l0 >> I(4)) + I(2 * qd))
        xv = cuda.local.array(X16, F)         # xv[16m + 4qd + t]: x of line qd's 4 weights of word i
        for i in range(4):
            for m in range(MT):
                xm = I(min(m, M - 1)) * I(K) + I(256 * (c >> 2)) + I(128) * n + l0 + I(4 * i)
                for qd in range(4):
                    xv[16 * m + 4 * qd], xv[16 * m + 4 * qd + 1], xv[16 * m + 4 * qd + 2], xv[16 * m + 4 * qd + 3] = ld4(x, xm + I(32 * qd))
            for r in range(R):
                a, b, h = ql[8 * r + i], ql[8 * r + 4 + i], qh[4 * r + i]
                lo4, h3 = U(0x0F0F0F0F), U(0x03030303)
                w = (fma4((a & lo4) | ((h & h3) << U(4)), 6, A[4 * r], F(-1.5) * A[4 * r])
                     + fma4((b & lo4) | (((h >> U(2)) & h3) << U(4)), 6, A[4 * r + 1], F(-1.5) * A[4 * r + 1])
                     + fma4(((a >> U(4)) & lo4) | (((h >> U(4)) & h3) << U(4)), 6, A[4 * r + 2], F(-1.5) * A[4 * r + 2])
                     + fma4(((b >> U(4)) & lo4) | (((h >> U(6)) & h3) << U(4)), 6, A[4 * r + 3], F(-1.5) * A[4 * r + 3]))
                for m in range(MT):
                    acc[r * MT + m] = _dot16(w, xv, 16 * m, acc[r * MT + m])

    return chunk


CHUNKS = {"Q4_K": _q4_k_chunk, "Q6_K": _q6_k_chunk}


@functools.lru_cache(maxsize=None)
def chunk_kernel(qtype: str, rows: int, warps: int, m_tile: int):
    chunk = CHUNKS[qtype](rows, m_tile)
    R, MT = rows, m_tile
    NACC = R * MT
    store = warp_rows_store(rows, m_tile, warps)

    @cuda.jit
    def kernel(x, K, w32, w16, row_bytes, n_out, out):
        tid = cuda.threadIdx.x
        lane = tid & 31
        row0 = (cuda.blockIdx.x * warps + (tid >> 5)) * R
        M = x.shape[0] // K
        acc = cuda.local.array(NACC, F)           # acc[r*MT + m]: out[m, row0 + r]
        for i in range(NACC):
            acc[i] = F(0)
        for c in range(lane, K >> 6, 32):
            chunk(x, K, M, w32, w16, row_bytes, n_out, row0, c, acc)
        store(acc, tid, lane, row0, M, n_out, out)

    return kernel


def _align(qtype):
    return 16 if qtype == "Q4_K" else 4          # Q4_K rows are read with 16-byte loads


def gemv_chunk(x, w_raw, qtype, n_out, out, rows=2, warps=4):
    """out[:] = x @ W.T for M <= 16, Q4_K or Q6_K (x float32 C-contiguous)."""
    w32, w16, stride = device_views(w_raw, align=_align(qtype))
    if address(x) % 16:
        x = x.copy()                              # 16-byte loads of x need an aligned start
    kernel = chunk_kernel(qtype, rows, warps, m_tile(x.shape[0]))
    per_block = rows * warps
    launch(kernel, (n_out + per_block - 1) // per_block, 32 * warps, x.reshape(-1), x.shape[1], w32, w16, stride, n_out, out)
    return out


def gemv_chunk_workspace(qtype, M, N, K, x_dtype, rows=2, warps=4):
    """gemv_chunk's buffers (x and W aligned, as CuPy allocates them): the padded copy of rows that
    are not a multiple of 16 (Q4_K) or 4 (Q6_K) bytes."""
    return {"padded rows": padded_bytes(qtype, N, K, _align(qtype))}
