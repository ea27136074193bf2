// Fused prefill GEMM on Hopper's warpgroup tensor cores (wgmma), Q4_K / Q6_K weights decoded once
// per CTA tile into shared memory, no scratch:
//
//   out[M, N] (fp32 or fp16) = x[M, K] (fp16) @ W[N, K].T,   W: raw Q4_K or Q6_K rows, K % 256 == 0
//
// Why this and not gemm_mma.cu: there every thread decodes the B fragments it feeds to mma.sync, so a
// weight is decoded once per 2-4 mma and the 48 KB static shared memory holds a 1-3 slot ring; it
// measured 0.15-0.21x cuBLAS at M = 512-4096 (docs/perf.md, sixth stop). Here a CTA decodes each
// 64-wide K step of its BN weight rows once into a shared fp16 tile that both warpgroups' wgmma read
// (BM = 128 rows of x), the raw weight bytes and x arrive by cp.async into rings in dynamic shared
// memory (up to 227 KB; kernels/_device.launch(shared=...) raises the kernel's limit), and the decode
// of step s + 1 runs on the CUDA cores while wgmma of step s runs on the tensor cores.
// sm_90a only (wgmma); kernels/gemm_wgmma_twin.py is the same algorithm in Numba for the simulator,
// tests/gemm_wgmma_emulate.cpp runs this file on the CPU (wgmma executed at its wait_group).
//
// Tiling. CTA b of a 1-D grid owns out[m0 : m0 + BM, n0 : n0 + BN] (grouped order: tile_order.cuh);
// NWG warpgroups of 128 threads, warpgroup g owns rows m0 + 64 g .. + 64
// with BN / 2 FP32 accumulators a thread (one wgmma m64nBNk16 per 16 of K); with MT = 2 m-tiles a warpgroup
// (BM = 128 NWG), rows m0 + 64 (2 g + t), t < 2, and BN accumulators.
//
// Shared memory (from a 1024-byte aligned base):
//   A[STAGES]  x rows m0 .. + BM, 64 columns of K step s: BM x 64 fp16, ring slot s % STAGES
//   B[2]       W rows n0 .. + BN decoded, 64 columns of K step s: BN x 64 fp16, slot s % 2
//   Wr[2]      raw bytes of super-block j of W rows n0 .. + BN (WROW bytes a row), slot j % 2
// A and B are in wgmma's K-major canonical layout: the 16-byte chunk c (columns 8c .. 8c + 7) of row r
// sits at gw_chunk<SWZ>(r, c):
//   SWZ = 1 (128-byte swizzle): 128 r + 16 (c ^ (r % 8)), descriptor SBO = 1024 (8-row groups), LBO
//            unused; the k16 slice kk starts 32 kk bytes in (the swizzle is of the address itself,
//            hence the 1024-byte aligned tiles)
//   SWZ = 0 (no swizzle, "interleave": 8 x 8 core matrices of 128 contiguous bytes):
//            1024 (r / 8) + 128 c + 16 (r % 8), LBO = 128 (next core matrix along K), SBO = 1024;
//            the slice kk starts 256 kk bytes in
// Both write patterns are free of bank conflicts (8 consecutive rows, one chunk each); the two exist
// because the swizzled one is the one cuBLAS-class kernels use and the plain one is the fallback if
// the descriptor rules read from the PTX manual prove wrong for one of them on the hardware.
//
// The K loop (steps s of 64; super-block j = s / 4, quarter q = s % 4). cp.async groups: the prologue
// commits W(0), W(1), A(0) as group 0 and A(1) .. A(STAGES - 2) as groups 1 ..; iteration s commits
// one group carrying A(s + STAGES - 1) and, when s + 1 = 4 j' (j' >= 1), W(j' + 1). Iteration s:
//   1. wgmma.fence; 4 x wgmma on A(s), B(s % 2); commit                (tensor cores: step s)
//   2. wgmma.wait_group 1: this warpgroup's step s - 1 is done          (A slot (s - 1) % STAGES and
//                                                                        B slot (s + 1) % 2 are free)
//   3. cp.async.wait_group STAGES - 3: this thread's copies of A(s + 1) (and of W(j) it needs) landed
//   4. __syncthreads: the same for every thread
//   5. cp.async of A(s + STAGES - 1) into slot (s - 1) % STAGES, of W(j' + 1) into Wr[(j' + 1) % 2]
//   6. decode step s + 1: Wr[((s + 1) / 4) % 2] quarter (s + 1) % 4 -> B[(s + 1) % 2]
//   7. fence.proxy.async (generic-proxy writes, cp.async's included, visible to wgmma); __syncthreads
// W(j' + 1) is issued in iteration 4 j' - 1, after the barrier that ends the last decode of W(j' - 1)
// (the slot it reuses), and waited for (step 3 of iteration 4 j' + 3) through the in-order groups
// while STAGES <= 6.
//
// Decode (per step, 2 BN units over the CTA's threads; unit u: row u % BN, part u / BN, 32 weights):
//   Q4_K part h: the 16 qs bytes 32 q + 16 h .. of the quarter: low nibbles -> columns 16 h + i
//       (sub-block 2 q), high nibbles -> 32 + 16 h + i (sub-block 2 q + 1), i < 16. Per weight in
//       fp16x2: (0x6400 | nibble) - 1024 = nibble exactly, then fma with fp16(d sc), -fp16(dmin m):
//       one rounding after two rounded scales (the cuBLAS path rounds once; bound below).
//   Q6_K part p, quarter q = 2 hf + h: run k = 2 h + p of half hf: columns 32 p + l (l < 32) from
//       QL[64 hf + 32 p + l] (nibble h), QH[32 hf + l] (bits 2k, 2k + 1), scale S[8 hf + l / 16 + 2 k];
//       (0x6400 | q) - 1056 = q - 32 exactly, times fp16(d S). Q6_K blocks start 2-byte aligned: a
//       row's block is staged as the 14 16-byte chunks covering it (o = its address & 15), rows 240
//       bytes apart (an odd number of chunks: conflict-free reads).
// Error: x and every decoded weight rounded to fp16 (the scales too), FP32 accumulation: the bound of
// dequant_linked_cublas (2e-3 on ||out - ref|| / ||ref||) holds.
#include "block_decode.cuh"
#include "tile_order.cuh"
#include "wgmma_ptx.cuh"

