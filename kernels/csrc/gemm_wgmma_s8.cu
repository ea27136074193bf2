// Int8 prefill GEMM on Hopper's wgmma for Q4_K / Q6_K weights re-quantized to int8 inside the kernel
// (issue 17's int8-activation variant; kernels/requant8.py is its numerics in NumPy):
//
//   out[M, N] (fp32 or fp16) = sum over super-blocks j of  dx[j][m] dw[n, j] sum_{k in j} x8[m, k] w8[n, k]
//
// x8: int8 [M, K], x quantized per 256 values (dx = max|x| / 127: linked.quantize_s8); dx float32
// [K / 256][Mp] (Mp = M rounded up to 4, so each super-block's row of scales is whole 16-byte chunks).
// w8 = rint(w / dw), dw = (the largest |w| the super-block's scales allow) / 126, decoded from the raw rows
// into a shared int8 tile per K step: the weights stay Q4_K / Q6_K in memory, no scratch.
//
// Why (docs/perf.md, twelfth stop): an int8 product on the stored quants must rescale every 16-32 of K;
// re-quantized per super-block, the tensor cores accumulate a whole super-block in s32 and the kernel
// rescales once per 256 of K. Accuracy on the real gemma-3 teacher (every Q4_K / Q6_K product this way):
// mean cosine 0.99924, top-1 96.3 % against float32 (scripts/probe_int8_accuracy.py; issue 17's bar 0.999 / 95 %).
//
// Tiling as gemm_wgmma<Q, 128, 2, ...> (this file includes it for its loads, decode helpers and epilogue): a
// CTA of two warpgroups owns 128 rows of x and BN = 128 weight rows, K steps of 128 (one 128-byte row of int8
// a tile row: two steps a super-block), 4 wgmma m64n128k32 a step into 64 s32 accumulators a thread. At each
// super-block's end they are promoted into the 64 float32 accumulators, acc += dx dw float(s), float(s) as the
// bits 0x4B400000 + s less 12582912 (exact for |s| < 2^22; here |s| <= 256 x 127 x 126), since cvt.rn.f32.s32
// issues at a quarter of the FP32 rate. The promotion waits for the super-block's last wgmma (wait_group 0),
// as CUTLASS's FP8 accumulation does: a second s32 set, to promote one super-block while the next multiplies,
// needs 192 accumulator registers at BN = 128 (ptxas spills), and at BN = 64 ptxas serialises the wgmma
// (C7514: it cannot tell that the set promoted after a loop's back edge is no longer in flight).
// Shared memory (1024-byte aligned): A[4] (x8 ring, 128 x 128 bytes), B[2] (w8 tiles, 128 x 128 bytes),
// Wr[2] (raw super-blocks, GwW<Q>::ROW bytes a row), DX[2] (128 dx of super-block j in slot j % 2), DW[2]
// (128 dw). A and B in gemm_wgmma's K-major 128-byte-swizzled layout (gw_chunk<1>); a k32 slice is 32 bytes.
//
// The K loop (steps s; super-block j = s / 2, half h = s % 2). cp.async groups: the prologue commits W(0),
// W(1), DX(0), A(0) as group 0 and A(1), A(2) as groups 1, 2; iteration s commits one group: A(s + 3) and,
// when s = 2 j' - 1 (j' >= 1), W(j' + 1) and DX(j'). Iteration s:
//   0. (h = 0, s > 0) wgmma.wait_group 0: super-block j - 1 is complete: promote it with DX[(j - 1) % 2],
//      DW[(j - 1) % 2]
//   1. wgmma.fence; 4 x wgmma on A(s), B(s % 2) (the first of a super-block with scale-d 0); commit
//   2. (s + 1 < steps) wgmma.wait_group 1: this warpgroup's step s - 1 is done
//   3. cp.async.wait_group 1: this thread's A(s + 1) landed, and W(j'), DX(j' - 1) of two iterations before
//   4. __syncthreads (everyone's; everyone done with A(s - 1), B((s + 1) % 2) and the rescale's slots)
//   5. cp.async of A(s + 3) into slot (s - 1) % 4; W(j' + 1) into Wr[(j' + 1) % 2]; DX(j') into DX[j' % 2]
//   6. decode step s + 1: Wr[((s + 1) / 2) % 2], half (s + 1) % 2 -> B[(s + 1) % 2]; at half 0 its dw -> DW
//   7. fence.proxy.async; __syncthreads
// after the loop: wait 0, the last super-block's rescale, the epilogue (gw_store_tile).
// Slot reuse: W(j' + 1) overwrites W(j' - 1), whose last decode (step 2 j' - 1) ended at iteration 2 j' - 2's
// barrier; DX(j') overwrites DX(j' - 2), promoted at iteration 2 j' - 2; DW(j) is written by the decode of step
// 2 j (iteration 2 j - 1) over DW(j - 2), promoted at iteration 2 j - 2.
// Decode (units of 32 weights: row u % 128, part u / 128, two a thread; fp16x2 as gemm_wgmma's decode):
//   (0x6400 | q) - 1024 = q exactly; t = fma(q, A, C) with A = fp16(D / dw), C = fp16(-M / dw) (w = D q - M);
//   t + 1536 rounds t to the integer (fp16's spacing is 1 in [1024, 2048)) and its low byte is w8 (two's
//   complement: 1536 + w8 = 1024 + 512 + w8, 512 = 0x200); one byte_perm packs four.
//   Q4_K half h, part p (qq = 2h + p / 2, hb = p % 2): the 16 qs bytes 32 qq + 16 hb ..: low nibbles -> columns
//     64 (p / 2) + 16 hb + i (sub-block 2 qq), high -> 32 columns further (2 qq + 1).
//   Q6_K half h, part p: run k = p: columns 32 k + l from QL[64 h + 32 (k & 1) + l] (nibble k >> 1),
//     QH[32 h + l] (bits 2k, 2k + 1), scale S[8 h + 2 k + l / 16]; M = 32 D.
#include "gemm_wgmma.cu"

