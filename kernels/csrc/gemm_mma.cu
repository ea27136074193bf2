// Fused prefill GEMM on the fp16 tensor cores, weights decoded inside the product (no scratch):
//
//   out[M, N] (fp32) = x[M, K] (fp16) @ W[N, K].T,   W: raw Q4_K or Q6_K rows, K % 256 == 0
//
// Why linked CUDA C: Numba cannot issue mma.sync, ldmatrix or cp.async. kernels/gemm_mma_twin.py
// is the same tiling and index arithmetic in Numba with the mma replaced by FP32 multiply-adds, so
// the simulator checks the indexing in CI; kernels/linked.py (gemm_mma_linked) launches this one.
//
// Tiling. A CTA of (BM / WM) x (BN / WN) warps owns out[m0 : m0 + BM, n0 : n0 + BN] (a 1-D grid
// of ceil(M / BM) * ceil(N / BN) CTAs in grouped order, tile_order.cuh); warp (wm, wn) owns a WM x WN warp tile = MI x NI mma tiles of
// m16n8 (MI = WM / 16, NI = WN / 8), their FP32 accumulators in registers. The K loop steps one
// quarter super-block (64 weights) at a time: step s = super-block s / 4, quarter q = s % 4.
// Each step stages, through a ring of STAGES slots filled with cp.async (global -> shared, 16 bytes
// per instruction, zero-filled past M and N):
//   xs[BM][64 + 8] fp16    x[m0 + r, 64 s .. + 64]; row stride 144 B, so ldmatrix is conflict-free
//   ws[BN][WS] bytes       the raw bytes of W row n0 + r that quarter q reads (GmW<Q>, below)
// Then 4 k16 sub-steps: A fragments by ldmatrix.x4 from xs; B fragments decoded by each thread
// straight from ws into fp16 pairs (FP32 math, one rounding, as decode_cast.cu's q*k_decode_f16);
// MI x NI mma.sync.m16n8k16 (fp16 in, FP32 accumulate).
// m16n8k16 fragment ownership, lane = 4 g + t:
//   A (row major, 16 x 16): a0 = A[g][2t, 2t+1]  a1 = A[g+8][2t, 2t+1]  a2 = A[g][2t+8, +9]  a3 = A[g+8][2t+8, +9]
//   B (col major, 16 x 8):  b0 = B[2t, 2t+1][g]  b1 = B[2t+8, 2t+9][g]        (B[k][n] = W[n][k])
//   C (16 x 8, FP32):       c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
// 48 KB of static shared memory (Numba cannot raise the limit) bound BM x BN and STAGES:
// linked.gemm_mma_stages picks the deepest ring (<= 3) that fits; static_assert below.
#include "block_decode.cuh"
#include "tile_order.cuh"

// ---- PTX --------------------------------------------------------------------------------------
// tests/gemm_mma_emulate.cpp defines GM_EMULATE and host versions of these six (a warp of host
// threads exchanging fragments), to run this file on the CPU.
#ifndef GM_EMULATE
static __device__ __forceinline__ u32 gm_smem(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, of which the first `valid` (0..16) are read, the rest zero-filled
static __device__ __forceinline__ void gm_cp16(void* smem, const void* g, int valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(gm_smem(smem)), "l"(g), "r"(valid) : "memory");
}
static __device__ __forceinline__ void gm_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>   // wait until at most N of this thread's groups are still in flight
static __device__ __forceinline__ void gm_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

static __device__ __forceinline__ void gm_ldm4(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(gm_smem(p)));
}

static __device__ __forceinline__ void gm_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif

// ---- what a quarter of a W super-block stages, and its decode into B fragments ----------------
// GmW<4> (Q4_K), quarter q: chunk 0 = the 16-byte head (d, dmin, scales), chunks 1-2 = qs bytes
// 32q .. 32q + 32 (weights 64q + c: c < 32 low nibble of byte c, sub-block 2q; c >= 32 high nibble
// of byte c - 32, sub-block 2q + 1). Rows are 16-byte aligned: every chunk is exact.
// GmW<6> (Q6_K), quarter q = 2 hf + h: weights 128 hf + 64 h + c (c < 64) read QL[64 hf + c]
// (low nibble if h = 0, high if h = 1), QH[32 hf + c % 32] (bits 2k, k = 2h + c / 32) and
// S[8 hf + (c % 32) / 16 + 2k]. A 210-byte block starts 2-byte aligned, so each field range is
// copied as the 16-byte aligned chunks covering it, with o = (block address) & 15:
//   chunks 0-4: QL[64 hf ..] at byte o,  5-7: QH[32 hf ..] at 80 + o,  8-9: S, d at 128 + o.
template <int Q> struct GmW;
template <> struct GmW<4> { static constexpr int CHUNKS = 3; };
template <> struct GmW<6> { static constexpr int CHUNKS = 10; };
static_assert(Q4_K_QS % 16 == 0 && Q4_K_BYTES % 16 == 0, "Q4_K chunks are whole");
static_assert(Q6_K_QL % 16 == 0 && Q6_K_QH % 16 == 0 && Q6_K_SCALES % 16 == 0, "Q6_K field starts are chunk starts");
static_assert(Q6_K_D + 2 <= Q6_K_SCALES + 32 - 14, "S and d fit two chunks at any 2-byte offset");

