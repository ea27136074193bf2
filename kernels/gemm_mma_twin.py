"""The Numba twin of csrc/gemm_mma.cu: the same tiling and index arithmetic, mma done in FP32.

csrc/gemm_mma.cu (linked CUDA C, GPU only) computes out[M, N] = x[M, K] @ W[N, K].T with W raw
Q4_K / Q6_K rows, x fp16, on the tensor cores. The simulator cannot run C, so this kernel repeats
it step for step for CI:

    CTA tile      block b owns out[tm*BM : +BM, tn*BN : +BN], (tm, tn) = tile_of(b) (the C's grouped
                  order, csrc/tile_order.cuh); warp (wm, wn) = (warp % (BM/WM),
                  warp // (BM/WM)) owns a WM x WN warp tile of MI x NI m16n8 tiles
    K loop        steps of 64 weights (quarter q = step % 4 of super-block step // 4), a ring of
                  STAGES slots; "cp.async" = a copy of the same 16-byte chunks (zero-filled past M
                  and N, clipped at the end of W) in the same thread -> chunk assignment
    fragments     A as ldmatrix.x4 delivers it from the lane addresses the C computes; B decoded
                  from the staged W bytes at the C's byte offsets, rounded to fp16 as the C packs it
    mma           replaced by FP32 multiply-adds: each warp puts its A and B fragments into shared
                  memory at their m16n8k16 positions, and each thread adds the products of its C
                  elements (so a fragment owned by the wrong thread gives a wrong result)
    edges         stores guarded by m < M, n < N

It is slow (a check of the indexing, not a variant): tests/test_kernels_gemm_mma.py runs it on tiny
tiles in the simulator against a float64 reference. Its helpers (_ptx's half2 / f16lo) have GPU
forms too, but it has only been run in the simulator.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from q4kdistill.errors import Q4KError

from ._device import F, U, launch
from ._ptx import f16lo, half2
from .linked import GEMM_W_CHUNKS, GEMM_XS
from .decode import Q4K_BYTES, Q4K_QS, Q6K_BYTES, Q6K_D, Q6K_QH, Q6K_QL, Q6K_SCALES, q4_k_chunk_scales
from .weights import address, columns, qtype_name

W_CHUNKS, XS = GEMM_W_CHUNKS, GEMM_XS   # 16-byte chunks of a W row per K step; x row stride (halfs)


@cuda.jit(device=True, inline=True)
def _round16(v):
    """v rounded to fp16 and back (what cvt.rn.f16x2 then the tensor core sees)."""
    return f16lo(half2(F(v), F(0)))


@cuda.jit(device=True, inline=True)
def _u16(b, r, at):
    """The little-endian 16-bit word at byte `at` of row r of the staged bytes b [BN, WS]."""
    return U(b[r, at]) | (U(b[r, at + 1]) << U(8))


@cuda.jit(device=True, inline=True)
def _u32(b, r, at):
    return _u16(b, r, at) | (_u16(b, r, at + 2) << U(16))


GROUP = 8                               # M tiles that sweep the N tiles together (csrc TILE_GROUP)


def tile_order(b, tiles_m, tiles_n):
    """(tm, tn) of CTA b: as csrc grouped_tile, groups of GROUP M tiles, M fastest inside a group."""
    per_group = GROUP * tiles_n
    first = b // per_group * GROUP
    rows = min(tiles_m - first, GROUP)
    inside = b % per_group
    return first + inside % rows, inside // rows


tile_of = cuda.jit(device=True, inline=True)(tile_order)


@functools.lru_cache(maxsize=None)
def twin_kernel(qtype: str, bm: int, bn: int, wm: int, wn: int, stages: int):
    """The twin for one (qtype, tile, ring depth): grid = ceil(M / bm) * ceil(N / bn) blocks of
    32 * (bm / wm) * (bn / wn) threads; arguments (w flat uint8, row_bytes, N, K, M, x fp16 bits
    flat uint16 [M * K], out flat float32 [M * N])."""
    q4 = qtype == "Q4_K"
    WCH = W_CHUNKS[qtype]
    WS = 16 * WCH
    BLOCK = Q4K_BYTES if q4 else Q6K_BYTES
    WARPS_M = bm // wm
    WARPS = WARPS_M * (bn // wn)
    THREADS = 32 * WARPS
    MI, NI = wm // 16, wn // 8
    BM, BN, WM, WN, STAGES = bm, bn, wm, wn, stages

    @cuda.jit(device=True, inline=True)
    def load(xs, ws, slot, step, w, row_bytes, w_bytes, n_out, n0, x, K, M, m0, tid):
        """The chunks csrc gm_load issues for `step` into `slot` (thread tid: chunks tid, tid + THREADS, ...)."""
        for i in range(tid, BM * 8, THREADS):               # x: 8 chunks of 8 halfs per row
            r, c = i // 8, i % 8
            for e in range(8):
                xs[slot, r, 8 * c + e] = x[(m0 + r) * K + 64 * step + 8 * c + e] if m0 + r < M else 0
        sb, q = step // 4, step % 4
        for i in range(tid, BN * WCH, THREADS):             # W: WCH chunks per row
            r, c = i // WCH, i % WCH
            valid, src = 0, 0
            if n0 + r < n_out:
                blk = (n0 + r) * row_bytes + sb * BLOCK
                if q4:                                       # head, then qs bytes 32q .. 32q + 32
                    src = blk + (0 if c == 0 else Q4K_QS + 32 * q + 16 * (c - 1))
                else:                                        # chunks covering QL, QH, S + d of half q // 2
                    b16 = blk - blk % 16
                    hf = q // 2
                    if c < 5:
                        src = b16 + Q6K_QL + 64 * hf + 16 * c
                    elif c < 8:
                        src = b16 + Q6K_QH + 32 * hf + 16 * (c - 5)
                    else:
                        src = b16 + Q6K_SCALES + 16 * (c - 8)
                valid = min(16, w_bytes - src)
            for e in range(16):
                ws[slot, r, 16 * c + e] = w[src + e] if e < valid else 0

    @cuda.jit(device=True, inline=True)
    def frag_b(wsl, r, o6, q, ks, t, D0, M0, D1, M1, bt, j, col):
        """The four weights of b0, b1 (k = 2t, 2t+1, 2t+8, 2t+9 of sub-step ks) of the W row staged at r,
        decoded as csrc gm_q4_frag / gm_q6_frag do, written to bt[j, k, col]."""
        for i in range(2):                                   # b0, then b1 (8 weights further)
            if q4:
                at = 16 + 16 * (ks % 2) + 2 * t + 8 * i
                v = _u16(wsl, r, at) >> U(4 * (ks // 2))
                D, Dm = (D0, M0) if ks < 2 else (D1, M1)
                lo = D * F(v & U(15)) - Dm
                hi = D * F((v >> U(8)) & U(15)) - Dm
            else:
                h, hf, c = q % 2, q // 2, 16 * ks + 2 * t
                l, k = c % 32, 2 * (q % 2) + ks // 2
                d = f16lo(_u16(wsl, r, 128 + o6 + (Q6K_D - Q6K_SCALES)))
                sc = np.int32(wsl[r, 128 + o6 + 8 * hf + l // 16 + 2 * k])
                dk = d * F(sc - 256 if sc > 127 else sc)
                L = _u16(wsl, r, o6 + c + 8 * i) >> U(4 * h)
                H = _u16(wsl, r, 80 + o6 + l + 8 * i) >> U(2 * k)
                q0 = (L & U(15)) | ((H & U(3)) << U(4))
                q1 = ((L >> U(8)) & U(15)) | (((H >> U(8)) & U(3)) << U(4))
                lo = dk * (F(q0) - F(32))
                hi = dk * (F(q1) - F(32))
            bt[j, 2 * t + 8 * i, col] = _round16(lo)
            bt[j, 2 * t + 8 * i + 1, col] = _round16(hi)

    @cuda.jit
    def kernel(w, row_bytes, n_out, K, M, x, out):
        xs = cuda.shared.array((STAGES, BM, XS), np.uint16)      # fp16 bits, as the C stages them
        ws = cuda.shared.array((STAGES, BN, WS), np.uint8)
        af = cuda.shared.array((WARPS, MI, 16, 16), np.float32)   # A fragments of each warp, by position
        bf = cuda.shared.array((WARPS, NI, 16, 8), np.float32)    # B fragments [k][n]
        acc = cuda.local.array((MI, NI, 4), np.float32)
        tid = cuda.threadIdx.x
        lane, warp = tid % 32, tid // 32
        wm_, wn_ = warp % WARPS_M, warp // WARPS_M
        g, t = lane // 4, lane % 4
        tm, tn = tile_of(cuda.blockIdx.x, (M + BM - 1) // BM, (n_out + BN - 1) // BN)
        m0, n0 = tm * BM, tn * BN
        steps = K // 64
        w_bytes = n_out * row_bytes
        for i in range(MI):
            for j in range(NI):
                for e in range(4):
                    acc[i, j, e] = 0
        for s in range(STAGES - 1):                                # prologue
            if s < steps:
                load(xs, ws, s, s, w, row_bytes, w_bytes, n_out, n0, x, K, M, m0, tid)
        for step in range(steps):
            ahead, slot, q = step + STAGES - 1, step % STAGES, step % 4
            if ahead < steps:                                      # slot ahead % STAGES: free since the last barrier
                load(xs, ws, ahead % STAGES, ahead, w, row_bytes, w_bytes, n_out, n0, x, K, M, m0, tid)
            cuda.syncthreads()                                     # the C's wait_group + barrier
            wsl = ws[slot]
            for ks in range(4):
                for i in range(MI):                                # ldmatrix.x4: lane p gives row p % 16, column 8 (p // 16)
                    for mat in range(4):                           # matrix mat reaches this thread from lane 8 mat + g
                        p = 8 * mat + g
                        row = wm_ * WM + 16 * i + p % 16
                        col = 16 * ks + 8 * (p // 16) + 2 * t
                        af[warp, i, g + 8 * (mat % 2), 2 * t + 8 * (mat // 2)] = f16lo(U(xs[slot, row, col]))
                        af[warp, i, g + 8 * (mat % 2), 2 * t + 8 * (mat // 2) + 1] = f16lo(U(xs[slot, row, col + 1]))
                for j in range(NI):
                    r = wn_ * WN + 8 * j + g                       # W row of b fragments j
                    D0 = M0 = D1 = M1 = F(0)
                    o6 = 0
                    if q4:
                        D0, M0, D1, M1 = q4_k_chunk_scales(_u32(wsl, r, 0), _u32(wsl, r, 4), _u32(wsl, r, 8),
                                                           _u32(wsl, r, 12), np.uint64(q))
                    else:
                        o6 = ((n0 + r) * row_bytes + (step // 4) * BLOCK) % 16   # w starts 16-byte aligned
                    frag_b(wsl, r, o6, q, ks, t, D0, M0, D1, M1, bf[warp], j, g)
                cuda.syncthreads()                                 # the warp's fragments are in place
                for i in range(MI):                                # "mma": c_e += A[row_e, :] . B[:, col_e]
                    for j in range(NI):
                        for e in range(4):
                            row, col = g + 8 * (e // 2), 2 * t + e % 2
                            s_ = F(0)
                            for k in range(16):
                                s_ += af[warp, i, row, k] * bf[warp, j, k, col]
                            acc[i, j, e] += s_
                cuda.syncthreads()                                 # before the next sub-step overwrites them
        for i in range(MI):
            for j in range(NI):
                for e in range(4):
                    m = m0 + wm_ * WM + 16 * i + g + 8 * (e // 2)
                    n = n0 + wn_ * WN + 8 * j + 2 * t + e % 2
                    if m < M and n < n_out:
                        out[m * n_out + n] = acc[i, j, e]

    return kernel


def twin_operands(name: str, x, w_raw, qtype, n_out, out, decodes) -> tuple:
    """(qtype name, K, M, x as flat fp16 bits) after the checks both GEMM twins make: a type in
    `decodes`, C-contiguous raw weights starting 16-byte aligned, x [M, K], out [M, n_out] C-contiguous."""
    q = qtype_name(qtype)
    if q not in decodes:
        raise Q4KError(f"{name} decodes {', '.join(decodes)}, not {q}")
    K = columns(w_raw, q, n_out)
    if not w_raw.flags.c_contiguous or address(w_raw) % 16:
        raise Q4KError(f"{name} needs C-contiguous raw weights that start 16-byte aligned")
    M = x.shape[0]
    if x.ndim != 2 or x.shape[1] != K or out.shape != (M, n_out) or not out.flags.c_contiguous:
        raise Q4KError(f"{name}: x must be [M, {K}] and out float32 [M, {n_out}], C-contiguous")
    xp = np if isinstance(x, np.ndarray) else __import__("cupy")
    return q, K, M, xp.ascontiguousarray(x, dtype=np.float16).reshape(-1).view(np.uint16)


def gemm_mma_twin(x, w_raw, qtype, n_out, out, bm=32, bn=16, wm=16, wn=8, stages=2):
    """out[:] = x @ W.T as csrc/gemm_mma.cu computes it (x rounded to fp16, W decoded to fp16), with
    the tensor-core product replaced by FP32 multiply-adds. x: float32 or float16 [M, K]; W raw
    Q4_K / Q6_K rows starting 16-byte aligned; out float32 [M, n_out], C-contiguous."""
    from .linked import gemm_tile_check

    q, K, M, x16 = twin_operands("gemm_mma_twin", x, w_raw, qtype, n_out, out, W_CHUNKS)
    warps = gemm_tile_check(bm, bn, wm, wn)
    if stages < 1:
        raise Q4KError(f"gemm_mma_twin: stages must be >= 1, got {stages}")
    launch(twin_kernel(q, bm, bn, wm, wn, stages), -(-n_out // bn) * -(-M // bm), 32 * warps,
           w_raw.reshape(-1), w_raw.shape[1], n_out, K, M, x16, out.reshape(-1))
    return out