template <int Q>
struct GsSmem {
    static constexpr int BM = 128, BN = 128, STAGES = 4;
    static constexpr int A = BM * 128, B = BN * 128, W = BN * GwW<Q>::ROW;
    static constexpr int A_OFF = 0, B_OFF = STAGES * A, W_OFF = B_OFF + 2 * B, DX_OFF = W_OFF + 2 * W,
                         DW_OFF = DX_OFF + 2 * BM * 4;
    static constexpr int BYTES = DW_OFF + 2 * BN * 4 + 1024;
    static_assert(A % 1024 == 0 && B % 1024 == 0 && W % 16 == 0, "aligned tiles");
};

// four int8 from two fp16x2 words t + 1536: their low bytes
static __device__ __forceinline__ u32 gs_pack4(u32 x, u32 y, u32 A, u32 C) {
    const u32 m = 0x64006400u, r = 0x66006600u;
    return __byte_perm(h2_add(h2_fma(h2_sub(x, m), A, C), r), h2_add(h2_fma(h2_sub(y, m), A, C), r), 0x6420u);
}

// the largest |w| of a super-block the scales allow, / 126 (requant8.LEVELS), and its reciprocal (0 for 0)
static __device__ __forceinline__ void gs_scale(float bound, float& dw, float& inv) {
    dw = bound / 126.0f;
    inv = dw > 0.0f ? 1.0f / dw : 0.0f;
}

