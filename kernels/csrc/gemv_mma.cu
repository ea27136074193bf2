// Q4_K / Q6_K GEMV on int8 activations with the int8 tensor cores (mma.sync), M = 1..8*NT:
//
//   q4k_mma<NT,NW,S,XK>       Q4_K, m16n8k32 per 32-weight sub-block; NW warps split K, cp.async ring
//   q4k_mma_rows<NT,NW,S,XK>  the same, warps split rows instead of K (one x slot per block)
//   q6k_mma<NT,NW>            Q6_K, m16n8k16 per 16-weight sub-block, W straight from global memory
//
// x comes from quantize_x.cu: q8_quantize_frag (per 32) or q8k_quantize_frag (XK, per 256) in
// fragment order for Q4_K, q8_quantize's plain layout for Q6_K.
#include "block_decode.cuh"

// Q4_K x int8 activations on the tensor cores, M = 1..8*NT: mma.sync m16n8k32 (s8 x s8 -> s32),
// one mma per (16 weight rows, 32-weight sub-block, 8 activation rows). A warp owns 16 rows; the
// NW warps of a block split the super-blocks of K and are reduced through shared memory.
//
// Fragments (PTX ISA, m16n8k32 .s8): lane = 4 g + t. A regs: {row g, k 4t..4t+3}, {row g+8, same},
// {row g, k 16+4t..}, {row g+8, k 16+4t..}; B regs: {k 4t.., col g}, {k 16+4t.., col g};
// C: {row g, col 2t}, {row g, col 2t+1}, {row g+8, col 2t}, {row g+8, col 2t+1}.
// The sum over k is order-free, so k is permuted to suit 8-byte loads: mma k = 4t+i is weight
// 8t+i of the sub-block, k = 16+4t+i is weight 8t+4+i -- for W and x alike. Lane t thus reads
// quant bytes 32j + 8t .. +8 (one 8-byte load per row: low nibbles = sub-block 2j, high = 2j+1)
// and x words 8s + 2t, 8s + 2t + 1 of q8 block s.
static __device__ __forceinline__ void mma_s8(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%10, %10, %10, %10};"
                 : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(0));
}

// Store a warp's C fragments of NT 16 x 8 tiles: lane (g, t) holds rows g, g+8 and columns 2t, 2t+1
// (activation rows 8 nt + ...) of the 16 weight rows from row0; atomically when the grid splits K
// over blockIdx.y (out zeroed beforehand).
template <int NT>
static __device__ __forceinline__ void mma_store(const float (&v)[NT][4], float* __restrict__ out, int row0,
                                                 int n_out, int M) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + 8 * (i >> 1), m = 8 * nt + 2 * t + (i & 1);
            if (row < n_out && m < M) {
                if (gridDim.y > 1) atomicAdd(out + size_t(m) * n_out + row, v[nt][i]);
                else out[size_t(m) * n_out + row] = v[nt][i];
            }
        }
}

// Sum the NW warps' C fragments through shared memory; warp 0 stores the 16 x 8 NT tile.
template <int NT, int NW>
static __device__ __forceinline__ void mma_reduce_store(float (&acc)[NT][4], float* __restrict__ out, int row0,
                                                        int n_out, int M) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __shared__ float red[NW][NT * 4][32];
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][nt * 4 + i][lane] = acc[nt][i];
    __syncthreads();
    if (warp != 0) return;
    float v[NT][4];
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[nt][i] = 0.0f;
            #pragma unroll
            for (int k = 0; k < NW; ++k) v[nt][i] += red[k][nt * 4 + i][lane];
        }
    mma_store<NT>(v, out, row0, n_out, M);
}

static __device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    u32 saddr;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(saddr) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(saddr), "l"(gmem) : "memory");
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
static __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// Shared-memory row pitch of a Q4_K super-block (144 bytes used; the padding keeps the fragment
// reads free of bank conflicts).
constexpr int MMA_ROW = 160;
// A super-block row is copied as Q4_K_PIECES 16-byte pieces.
constexpr int Q4_K_PIECES = Q4_K_BYTES / 16;
static_assert(Q4_K_BYTES % 16 == 0 && Q4_K_BYTES <= MMA_ROW, "Q4_K rows are whole 16-byte pieces");

