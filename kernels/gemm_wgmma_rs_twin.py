"""The Numba twin of csrc/gemm_wgmma_rs.cu: the same tiles, rings, swizzled x slots, raw-W slots, register
decode and accumulator layout, with wgmma replaced by FP32 multiply-adds that read x through its descriptor.

csrc/gemm_wgmma_rs.cu (linked CUDA C, sm_90 only) computes out[M, N] = x[M, K] @ W[N, K].T for raw Q4_K rows
as out^T = W x^T: W is wgmma's A operand, decoded by each consumer thread straight from the raw bytes into the
register fragments it feeds, x the B operand from shared memory. The simulator cannot run C, so this kernel
repeats it step for step for CI:

    tiles      (MT = 1, as every instantiation with one 64-row W tile a warpgroup)
               CTA b owns x rows m0 = tm BX .. + BX and W rows n0 = tn 128 .. + 128, (tm, tn) = the C's
               grouped_tile(b, ceil(M / BX), ceil(N / 128)) (gemm_mma_twin.tile_of); consumer warpgroup c
               (the C's warpgroup 1 + c) owns W rows n0 + 64 c .. + 64
    shared     X [XS] (BX rows x 128 bytes each, the 16-byte chunk c of row r at the C's gw_chunk<1>(r, c) =
               128 r + 16 (c ^ (r % 8)), zero rows past M), W [WS] (the CTA's 128 raw rows of one
               super-block, row r at 144 r, rows past N clamped to the last row as gr_w_offsets clamps)
    loads      the producer's copies with its thread -> chunk assignment (pt = 0 .. 127: x chunk pt % 8 of
               rows pt / 8 + 16 k; W chunk u = pt + 128 k = chunk u % 9 of row u / 9) and its slot order:
               W(0) at step 0, W(s / 4 + 1) at s % 4 == 2 into slot j % WS, X(s) into slot s % XS
    decode     consumer thread (warp w, lane 4 g + i), rows ra = 64 c + 16 w + g and ra + 8 of the CTA's
               128, step s = 4 j + q: the C's gr_scales (d sc and -dmin m of sub-blocks 2 q, 2 q + 1 in FP32,
               rounded to fp16 as pack_half2 does; the heads read at q = 0), gr_decode_quarter / gr_decode_pair
               (byte pair u at 2 i + 8 u of qs chunk q; byte_perm 0x4140, the 0x6400 trick; low nibbles ->
               slice u / 2, high nibbles -> slice 2 + u / 2, at e = 2 (u & 1), + 1 for row ra + 8), each
               weight fma.rn.f16x2's one rounding of its exact value, into a[s % 2][t][e] (fp16x2)
    wgmma      per slice t, the warpgroup's 64 x 16 A gathered from the threads' fragments (thread (w, g, i)'s
               a[t][e] half h is A[16 w + g + 8 (e & 1)][2 i + 8 (e >> 1) + h]) through shared memory and a
               barrier; B element (n, k) read through the x descriptor (K-major, 128-byte swizzle, SBO 1024,
               start = slot base + 32 t) by the PTX manual's address rule; each thread adds its elements
               d[4 j + e] = D[W row 16 w + g + 8 (e >> 1)][x row 8 j + 2 i + (e & 1)] in FP32
    epilogue   out[m0 + x row, n0 + 64 c + W row], guarded by m < M, n < N

So a misplaced chunk, a nibble in the wrong slice, a fragment at the wrong e or owned by the wrong lane, a
wrong scale or slot gives a wrong result. Representation (the simulator pays a device call for each fp16
conversion, so there are none in the hot loops): an x slot holds one float32 per fp16 of the C's slot, at the
fp16's byte address / 2, the values of x rounded to fp16 on the host; a fragment word a[t][e] is kept as its two
halves' values; fp16 rounding is done in arithmetic (_f16_rn, ties to even, exact from float64).

Not modelled: the producer warpgroup itself (only the 256 consumer threads are launched; threads 0 .. 127 make
the producer's copies as its threads pt = 0 .. 127 would, at once, at the step that issues them, so the full /
empty mbarriers and cp.async's asynchrony are not there), wgmma's asynchrony (wait_group depths) and setmaxnreg:
the CPU emulation of the C, tests/gemm_wgmma_rs_emulate.cpp, sees those. The x copies are the cp.async path
(TMA = false); that a TMA box lands x in the same gw_chunk<1> layout the twin does not check. Work whose result
the epilogue does not store is skipped to keep the simulator fast: the products of x rows >= M and W rows >= N
(in the C: zero x rows and clamped W rows, computed and dropped), and the decode of a thread whose rows ra,
ra + 8 are both past N (no thread that stores reads its fragments: the A gather is by rows). The copies are all
made (the clamping and the zero fill are the loads'). Neither twin nor emulation can tell whether the hardware's
register-A fragment and descriptor rules are the PTX manual's as read here (the GPU test decides).
It is slow (a check of the indexing, not a variant): tests/test_kernels_gemm_wgmma_rs_twin.py runs it on tiny
shapes in the simulator against a float64 reference; it has only been run there.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from ._device import F, U, launch
from .decode import Q4K_BYTES, Q4K_QS, q4_k_chunk_scales
from .gemm_mma_twin import tile_of, twin_operands
from .gemm_wgmma_twin import _u16, _u32
from .linked import gemm_wgmma_rs_check

BW = 128                      # W rows a CTA (two consumer warpgroups of 64): GrSmem::BW
CONSUMERS = 256               # the threads launched: the C's warpgroups 1 and 2
W_CHUNKS = Q4K_BYTES // 16    # 16-byte chunks of a row's super-block (9)


@cuda.jit(device=True, inline=True)
def _f16_rn(v):
    """v (float64) rounded once to the nearest fp16 (ties to even, subnormals, overflow to inf), as float32: what
    cvt.rn.f16x2.f32 keeps of a float32, and fma.rn.f16x2 of its exact result (here exact in float64). Arithmetic
    only: the simulator's fp16 conversions (_ptx.half2 / f16lo) cost a device call each."""
    if v == 0:
        return F(0)
    e = math.frexp(v)[1]                                    # 2^(e - 1) <= |v| < 2^e
    q = max(e - 11, -24)                                    # fp16's quantum there (11 bits; 2^-24 subnormal)
    r = math.ldexp(np.float64(round(math.ldexp(v, -q))), q)
    if abs(r) > 65504:
        r = math.inf if r > 0 else -math.inf
    return F(r)