// the 32-weight unit (row r, part p) of step s
template <int Q>
static __device__ __forceinline__ void gs_decode_unit(u8* b, float* dw_out, const u8* wr, const u8* w, int row_bytes,
                                                      int n0, int s, int r, int p) {
    const int h = s & 1;
    const u8* wrow = wr + GwW<Q>::ROW * r;
    u32 o[8];                                                    // 32 int8: two chunks of row r
    int c0, c1;
    float dw, inv;
    if (Q == 4) {
        const Q4Scales sc = q4k_scales(*reinterpret_cast<const uint4*>(wrow));
        float bound = 0.0f;
        #pragma unroll
        for (int t = 0; t < 8; ++t) {
            float D, M;
            q4k_sub(sc, t, D, M);
            bound = fmaxf(bound, fmaxf(fabsf(D * 15.0f - M), fabsf(M)));
        }
        gs_scale(bound, dw, inv);
        const int qq = 2 * h + (p >> 1), hb = p & 1;
        float D0, M0, D1, M1;
        q4k_sub(sc, 2 * qq, D0, M0);
        q4k_sub(sc, 2 * qq + 1, D1, M1);
        const u32 a0 = pack_half2(D0 * inv, D0 * inv), k0 = pack_half2(-M0 * inv, -M0 * inv);
        const u32 a1 = pack_half2(D1 * inv, D1 * inv), k1 = pack_half2(-M1 * inv, -M1 * inv);
        const uint4 qv = *reinterpret_cast<const uint4*>(wrow + Q4_K_QS + 32 * qq + 16 * hb);
        const u32 word[4] = {qv.x, qv.y, qv.z, qv.w};
        #pragma unroll
        for (int k = 0; k < 4; ++k) {
            u32 x, y;
            gw_bytes_to_h2(word[k] & 0x0F0F0F0Fu, x, y);
            o[k] = gs_pack4(x, y, a0, k0);                       // sub-block 2 qq: columns 64 (p / 2) + 16 hb + 4 k
            gw_bytes_to_h2((word[k] >> 4) & 0x0F0F0F0Fu, x, y);
            o[4 + k] = gs_pack4(x, y, a1, k1);                   // sub-block 2 qq + 1: 32 columns further
        }
        c0 = 4 * (p >> 1) + hb, c1 = c0 + 2;
    } else {
        const size_t at = reinterpret_cast<size_t>(w) + size_t(n0 + r) * row_bytes + size_t(s >> 1) * Q6_K_BYTES;
        const u8* blk = wrow + (at & 15);
        const float d = half_to_float(*reinterpret_cast<const u16*>(blk + Q6_K_D));
        const signed char* S = reinterpret_cast<const signed char*>(blk + Q6_K_SCALES);
        float bound = 0.0f;
        #pragma unroll
        for (int t = 0; t < 16; ++t) {
            const float D = d * float(S[t]), M = 32.0f * D;
            bound = fmaxf(bound, fmaxf(fabsf(D * 63.0f - M), fabsf(M)));
        }
        gs_scale(bound, dw, inv);
        const int k = p;                                          // run k: columns 32 k ..
        u32 qh[8], ql[8];
        gw_ld32_a2(blk + Q6_K_QH + 32 * h, qh);
        gw_ld32_a2(blk + Q6_K_QL + 64 * h + 32 * (k & 1), ql);
        const float Dl = d * float(S[8 * h + 2 * k]), Dh = d * float(S[8 * h + 2 * k + 1]);
        const u32 al = pack_half2(Dl * inv, Dl * inv), kl = pack_half2(-(32.0f * Dl) * inv, -(32.0f * Dl) * inv);
        const u32 ah = pack_half2(Dh * inv, Dh * inv), kh = pack_half2(-(32.0f * Dh) * inv, -(32.0f * Dh) * inv);
        #pragma unroll
        for (int i = 0; i < 8; ++i) {                            // weights l = 4 i .. 4 i + 3 of run k
            const u32 v = ((ql[i] >> (4 * (k >> 1))) & 0x0F0F0F0Fu) | (((qh[i] >> (2 * k)) & 0x03030303u) << 4);
            u32 x, y;
            gw_bytes_to_h2(v, x, y);
            o[i] = i < 4 ? gs_pack4(x, y, al, kl) : gs_pack4(x, y, ah, kh);
        }
        c0 = 2 * k, c1 = 2 * k + 1;
    }
    gw_store_chunk<1>(b, r, c0, o[0], o[1], o[2], o[3]);
    gw_store_chunk<1>(b, r, c1, o[4], o[5], o[6], o[7]);
    if (h == 0 && p == 0) dw_out[r] = dw;
}