// ---- PTX --------------------------------------------------------------------------------------
// (the shared wrappers: wgmma_ptx.cuh; tests/gemm_wgmma_emulate.cpp defines GW_EMULATE and host versions)
#ifndef GW_EMULATE
// fp16x2 arithmetic on packed words
static __device__ __forceinline__ u32 h2_sub(u32 a, u32 b) {
    u32 r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
static __device__ __forceinline__ u32 h2_mul(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
static __device__ __forceinline__ u32 h2_add(u32 a, u32 b) {
    u32 r;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
static __device__ __forceinline__ u32 h2_fma(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
#endif

// ---- layout -------------------------------------------------------------------------------------
// byte offset of the 16-byte chunk c (K columns 8c .. 8c + 7) of row r in an A or B tile
template <int SWZ>
static __device__ __forceinline__ u32 gw_chunk(int r, int c) {
    return SWZ ? u32(128 * r + 16 * (c ^ (r & 7))) : u32(1024 * (r >> 3) + 128 * c + 16 * (r & 7));
}

// the matrix descriptor of a K-major fp16 tile whose (row 0, column 16 kk) is at `tile`
template <int SWZ>
static __device__ __forceinline__ u64 gw_desc(const u8* tile, int kk) {
    return gw_make_desc(gw_smem(tile) + (SWZ ? 32u : 256u) * u32(kk), SWZ ? 16u : 128u, 1024u, SWZ);
}

template <int Q> struct GwW;
template <> struct GwW<4> { static constexpr int CHUNKS = Q4_K_BYTES / 16, ROW = Q4_K_BYTES; };    // 9, 144
template <> struct GwW<6> { static constexpr int CHUNKS = 14, ROW = 240; };   // 14 chunks cover 210 bytes at any even offset
static_assert(Q4_K_BYTES % 16 == 0 && (Q4_K_BYTES / 16) % 2 == 1, "Q4_K rows: whole chunks, an odd number");
static_assert(14 + Q6_K_BYTES <= 16 * 14 && 16 * 14 < 240, "Q6_K: 14 chunks cover a block, rows padded to 15");

template <int Q, int BN, int NWG, int STAGES, int MT = 1>
struct GwSmem {
    static constexpr int BM = 64 * NWG * MT;
    static constexpr int A = BM * 128, B = BN * 128, W = BN * GwW<Q>::ROW;
    static constexpr int A_OFF = 0, B_OFF = STAGES * A, W_OFF = B_OFF + 2 * B;
    static constexpr int BYTES = W_OFF + 2 * W + 1024;       // + the alignment of the base
    static_assert(A % 1024 == 0 && B % 1024 == 0, "1024-byte aligned tiles");
};

// ---- loads --------------------------------------------------------------------------------------
// x rows m0 .. + BM, columns 64 s .. + 64 -> tile a (zero rows past M)
template <int BM, int THREADS, int SWZ>
static __device__ __forceinline__ void gw_load_a(u8* a, const u16* x, int K, int M, int m0, int s, int tid) {
    static_assert((BM * 8) % THREADS == 0, "every thread copies the same number of chunks");
    #pragma unroll
    for (int k = 0; k < BM * 8 / THREADS; ++k) {   // a fixed trip count: unrolled whatever tid is
        const int i = tid + k * THREADS, r = i >> 3, c = i & 7;
        const bool ok = m0 + r < M;
        gw_cp16(a + gw_chunk<SWZ>(r, c), ok ? x + size_t(m0 + r) * K + 64 * s + 8 * c : x, ok ? 16 : 0);
    }
}

// super-block j of W rows n0 .. + BN -> wr (rows GwW<Q>::ROW bytes apart; zero past n_out; a Q6_K
// row as the chunks covering its block from the 16-byte boundary below it, clipped at the end of W)
template <int Q, int BN, int THREADS>
static __device__ __forceinline__ void gw_load_w(u8* wr, const u8* w, int row_bytes, size_t w_bytes, int n_out,
                                                 int n0, int j, int tid) {
    constexpr int CH = GwW<Q>::CHUNKS, N = BN * CH;
    #pragma unroll
    for (int k = 0; k < (N + THREADS - 1) / THREADS; ++k) {   // a fixed trip count (unrolled); the tail guarded
        const int i = tid + k * THREADS, r = i / CH, c = i % CH;
        if (N % THREADS != 0 && i >= N) break;
        int valid = 0;
        const u8* src = w;
        if (n0 + r < n_out) {
            const size_t blk = size_t(n0 + r) * row_bytes + size_t(j) * (Q == 4 ? Q4_K_BYTES : Q6_K_BYTES);
            const size_t at = (Q == 4 ? blk : blk & ~size_t(15)) + 16 * size_t(c);
            valid = w_bytes - at < 16 ? int(w_bytes - at) : 16;     // at < w_bytes: o + 210 > 16 * 13
            src = w + at;
        }
        gw_cp16(wr + GwW<Q>::ROW * r + 16 * c, src, valid);
    }
}

// ---- decode of one K step into the B tile --------------------------------------------------------
// 4 weights (bytes of `v`, each < 64) -> two fp16x2 words: ((0x6400 | v) - bias) [* scale]
static __device__ __forceinline__ void gw_bytes_to_h2(u32 v, u32& lo, u32& hi) {
    lo = __byte_perm(v, 0u, 0x4140u) | 0x64006400u;    // halves 1024 + byte 0, 1024 + byte 1
    hi = __byte_perm(v, 0u, 0x4342u) | 0x64006400u;
}

template <int SWZ>
static __device__ __forceinline__ void gw_store_chunk(u8* b, int r, int c, u32 w0, u32 w1, u32 w2, u32 w3) {
    st16(b + gw_chunk<SWZ>(r, c), w0, w1, w2, w3);
}

// Q4_K unit (row r, part h) of quarter q; wrow: the row's staged block
template <int SWZ>
static __device__ __forceinline__ void gw_decode_q4(u8* b, const u8* wrow, int r, int q, int h) {
    const Q4Scales sc = q4k_scales(*reinterpret_cast<const uint4*>(wrow));
    float D0, M0, D1, M1;
    q4k_sub(sc, 2 * q, D0, M0);
    q4k_sub(sc, 2 * q + 1, D1, M1);
    const u32 d0 = pack_half2(D0, D0), m0 = pack_half2(-M0, -M0), d1 = pack_half2(D1, D1), m1 = pack_half2(-M1, -M1);
    const uint4 qs = *reinterpret_cast<const uint4*>(wrow + Q4_K_QS + 32 * q + 16 * h);
    const u32 word[4] = {qs.x, qs.y, qs.z, qs.w};
    u32 lo[8], hi[8];     // columns 16 h + 2 i, + 1 (sub-block 2 q) and 32 + 16 h + 2 i, + 1 (2 q + 1)
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
        u32 a, c;
        gw_bytes_to_h2(word[k] & 0x0F0F0F0Fu, a, c);
        lo[2 * k] = h2_fma(h2_sub(a, 0x64006400u), d0, m0);
        lo[2 * k + 1] = h2_fma(h2_sub(c, 0x64006400u), d0, m0);
        gw_bytes_to_h2((word[k] >> 4) & 0x0F0F0F0Fu, a, c);
        hi[2 * k] = h2_fma(h2_sub(a, 0x64006400u), d1, m1);
        hi[2 * k + 1] = h2_fma(h2_sub(c, 0x64006400u), d1, m1);
    }
    gw_store_chunk<SWZ>(b, r, 2 * h, lo[0], lo[1], lo[2], lo[3]);
    gw_store_chunk<SWZ>(b, r, 2 * h + 1, lo[4], lo[5], lo[6], lo[7]);
    gw_store_chunk<SWZ>(b, r, 4 + 2 * h, hi[0], hi[1], hi[2], hi[3]);
    gw_store_chunk<SWZ>(b, r, 4 + 2 * h + 1, hi[4], hi[5], hi[6], hi[7]);
}

// 32 bytes from a 2-byte aligned shared address, as 8 words
static __device__ __forceinline__ void gw_ld32_a2(const u8* p, u32 (&v)[8]) {
    const size_t a = reinterpret_cast<size_t>(p);
    const u32* w = reinterpret_cast<const u32*>(a & ~size_t(3));
    const u32 sh = u32(a & 3) * 8;
    u32 prev = w[0];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 next = w[i + 1];                               // inside the padded row
        v[i] = __funnelshift_r(prev, next, sh);
        prev = next;
    }
}

// Q6_K unit (row r, part p) of quarter q; blk: the row's block in the staged bytes (2-byte aligned)
template <int SWZ>
static __device__ __forceinline__ void gw_decode_q6(u8* b, const u8* blk, int r, int q, int p) {
    const int hf = q >> 1, h = q & 1, k = 2 * h + p;
    u32 ql[8], qh[8];
    gw_ld32_a2(blk + Q6_K_QL + 64 * hf + 32 * p, ql);
    gw_ld32_a2(blk + Q6_K_QH + 32 * hf, qh);
    const float d = half_to_float(*reinterpret_cast<const u16*>(blk + Q6_K_D));
    const signed char* S = reinterpret_cast<const signed char*>(blk + Q6_K_SCALES + 8 * hf + 2 * k);
    const float s0 = d * float(S[0]), s1 = d * float(S[1]);       // columns l < 16, l >= 16
    const u32 d0 = pack_half2(s0, s0), d1 = pack_half2(s1, s1);
    u32 o[16];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {                                  // weights l = 4 i .. 4 i + 3
        const u32 v = ((ql[i] >> (4 * h)) & 0x0F0F0F0Fu) | (((qh[i] >> (2 * k)) & 0x03030303u) << 4);
        u32 a, c;
        gw_bytes_to_h2(v, a, c);
        const u32 dd = i < 4 ? d0 : d1;
        o[2 * i] = h2_mul(h2_sub(a, 0x64206420u), dd);             // 0x6420 = 1056 = 1024 + 32
        o[2 * i + 1] = h2_mul(h2_sub(c, 0x64206420u), dd);
    }
    #pragma unroll
    for (int c = 0; c < 4; ++c) gw_store_chunk<SWZ>(b, r, 4 * p + c, o[4 * c], o[4 * c + 1], o[4 * c + 2], o[4 * c + 3]);
}

// step t: W super-block t / 4 (staged in wr), quarter t % 4 -> b
template <int Q, int BN, int THREADS, int SWZ>
static __device__ __forceinline__ void gw_decode(u8* b, const u8* wr, const u8* w, int row_bytes, int n0, int t,
                                                 int tid) {
    const int q = t & 3;
    #pragma unroll
    for (int k = 0; k < (2 * BN + THREADS - 1) / THREADS; ++k) {   // a fixed trip count (unrolled); the tail guarded
        const int u = tid + k * THREADS, r = u % BN, part = u / BN;
        if ((2 * BN) % THREADS != 0 && u >= 2 * BN) break;
        const u8* wrow = wr + GwW<Q>::ROW * r;
        if (Q == 4) {
            gw_decode_q4<SWZ>(b, wrow, r, q, part);
        } else {
            const size_t blk = reinterpret_cast<size_t>(w) + size_t(n0 + r) * row_bytes + size_t(t >> 2) * Q6_K_BYTES;
            gw_decode_q6<SWZ>(b, wrow + (blk & 15), r, q, part);
        }
    }
}

// ---- the epilogue (both wgmma GEMMs) ---------------------------------------------------------------
// d[4 j + e] -> out[m0 + 64 wg + 16 warp + g + 8 (e >> 1), n0 + 8 j + 2 i + (e & 1)] for m < M, n < n_out:
// float32 (OUT16 = 0) or fp16 bits (OUT16 = 1), rows ldo elements apart (pairs: 8- / 4-byte stores where every
// row starts aligned for them)
template <int BN, int OUT16>
static __device__ __forceinline__ void gw_store_tile(const float (&d)[BN / 2], void* __restrict__ out, int ldo, int M,
                                                     int n_out, int m0, int n0, int tid) {
    const int wg = tid >> 7;
    const int lane = tid & 31, warp = (tid >> 5) & 3, g = lane >> 2, i2 = 2 * (lane & 3);
    const bool pairs = (n_out & 1) == 0 && (ldo & 1) == 0 &&
                       (reinterpret_cast<size_t>(out) & (OUT16 ? 3 : 7)) == 0;
    #pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        #pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + 64 * wg + 16 * warp + g + 8 * half, n = n0 + 8 * j + i2;
            const float v0 = d[4 * j + 2 * half], v1 = d[4 * j + 2 * half + 1];
            if (m >= M || n >= n_out) continue;
            const size_t at = size_t(m) * ldo + n;
            if (OUT16) {
                u16* o = reinterpret_cast<u16*>(out) + at;
                if (pairs) {
                    *reinterpret_cast<u32*>(o) = pack_half2(v0, v1);
                } else {
                    const u32 p = pack_half2(v0, v1);
                    o[0] = u16(p & 0xFFFFu);
                    if (n + 1 < n_out) o[1] = u16(p >> 16);
                }
            } else {
                float* o = reinterpret_cast<float*>(out) + at;
                if (pairs) {
                    *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
                } else {
                    o[0] = v0;
                    if (n + 1 < n_out) o[1] = v1;
                }
            }
        }
    }
}