// One super-block of 16 weight rows (W: 16 rows x MMA_ROW bytes in shared memory) against the x
// slot of NT activation tiles (fragments NT x 2048 B, then NT x 512 B of scales), into acc.
// XK = false: x scaled per 32 (q8_quantize_frag: (d, d * sum q) per sub-block and column); each
// sub-block's int32 result is scaled in FP32 (4 conversions and 8 FP32 operations per lane).
// XK = true: x scaled per 256 (q8k_quantize_frag, llama.cpp's Q8_K idea: one d per super-block and
// column, integer sums per sub-block). The 6-bit scales and mins are integers, so a sub-block costs
// 8 integer multiply-adds per lane; FP32 only once per super-block.
template <int NT, bool XK>
static __device__ __forceinline__ void q4k_mma_sb(const u8* __restrict__ wrow, const u8* __restrict__ xs,
                                                  float (&acc)[NT][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    constexpr int X_BYTES = NT * 2048;
    const uint4 hA = *reinterpret_cast<const uint4*>(wrow + g * MMA_ROW);
    const uint4 hB = *reinterpret_cast<const uint4*>(wrow + (g + 8) * MMA_ROW);
    uint2 qa[4], qb[4];
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
        qa[j] = *reinterpret_cast<const uint2*>(wrow + g * MMA_ROW + Q4_K_QS + 32 * j + 8 * t);
        qb[j] = *reinterpret_cast<const uint2*>(wrow + (g + 8) * MMA_ROW + Q4_K_QS + 32 * j + 8 * t);
    }
    const Q4Scales sA = q4k_scales(hA), sB = q4k_scales(hB);
    int ci[NT][4], mi[NT][4];                            // XK: sum of sc * dot, sum of m * sum x (integers)
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int e = 0; e < 4; ++e) ci[nt][e] = mi[nt][e] = 0;
    #pragma unroll
    for (int sub = 0; sub < 8; ++sub) {                  // sub-block: low nibbles of chunk sub/2, or high
        const int j = sub >> 1;
        const u32 sh = 4 * (sub & 1), lo = 0x0F0F0F0Fu;
        const u32 a0 = (qa[j].x >> sh) & lo, a2 = (qa[j].y >> sh) & lo;
        const u32 a1 = (qb[j].x >> sh) & lo, a3 = (qb[j].y >> sh) & lo;
        if constexpr (XK) {
            int scA, mA, scB, mB;
            q4k_sub_int(sA, sub, scA, mA);
            q4k_sub_int(sB, sub, scB, mB);
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const uint2 b = *reinterpret_cast<const uint2*>(xs + nt * 2048 + sub * 256 + 8 * lane);
                const int2 sx = *reinterpret_cast<const int2*>(xs + X_BYTES + nt * 512 + sub * 32 + 8 * t);
                int c[4];
                mma_s8(c, a0, a1, a2, a3, b.x, b.y);
                ci[nt][0] += scA * c[0]; ci[nt][1] += scA * c[1]; ci[nt][2] += scB * c[2]; ci[nt][3] += scB * c[3];
                mi[nt][0] += mA * sx.x;  mi[nt][1] += mA * sx.y;  mi[nt][2] += mB * sx.x;  mi[nt][3] += mB * sx.y;
            }
        } else {
            float DA, MA, DB, MB;
            q4k_sub(sA, sub, DA, MA);
            q4k_sub(sB, sub, DB, MB);
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const uint2 b = *reinterpret_cast<const uint2*>(xs + nt * 2048 + sub * 256 + 8 * lane);
                const float4 dd = *reinterpret_cast<const float4*>(xs + X_BYTES + nt * 512 + sub * 64 + 16 * t);
                int c[4];
                mma_s8(c, a0, a1, a2, a3, b.x, b.y);
                acc[nt][0] = fmaf(DA * dd.x, int_to_float(c[0]), fmaf(-MA, dd.y, acc[nt][0]));
                acc[nt][1] = fmaf(DA * dd.z, int_to_float(c[1]), fmaf(-MA, dd.w, acc[nt][1]));
                acc[nt][2] = fmaf(DB * dd.x, int_to_float(c[2]), fmaf(-MB, dd.y, acc[nt][2]));
                acc[nt][3] = fmaf(DB * dd.z, int_to_float(c[3]), fmaf(-MB, dd.w, acc[nt][3]));
            }
        }
    }
    if constexpr (XK) {
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float2 dx = *reinterpret_cast<const float2*>(xs + X_BYTES + nt * 512 + 256 + 8 * t);
            // |ci| < 8 * 63 * 32 * 15 * 127 < 2^25: __int2float_rn, not the 2^23 trick
            acc[nt][0] = fmaf(dx.x, fmaf(sA.d, __int2float_rn(ci[nt][0]), -sA.dmin * __int2float_rn(mi[nt][0])), acc[nt][0]);
            acc[nt][1] = fmaf(dx.y, fmaf(sA.d, __int2float_rn(ci[nt][1]), -sA.dmin * __int2float_rn(mi[nt][1])), acc[nt][1]);
            acc[nt][2] = fmaf(dx.x, fmaf(sB.d, __int2float_rn(ci[nt][2]), -sB.dmin * __int2float_rn(mi[nt][2])), acc[nt][2]);
            acc[nt][3] = fmaf(dx.y, fmaf(sB.d, __int2float_rn(ci[nt][3]), -sB.dmin * __int2float_rn(mi[nt][3])), acc[nt][3]);
        }
    }
}