// source of chunk c of row `row` (< n_out) for quarter q of super-block sb, and how many of its 16
// bytes lie inside W (the last Q6_K chunk of the last row may reach past the end of W)
template <int Q>
static __device__ __forceinline__ const u8* gm_w_chunk(const u8* w, int row_bytes, size_t w_bytes, int row, int sb,
                                                       int q, int c, int& valid) {
    const size_t blk = size_t(row) * row_bytes + size_t(sb) * (Q == 4 ? Q4_K_BYTES : Q6_K_BYTES);
    size_t src;
    if (Q == 4) {
        src = blk + (c == 0 ? 0 : Q4_K_QS + 32 * q + 16 * (c - 1));
    } else {
        const size_t b16 = blk & ~size_t(15);                  // w itself is 16-byte aligned
        const int hf = q >> 1;
        src = b16 + (c < 5 ? Q6_K_QL + 64 * hf + 16 * c : c < 8 ? Q6_K_QH + 32 * hf + 16 * (c - 5)
                                                                 : Q6_K_SCALES + 16 * (c - 8));
    }
    valid = w_bytes - src < 16 ? int(w_bytes - src) : 16;    // src < w_bytes always
    return w + src;
}

// b0, b1 of the k16 sub-step ks (0..3) of quarter q for the W row staged at `r` (thread t = lane % 4):
// weights c = 16 ks + 2t, +1 (b0) and +8, +9 (b1) of the quarter. Q4_K: D, Dm of the quarter's two
// sub-blocks (ks < 2: sub-block 2q, else 2q + 1).
static __device__ __forceinline__ void gm_q4_frag(const u8* r, int ks, int t, const float (&D)[2],
                                                  const float (&Dm)[2], u32& b0, u32& b1) {
    const int at = 16 + 16 * (ks & 1) + 2 * t, sh = 4 * (ks >> 1), s = ks >> 1;
    const u32 v0 = *reinterpret_cast<const u16*>(r + at) >> sh;        // bytes c, c + 1
    const u32 v1 = *reinterpret_cast<const u16*>(r + at + 8) >> sh;    // bytes c + 8, c + 9
    b0 = pack_half2(D[s] * small_int_to_float(v0 & 15u) - Dm[s], D[s] * small_int_to_float((v0 >> 8) & 15u) - Dm[s]);
    b1 = pack_half2(D[s] * small_int_to_float(v1 & 15u) - Dm[s], D[s] * small_int_to_float((v1 >> 8) & 15u) - Dm[s]);
}

// Q6_K: o = the block's address & 15, h = q & 1, hf = q >> 1
static __device__ __forceinline__ void gm_q6_frag(const u8* r, int o, int q, int ks, int t, u32& b0, u32& b1) {
    const int h = q & 1, hf = q >> 1, c = 16 * ks + 2 * t, l = c & 31, k = 2 * h + (ks >> 1);
    const float d = half_to_float(*reinterpret_cast<const u16*>(r + 128 + o + (Q6_K_D - Q6_K_SCALES)));
    const float dk = d * float(reinterpret_cast<const signed char*>(r)[128 + o + 8 * hf + (l >> 4) + 2 * k]);
    u32 out[2];
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const u32 L = u32(*reinterpret_cast<const u16*>(r + o + c + 8 * i)) >> (4 * h);
        const u32 H = u32(*reinterpret_cast<const u16*>(r + 80 + o + l + 8 * i)) >> (2 * k);
        const u32 q0 = (L & 15u) | ((H & 3u) << 4), q1 = ((L >> 8) & 15u) | (((H >> 8) & 3u) << 4);
        out[i] = pack_half2(dk * (small_int_to_float(q0) - 32.0f), dk * (small_int_to_float(q1) - 32.0f));
    }
    b0 = out[0];
    b1 = out[1];
}

// ---- the kernel body --------------------------------------------------------------------------
template <int Q, int BM, int BN, int STAGES>
struct GmSmem {
    static constexpr int XS = 64 + 8;                          // x row stride, halfs
    static constexpr int WS = 16 * GmW<Q>::CHUNKS;             // W row stride, bytes
    u16 x[STAGES][BM][XS];
    u8 w[STAGES][BN][WS];
};

// Issue the cp.async of step `step` (x columns 64 step .., W quarter step % 4 of super-block step / 4)
// into slot `slot`: thread tid copies chunks tid, tid + THREADS, ...
template <int Q, int BM, int BN, int STAGES, int THREADS>
static __device__ __forceinline__ void gm_load(GmSmem<Q, BM, BN, STAGES>& sm, int slot, int step, const u8* w,
                                               int row_bytes, size_t w_bytes, int n_out, int n0, const u16* x,
                                               int K, int M, int m0, int tid) {
    constexpr int XCH = BM * 8, WCH = BN * GmW<Q>::CHUNKS;     // 16-byte chunks of x and W per step
    #pragma unroll
    for (int i = tid; i < XCH; i += THREADS) {
        const int r = i >> 3, c = i & 7;
        const bool ok = m0 + r < M;
        gm_cp16(&sm.x[slot][r][8 * c], ok ? x + size_t(m0 + r) * K + 64 * step + 8 * c : x, ok ? 16 : 0);
    }
    #pragma unroll
    for (int i = tid; i < WCH; i += THREADS) {
        const int r = i / GmW<Q>::CHUNKS, c = i % GmW<Q>::CHUNKS;
        int valid = 0;
        const u8* src = w;
        if (n0 + r < n_out) src = gm_w_chunk<Q>(w, row_bytes, w_bytes, n0 + r, step >> 2, step & 3, c, valid);
        gm_cp16(&sm.w[slot][r][16 * c], src, valid);
    }
}

