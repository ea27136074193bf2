// Fused prefill GEMM on wgmma with the Q4_K / Q6_K weights decoded into registers (Machete's idea): warp-specialised,
// no __syncthreads in the K loop, no decoded tile in shared memory.
//
//   out[M, N] (fp32 or fp16) = x[M, K] (fp16) @ W[N, K].T,   W: raw Q4_K or Q6_K rows (Q = 4, 6), K % 256 == 0
//
// Why (docs/perf.md, eighteenth stop): gemm_wgmma.cu decodes W into a shared fp16 tile that both warpgroups'
// wgmma read, so every K step needs two __syncthreads, and the same threads issue the cp.async, decode and
// wgmma: ncu (H100, 18944 x 3584, M = 4096) shows 43 % issue utilisation, IMAD / branch / barrier the top of the
// samples, and it runs at 0.39-0.53x cuBLAS. Here the product is computed transposed, out^T = W x^T: W is
// wgmma's A operand, which may come from registers, so each consumer thread decodes exactly the A fragment it
// feeds (8 weights a k16 slice) straight from the raw bytes, and x is the B operand from shared memory.
//
// Warpgroups (384 threads, setmaxnreg 88 / 208: the producer's unrolled copies spill at 56; the consumers use ~195):
//   warpgroup 0 produces: cp.async of x tiles (XS slots) and raw W super-blocks (WS slots), signalled by
//     cp.async.mbarrier.arrive.noinc on full_x[s] / full_w[s] (128 arrivals each)
//   warpgroups 1, 2 consume: warpgroup 1 + c owns W rows n0 + 64 c .. + 64 and all BX x rows of the CTA's tile:
//     BX / 2 FP32 accumulators a thread (m64nBXk16 with the W rows as M, the x rows as N)
//   empty_x[s] (256 arrivals): both consumers' wgmma of the step in slot s are complete; empty_w[s] (256): both
//   consumers have read super-block slot s into registers (the decode; the wgmma never read W from memory).
//
// The K order. A thread of warp w, lane 4 g + i holds A[16 w + g + 8 (e & 1)][2 i + 8 (e >> 1) + (0, 1)] in a[e] (the
// m16n8k16 A fragment): the weights k = 2 i, 2 i + 1 (a[0], a[1]) and 2 i + 8, 2 i + 9 (a[2], a[3]) of slice t, i.e.
// quarter q's weights 16 t + 2 i + (0, 1) and 16 t + 8 + 2 i + (0, 1). In quarter q (64 weights) of a Q4_K
// super-block, byte b of qs chunk q holds weight 64 q + b (low nibble) and 64 q + 32 + b (high nibble): slices 0, 1
// are the low nibbles of bytes 0..15, 16..31 and slices 2, 3 their high nibbles. So a thread reads, per row and
// quarter, the four byte pairs 2 i + 8 u (u < 4) with one 16-bit load each, and pair u feeds slice u / 2 (low
// nibbles) and slice 2 + u / 2 (high nibbles), as k 2 i (u even) or 2 i + 8 (u odd). x stays in its natural order
// (slice t: the 32 bytes 32 t .. of the step's row): a permuted x tile cost twice the L2 sectors and 8 times the
// shared-memory wavefronts of its cp.async (ncu, eighteenth stop: a 32-byte sector's two 16-byte halves went to
// chunks that were not neighbours).