// Each warp streams its 16 rows' super-blocks, and the x fragments under them, through a ring of
// shared-memory slots with cp.async (loads in flight hold no registers and the x loads leave the
// critical path). Slot = W: 16 rows x 160 bytes (144 used; the padding keeps the fragment reads
// free of bank conflicts) | xf: NT x 8 sub-blocks x 256 B | ds: NT x 8 x 64 B. STAGES_WANTED slots,
// or as many as 40 KB of shared memory per block allow if fewer; at least 2.
// Split-K: blockIdx.y of gridDim.y takes every gridDim.y-th group of NW super-blocks and adds its
// sums into out atomically (out zeroed beforehand); gridDim.y == 1 stores plainly.
template <int NT, int NW, int STAGES_WANTED = 4, bool XK = false>
static __device__ __forceinline__ void q4k_mma(const u8* __restrict__ w, int row_bytes, int n_out, int K, int M,
                                               const uint2* __restrict__ xf, const float2* __restrict__ dsf,
                                               float* __restrict__ out) {
    constexpr int W_BYTES = 16 * MMA_ROW, X_BYTES = NT * 8 * 256, SLOT = W_BYTES + X_BYTES + NT * 8 * 64;
    constexpr int FIT = 40960 / (NW * SLOT), STAGES = FIT > STAGES_WANTED ? STAGES_WANTED : FIT;
    static_assert(STAGES >= 2, "too many warps for this many activation tiles");
    __shared__ __align__(16) u8 ring[NW][STAGES][SLOT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const int nsb = K >> 8, nsub = K >> 5;
    const int first = blockIdx.y * NW + warp, step = NW * gridDim.y;
    const int mine = nsb > first ? (nsb - first + step - 1) / step : 0;    // super-blocks first, first + step, ...

    // this lane's W pieces (piece c = lane + 32 k of 16 rows x Q4_K_PIECES): offsets fixed per lane, set up once
    constexpr int PIECES = (16 * Q4_K_PIECES + 31) / 32;
    size_t src_off[PIECES];
    int dst_off[PIECES];
    #pragma unroll
    for (int k = 0; k < PIECES; ++k) {
        const int c = min(lane + 32 * k, 16 * Q4_K_PIECES - 1), r = c / Q4_K_PIECES, piece = c - Q4_K_PIECES * r;
        src_off[k] = size_t(min(row0 + r, n_out - 1)) * row_bytes + 16 * piece;
        dst_off[k] = r * MMA_ROW + 16 * piece;
    }
    auto fetch = [&](int i) {                                               // the i-th of this warp's super-blocks
        if (i < mine) {
            const int sb = first + i * step;
            u8* slot = ring[warp][i % STAGES];
            const u8* wsb = w + sb * Q4_K_BYTES;
            #pragma unroll
            for (int k = 0; k < PIECES; ++k)
                if (lane + 32 * k < 16 * Q4_K_PIECES) cp_async16(slot + dst_off[k], wsb + src_off[k]);
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const u8* xs = reinterpret_cast<const u8*>(xf + (nt * nsub + 8 * sb) * 32);
                const u8* ds = reinterpret_cast<const u8*>(dsf + (nt * nsub + 8 * sb) * 8);
                #pragma unroll
                for (int k = 0; k < 4; ++k) cp_async16(slot + W_BYTES + nt * 2048 + 16 * (lane + 32 * k), xs + 16 * (lane + 32 * k));
                cp_async16(slot + W_BYTES + X_BYTES + nt * 512 + 16 * lane, ds + 16 * lane);
            }
        }
        cp_async_commit();                                                  // (possibly empty) group per step
    };

    float acc[NT][4];
    zero(acc);

    #pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) fetch(i);
    for (int i = 0; i < mine; ++i) {
        cp_async_wait<STAGES - 2>();                                        // step i has landed
        __syncwarp();                                                       // ... for every lane; slot i-1 is free
        fetch(i + STAGES - 1);                                              // refill slot (i - 1) % STAGES
        const u8* slot = ring[warp][i % STAGES];
        q4k_mma_sb<NT, XK>(slot, slot + W_BYTES, acc);
    }
    cp_async_wait<0>();
    mma_reduce_store<NT, NW>(acc, out, row0, n_out, M);
}

