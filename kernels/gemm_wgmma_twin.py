"""The Numba twin of csrc/gemm_wgmma.cu: the same tiles, shared-memory layout, rings and decode, with
wgmma replaced by FP32 multiply-adds that read the tiles through the matrix descriptors.

csrc/gemm_wgmma.cu (linked CUDA C, sm_90 only) computes out[M, N] = x[M, K] @ W[N, K].T with W raw
Q4_K / Q6_K rows, x fp16: a CTA of NWG warpgroups owns a (64 NWG MT) x BN tile, decodes each 64-wide K
step of its BN weight rows once into a shared fp16 tile, and both warpgroups' wgmma read it. The
simulator cannot run C, so this kernel repeats it step for step for CI:

    tiles         block b owns out[tm*BM : +BM, tn*BN : +BN], (tm, tn) = gemm_mma_twin.tile_of(b)
    shared        A ring [STAGES] (x, BM x 64 fp16), B [2] (decoded W, BN x 64 fp16), Wr [2] (raw
                  super-blocks of the BN rows, ROW bytes a row); A and B with the 16-byte chunk c of
                  row r at chunk_at(r, c) (the C's gw_chunk: 128-byte swizzle or plain core matrices)
    loads         the C's cp.async chunks (zero past M and N, clipped at the end of W), done at once
    decode        the C's units (row u % BN, part u // BN), scales rounded to fp16 as it packs them,
                  each weight rounded once from the fp16 operands (float64 here)
    wgmma         one thread of each warpgroup reads A and B through the descriptors the C builds
                  (start, LBO, SBO, swizzle) by the PTX manual's address rules and forms the step's
                  64 x BN products; each thread adds its accumulator elements (warp w, lane 4g + i:
                  row 16w + g + 8(e >> 1), column 8j + 2i + (e & 1)) -- so a chunk written where the
                  descriptor does not look gives a wrong result
    edges         stores guarded by m < M, n < N

What the twin cannot see (the CPU emulation of the C, tests/gemm_wgmma_emulate.cpp, does): the
asynchrony of cp.async and wgmma, i.e. wait depths and a tile overwritten under a wgmma in flight.
What neither can see: whether the hardware's accumulator layout and descriptor rules are the PTX
manual's as read here (the GPU test decides; the plain-layout variant is the fallback for the second).
It is slow (a check of the indexing, not a variant): tests/test_kernels_gemm_wgmma.py runs it on
tiny tiles in the simulator against a float64 reference.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from q4kdistill.errors import Q4KError

from ._device import F, U, launch
from ._ptx import f16lo, half2
from .decode import Q4K_BYTES, Q4K_QS, Q6K_BYTES, Q6K_D, Q6K_QH, Q6K_QL, Q6K_SCALES, q4_k_chunk_scales
from .gemm_mma_twin import tile_of, twin_operands
from .linked import WGMMA_W_ROW, gemm_wgmma_check
from .weights import qtype_name

W_CHUNKS = {"Q4_K": Q4K_BYTES // 16, "Q6_K": 14}    # 16-byte chunks staged per row and super-block


@cuda.jit(device=True, inline=True)
def _r16(v):
    """v rounded to fp16 (nearest even) and back: what cvt.rn.f16x2 / an f16x2 operation keeps."""
    return f16lo(half2(F(v), F(0)))


@cuda.jit(device=True, inline=True)
def _u16(b, at):
    return U(b[at]) | (U(b[at + 1]) << U(8))


@cuda.jit(device=True, inline=True)
def _u32(b, at):
    return _u16(b, at) | (_u16(b, at + 2) << U(16))


@functools.lru_cache(maxsize=None)
def twin_kernel(qtype: str, bn: int, nwg: int, stages: int, swz: int, mt: int = 1):
    """The twin for one instantiation: grid = ceil(M / (64 nwg mt)) * ceil(N / bn) blocks of 128 nwg
    threads; arguments (w flat uint8, row_bytes, N, K, M, x fp16 bits flat uint16 [M * K], out flat
    float32 [M * ldo], ldo: out's row length). mt: 64-row m-tiles a warpgroup (rows 64 (mt g + t))."""
    q4 = qtype == "Q4_K"
    BN, NWG, STAGES, SWZ, MT = bn, nwg, stages, swz, mt
    BM, THREADS, R = 64 * nwg * mt, 128 * nwg, bn // 2
    CH, ROW = W_CHUNKS[qtype], WGMMA_W_ROW[qtype]
    BLOCK = Q4K_BYTES if q4 else Q6K_BYTES
    A_HALFS, B_HALFS = BM * 64, BN * 64

    @cuda.jit(device=True, inline=True)
    def chunk_at(r, c):
        """Byte offset of chunk c of row r in an A or B tile (csrc gw_chunk)."""
        if SWZ:
            return 128 * r + 16 * (c ^ (r % 8))
        return 1024 * (r // 8) + 128 * c + 16 * (r % 8)

    @cuda.jit(device=True, inline=True)
    def operand(tile, start, row, k):
        """Element (row, k < 16) of the K-major operand whose descriptor starts at byte `start` of
        `tile` (fp16 bits), by the PTX manual's rules (LBO 128 / SBO 1024 as the C sets them)."""
        if SWZ:
            a = start + (row // 8) * 1024 + (row % 8) * 128 + 2 * k
            a ^= ((a >> 7) & 7) << 4
        else:
            a = start + (row // 8) * 1024 + (k // 8) * 128 + (row % 8) * 16 + 2 * (k % 8)
        return f16lo(U(tile[a // 2]))

    @cuda.jit(device=True, inline=True)
    def load_a(a, x, K, M, m0, s, tid):
        for i in range(tid, BM * 8, THREADS):
            r, c = i // 8, i % 8
            at = chunk_at(r, c) // 2
            for e in range(8):
                a[at + e] = x[(m0 + r) * K + 64 * s + 8 * c + e] if m0 + r < M else 0

    @cuda.jit(device=True, inline=True)
    def load_w(wr, w, row_bytes, w_bytes, n_out, n0, j, tid):
        for i in range(tid, BN * CH, THREADS):
            r, c = i // CH, i % CH
            valid, src = 0, 0
            if n0 + r < n_out:
                blk = (n0 + r) * row_bytes + j * BLOCK
                src = (blk if q4 else blk - blk % 16) + 16 * c
                valid = min(16, w_bytes - src)
            for e in range(16):
                wr[ROW * r + 16 * c + e] = w[src + e] if e < valid else 0

    @cuda.jit(device=True, inline=True)
    def put(b, r, col, v):
        """Weight v (fp16 bits of the rounded value) at column col (< 64) of row r of the B tile."""
        b[(chunk_at(r, col // 8) + 2 * (col % 8)) // 2] = v

    @cuda.jit(device=True, inline=True)
    def bits16(v):
        return np.uint16(half2(F(v), F(0)) & U(0xFFFF))

    @cuda.jit(device=True, inline=True)
    def decode(b, wr, row_bytes, n0, t, tid):
        q = t % 4
        for u in range(tid, 2 * BN, THREADS):
            r, part = u % BN, u // BN
            base = ROW * r
            if q4:                       # part h: qs bytes 32q + 16h + i, low nibble -> column 16h + i, high -> 32 + 16h + i
                D0, M0, D1, M1 = q4_k_chunk_scales(_u32(wr, base), _u32(wr, base + 4), _u32(wr, base + 8),
                                                   _u32(wr, base + 12), np.uint64(q))
                d0, m0, d1, m1 = _r16(D0), _r16(M0), _r16(D1), _r16(M1)
                for i in range(16):
                    byte = U(wr[base + Q4K_QS + 32 * q + 16 * part + i])
                    lo = np.float64(byte & U(15)) * np.float64(d0) - np.float64(m0)
                    hi = np.float64(byte >> U(4)) * np.float64(d1) - np.float64(m1)
                    put(b, r, 16 * part + i, bits16(lo))
                    put(b, r, 32 + 16 * part + i, bits16(hi))
            else:                        # part p of quarter q = 2hf + h: run k = 2h + p, columns 32p + l
                blk = base + ((n0 + r) * row_bytes + (t // 4) * BLOCK) % 16     # w starts 16-byte aligned
                hf, h = q // 2, q % 2
                k = 2 * h + part
                d = f16lo(_u16(wr, blk + Q6K_D))
                for l in range(32):
                    sc = np.int32(wr[blk + Q6K_SCALES + 8 * hf + 2 * k + l // 16])
                    dk = _r16(d * F(sc - 256 if sc > 127 else sc))
                    ql = (U(wr[blk + Q6K_QL + 64 * hf + 32 * part + l]) >> U(4 * h)) & U(15)
                    qh = (U(wr[blk + Q6K_QH + 32 * hf + l]) >> U(2 * k)) & U(3)
                    v = np.float64(np.int32(ql | (qh << U(4))) - 32) * np.float64(dk)
                    put(b, r, 32 * part + l, bits16(v))

    @cuda.jit
    def kernel(w, row_bytes, n_out, K, M, x, out, ldo):
        A = cuda.shared.array((STAGES, A_HALFS), np.uint16)
        B = cuda.shared.array((2, B_HALFS), np.uint16)
        Wr = cuda.shared.array((2, BN * ROW), np.uint8)
        d = cuda.local.array((MT, R), np.float32)
        av = cuda.local.array((64, 64), np.float32)                        # the step's operands, as read
        bv = cuda.local.array((BN, 64), np.float32)
        P = cuda.shared.array((NWG, MT, 64, BN), np.float32)               # the step's products
        tid = cuda.threadIdx.x
        wg, warp, lane = tid // 128, (tid // 32) % 4, tid % 32
        g, i2 = lane // 4, 2 * (lane % 4)
        tm, tn = tile_of(cuda.blockIdx.x, (M + BM - 1) // BM, (n_out + BN - 1) // BN)
        m0, n0 = tm * BM, tn * BN
        steps, blocks = K // 64, K // 256
        w_bytes = n_out * row_bytes
        for t in range(MT):
            for i in range(R):
                d[t, i] = 0

        load_w(Wr[0], w, row_bytes, w_bytes, n_out, n0, 0, tid)          # prologue (the C's group 0 ..)
        if blocks > 1:
            load_w(Wr[1], w, row_bytes, w_bytes, n_out, n0, 1, tid)
        for s in range(STAGES - 1):
            if s < steps:
                load_a(A[s], x, K, M, m0, s, tid)
        cuda.syncthreads()
        decode(B[0], Wr[0], row_bytes, n0, 0, tid)
        cuda.syncthreads()
        for s in range(steps):
            a, b = A[s % STAGES], B[s % 2]
            if tid % 128 == 0:                                             # "wgmma": 4 x m64nBNk16 an m-tile,
                for t in range(MT):                                        # one thread of the warpgroup
                    for kk in range(4):                                    # reading through the descriptors
                        sa = 64 * 128 * (MT * wg + t) + (32 if SWZ else 256) * kk
                        sb = (32 if SWZ else 256) * kk
                        for r in range(64):
                            for k in range(16):
                                av[r, 16 * kk + k] = operand(a, sa, r, k)
                        for c in range(BN):
                            for k in range(16):
                                bv[c, 16 * kk + k] = operand(b, sb, c, k)
                    for r in range(64):
                        for c in range(BN):
                            acc = F(0)
                            for k in range(64):
                                acc += av[r, k] * bv[c, k]
                            P[wg, t, r, c] = acc
            cuda.syncthreads()
            for t in range(MT):                                            # each thread adds its fragments
                for j in range(BN // 8):
                    for e in range(4):
                        d[t, 4 * j + e] += P[wg, t, 16 * warp + g + 8 * (e // 2), 8 * j + i2 + e % 2]
            if s + 1 < steps:
                cuda.syncthreads()                                         # the C's waits + barrier
                ahead = s + STAGES - 1
                if ahead < steps:
                    load_a(A[ahead % STAGES], x, K, M, m0, ahead, tid)
                if (s + 1) % 4 == 0 and (s + 1) // 4 + 1 < blocks:
                    j = (s + 1) // 4 + 1
                    load_w(Wr[j % 2], w, row_bytes, w_bytes, n_out, n0, j, tid)
                decode(B[(s + 1) % 2], Wr[((s + 1) // 4) % 2], row_bytes, n0, s + 1, tid)
                cuda.syncthreads()
        for t in range(MT):                                                # epilogue
            for j in range(BN // 8):
                for e in range(4):
                    m = m0 + 64 * (MT * wg + t) + 16 * warp + g + 8 * (e // 2)
                    n = n0 + 8 * j + i2 + e % 2
                    if m < M and n < n_out:
                        out[m * ldo + n] = d[t, 4 * j + e]

    return kernel


def gemm_wgmma_twin(x, w_raw, qtype, n_out, out, bn=32, nwg=1, stages=3, swz=1, mt=1):
    """out[:] = x @ W.T as csrc/gemm_wgmma.cu computes it (x rounded to fp16, W decoded to fp16 with
    fp16 scales), wgmma replaced by FP32 multiply-adds through its descriptors. x: float32 or float16
    [M, K]; W raw Q4_K / Q6_K rows starting 16-byte aligned; out float32 [M, n_out], C-contiguous."""
    q, K, M, x16 = twin_operands("gemm_wgmma_twin", x, w_raw, qtype, n_out, out, W_CHUNKS)
    gemm_wgmma_check(q, bn, nwg, stages, swz, mt)
    launch(twin_kernel(q, bn, nwg, stages, swz, mt), -(-n_out // bn) * -(-M // (64 * nwg * mt)), 128 * nwg,
           w_raw.reshape(-1), w_raw.shape[1], n_out, K, M, x16, out.reshape(-1), n_out)
    return out


def decoded_as_kernel(w_raw, qtype: str) -> np.ndarray:
    """W [N, K] as float16, decoded the way csrc/gemm_wgmma.cu (and its twin) decode it: each
    sub-block scale (d * sc, dmin * m; d * S) computed in FP32 and rounded to fp16, then each weight
    (q * D - Dm; (q - 32) * D) rounded once: the reference codec with its scales rounded. The tests'
    tight reference (NumPy, CPU)."""
    from q4kdistill.formats import quants

    q = qtype_name(qtype)
    if q not in W_CHUNKS:
        raise Q4KError(f"decoded_as_kernel decodes Q4_K and Q6_K, not {q}")
    to16 = lambda a: a.astype(np.float16).astype(np.float32)
    return quants.dequantize(np.asarray(w_raw, np.uint8), q, round_scales=to16).astype(np.float16)
