"""Fused GEMV / skinny GEMM for M = 1..16 rows of activations: out = x @ W.T, W decoded in registers.

    x   [M, K] float32 (passed flat)   out [M, N] float32   W [N, K] as raw quant blocks

Each thread block owns ROWS output rows and walks all of K; WARPS warps share the walk:

    group k8 (8 weights) -> thread k8 % (32*WARPS)     (a warp reads 256 consecutive weights,
                                                        i.e. one Q4_K super-block, in one go)

A thread loads its 8 x values for each of the M_TILE activation rows once and reuses them for
the ROWS weight rows, decodes 8 weights per row with the type's ``decode8`` (each weight byte is
read once, as uint32 words, coalesced across the warp) and keeps ROWS*M_TILE partial sums in
registers. At the end: warp shuffles, then one shared-memory pass across warps. Under the
simulator (no shuffles) every thread's partials go through shared memory instead.

M is rounded up to an M_TILE in (1, 2, 4, 8, 16); the extra rows repeat the last row of x and are
never stored. One compiled kernel per (type, ROWS, WARPS, M_TILE).
"""
from __future__ import annotations

import functools

from numba import cuda

from ._device import F, I, SIMULATOR, launch, warp_sum
from .decode import FORMATS
from .weights import device_views, padded_bytes

M_TILES = (1, 2, 4, 8, 16)


@cuda.jit(device=True, inline=True)
def _dot8(w, xv, b, acc):
    """acc + sum_t w[t] * xv[b + t]."""
    acc = cuda.fma(w[0], xv[b], acc)
    acc = cuda.fma(w[1], xv[b + 1], acc)
    acc = cuda.fma(w[2], xv[b + 2], acc)
    acc = cuda.fma(w[3], xv[b + 3], acc)
    acc = cuda.fma(w[4], xv[b + 4], acc)
    acc = cuda.fma(w[5], xv[b + 5], acc)
    acc = cuda.fma(w[6], xv[b + 6], acc)
    return cuda.fma(w[7], xv[b + 7], acc)


@functools.lru_cache(maxsize=None)
def gemv_kernel(qtype: str, rows: int, warps: int, m_tile: int):
    decode8 = FORMATS[qtype].decode8
    R, MT, THREADS = rows, m_tile, 32 * warps
    NACC, NX = R * MT, 8 * m_tile
    SHUFFLE = not SIMULATOR
    RED = (warps, NACC) if SHUFFLE else (THREADS, NACC)   # partial sums to add up at the end

    @cuda.jit
    def kernel(x, K, w32, w16, row_bytes, n_out, out):   # x: [M*K] flat
        tid = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * R
        M = x.shape[0] // K
        acc = cuda.local.array(NACC, F)                # acc[r*MT + m]: out[m, row0 + r]
        for i in range(NACC):
            acc[i] = F(0)
        xv = cuda.local.array(NX, F)               # xv[8m + t] = x[m, 8*k8 + t]
        for k8 in range(tid, K >> 3, THREADS):
            for m in range(MT):
                xm = I(min(m, M - 1) * K + 8 * k8)
                for t in range(8):
                    xv[8 * m + t] = x[xm + I(t)]
            for r in range(R):
                w = decode8(w32, w16, I(min(row0 + r, n_out - 1) * row_bytes), I(k8))
                for m in range(MT):
                    acc[r * MT + m] = _dot8(w, xv, 8 * m, acc[r * MT + m])

        red = cuda.shared.array(RED, F)
        if SHUFFLE:
            for i in range(NACC):
                v = warp_sum(acc[i])
                if tid & 31 == 0:
                    red[tid >> 5, i] = v
        else:
            for i in range(NACC):
                red[tid, i] = acc[i]
        cuda.syncthreads()  # every partial is in `red`
        if tid < NACC:
            r, m = tid // MT, tid % MT
            s = F(0)
            for j in range(RED[0]):
                s += red[j, tid]
            if row0 + r < n_out and m < M:
                out[m, row0 + r] = s

    return kernel


def m_tile(M: int) -> int:
    return next(t for t in M_TILES if t >= M)


def gemv(x, w_raw, qtype, n_out, out, rows=2, warps=4):
    """out[:] = x @ W.T for M <= 16 (x float32 C-contiguous)."""
    w32, w16, stride = device_views(w_raw)
    kernel = gemv_kernel(qtype, rows, warps, m_tile(x.shape[0]))
    launch(kernel, (n_out + rows - 1) // rows, 32 * warps, x.reshape(-1), x.shape[1], w32, w16, stride, n_out, out)
    return out


def gemv_workspace(qtype, M, N, K, x_dtype, rows=2, warps=4):
    """gemv's buffers: the padded copy of rows that are not a multiple of 4 bytes."""
    return {"padded rows": padded_bytes(qtype, N, K)}