// The same product with the rows split over the warps instead of K: a block of NW warps owns 16*NW
// consecutive rows (16 per warp) and all its warps walk the same super-blocks, so one x slot per
// block serves NW warps (q4k_mma reloads x for every warp: about as many x bytes from L2 as W
// bytes from DRAM). Slot = W: NW x 16 rows x 160 bytes | xf: NT x 8 x 256 B | ds: NT x 8 x 64 B,
// filled by all threads of the block with cp.async; one __syncthreads per super-block. No
// cross-warp reduction: each warp stores its own rows. Split-K over blockIdx.y as q4k_mma.
template <int NT, int NW, int STAGES_WANTED = 4, bool XK = false>
static __device__ __forceinline__ void q4k_mma_rows(const u8* __restrict__ w, int row_bytes, int n_out, int K, int M,
                                                    const uint2* __restrict__ xf, const float2* __restrict__ dsf,
                                                    float* __restrict__ out) {
    constexpr int W_BYTES = NW * 16 * MMA_ROW, X_BYTES = NT * 8 * 256, SLOT = W_BYTES + X_BYTES + NT * 8 * 64;
    constexpr int FIT = 47104 / SLOT, STAGES = FIT > STAGES_WANTED ? STAGES_WANTED : FIT;
    static_assert(STAGES >= 2, "too many warps for this many activation tiles");
    __shared__ __align__(16) u8 ring[STAGES][SLOT];
    constexpr int THREADS = 32 * NW;
    const int tid = threadIdx.x, warp = tid >> 5;
    const int row0 = blockIdx.x * 16 * NW;
    const int nsb = K >> 8, nsub = K >> 5;
    const int first = blockIdx.y, step = gridDim.y;
    const int mine = nsb > first ? (nsb - first + step - 1) / step : 0;

    // this thread's W pieces (piece c = tid + THREADS k of 16 NW rows x Q4_K_PIECES) and x pieces (c = tid +
    // THREADS k of NT x (128 fragment + 32 scale) pieces): offsets fixed per thread
    constexpr int WP = 16 * NW * Q4_K_PIECES, XP = NT * 160;
    constexpr int W_PIECES = (WP + THREADS - 1) / THREADS, X_PIECES = (XP + THREADS - 1) / THREADS;
    size_t w_src[W_PIECES];
    int w_dst[W_PIECES], x_src[X_PIECES], x_dst[X_PIECES];
    #pragma unroll
    for (int k = 0; k < W_PIECES; ++k) {
        const int c = min(tid + THREADS * k, WP - 1), r = c / Q4_K_PIECES, piece = c - Q4_K_PIECES * r;
        w_src[k] = size_t(min(row0 + r, n_out - 1)) * row_bytes + 16 * piece;
        w_dst[k] = r * MMA_ROW + 16 * piece;
    }
    #pragma unroll
    for (int k = 0; k < X_PIECES; ++k) {
        const int c = min(tid + THREADS * k, XP - 1), nt = c / 160, p = c - 160 * nt;
        // source offsets in bytes relative to super-block 0 of tile nt (fragments, then scales)
        x_src[k] = p < 128 ? nt * nsub * 256 + 16 * p : nt * nsub * 64 + 16 * (p - 128);
        x_dst[k] = p < 128 ? W_BYTES + nt * 2048 + 16 * p : W_BYTES + X_BYTES + nt * 512 + 16 * (p - 128);
    }
    const u8* xfb = reinterpret_cast<const u8*>(xf);
    const u8* dsb = reinterpret_cast<const u8*>(dsf);
    auto fetch = [&](int i) {
        if (i < mine) {
            const int sb = first + i * step;
            u8* slot = ring[i % STAGES];
            const u8* wsb = w + sb * Q4_K_BYTES;
            #pragma unroll
            for (int k = 0; k < W_PIECES; ++k)
                if (tid + THREADS * k < WP) cp_async16(slot + w_dst[k], wsb + w_src[k]);
            #pragma unroll
            for (int k = 0; k < X_PIECES; ++k)
                if (tid + THREADS * k < XP) {
                    const bool frag = x_dst[k] < W_BYTES + X_BYTES;
                    cp_async16(slot + x_dst[k], (frag ? xfb + sb * 2048 : dsb + sb * 512) + x_src[k]);
                }
        }
        cp_async_commit();
    };

    float acc[NT][4];
    zero(acc);

    #pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) fetch(i);
    for (int i = 0; i < mine; ++i) {
        cp_async_wait<STAGES - 2>();                 // this thread's pieces of step i have landed
        __syncthreads();                             // ... and everyone's; slot i-1 is read by all
        fetch(i + STAGES - 1);                       // refill slot (i - 1) % STAGES
        const u8* slot = ring[i % STAGES];
        q4k_mma_sb<NT, XK>(slot + warp * 16 * MMA_ROW, slot + W_BYTES, acc);
    }
    cp_async_wait<0>();
    mma_store<NT>(acc, out, row0 + 16 * warp, n_out, M);
}