// ---- the kernel body ----------------------------------------------------------------------------
// out[m * ldo + n] for m < M, n < n_out: float32 (OUT16 = 0) or fp16 bits (OUT16 = 1); ldo >= n_out (a
// column block of a wider matrix: ldo its row length).
// w and x 16-byte aligned. Launch: ceil(M / (64 NWG MT)) * ceil(n_out / BN) blocks of 128 NWG threads,
// GwSmem<Q, BN, NWG, STAGES, MT>::BYTES of dynamic shared memory.
// MT: 64-row m-tiles a warpgroup (rows m0 + 64 (MT g + t), t < MT; MT x BN / 2 accumulators a thread): each decoded
// W tile then feeds MT x more products, i.e. the decode per multiply-add falls by MT (MT = 2 with BN = 128: a
// 256 x 128 tile, half the decode of the 128 x 256 one for the same tensor-core work a K step).
template <int Q, int BN, int NWG, int STAGES, int SWZ, int OUT16, int MT = 1>
static __device__ __forceinline__ void gemm_wgmma(const u8* __restrict__ w, int row_bytes, int n_out, int K, int M,
                                                  const u16* __restrict__ x, void* __restrict__ out, int ldo) {
    using L = GwSmem<Q, BN, NWG, STAGES, MT>;
    constexpr int BM = L::BM, THREADS = 128 * NWG, R = BN / 2;
    static_assert(STAGES >= 3 && STAGES <= 6, "the ring needs 3..6 slots (see the K loop above)");
    static_assert(BN % 32 == 0 && BN <= 256 && NWG >= 1 && NWG <= 2, "wgmma widths 32..256, 1 or 2 warpgroups");
    static_assert((MT == 1 || MT == 2) && MT * BN <= 256, "1 or 2 m-tiles a warpgroup, <= 128 accumulators a thread");
    static_assert(L::BYTES <= 227 * 1024, "dynamic shared memory is at most 227 KB");
    u8* const sm = gw_aligned_smem();
    u8* const As = sm + L::A_OFF;
    u8* const Bs = sm + L::B_OFF;
    u8* const Ws = sm + L::W_OFF;

    const int tid = threadIdx.x, wg = tid >> 7;
    int tm, tn;
    grouped_tile(blockIdx.x, (M + BM - 1) / BM, (n_out + BN - 1) / BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN, steps = K / 64, blocks = K / 256;
    const size_t w_bytes = size_t(n_out) * row_bytes;

    float d[MT * R];                                              // m-tile t: d[t R ..]
    #pragma unroll
    for (int i = 0; i < MT * R; ++i) d[i] = 0.0f;

    // prologue: group 0 = W(0), W(1), A(0); groups 1 .. STAGES - 2 = A(1) ..
    gw_load_w<Q, BN, THREADS>(Ws, w, row_bytes, w_bytes, n_out, n0, 0, tid);
    if (blocks > 1) gw_load_w<Q, BN, THREADS>(Ws + L::W, w, row_bytes, w_bytes, n_out, n0, 1, tid);
    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < steps) gw_load_a<BM, THREADS, SWZ>(As + s * L::A, x, K, M, m0, s, tid);
        gw_cp_commit();
    }
    gw_cp_wait<STAGES - 2>();
    __syncthreads();
    gw_decode<Q, BN, THREADS, SWZ>(Bs, Ws, w, row_bytes, n0, 0, tid);
    gw_fence_async();
    __syncthreads();

    for (int s = 0; s < steps; ++s) {
        // 1. the tensor cores take step s
        const u8* a = As + (s % STAGES) * L::A + 64 * 128 * MT * wg;
        const u8* b = Bs + (s & 1) * L::B;
        gw_pin(d);
        gw_mma_fence();
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            #pragma unroll
            for (int t = 0; t < MT; ++t)
                gw_mma<BN>(*reinterpret_cast<float (*)[R]>(d + t * R), gw_desc<SWZ>(a + 64 * 128 * t, kk), gw_desc<SWZ>(b, kk));
        gw_mma_commit();
        gw_pin(d);
        if (s + 1 < steps) {
            gw_mma_wait<1>();                                     // 2. step s - 1 done (this warpgroup)
            gw_pin(d);
            gw_cp_wait<STAGES - 3>();                             // 3. my copies for step s + 1
            __syncthreads();                                      // 4. everyone's
            const int ahead = s + STAGES - 1;                     // 5. refill the slot step s - 1 used
            if (ahead < steps) gw_load_a<BM, THREADS, SWZ>(As + (ahead % STAGES) * L::A, x, K, M, m0, ahead, tid);
            if (((s + 1) & 3) == 0 && (s + 1) / 4 + 1 < blocks) {
                const int j = (s + 1) / 4 + 1;
                gw_load_w<Q, BN, THREADS>(Ws + (j & 1) * L::W, w, row_bytes, w_bytes, n_out, n0, j, tid);
            }
            gw_cp_commit();
            gw_decode<Q, BN, THREADS, SWZ>(Bs + ((s + 1) & 1) * L::B, Ws + (((s + 1) >> 2) & 1) * L::W, w, row_bytes,
                                           n0, s + 1, tid);       // 6.
            gw_fence_async();                                     // 7.
            __syncthreads();
        }
    }
    gw_mma_wait<0>();
    gw_pin(d);
    gw_cp_wait<0>();

    #pragma unroll
    for (int t = 0; t < MT; ++t)                                  // (gw_store_tile adds 64 wg itself)
        gw_store_tile<BN, OUT16>(*reinterpret_cast<const float (*)[R]>(d + t * R), out, ldo, M, n_out,
                                 m0 + 64 * (MT - 1) * wg + 64 * t, n0, tid);
}