// step s: the BN rows' 128 weights of it, as 4 BN units of 32 (row u % BN, part u / BN) over the 256 threads
template <int Q, int BN>
static __device__ __forceinline__ void gs_decode(u8* b, float* dw_out, const u8* wr, const u8* w, int row_bytes, int n0,
                                                 int s, int tid) {
    static_assert((4 * BN) % 256 == 0, "every thread decodes the same number of units");
    #pragma unroll
    for (int k = 0; k < 4 * BN / 256; ++k) {       // a fixed trip count: unrolled whatever tid is
        const int u = tid + 256 * k;
        gs_decode_unit<Q>(b, dw_out, wr, w, row_bytes, n0, s, u % BN, u / BN);
    }
}

// acc += dx[row] dw[col] float(si) for the thread's accumulators (the m64nNk32 layout of gemm_wgmma's d)
template <int R>
static __device__ __forceinline__ void gs_rescale(float (&acc)[R], const int (&si)[R], const float* dx, const float* dw,
                                                  int tid) {
    const int wg = tid >> 7, lane = tid & 31, warp = (tid >> 5) & 3, g = lane >> 2, i2 = 2 * (lane & 3);
    const float x0 = dx[64 * wg + 16 * warp + g], x1 = dx[64 * wg + 16 * warp + g + 8];
    #pragma unroll
    for (int j = 0; j < R / 4; ++j) {
        const float w0 = dw[8 * j + i2], w1 = dw[8 * j + i2 + 1];
        const float s[4] = {x0 * w0, x0 * w1, x1 * w0, x1 * w1};
        #pragma unroll
        for (int e = 0; e < 4; ++e)
            acc[4 * j + e] = fmaf(s[e], __int_as_float(0x4B400000 + si[4 * j + e]) - 12582912.0f, acc[4 * j + e]);
    }
}

// dx of super-block j for rows m0 .. + 128 (Mp of them a super-block) -> dxs, zero past Mp
static __device__ __forceinline__ void gs_load_dx(float* dxs, const float* dx, int Mp, int m0, int j, int tid) {
    if (tid < 32) {
        const int m = m0 + 4 * tid, valid = Mp - m >= 4 ? 16 : 0;  // Mp % 4 == 0
        gw_cp16(dxs + 4 * tid, valid ? dx + size_t(j) * Mp + m : dx, valid);
    }
}