// Decode (per row and slice, in fp16x2, as gemm_wgmma.cu): v = the two bytes, p = byte_perm(v, 0, 0x4140) (byte 0
// in half 0, byte 1 in half 1), lo = (p & 0x000F000F) | 0x64006400, hi = ((p >> 4) & 0x000F000F) | 0x64006400,
// then (h - 1024) exactly, times fp16(d sc) plus -fp16(dmin m) of sub-block 2 q (lo) or 2 q + 1 (hi), one rounding
// (the same numbers as gemm_wgmma.cu's decode, so the same 2e-3 bound).
//
// Shared memory (1024-byte aligned base): X[XS] (BX rows x 128 bytes, 128-byte swizzled K-major), W[WS] (the CTA's
// 128 MT rows of super-block j, GwW<Q>::ROW bytes a row), then the mbarriers. Producer order for step s (64 of K):
// at s = 0 W(0), at s % 4 == 2 W(s / 4 + 1) (a super-block two steps before it is needed), then X(s); it waits for empty_* before
// refilling a slot. Consumer, step s = 4 j + q: (q = 0: wait full_w, read the two rows' scale heads) decode the 4
// slices into a[s % 2] (16 registers; q = 3: arrive on empty_w), wait full_x, wgmma.fence, 4 wgmma (A registers,
// B descriptor + 32 t bytes), commit, wait_group 1 (step s - 1 done: its A registers and x slot are free), arrive on
// empty_x of step s - 1. So the decode of step s + 1 runs while step s is on the tensor cores.
// tests/gemm_wgmma_rs_emulate.cpp runs this file on the CPU (a host thread per CUDA thread, wgmma at its wait, the
// mbarriers performing the copies, the TMA's tile copies by the emulation's own tensor map, the A fragments exchanged
// across the warpgroup), every instantiated shape; kernels/gemm_wgmma_rs_twin.py is its Numba twin for the simulator
// (MT = 1, x by cp.async).
//
// Measured (eighteenth stop, `bench kernels --qtypes Q4_K --m 512 4096`, cuBLAS fp16 on the decoded weights in the
// same run): MT = 1, BX = 256, H100: 0.65-0.84x cuBLAS at M = 4096, 0.40-0.81x at M = 512 (the LM head 0.81x, where
// the scratch path gives 0.57x); gemm_wgmma.cu gives 0.39-0.53x on the same shapes. H200: TMA for x the same as the
// producer's cp.async (0.67-0.83x against 0.68-0.83x). MT = 2 built and checked on the CPU only (no device time left).

#include "gemm_wgmma.cu"

#define GR_REGS 168            // the launch's cap (kernels/linked.py GR_REGISTERS): 65536 / 384
constexpr int GR_PRODUCER_REGS = 88;                            // (at 56 its unrolled copies spilled)
constexpr int GR_CONSUMER_REGS = (384 * GR_REGS - 128 * GR_PRODUCER_REGS) / 256;   // all the producer frees: 208
static_assert(128 * GR_PRODUCER_REGS + 256 * GR_CONSUMER_REGS <= 384 * GR_REGS, "setmaxnreg must fit the launch");

// A staged W row of one super-block is gemm_wgmma.cu's (GwW<Q>::ROW: Q4_K its 144 bytes; Q6_K the 14 chunks covering
// its 2-byte-aligned 210 bytes from the 16-byte boundary below, rows 240 bytes apart).
template <int BX, int XS, int WS, int MT = 1, int Q = 4>
struct GrSmem {
    static constexpr int BW = 128 * MT;                          // W rows a CTA (two consumers of 64 MT)
    static constexpr int X = BX * 128, W = BW * GwW<Q>::ROW;
    static constexpr int X_OFF = 0, W_OFF = XS * X, BAR_OFF = W_OFF + WS * W;
    static constexpr int BYTES = BAR_OFF + 16 * (XS + WS) + 1024;   // + the alignment of the base
    static_assert(X % 1024 == 0, "1024-byte aligned x slots (the swizzle's atoms)");
};