// out[m, n] for m < M, n < n_out (row-major [M, n_out]); w 16-byte aligned, x [M, K] fp16 16-byte aligned.
template <int Q, int BM, int BN, int WM, int WN, int STAGES>
static __device__ __forceinline__ void gemm_mma(const u8* __restrict__ w, int row_bytes, int n_out, int K, int M,
                                                const u16* __restrict__ x, float* __restrict__ out) {
    constexpr int WARPS_M = BM / WM, THREADS = 32 * WARPS_M * (BN / WN), MI = WM / 16, NI = WN / 8;
    using Smem = GmSmem<Q, BM, BN, STAGES>;
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 8 == 0, "tiles of whole mma tiles");
    static_assert(sizeof(Smem) <= 48 * 1024, "static shared memory is capped at 48 KB");
    __shared__ __align__(16) Smem sm;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M, g = lane >> 2, t = lane & 3;
    int tm, tn;
    grouped_tile(blockIdx.x, (M + BM - 1) / BM, (n_out + BN - 1) / BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN, steps = K / 64;
    const size_t w_bytes = size_t(n_out) * row_bytes;
    float acc[MI][NI][4];
    #pragma unroll
    for (int i = 0; i < MI; ++i)
        #pragma unroll
        for (int j = 0; j < NI; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {                     // prologue: steps 0 .. STAGES - 2
        if (s < steps) gm_load<Q, BM, BN, STAGES, THREADS>(sm, s, s, w, row_bytes, w_bytes, n_out, n0, x, K, M, m0, tid);
        gm_commit();
    }
    for (int step = 0; step < steps; ++step) {
        const int ahead = step + STAGES - 1, slot = step % STAGES, q = step & 3;
        // slot ahead % STAGES was last read in step - 1, which every warp finished (trailing barrier)
        if (ahead < steps)
            gm_load<Q, BM, BN, STAGES, THREADS>(sm, ahead % STAGES, ahead, w, row_bytes, w_bytes, n_out, n0, x, K, M, m0, tid);
        gm_commit();                                           // one (possibly empty) group per step
        gm_wait<STAGES - 1>();                                 // this thread's copies of `step` landed
        __syncthreads();                                       // ... and every other thread's

        // per W row of this warp: Q4_K scales of the quarter's two sub-blocks; Q6_K the block offset
        float D[NI][2], Dm[NI][2];
        int o6[NI];
        #pragma unroll
        for (int j = 0; j < NI; ++j) {
            const int r = wn * WN + 8 * j + g;                 // W row (in the tile) of b fragments j
            if (Q == 4) {
                const Q4Scales sc = q4k_scales(*reinterpret_cast<const uint4*>(&sm.w[slot][r][0]));
                q4k_sub(sc, 2 * q, D[j][0], Dm[j][0]);
                q4k_sub(sc, 2 * q + 1, D[j][1], Dm[j][1]);
            } else {
                o6[j] = int((size_t(w) + size_t(n0 + r) * row_bytes + size_t(step >> 2) * Q6_K_BYTES) & 15);
            }
        }
        #pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            u32 a[MI][4];
            #pragma unroll
            for (int i = 0; i < MI; ++i)                       // lanes 0-15: rows 0-15 at k 0; 16-31: at k 8
                gm_ldm4(a[i], &sm.x[slot][wm * WM + 16 * i + (lane & 15)][16 * ks + 8 * (lane >> 4)]);
            #pragma unroll
            for (int j = 0; j < NI; ++j) {
                const u8* r = &sm.w[slot][wn * WN + 8 * j + g][0];
                u32 b0, b1;
                if (Q == 4) gm_q4_frag(r, ks, t, D[j], Dm[j], b0, b1);
                else gm_q6_frag(r, o6[j], q, ks, t, b0, b1);
                #pragma unroll
                for (int i = 0; i < MI; ++i) gm_mma(acc[i][j], a[i], b0, b1);
            }
        }
        __syncthreads();                                       // slot is free for the load of step + STAGES
    }
    gm_wait<0>();

    #pragma unroll
    for (int i = 0; i < MI; ++i)
        #pragma unroll
        for (int j = 0; j < NI; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + wm * WM + 16 * i + g + 8 * (e >> 1), n = n0 + wn * WN + 8 * j + 2 * t + (e & 1);
                if (m < M && n < n_out) out[size_t(m) * n_out + n] = acc[i][j][e];
            }
}
