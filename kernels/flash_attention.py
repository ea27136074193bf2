"""FP32 flash attention in Numba CUDA: FlashAttention-2's algorithm, forward and backward, one
thread per row. The simulator runs these in CI; on a GPU they are the fallback of the
tensor-core kernels (flash_attention_mma.py). No [T, T] array exists at any point.

Shapes: q, o, do [B, T, H, D]; k, v [B, T, KV, D]; lse, drow [B, H, T]; all float32, C-contiguous.
Query head h reads kv head h // G (G = H // KV). Key j is visible to query i iff j <= i,
i - j < window and key_mask[b, j] (uint8 [B, T]; a one-element array and has_mask = 0 for none).

forward   grid (ceil(T / BQ), H, B), BQ threads; thread r owns query i = tile*BQ + r:
            for each key tile [j0, j0 + BK) any query of the block may see:
                K, V tile -> shared memory (zero-filled past T)
                s[c] = q_i . k_j * scale for visible j (else -inf);  m' = max(m, max_c s)
                acc = acc * exp(m - m') + sum_c exp(s[c] - m') v_j;  l likewise;  m = m'
            o_i = acc / l,  lse_i = m + log l  (a query that sees no key: o = 0, lse = +inf)
backward  drow_i = do_i . o_i (the wrapper, one array op), then two kernels, so that every
          output has exactly one writer (no atomics: deterministic, and the simulator has no
          float atomics worth trusting for speed):
  dq      grid (ceil(T / BQ), H, B): thread per query i, key tiles as in the forward;
            p = exp(s - lse_i), ds = p (do_i . v_j - drow_i), dq_i += ds k_j scale
  dk, dv  grid (ceil(T / BK), KV, B): thread per key j, loops over the G query heads of its kv
          head and the query tiles [i0, i0 + BQ) that may see the block's keys (Q, dO, lse, drow
          tiles in shared memory):  dv_j += p do_i,  dk_j += ds q_i scale
Tiles: K/V (or Q/dO) tiles of 2 x tile x D floats stay under the 48 KB of static shared memory.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from ._device import SIMULATOR, launch

F = np.float32
NEG_INF = F(-np.inf)


def tiles(D: int) -> tuple:
    """(query rows, key rows) per block for head size D: two [tile, D] float32 tiles in 48 KB."""
    if SIMULATOR:
        return 8, 8
    return 64, max(8, min(64, 4096 // D))


@functools.lru_cache(maxsize=None)
def _forward_kernel(D: int, BQ: int, BK: int):
    @cuda.jit
    def kernel(q, k, v, mask, has_mask, window, scale, o, lse):
        tile, h, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        r = cuda.threadIdx.x
        T, H, KV = q.shape[1], q.shape[2], k.shape[2]
        kvh = h // (H // KV)
        i = tile * BQ + r
        ks = cuda.shared.array((BK, D), F)
        vs = cuda.shared.array((BK, D), F)
        qi = cuda.local.array(D, F)
        acc = cuda.local.array(D, F)
        s = cuda.local.array(BK, F)
        for d in range(D):
            qi[d] = q[b, i, h, d] if i < T else F(0)
            acc[d] = F(0)
        m, l = NEG_INF, F(0)
        i0 = tile * BQ
        i1 = min(T, i0 + BQ)
        j_lo = max(0, i0 - window + 1)
        for j0 in range(j_lo, i1, BK):
            for e in range(r, BK * D, BQ):                      # cooperative tile load
                c, d = e // D, e % D
                j = j0 + c
                ks[c, d] = k[b, j, kvh, d] if j < T else F(0)
                vs[c, d] = v[b, j, kvh, d] if j < T else F(0)
            cuda.syncthreads()                                  # tile complete before any thread reads it
            m_new = m
            for c in range(BK):
                j = j0 + c
                s[c] = NEG_INF
                if i < T and j <= i and i - j < window and (has_mask == 0 or mask[b, j] != 0):
                    dot = F(0)
                    for d in range(D):
                        dot += qi[d] * ks[c, d]
                    s[c] = dot * scale
                    m_new = max(m_new, s[c])
            if m_new > NEG_INF:
                alpha = math.exp(m - m_new) if m > NEG_INF else F(0)
                l *= alpha
                for d in range(D):
                    acc[d] *= alpha
                for c in range(BK):
                    if s[c] > NEG_INF:
                        p = math.exp(s[c] - m_new)
                        l += p
                        for d in range(D):
                            acc[d] += p * vs[c, d]
                m = m_new
            cuda.syncthreads()                                  # every thread done with the tile before the next load
        if i < T:
            inv = F(1) / l if l > F(0) else F(0)
            for d in range(D):
                o[b, i, h, d] = acc[d] * inv
            lse[b, h, i] = m + math.log(l) if l > F(0) else F(np.inf)

    return kernel


@functools.lru_cache(maxsize=None)
def _dq_kernel(D: int, BQ: int, BK: int):
    @cuda.jit
    def kernel(q, k, v, do, lse, drow, mask, has_mask, window, scale, dq):
        tile, h, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        r = cuda.threadIdx.x
        T, H, KV = q.shape[1], q.shape[2], k.shape[2]
        kvh = h // (H // KV)
        i = tile * BQ + r
        ks = cuda.shared.array((BK, D), F)
        vs = cuda.shared.array((BK, D), F)
        qi = cuda.local.array(D, F)
        doi = cuda.local.array(D, F)
        acc = cuda.local.array(D, F)
        for d in range(D):
            qi[d] = q[b, i, h, d] if i < T else F(0)
            doi[d] = do[b, i, h, d] if i < T else F(0)
            acc[d] = F(0)
        L = lse[b, h, i] if i < T else F(np.inf)
        Dr = drow[b, h, i] if i < T else F(0)
        i0 = tile * BQ
        i1 = min(T, i0 + BQ)
        for j0 in range(max(0, i0 - window + 1), i1, BK):
            for e in range(r, BK * D, BQ):
                c, d = e // D, e % D
                j = j0 + c
                ks[c, d] = k[b, j, kvh, d] if j < T else F(0)
                vs[c, d] = v[b, j, kvh, d] if j < T else F(0)
            cuda.syncthreads()                                  # tile complete before any thread reads it
            for c in range(BK):
                j = j0 + c
                if i < T and j <= i and i - j < window and (has_mask == 0 or mask[b, j] != 0) and L < F(np.inf):
                    s, dp = F(0), F(0)
                    for d in range(D):
                        s += qi[d] * ks[c, d]
                        dp += doi[d] * vs[c, d]
                    p = math.exp(s * scale - L)
                    ds = p * (dp - Dr) * scale
                    for d in range(D):
                        acc[d] += ds * ks[c, d]
            cuda.syncthreads()                                  # every thread done with the tile before the next load
        if i < T:
            for d in range(D):
                dq[b, i, h, d] = acc[d]

    return kernel


@functools.lru_cache(maxsize=None)
def _dkv_kernel(D: int, BQ: int, BK: int):
    @cuda.jit
    def kernel(q, k, v, do, lse, drow, mask, has_mask, window, scale, dk, dv):
        tile, kvh, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        r = cuda.threadIdx.x
        T, H, KV = q.shape[1], q.shape[2], k.shape[2]
        G = H // KV
        j = tile * BK + r
        qs = cuda.shared.array((BQ, D), F)
        dos = cuda.shared.array((BQ, D), F)
        ls = cuda.shared.array(BQ, F)
        drs = cuda.shared.array(BQ, F)
        kj = cuda.local.array(D, F)
        vj = cuda.local.array(D, F)
        dkj = cuda.local.array(D, F)
        dvj = cuda.local.array(D, F)
        for d in range(D):
            kj[d] = k[b, j, kvh, d] if j < T else F(0)
            vj[d] = v[b, j, kvh, d] if j < T else F(0)
            dkj[d] = F(0)
            dvj[d] = F(0)
        live = j < T and (has_mask == 0 or mask[b, j] != 0)
        j0 = tile * BK
        j1 = min(T, j0 + BK)
        i_hi = min(T, j1 - 1 + window)
        for g in range(G):
            h = kvh * G + g
            for i0 in range(j0, i_hi, BQ):
                for e in range(r, BQ * D, BK):                  # cooperative tile load
                    c, d = e // D, e % D
                    i = i0 + c
                    qs[c, d] = q[b, i, h, d] if i < T else F(0)
                    dos[c, d] = do[b, i, h, d] if i < T else F(0)
                for c in range(r, BQ, BK):
                    i = i0 + c
                    ls[c] = lse[b, h, i] if i < T else F(np.inf)
                    drs[c] = drow[b, h, i] if i < T else F(0)
                cuda.syncthreads()                              # tiles complete before any thread reads them
                for c in range(BQ):
                    i = i0 + c
                    if live and i < T and j <= i and i - j < window and ls[c] < F(np.inf):
                        s, dp = F(0), F(0)
                        for d in range(D):
                            s += qs[c, d] * kj[d]
                            dp += dos[c, d] * vj[d]
                        p = math.exp(s * scale - ls[c])
                        ds = p * (dp - drs[c]) * scale
                        for d in range(D):
                            dvj[d] += p * dos[c, d]
                            dkj[d] += ds * qs[c, d]
                cuda.syncthreads()                              # every thread done with the tiles before the next load
        if j < T:
            for d in range(D):
                dk[b, j, kvh, d] = dkj[d]
                dv[b, j, kvh, d] = dvj[d]

    return kernel


def _f32(xp, a):
    """float32 C-contiguous; uint16 is read as bfloat16 bits (the package's bf16 convention)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return xp.ascontiguousarray(a, dtype=np.float32)


def _prepare(xp, q, k, v, key_mask, window):
    f32 = [_f32(xp, a) for a in (q, k, v)]
    if key_mask is None:
        mask, has = xp.ones((1, 1), dtype=np.uint8), 0
    else:
        mask, has = xp.ascontiguousarray(key_mask, dtype=np.uint8), 1
    T = q.shape[1]
    w = T + 1 if window is None else max(1, min(int(window), T + 1))
    return f32, mask, has, w


def numba_attention_forward(q, k, v, key_mask, window, scale):
    """-> (o float32 [B, T, H, D], lse float32 [B, H, T])."""
    from q4kdistill.backend import array_module

    xp = array_module(q)
    (q, k, v), mask, has, w = _prepare(xp, q, k, v, key_mask, window)
    B, T, H, D = q.shape
    BQ, BK = tiles(D)
    o = xp.full(q.shape, np.nan, dtype=np.float32)
    lse = xp.full((B, H, T), np.nan, dtype=np.float32)
    launch(_forward_kernel(D, BQ, BK), (-(-T // BQ), H, B), BQ, q, k, v, mask, has, w, F(scale), o, lse)
    return o, lse


def numba_attention_backward(do, cache):
    """do [B, T, H, D] -> (dq, dk, dv) float32, from a forward's FlashCache (any path: q, k, v, o, lse)."""
    from q4kdistill.backend import array_module

    xp = array_module(do)
    (q, k, v), mask, has, w = _prepare(xp, cache.q, cache.k, cache.v, cache.key_mask, cache.window)
    do = _f32(xp, do)
    B, T, H, D = q.shape
    KV = k.shape[2]
    o = xp.asarray(cache.o, dtype=np.float32)
    drow = xp.ascontiguousarray((do * o).sum(axis=-1).transpose(0, 2, 1))   # [B, H, T]
    lse = xp.ascontiguousarray(cache.lse, dtype=np.float32)
    BQ, BK = tiles(D)
    dq = xp.full(q.shape, np.nan, dtype=np.float32)
    dk = xp.full(k.shape, np.nan, dtype=np.float32)
    dv = xp.full(k.shape, np.nan, dtype=np.float32)
    sc = F(cache.scale)
    launch(_dq_kernel(D, BQ, BK), (-(-T // BQ), H, B), BQ, q, k, v, do, lse, drow, mask, has, w, sc, dq)
    launch(_dkv_kernel(D, BQ, BK), (-(-T // BK), KV, B), BK, q, k, v, do, lse, drow, mask, has, w, sc, dk, dv)
    return dq, dk, dv