// x rows m0 .. + BX, columns 64 s .. + 64 -> slot xs, 128-byte swizzled K-major (zero rows past M).
// Thread pt (0..127) copies chunk c = pt % 8 of rows pt / 8 + 16 k (a warp: four whole 128-byte rows an
// instruction); the swizzle term r % 8 is the same for all its rows. Unrolled, so that each cp.async has address
// registers of its own: in a rolled loop every cp.async waited for the previous one to release its address
// registers (ncu, eighteenth stop: the producer's loop branch stalled on long_sb, the consumers waited on full_x).
// FULL (every row of the tile below M, the common case) drops the per-row bounds and zero-fill selects: each copy is
// then one address add and the cp.async (the first version spent ~375 producer instructions a warp a step, as many as
// both consumers, and the consumers waited for full_x).
template <int BX, bool FULL>
static __device__ __forceinline__ void gr_load_x(u8* xs, const u16* x, int K, int M, int m0, int s, int pt) {
    const int r = pt >> 3, c = pt & 7;
    u8* const dst = xs + gw_chunk<1>(r, c);
    const u16* const src = x + size_t(m0 + r) * K + 64 * s + 8 * c;
    const size_t step = size_t(16) * K;
    #pragma unroll
    for (int k = 0; k < BX / 16; ++k) {
        if (FULL) {
            gw_cp16(dst + 16 * 128 * k, src + k * step, 16);
        } else {
            const bool ok = m0 + r + 16 * k < M;
            gw_cp16(dst + 16 * 128 * k, ok ? src + k * step : x, ok ? 16 : 0);
        }
    }
}

// super-block j of W rows n0 .. + 128 MT -> slot ws (rows 144 bytes apart): chunk u = pt + 128 k of the 1152 MT is chunk
// u % 9 of row u / 9, so that a warp's copies are consecutive chunks (one row a thread read each 32-byte sector
// twice). off[k]: that chunk's byte offset in W for super-block 0, computed once (gr_w_offsets), rows past n_out
// clamped to the last row (their products land in accumulator rows the epilogue does not store), so that a copy is
// one add and the cp.async. W is below 4 GB (the largest 7B matrix: 306 MB).
template <int MT>
static __device__ __forceinline__ void gr_w_offsets(u32 (&off)[MT * Q4_K_BYTES / 16], int row_bytes, int n_out, int n0,
                                                    int pt) {
    constexpr int CH = Q4_K_BYTES / 16;
    #pragma unroll
    for (int k = 0; k < MT * CH; ++k) {
        const int u = pt + 128 * k, r = u / CH, c = u % CH;
        off[k] = u32(min(n0 + r, n_out - 1)) * u32(row_bytes) + 16u * u32(c);
    }
}
template <int MT>
static __device__ __forceinline__ void gr_load_w(u8* ws, const u8* w, const u32 (&off)[MT * Q4_K_BYTES / 16], int j,
                                                 int pt) {
    const u8* const wj = w + size_t(j) * Q4_K_BYTES;
    #pragma unroll
    for (int k = 0; k < MT * Q4_K_BYTES / 16; ++k) gw_cp16(ws + 16 * (pt + 128 * k), wj + off[k], 16);
}

// Q6_K: super-block j of W rows n0 .. + 128 MT -> slot ws, row r at 240 r: chunk u = pt + 128 k is chunk u % 14 of
// row u / 14, from the row's block's 16-byte boundary (clipped at the end of W; rows past n_out clamped). The offsets
// move with j by 210 bytes and a boundary, so they are computed at each copy. gemm_wgmma.cu's gw_load_w<6, ..> stages
// the same bytes, but unrolled: in the 88-register producer that spilled 264-1032 bytes (link check), so this is its
// rolled form (14 MT copies every four steps).
template <int MT>
static __device__ __forceinline__ void gr_load_w6(u8* ws, const u8* w, int row_bytes, size_t w_bytes, int n_out, int n0,
                                                  int j, int pt) {
    constexpr int CH = GwW<6>::CHUNKS;
    #pragma unroll 1
    for (int k = 0; k < MT * CH; ++k) {
        const int u = pt + 128 * k, r = u / CH, c = u - CH * r;
        const size_t blk = size_t(min(n0 + r, n_out - 1)) * row_bytes + size_t(j) * Q6_K_BYTES;
        const size_t at = (blk & ~size_t(15)) + 16 * size_t(c);
        const int valid = at >= w_bytes ? 0 : (w_bytes - at < 16 ? int(w_bytes - at) : 16);
        gw_cp16(ws + GwW<6>::ROW * r + 16 * c, valid ? w + at : w, valid);
    }
}