@functools.lru_cache(maxsize=None)
def twin_kernel(bx: int, xs: int, ws: int):
    """The twin of gemm_wgmma_rs<bx, xs, ws, 0>: grid = ceil(M / bx) * ceil(N / 128) blocks of 256 threads (the
    consumers); arguments (w flat uint8, row_bytes, N, K, M, x flat float32 [M * K] holding the fp16 values,
    out flat float32 [M * ldo], ldo: out's row length)."""
    BX, XS, WS = bx, xs, ws
    X_BYTES, W_BYTES, R = BX * 128, BW * Q4K_BYTES, BX // 2

    @cuda.jit(device=True, inline=True)
    def chunk(r, c):
        """gw_chunk<1>: byte offset of the 16-byte chunk c of row r in a 128-byte swizzled K-major tile."""
        return 128 * r + 16 * (c ^ (r % 8))

    @cuda.jit(device=True, inline=True)
    def load_x(X, base, x, K, M, m0, s, pt):
        """gr_load_x: x rows m0 .. + BX, columns 64 s .. + 64 -> the slot at byte `base` (zero past M)."""
        r, c = pt >> 3, pt & 7
        dst = base + chunk(r, c)
        for k in range(BX // 16):
            row = m0 + r + 16 * k
            at = (dst + 16 * 128 * k) // 2
            for e in range(8):
                X[at + e] = x[row * K + 64 * s + 8 * c + e] if row < M else 0

    @cuda.jit(device=True, inline=True)
    def load_w(W, base, w, row_bytes, n_out, n0, j, pt):
        """gr_w_offsets + gr_load_w: super-block j of W rows n0 .. + 128 -> the slot at byte `base`, rows 144
        bytes apart, rows past n_out clamped to the last one."""
        for k in range(W_CHUNKS):
            u = pt + 128 * k
            r, c = u // W_CHUNKS, u % W_CHUNKS
            src = j * Q4K_BYTES + min(n0 + r, n_out - 1) * row_bytes + 16 * c
            for e in range(16):
                W[base + 16 * u + e] = w[src + e]

    @cuda.jit(device=True, inline=True)
    def scales(hd, r, q):
        """gr_scales: fp16 (d sc, -dmin m) of sub-blocks 2 q and 2 q + 1 of a row from its head words hd[r]
        (q4k_sub in FP32, then pack_half2)."""
        D0, M0, D1, M1 = q4_k_chunk_scales(hd[r, 0], hd[r, 1], hd[r, 2], hd[r, 3], np.uint64(q))
        return (_f16_rn(np.float64(D0)), _f16_rn(-np.float64(M0)), _f16_rn(np.float64(D1)),
                _f16_rn(-np.float64(M1)))

    @cuda.jit
    def kernel(w, row_bytes, n_out, K, M, x, out, ldo):
        # x slots: one element per fp16 of the C's (byte address / 2), holding its value; slot s at byte s X_BYTES
        Xs = cuda.shared.array(XS * X_BYTES // 2, np.float32)
        Ws = cuda.shared.array(WS * W_BYTES, np.uint8)                 # the raw W slots
        Ash = cuda.shared.array((2, 2, 4, 64, 16), np.float32)         # a[s % 2] of each warpgroup, as issued
        d = cuda.local.array(R, np.float32)
        a = cuda.local.array((4, 4, 2), np.float32)                    # a[s % 2][t][e]: its fp16x2's two halves
        head = cuda.local.array((2, 4), np.uint32)                     # the two rows' 16-byte heads (ha, hb)
        sc = cuda.local.array((2, 4), np.float32)                      # their GrScales (d0, m0, d1, m1)
        av = cuda.local.array((2, 16), np.float32)
        bv = cuda.local.array(16, np.float32)
        tid = cuda.threadIdx.x
        c, warp, lane = tid // 128, (tid // 32) % 4, tid % 32          # c: the C's warpgroup 1 + c
        g, i = lane // 4, lane % 4
        ra = 64 * c + 16 * warp + g                                    # rows ra, ra + 8 of the CTA's 128
        tm, tn = tile_of(cuda.blockIdx.x, (M + BX - 1) // BX, (n_out + BW - 1) // BW)
        m0, n0 = tm * BX, tn * BW
        steps, blocks = K // 64, K // 256
        live = n0 + ra < n_out                    # rows ra, ra + 8 both past N: nothing of them is stored
        for k in range(R):
            d[k] = 0

        for s in range(steps):
            j, q = s // 4, s % 4
            if tid < 128:                                              # ---- the producer's copies of step s
                jw = 0 if s == 0 else (s // 4 + 1 if s % 4 == 2 and s // 4 + 1 < blocks else -1)
                if jw >= 0:
                    load_w(Ws, (jw % WS) * W_BYTES, w, row_bytes, n_out, n0, jw, tid)
                load_x(Xs, (s % XS) * X_BYTES, x, K, M, m0, s, tid)
            cuda.syncthreads()                                         # (full_w / full_x)

            buf = s % 2                                                # ---- the consumers: decode into a[s % 2]
            if live:
                rowa = (j % WS) * W_BYTES + Q4K_BYTES * ra
                if q == 0:                                             # the heads, read once a super-block
                    for h in range(4):
                        head[0, h] = _u32(Ws, rowa + 4 * h)
                        head[1, h] = _u32(Ws, rowa + 8 * Q4K_BYTES + 4 * h)
                for r in range(2):                                     # gr_decode_quarter: row ra + 8 r
                    sc[r, 0], sc[r, 1], sc[r, 2], sc[r, 3] = scales(head, r, q)
                    qr = rowa + 8 * Q4K_BYTES * r + Q4K_QS + 32 * q + 2 * i
                    for u in range(4):                                 # gr_decode_pair of bytes 2 i + 8 u, + 1
                        t, e = u >> 1, 2 * (u & 1) + r
                        v = _u16(Ws, qr + 8 * u)
                        p = (v & U(0xFF)) | ((v & U(0xFF00)) << U(8))  # __byte_perm(v, 0, 0x4140)
                        lo = (p & U(0x000F000F)) | U(0x64006400)       # fp16 1024 + nibble: h2_sub leaves
                        hi = ((p >> U(4)) & U(0x000F000F)) | U(0x64006400)   # the nibble, exactly
                        for h in range(2):
                            nl = np.float64((lo >> U(16 * h)) & U(0x3FF))
                            nh = np.float64((hi >> U(16 * h)) & U(0x3FF))
                            a[t, e, h] = _f16_rn(nl * np.float64(sc[r, 0]) + np.float64(sc[r, 1]))     # h2_fma
                            a[t + 2, e, h] = _f16_rn(nh * np.float64(sc[r, 2]) + np.float64(sc[r, 3]))
                for t in range(4):                                     # the fragments, exchanged at issue
                    for e in range(4):
                        row, k = 16 * warp + g + 8 * (e & 1), 2 * i + 8 * (e >> 1)
                        Ash[buf, c, t, row, k] = a[t, e, 0]
                        Ash[buf, c, t, row, k + 1] = a[t, e, 1]
            cuda.syncthreads()

            if live:                                                   # ---- "wgmma": 4 x m64nBXk16
                base = (s % XS) * X_BYTES
                for t in range(4):
                    for h in range(2):
                        for k in range(16):
                            av[h, k] = Ash[buf, c, t, 16 * warp + g + 8 * h, k]
                    start = base + 32 * t                              # the x descriptor + 32 t bytes
                    for jj in range(BX // 8):
                        for e2 in range(2):
                            col = 8 * jj + 2 * i + e2                  # B row n = x row
                            if m0 + col < M:
                                for k in range(16):                    # K-major, 128-byte swizzle, SBO 1024
                                    at = start + (col // 8) * 1024 + (col % 8) * 128 + 2 * k
                                    at ^= ((at >> 7) & 7) << 4
                                    bv[k] = Xs[at // 2]
                                for h in range(2):
                                    if n0 + ra + 8 * h < n_out:
                                        acc = d[4 * jj + 2 * h + e2]
                                        for k in range(16):
                                            acc += av[h, k] * bv[k]
                                        d[4 * jj + 2 * h + e2] = acc

        nw = n0 + 64 * c                                               # ---- epilogue (gr_store_tile)
        for jj in range(BX // 8):
            for e in range(4):
                m, n = m0 + 8 * jj + 2 * i + (e & 1), nw + 16 * warp + g + 8 * (e >> 1)
                if m < M and n < n_out:
                    out[m * ldo + n] = d[4 * jj + e]

    return kernel


def gemm_wgmma_rs_twin(x, w_raw, qtype, n_out, out, bx=256, xs=4, ws=2):
    """out[:] = x @ W.T as csrc/gemm_wgmma_rs.cu computes it (x rounded to fp16, W decoded into fp16 fragments
    with fp16 scales), wgmma replaced by FP32 multiply-adds through its x descriptor. x: float32 or float16
    [M, K]; W raw Q4_K rows starting 16-byte aligned; out float32 [M, n_out], C-contiguous; (bx, xs, ws, 1) one of
    linked.GR_SHAPES (the twin models one W tile a warpgroup, mt = 1)."""
    q, K, M, x16 = twin_operands("gemm_wgmma_rs_twin", x, w_raw, qtype, n_out, out, ("Q4_K",))
    gemm_wgmma_rs_check(bx, xs, ws)
    if M == 0 or n_out == 0:
        return out
    xp = np if isinstance(x16, np.ndarray) else __import__("cupy")
    xv = x16.view(xp.float16).astype(xp.float32)                  # the fp16 values (see twin_kernel)
    launch(twin_kernel(bx, xs, ws), -(-n_out // BW) * -(-M // bx), CONSUMERS,
           w_raw.reshape(-1), w_raw.shape[1], n_out, K, M, xv, out.reshape(-1), n_out)
    return out
