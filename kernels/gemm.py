"""Fused tiled GEMM for larger M: out = x @ W.T, W decoded tile by tile into shared memory.

    x [M, K] float32 (flat)    out [M, N] float32    W [N, K] as raw quant blocks

A thread block computes a BM x BN tile of out (BM activation rows, BN weight rows) with
THREADS = (BM/TM) * (BN/TN) threads, each owning TM x TN outputs in registers. For each K step
of BK = 32 weights:

    Xs[k, m] = x[m0 + m, k0 + k]              (BK x BM, coalesced over k)
    Ws[k, n] = decode8(W row n0 + n)[k]       (BK x BN, one 8-weight group per thread-load)
    acc[i, j] += Xs[k, ty + i*BM/TM] * Ws[k, tx + j*BN/TN]     (strided ownership: no bank conflicts)

Rows +1 padding of the shared tiles keeps the transposed stores conflict-free. FP32 FMA
throughout (no tensor cores: numba-cuda exposes none), so this variant is exact but bounded by
the FP32 rate; for M >= 64 the decode-to-scratch + cuBLAS path is usually faster.
"""
from __future__ import annotations

import functools

from numba import cuda

from ._device import F, I, launch
from .decode import FORMATS
from .weights import device_views, padded_bytes

BK = 32  # weights per K step: 4 groups of 8; every supported K is a multiple of 32


@functools.lru_cache(maxsize=None)
def gemm_kernel(qtype: str, bm: int, bn: int, tm: int, tn: int):
    decode8 = FORMATS[qtype].decode8
    TY, TX = bm // tm, bn // tn                 # thread grid of the block
    THREADS = TY * TX
    XS, WS = (BK, bm + 1), (BK, bn + 1)
    X_LOADS = bm * BK // THREADS                # x values each thread stages per step
    W_LOADS = bn * (BK // 8) // THREADS         # 8-weight groups each thread decodes per step
    NACC = tm * tn
    assert bm * BK % THREADS == 0 and bn * (BK // 8) % THREADS == 0

    @cuda.jit
    def kernel(x, K, w32, w16, row_bytes, n_out, out):
        t = cuda.threadIdx.x
        ty, tx = t // TX, t % TX
        m0, n0 = cuda.blockIdx.y * bm, cuda.blockIdx.x * bn
        M = x.shape[0] // K
        Xs = cuda.shared.array(XS, F)
        Ws = cuda.shared.array(WS, F)
        acc = cuda.local.array(NACC, F)          # acc[i*tn + j]: out[m0 + ty + i*TY, n0 + tx + j*TX]
        for i in range(NACC):
            acc[i] = F(0)
        for k0 in range(0, K, BK):
            for i in range(X_LOADS):
                e = t + i * THREADS
                m, k = e // BK, e % BK
                Xs[k, m] = x[I(min(m0 + m, M - 1) * K + k0 + k)]
            for i in range(W_LOADS):
                e = t + i * THREADS
                n, g = e // (BK // 8), e % (BK // 8)
                w = decode8(w32, w16, I(min(n0 + n, n_out - 1) * row_bytes), I((k0 >> 3) + g))
                for j in range(8):
                    Ws[8 * g + j, n] = w[j]
            cuda.syncthreads()  # tiles staged
            for k in range(BK):
                for i in range(tm):
                    a = Xs[k, ty + i * TY]
                    for j in range(tn):
                        acc[i * tn + j] = cuda.fma(a, Ws[k, tx + j * TX], acc[i * tn + j])
            cuda.syncthreads()  # tiles consumed before the next step overwrites them
        for i in range(tm):
            m = m0 + ty + i * TY
            for j in range(tn):
                n = n0 + tx + j * TX
                if m < M and n < n_out:
                    out[m, n] = acc[i * tn + j]

    return kernel


def gemm(x, w_raw, qtype, n_out, out, bm=64, bn=64, tm=4, tn=4):
    """out[:] = x @ W.T for any M (x float32 C-contiguous)."""
    w32, w16, stride = device_views(w_raw)
    M, K = x.shape
    kernel = gemm_kernel(qtype, bm, bn, tm, tn)
    grid = ((n_out + bn - 1) // bn, (M + bm - 1) // bm)
    launch(kernel, grid, (bm // tm) * (bn // tn), x.reshape(-1), K, w32, w16, stride, n_out, out)
    return out


def gemm_workspace(qtype, M, N, K, x_dtype, bm=64, bn=64, tm=4, tn=4):
    """gemm's buffers: the padded copy of rows that are not a multiple of 4 bytes."""
    return {"padded rows": padded_bytes(qtype, N, K)}