// Q6_K's A fragments of quarter q (half n = q / 2 of the super-block, its weights 64 (q % 2) .. + 64) for the rows
// whose blocks start at ba (a[t][0], a[t][2]) and bb (a[t][1], a[t][3]). Slice t takes, of that half's layout
// (block_layouts.cuh), l = 16 (t % 2) + k (k < 16) from QL[l] (t < 2) or QL[32 + l] (t >= 2), nibble q % 2, and the
// bit pair 2 (t / 2) + 4 (q % 2) of QH[l]: its 16 weights share the scale S[4 (q % 2) + t]. Per weight, as gemm_wgmma's
// Q6_K decode: (0x6400 | q6) - 1056 = q6 - 32 exactly, times fp16(d S).
static __device__ __forceinline__ void gr6_decode_quarter(u32 (&a)[4][4], const u8* ba, const u8* bb, int q, int i) {
    const int n = q >> 1, h2 = q & 1;
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        const u8* blk = r ? bb : ba;
        const u8* QL = blk + Q6_K_QL + 64 * n;
        const u8* QH = blk + Q6_K_QH + 32 * n;
        const float d = half_to_float(*reinterpret_cast<const u16*>(blk + Q6_K_D));
        const signed char* S = reinterpret_cast<const signed char*>(blk + Q6_K_SCALES + 8 * n + 4 * h2);
        #pragma unroll
        for (int t = 0; t < 4; ++t) {
            const float sc = d * float(S[t]);
            const u32 dd = pack_half2(sc, sc);
            const int lb = 16 * (t & 1), shl = 4 * h2, shh = 2 * (t >> 1) + 4 * h2;
            #pragma unroll
            for (int hk = 0; hk < 2; ++hk) {                      // k = 2 i, 2 i + 1 (e = r), 2 i + 8, 2 i + 9 (e = 2 + r)
                const u32 ql = *reinterpret_cast<const u16*>(QL + 32 * (t >> 1) + lb + 8 * hk + 2 * i);
                const u32 qh = *reinterpret_cast<const u16*>(QH + lb + 8 * hk + 2 * i);
                const u32 v = ((ql >> shl) & 0x0F0Fu) | (((qh >> shh) & 0x0303u) << 4);
                a[t][2 * hk + r] = h2_mul(h2_sub(__byte_perm(v, 0u, 0x4140u) | 0x64006400u, 0x64206420u), dd);
            }
        }
    }
}

// The fp16x2 (d sc, -dmin m) of sub-blocks 2 q and 2 q + 1 of a row, from its 16-byte head
struct GrScales { u32 d0, m0, d1, m1; };
static __device__ __forceinline__ GrScales gr_scales(const uint4& head, int q) {
    const Q4Scales sc = q4k_scales(head);
    float D0, M0, D1, M1;
    q4k_sub(sc, 2 * q, D0, M0);
    q4k_sub(sc, 2 * q + 1, D1, M1);
    return GrScales{pack_half2(D0, D0), pack_half2(-M0, -M0), pack_half2(D1, D1), pack_half2(-M1, -M1)};
}

// two bytes of qs (v: byte 0 = weight k, byte 1 = weight k + 1) -> the low nibbles' and the high nibbles' fp16x2
static __device__ __forceinline__ void gr_decode_pair(u32 v, const GrScales& s, u32& lo, u32& hi) {
    const u32 p = __byte_perm(v, 0u, 0x4140u);
    lo = h2_fma(h2_sub((p & 0x000F000Fu) | 0x64006400u, 0x64006400u), s.d0, s.m0);
    hi = h2_fma(h2_sub(((p >> 4) & 0x000F000Fu) | 0x64006400u, 0x64006400u), s.d1, s.m1);
}