// out[m * ldo + n] for m < M, n < n_out (float32, or fp16 bits with OUT16). x8, w, dx 16-byte aligned; K % 256 == 0.
// Launch: ceil(M / 128) * ceil(n_out / 128) blocks of 256 threads, GsSmem<Q>::BYTES of dynamic shared memory.
template <int Q, int OUT16>
static __device__ __forceinline__ void gemm_wgmma_s8(const u8* __restrict__ w, int row_bytes, int n_out, int K, int M,
                                                     const signed char* __restrict__ x8, const float* __restrict__ dx,
                                                     int Mp, void* __restrict__ out, int ldo) {
    using L = GsSmem<Q>;
    constexpr int BM = L::BM, BN = L::BN, THREADS = 256, R = BN / 2;
    static_assert(L::BYTES <= 227 * 1024, "dynamic shared memory is at most 227 KB");
    u8* const sm = gw_aligned_smem();
    u8* const As = sm + L::A_OFF;
    u8* const Bs = sm + L::B_OFF;
    u8* const Ws = sm + L::W_OFF;
    float* const DX = reinterpret_cast<float*>(sm + L::DX_OFF);
    float* const DW = reinterpret_cast<float*>(sm + L::DW_OFF);

    const int tid = threadIdx.x;
    int tm, tn;
    grouped_tile(blockIdx.x, (M + BM - 1) / BM, (n_out + BN - 1) / BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN, nsb = K / 256, steps = 2 * nsb;
    const size_t w_bytes = size_t(n_out) * row_bytes;
    const u16* xw = reinterpret_cast<const u16*>(x8);             // gw_load_a's units: a step is 64 of them

    int si[R];                     // s32 sums of the current super-block (its first wgmma has scale-d 0)
    float acc[R];
    #pragma unroll
    for (int i = 0; i < R; ++i) {
        gw_opaque_zero(si[i]);         // (a plain 0 lets the compiler copy one register into the others on some
        acc[i] = 0.0f;                 // paths, and ptxas then serialises the wgmma: C7515)
    }

    // prologue: group 0 = W(0), W(1), DX(0), A(0); groups 1, 2 = A(1), A(2)
    gw_load_w<Q, BN, THREADS>(Ws, w, row_bytes, w_bytes, n_out, n0, 0, tid);
    if (nsb > 1) gw_load_w<Q, BN, THREADS>(Ws + L::W, w, row_bytes, w_bytes, n_out, n0, 1, tid);
    gs_load_dx(DX, dx, Mp, m0, 0, tid);
    #pragma unroll
    for (int s = 0; s < 3; ++s) {
        if (s < steps) gw_load_a<BM, THREADS, 1>(As + s * L::A, xw, K / 2, M, m0, s, tid);
        gw_cp_commit();
    }
    gw_cp_wait<2>();
    __syncthreads();
    gs_decode<Q, BN>(Bs, DW, Ws, w, row_bytes, n0, 0, tid);
    gw_fence_async();
    __syncthreads();

    for (int s = 0; s < steps; ++s) {
        const int h = s & 1;
        if (h == 0 && s > 0) {                                     // 0. super-block j - 1 done: promote it
            gw_mma_wait<0>();
            gw_pin(si);
            const int jp = (s >> 1) - 1;
            gs_rescale(acc, si, DX + (jp & 1) * BM, DW + (jp & 1) * BN, tid);
        }
        const u8* a = As + (s & 3) * L::A + 64 * 128 * (tid >> 7);
        const u8* b = Bs + (s & 1) * L::B;
        gw_pin(si);
        gw_pin(acc);
        gw_mma_fence();                                            // 1.
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) gw_mma_s8<BN>(si, gw_desc<1>(a, kk), gw_desc<1>(b, kk), h | (kk > 0));
        gw_mma_commit();
        gw_pin(si);
        if (s + 1 < steps) {
            gw_mma_wait<1>();                                      // 2.
            gw_pin(si);
            gw_cp_wait<1>();                                       // 3.
            __syncthreads();                                       // 4.
            if (s + 3 < steps) gw_load_a<BM, THREADS, 1>(As + ((s + 3) & 3) * L::A, xw, K / 2, M, m0, s + 3, tid);
            if (h == 1 && (s + 1) / 2 + 1 < nsb) {                 // 5. s = 2 j' - 1
                const int jn = (s + 1) / 2 + 1;
                gw_load_w<Q, BN, THREADS>(Ws + (jn & 1) * L::W, w, row_bytes, w_bytes, n_out, n0, jn, tid);
            }
            if (h == 1) gs_load_dx(DX + (((s + 1) >> 1) & 1) * BM, dx, Mp, m0, (s + 1) >> 1, tid);
            gw_cp_commit();
            gs_decode<Q, BN>(Bs + ((s + 1) & 1) * L::B, DW + (((s + 1) >> 1) & 1) * BN, Ws + (((s + 1) >> 1) & 1) * L::W,
                             w, row_bytes, n0, s + 1, tid);        // 6.
            gw_fence_async();                                      // 7.
            __syncthreads();
        }
    }
    gw_mma_wait<0>();
    gw_pin(si);
    gw_cp_wait<0>();
    __syncthreads();
    gs_rescale(acc, si, DX + ((nsb - 1) & 1) * BM, DW + ((nsb - 1) & 1) * BN, tid);
    gw_store_tile<BN, OUT16>(acc, out, ldo, M, n_out, m0, n0, tid);
}