// Q6_K x int8 activations on the tensor cores, M = 1..8*NT: mma.sync m16n8k16 (s8 x s8 -> s32), one
// mma per (16 weight rows, 16-weight sub-block with its own scale, 8 activation rows). Q6_K blocks
// are 210 bytes (2-byte aligned), so W is read with 4-byte loads joined by funnel shifts (no ring).
// Fragments (m16n8k16 .s8): A regs {row g, k 4t..4t+3}, {row g+8, same}; B {k 4t.., col g}; C as
// m16n8k32. Sub-block (n, k, h) = weights 128 n + 32 k + 16 h .. +16 of the super-block, scale
// S[8 n + 2 k + h]; lane t takes its weights 4t..4t+3: QL bytes 64 n + 32 (k & 1) + 16 h + 4t (nibble
// k >> 1) and QH bytes 128 + 32 n + 16 h + 4t (bits 2k, 2k+1). x is the plain q8 layout of
// q8_quantize (its 4 int8 at the same positions are one word), its scale that of q8 block 8 sb + 4 n + k.
static __device__ __forceinline__ void mma_s8_k16(int (&c)[4], u32 a0, u32 a1, u32 b0) {
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %7, %7, %7};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(0));
}


template <int NT, int NW>
static __device__ __forceinline__ void q6k_mma(const u8* __restrict__ w, int row_bytes, int n_out, int K, int M,
                                               const u32* __restrict__ xq, const float2* __restrict__ xds,
                                               float* __restrict__ out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const int nsb = K >> 8, kw = K >> 2, kb = K >> 5;
    const int first = blockIdx.y * NW + warp, step = NW * gridDim.y;
    const u8* wA = w + size_t(min(row0 + g, n_out - 1)) * row_bytes;
    const u8* wB = w + size_t(min(row0 + g + 8, n_out - 1)) * row_bytes;
    int xrow[NT], dc0[NT], dc1[NT];                     // B column g; C columns 2t, 2t+1 (clamped to M - 1)
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        xrow[nt] = min(8 * nt + g, M - 1) * kw;
        dc0[nt] = min(8 * nt + 2 * t, M - 1) * kb;
        dc1[nt] = min(8 * nt + 2 * t + 1, M - 1) * kb;
    }
    float acc[NT][4];
    zero(acc);

    for (int sb = first; sb < nsb; sb += step) {
        const u8* bA = wA + sb * Q6_K_BYTES;
        const u8* bB = wB + sb * Q6_K_BYTES;
        u32 qlA[8], qlB[8], qhA[4], qhB[4], scA[4], scB[4];
        #pragma unroll
        for (int i = 0; i < 8; ++i) {                       // i = 4 n + 2 (k & 1) + h
            const int off = Q6_K_QL + 64 * (i >> 2) + 32 * ((i >> 1) & 1) + 16 * (i & 1) + 4 * t;
            qlA[i] = ld4_a2(bA + off);
            qlB[i] = ld4_a2(bB + off);
        }
        #pragma unroll
        for (int i = 0; i < 4; ++i) {                       // i = 2 n + h
            const int off = Q6_K_QH + 32 * (i >> 1) + 16 * (i & 1) + 4 * t;
            qhA[i] = ld4_a2(bA + off);
            qhB[i] = ld4_a2(bB + off);
            scA[i] = ld4_a2(bA + Q6_K_SCALES + 4 * i);
            scB[i] = ld4_a2(bB + Q6_K_SCALES + 4 * i);
        }
        const float dA = half_to_float(__ldg(reinterpret_cast<const u16*>(bA + Q6_K_D)));
        const float dB = half_to_float(__ldg(reinterpret_cast<const u16*>(bB + Q6_K_D)));
        #pragma unroll
        for (int n = 0; n < 2; ++n)
            #pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int blk = 8 * sb + 4 * n + k;
                float dx0[NT], dx1[NT];
                #pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    dx0[nt] = __ldg(xds + dc0[nt] + blk).x;
                    dx1[nt] = __ldg(xds + dc1[nt] + blk).x;
                }
                #pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int qi = 4 * n + 2 * (k & 1) + h, hi = 2 * n + h, sub = 8 * n + 2 * k + h;
                    const u32 lsh = 4 * (k >> 1), hsh = 2 * k;
                    const u32 a0 = __vsub4(((qlA[qi] >> lsh) & 0x0F0F0F0Fu) | (((qhA[hi] >> hsh) & 0x03030303u) << 4), 0x20202020u);
                    const u32 a1 = __vsub4(((qlB[qi] >> lsh) & 0x0F0F0F0Fu) | (((qhB[hi] >> hsh) & 0x03030303u) << 4), 0x20202020u);
                    const int bs = 8 * (sub & 3);
                    const float sA = dA * int_to_float(int(scA[sub >> 2] << (24 - bs)) >> 24);
                    const float sB = dB * int_to_float(int(scB[sub >> 2] << (24 - bs)) >> 24);
                    #pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const u32 b = __ldg(xq + xrow[nt] + 64 * sb + 32 * n + 8 * k + 4 * h + t);
                        int c[4];
                        mma_s8_k16(c, a0, a1, b);
                        acc[nt][0] = fmaf(sA * dx0[nt], int_to_float(c[0]), acc[nt][0]);
                        acc[nt][1] = fmaf(sA * dx1[nt], int_to_float(c[1]), acc[nt][1]);
                        acc[nt][2] = fmaf(sB * dx0[nt], int_to_float(c[2]), acc[nt][2]);
                        acc[nt][3] = fmaf(sB * dx1[nt], int_to_float(c[3]), acc[nt][3]);
                    }
                }
            }
    }
    mma_reduce_store<NT, NW>(acc, out, row0, n_out, M);
}