// the A fragments of quarter q's four slices for rows ra (a[t][0], a[t][2]) and ra + 8 (a[t][1], a[t][3]): byte pair
// u (bytes 2 i + 8 u, + 1) gives slice u / 2 its low nibbles and slice 2 + u / 2 its high nibbles, at e = 2 (u & 1)
static __device__ __forceinline__ void gr_decode_quarter(u32 (&a)[4][4], const u8* qa, const u8* qb, const GrScales& sa,
                                                         const GrScales& sb) {
    #pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int t = u >> 1, e = 2 * (u & 1);
        gr_decode_pair(*reinterpret_cast<const u16*>(qa + 8 * u), sa, a[t][e], a[t + 2][e]);
        gr_decode_pair(*reinterpret_cast<const u16*>(qb + 8 * u), sb, a[t][e + 1], a[t + 2][e + 1]);
    }
}

// d[4 j + e] = out^T[row 16 w + g + 8 (e >> 1)][x row 8 j + 2 i + (e & 1)] of the consumer's 64 W rows -> out
template <int BX, int OUT16>
static __device__ __forceinline__ void gr_store_tile(const float (&d)[BX / 2], void* __restrict__ out, int ldo, int M,
                                                     int n_out, int m0, int nw, int warp, int lane) {
    const int g = lane >> 2, i2 = 2 * (lane & 3);
    #pragma unroll
    for (int j = 0; j < BX / 8; ++j)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int m = m0 + 8 * j + i2 + (e & 1), n = nw + 16 * warp + g + 8 * (e >> 1);
            if (m >= M || n >= n_out) continue;
            const size_t at = size_t(m) * ldo + n;
            if (OUT16) reinterpret_cast<u16*>(out)[at] = u16(pack_half2(d[4 * j + e], 0.0f) & 0xFFFFu);
            else reinterpret_cast<float*>(out)[at] = d[4 * j + e];
        }
}

// out[m * ldo + n] for m < M, n < n_out (float32, or fp16 bits with OUT16); w and x 16-byte aligned, K % 256 == 0.
// Launch: ceil(M / BX) * ceil(n_out / (128 MT)) blocks of 384 threads (register cap GR_REGS), GrSmem<..>::BYTES of
// dynamic shared memory.
// TMA: x's tiles by the tensor-memory accelerator (one cp.async.bulk.tensor of BX rows x 64 a step, issued by one
// producer thread, full_x completed by its bytes; rows past M zero-filled by the copy) through the tensor map at
// `xmap` (fp16 [M, K], box 64 x BX, 128-byte swizzle: the layout gw_chunk<1> describes); else by the producer's
// cp.async as above. With TMA the consumers read x only through wgmma (the async proxy on both sides: no fence).
// MT: 64-row W tiles a consumer warpgroup (W rows 64 (MT c + t) .. + 64 of the CTA's 128 MT, t < MT), each with its
// own BX / 2 accumulators: a K step is then MT groups of four wgmma, group (s, t) decoding into a[(MT s + t) % 2]
// while the group before it is on the tensor cores. MT = 2 with BX = 128 reads x once per 256 W rows instead of 128:
// 1.46x fewer L2 bytes a multiply-add than 128 x 256 (the L2 was the bound: eighteenth stop).
// Q: 4 (Q4_K rows) or 6 (Q6_K: gr_load_w6, gr6_decode_quarter; the same tiles, rings and K order).
template <int BX, int XS, int WS, int OUT16, bool TMA = false, int MT = 1, int Q = 4>
static __device__ __forceinline__ void gemm_wgmma_rs(const u8* __restrict__ w, int row_bytes, int n_out, int K, int M,
                                                     const u16* __restrict__ x, void* __restrict__ out, int ldo,
                                                     const void* xmap = nullptr) {
    using L = GrSmem<BX, XS, WS, MT, Q>;
    static_assert(Q == 4 || Q == 6, "Q4_K or Q6_K rows");
    static_assert(BX == 64 || BX == 128 || BX == 256, "x tiles of 64, 128 or 256 rows (wgmma N)");
    static_assert((MT == 1 || MT == 2) && MT * BX <= 256, "1 or 2 W tiles a warpgroup, <= 128 accumulators a thread");
    static_assert(XS >= 2 && WS >= 2, "two slots at least");
    static_assert(L::BYTES <= 227 * 1024, "dynamic shared memory is at most 227 KB");
    constexpr int CONSUMERS = 256;
    u8* const sm = gw_aligned_smem();
    u8* const Xs = sm + L::X_OFF;
    u8* const Ws = sm + L::W_OFF;
    u64* const full_x = reinterpret_cast<u64*>(sm + L::BAR_OFF);
    u64* const empty_x = full_x + XS;
    u64* const full_w = empty_x + XS;
    u64* const empty_w = full_w + WS;

    const int tid = threadIdx.x, wg = tid >> 7;
    int tm, tn;
    grouped_tile(blockIdx.x, (M + BX - 1) / BX, (n_out + L::BW - 1) / L::BW, tm, tn);
    const int m0 = tm * BX, n0 = tn * L::BW, steps = K / 64, blocks = K / 256;
    if (tid == 0) {
        for (int s = 0; s < XS; ++s) gw_mbar_init(full_x + s, TMA ? 1 : 128), gw_mbar_init(empty_x + s, CONSUMERS);
        for (int s = 0; s < WS; ++s) gw_mbar_init(full_w + s, 128), gw_mbar_init(empty_w + s, CONSUMERS);
    }
    __syncthreads();                                              // (the barriers initialised; none after this)

    if (wg == 0) {                                                // ---- the producer
        gw_regs_dec<GR_PRODUCER_REGS>();
        u32 w_off[Q == 4 ? MT * Q4_K_BYTES / 16 : 1];
        if (Q == 4) gr_w_offsets<MT>(*reinterpret_cast<u32 (*)[MT * Q4_K_BYTES / 16]>(w_off), row_bytes, n_out, n0, tid);
        const size_t w_bytes = size_t(n_out) * row_bytes;
        #pragma unroll 1
        for (int s = 0; s < steps; ++s) {
            const int jw = s == 0 ? 0 : ((s & 3) == 2 && s / 4 + 1 < blocks ? s / 4 + 1 : -1);
            if (jw >= 0) {
                if (jw >= WS) gw_mbar_wait(empty_w + jw % WS, (jw / WS - 1) & 1);
                if (Q == 4) gr_load_w<MT>(Ws + (jw % WS) * L::W, w, *reinterpret_cast<u32 (*)[MT * Q4_K_BYTES / 16]>(w_off),
                                          jw, tid);
                else gr_load_w6<MT>(Ws + (jw % WS) * L::W, w, row_bytes, w_bytes, n_out, n0, jw, tid);
                gw_cp_mbar_arrive(full_w + jw % WS);
            }
            const int xs = s % XS;
            if (TMA) {
                if (tid == 0) {
                    if (s >= XS) gw_mbar_wait(empty_x + xs, (s / XS - 1) & 1);
                    gw_mbar_expect_tx(full_x + xs, BX * 128);
                    gw_tma_2d(Xs + xs * L::X, xmap, 64 * s, m0, full_x + xs);
                }
                continue;
            }
            if (s >= XS) gw_mbar_wait(empty_x + xs, (s / XS - 1) & 1);
            if (m0 + BX <= M) gr_load_x<BX, true>(Xs + xs * L::X, x, K, M, m0, s, tid);
            else gr_load_x<BX, false>(Xs + xs * L::X, x, K, M, m0, s, tid);
            gw_cp_mbar_arrive(full_x + xs);
        }
        gw_cp_wait_all();                                         // (no copy in flight when its threads exit)
        return;
    }

    gw_regs_inc<GR_CONSUMER_REGS>();                              // ---- the consumers
    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, i = lane & 3;
    const int ra = 64 * MT * c + 16 * warp + g;                   // rows ra + 64 t, + 8 of the CTA's 128 MT
    const u64 x_d = gw_make_desc(gw_smem(Xs), 16, 1024, 1);

    u32 row_off[2 * MT];                                          // Q6_K: the rows' byte offsets in W (low bits)
    #pragma unroll
    for (int t = 0; t < 2 * MT; ++t) row_off[t] = u32(min(n0 + ra + 64 * (t >> 1) + 8 * (t & 1), n_out - 1)) * u32(row_bytes);
    float d[MT * BX / 2];                                         // W tile t: d[t BX / 2 ..]
    #pragma unroll
    for (int k = 0; k < MT * BX / 2; ++k) d[k] = 0.0f;
    u32 a[2][4][4];

    int j = 0;
    #pragma unroll 1
    do {                                                          // (blocks >= 1: no zero-trip path, which ptxas
        const int wsl = j % WS;                                   // would take for accumulators defined in flight)
        gw_mbar_wait(full_w + wsl, (j / WS) & 1);
        const u8* const rows = Ws + wsl * L::W + GwW<Q>::ROW * ra;
        #pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int s = 4 * j + q;
            #pragma unroll
            for (int t = 0; t < MT; ++t) {
                u32 (&ag)[4][4] = a[(MT * q + t) & 1];            // (MT q + t has the parity of MT s + t)
                const u8* rowa = rows + 64 * GwW<Q>::ROW * t;
                const u8* rowb = rowa + 8 * GwW<Q>::ROW;
                if (Q == 4) {
                    gr_decode_quarter(ag, rowa + Q4_K_QS + 32 * q + 2 * i, rowb + Q4_K_QS + 32 * q + 2 * i,
                                      gr_scales(*reinterpret_cast<const uint4*>(rowa), q),
                                      gr_scales(*reinterpret_cast<const uint4*>(rowb), q));
                } else {                                          // the blocks' offsets in their staged rows
                    const u32 oa = (row_off[2 * t] + u32(j) * Q6_K_BYTES) & 15u;
                    const u32 ob = (row_off[2 * t + 1] + u32(j) * Q6_K_BYTES) & 15u;
                    gr6_decode_quarter(ag, rowa + oa, rowb + ob, q, i);
                }
                if (q == 3 && t == MT - 1) gw_mbar_arrive(empty_w + wsl);   // super-block j is in registers
                if (t == 0) {
                    gw_mbar_wait(full_x + s % XS, (s / XS) & 1);
                    if (!TMA) gw_fence_async();                   // (cp.async's writes visible to wgmma)
                }
                float (&dt)[BX / 2] = *reinterpret_cast<float (*)[BX / 2]>(d + t * BX / 2);
                gw_pin(d);
                gw_pin(ag);
                gw_mma_fence();
                const u64 xd = gw_desc_add(x_d, (s % XS) * L::X);
                #pragma unroll
                for (int u = 0; u < 4; ++u) gw_mma_rk<BX>(dt, ag[u], gw_desc_add(xd, 32 * u));
                gw_mma_commit();
                gw_pin(d);
                gw_mma_wait<1>();                                 // the group before this one done
                gw_pin(d);
                gw_pin(a[0]);
                gw_pin(a[1]);
                if (t == 0 && s > 0) gw_mbar_arrive(empty_x + (s - 1) % XS);   // (that group was step s - 1's last)
            }
        }
    } while (++j < blocks);
    gw_mma_wait<0>();
    gw_pin(d);
    #pragma unroll
    for (int t = 0; t < MT; ++t)
        gr_store_tile<BX, OUT16>(*reinterpret_cast<const float (*)[BX / 2]>(d + t * BX / 2), out, ldo, M, n_out, m0,
                                 n0 + 64 * (MT * c + t), warp, lane);
}
