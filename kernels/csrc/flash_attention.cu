// Flash attention on the tensor cores: FlashAttention-2's forward and backward with bf16 (or
// fp16) q, k, v and dO, FP32 accumulation (mma.sync.m16n8k16), FP32 outputs. Linked into thin
// Numba kernels by kernels/flash_attention_mma.py (cuda.declare_device(..., link=..., abi="c")),
// compiled by NVRTC at first launch: no headers, conversions and mma through inline PTX.
//
// Why CUDA C and not Numba with inline PTX: the algorithm lives in register fragments (the S tile
// an mma produced is, converted to 16 bits, the A operand of the next mma) and in unrolled loops
// over compile-time tile sizes; Numba has neither register arrays indexed by unrolled constants nor
// 32-bit index arithmetic, so its twin (kernels/flash_attention.py, FP32, one thread per row) is
// the simulator's and the fallback's path, and this file is the fast one.
//
// Layouts (elements are 16-bit: bf16 or fp16 bits; float32 where said):
//   q, dO  [B, T, H, D]     k, v  [B, T, KV, D]     o, dq  float [B, T, H, D]   dk, dv  float [B, T, KV, D]
//   (the forward's template OUT: o float32 (0), or fp16 (1) / bf16 (2) bits, the float32 value rounded to
//   nearest even: what a cast of the float32 o gives, for a product that reads 16 bits anyway)
//   lse, drow  float [B, H, T] (lse natural log, +inf for a query that sees no key; drow = rowsum(dO * O))
//   mask  u8 [B, T] or null (1 = real key). Query head h reads kv head h / (H / KV).
//   Key j is visible to query i iff j <= i, i - j < window (window = T + 1: no window) and mask[b, j].
//
// mma.sync.m16n8k16 fragments (lane = 4 * gid + tig; A 16x16 row-major, B 16x8 "col", C 16x8):
//   a0 = A[gid][2tig..+1]  a1 = A[gid+8][2tig..+1]  a2 = A[gid][2tig+8..+9]  a3 = A[gid+8][2tig+8..+9]
//   b0 = B[2tig..+1][gid]  b1 = B[2tig+8..+9][gid]
//   c0,c1 = C[gid][2tig..+1]  c2,c3 = C[gid+8][2tig..+1]
// so the C fragments of two adjacent n-tiles, packed to 16 bits, are the A fragment of the next
// product with k over those 16 columns (P -> P V, dS^T -> dS^T Q): no trip through shared memory.
//
// fa_forward<D, WARPS, BC, BF16, OUT, MT>: one block per (query tile of 16*MT*WARPS rows, head, batch);
//   warp w owns 16*MT query rows as MT m16 tiles, their Q fragments in registers for the whole block.
//   Key tiles of BC rows of K and V go to shared memory by cp.async in two stages (tile n + 1 lands while
//   tile n is multiplied); fragments come out of shared memory by ldmatrix. Per tile and m-tile: S = Q K^T
//   (registers), masked, online softmax in base 2 (running max m and partial sums l per row; the quad of
//   lanes sharing a row reduce by shuffles), O = O * exp2(m - m') + P V. Each K and V fragment loaded
//   feeds one mma per m-tile: MT = 2 (FlashAttention-2's 32 rows per warp for D = 64) halves the ldmatrix
//   traffic per FLOP and gives each warp two independent softmax chains, for twice the Q, S and O
//   registers (D = 64: 255 registers per thread, 133 with MT = 1; nvcc 13.0, sm_90a). A warp skips a
//   key tile that none of its rows sees; an m-tile that sees none of it (past T, the window's edge; on the
//   diagonal never, with BC a multiple of 32) is multiplied anyway: its P is 0. Tiles entirely above the
//   diagonal or left of the window are never loaded. Query tiles run heaviest first (causal: the last
//   tiles see the most keys).
// fa_backward<D, BC, DSPLIT>: parallel over key tiles and query heads (FlashAttention-2's grid): a
//   block holds one key tile of one query head's kv head and walks the query tiles that see it, with
//   dK and dV in registers. Without GQA (G = H / KV = 1) it is their only writer and stores them;
//   with GQA the G query heads of a kv head each add their share (red.global.add.v2.f32) into a
//   zeroed dk, dv. (A block per kv head looping over its G heads needs no atomics, but at T = 8192
//   with 2 kv heads that is 256 blocks of 4 warps for 132 SMs, the first key tiles doing 128 x 7
//   query tiles in a row: measured 5.9 ms against 0.9 ms for torch's SDPA.) Blocks run heaviest
//   first: the linear block index walks key tiles outermost (tile 0 sees every query), heads
//   innermost. dQ is the sum over key tiles, so it is accumulated
//   with FP32 atomic adds (red.global.add.v2.f32: two columns per instruction) into a zeroed dq,
//   as FlashAttention-2 does: a separate dQ pass would
//   recompute S and dP (2 of the 5 products) for every tile pair, 40 % more tensor work, to buy
//   run-to-run bitwise repeatability. Per query tile (BR = BC rows) of each head:
//     S^T = K Q^T, P^T = exp2(S^T log2e scale - lse_i log2e) masked          (warp: 16 keys)
//     dP^T = V dO^T, dS^T = P^T (dP^T - drow_i)
//     dV += P^T dO, dK += dS^T Q                 (registers; scale applied once at the end)
//     dS -> shared memory (16-bit, [query][key]); dQ_tile = dS K * scale -> atomicAdd (warp: 16 queries)
//   (the next tile's Q and dO are requested by cp.async before the dQ step, which does not read them)
//   dO and drow come scaled by a power of two (*dout_scale, on the device: no host round trip) that
//   puts max |dO| near 1, so fp16 keeps small gradients out of its subnormal range; the results
//   are scaled back on the way out.
//   With DSPLIT > 1 (large D) warps pair up on the same 16 keys, each accumulating D / DSPLIT
//   columns of dK, dV (and of dQ), and recomputing S^T and dP^T: registers for D = 128, 256.
// Shared memory stays under the 48 KB of static allocation (rows padded by 8 elements, so the
// 32-bit fragment loads of 8 rows x 4 columns hit 32 different banks).

#pragma nv_diag_suppress 177

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#define FA_INF __int_as_float(0x7f800000)   // NVRTC without headers has no INFINITY

// mma: c += A B for one 16x16 A and 16x8 B fragment (FP32 accumulation).
// fa_pack: two floats -> one word of 16-bit values, lo in the low half (round to nearest even).
// fa_ldm4: four 8x8 16-bit matrices from shared memory in one instruction: lane l gives the address
//   of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned); r[i] gets matrix i's elements in the
//   C/A fragment order, (row gid, cols 2tig..+1), or with TRANS its transpose, (rows 2tig..+1,
//   col gid): the B fragment of a [k][n] row-major tile.
// fa_smem: a shared-memory address for fa_ldm4. The kernels take a per-thread base once and add
//   constants of the unrolled loops, which ptxas folds into the instruction's offset, so no
//   address per call stays live in a register.
// tests/flash_attention_emulate.cpp defines FA_EMULATE and its own versions of these four (a warp
// of host threads exchanging fragments), to run this file's kernels on the CPU.
#ifndef FA_EMULATE
typedef u32 fa_saddr;

template <bool BF16>
static __device__ __forceinline__ void fa_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <bool BF16>
static __device__ __forceinline__ u32 fa_pack(float lo, float hi) {
    u32 r;
    if (BF16)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));   // first source -> upper half
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x in one MUFU instruction (relative error 2^-22; 2^-inf = 0), as FlashAttention's exp2f under fast math
static __device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// p[0] += a, p[1] += b in global memory, no result (8-byte aligned p): one vector reduction on sm_90
static __device__ __forceinline__ void fa_red2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};" :: "l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

static __device__ __forceinline__ fa_saddr fa_smem(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

template <bool TRANS>
static __device__ __forceinline__ void fa_ldm4(u32 (&r)[4], fa_saddr a) {
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
#endif

// Where lane l points fa_ldm4 for the three fragment shapes, as (row, col) offsets in the tile:
//   A 16x16 at (r0, c0)                 a0..a3:  row r0 + l%8 + 8 (l/8 & 1), col c0 + 8 (l/16)
//   B of two n-tiles from [n][k] rows   b0, b1 of n-tile t, then of t + 1:
//     (n0, k0), n = n0 + l%8 + 8 (l/16), k = k0 + 8 (l/8 & 1)                      (no TRANS)
//   B of two n-tiles from [k][n] rows   (k0, n0), k = k0 + l%8 + 8 (l/8 & 1), n = n0 + 8 (l/16)  (TRANS)
static __device__ __forceinline__ int fa_lm_lo(int lane) { return lane % 8 + 8 * ((lane / 8) & 1); }
static __device__ __forceinline__ int fa_lm_hi(int lane) { return 8 * (lane / 16); }

#ifndef FA_EMULATE
// 16 bytes global -> shared without passing through registers; src_size 0 writes zeros (a row past T)
static __device__ __forceinline__ void fa_cp16(void* smem, const void* g, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(fa_smem(smem)), "l"(g), "r"(valid ? 16 : 0)
                 : "memory");
}
// 4 bytes global -> shared (both 4-byte aligned), zeros where !valid: lse and drow rows
static __device__ __forceinline__ void fa_cp4(void* smem, const void* g, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(fa_smem(smem)), "l"(g), "r"(valid ? 4 : 0)
                 : "memory");
}
static __device__ __forceinline__ void fa_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>   // wait until at most N of this thread's groups are still in flight
static __device__ __forceinline__ void fa_cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
#endif

// the same rows as fa_load_tile, by cp.async (this thread's pieces land by the next fa_cp_wait)
template <int ROWS, int D, int THREADS>
static __device__ __forceinline__ void fa_async_tile(u16 (*tile)[D + 8], const u16* g, int r0, int T, int heads,
                                                     int head, int tid) {
    constexpr int CHUNKS = ROWS * D / 8;
    #pragma unroll
    for (int c = tid; c < CHUNKS; c += THREADS) {
        const int r = c / (D / 8), col = (c % (D / 8)) * 8;
        const bool valid = r0 + r < T;
        fa_cp16(&tile[r][col], valid ? g + (size_t(r0 + r) * heads + head) * D + col : g, valid);
    }
}

// fa_async_tile at a fixed trip count (the forward's K / V tiles): the loop above runs over tid, so nvcc leaves it rolled; past T
// the copy reads 0 bytes (the address is not accessed, as CUTLASS's zfill) and no pointer is selected
template <int ROWS, int D, int THREADS>
static __device__ __forceinline__ void fa_async_tile13(u16 (*tile)[D + 8], const u16* g, int r0, int T, int heads,
                                                       int head, int tid) {
    constexpr int CPR = D / 8, CHUNKS = ROWS * CPR;
    #pragma unroll
    for (int k = 0; k < (CHUNKS + THREADS - 1) / THREADS; ++k) {
        const int c = tid + k * THREADS;
        if (CHUNKS % THREADS != 0 && c >= CHUNKS) break;
        const int r = c / CPR, col = (c % CPR) * 8;
        fa_cp16(&tile[r][col], g + (size_t(r0 + r) * heads + head) * D + col, r0 + r < T);
    }
}

// O *= alpha by row: acc[t][e] holds row e >> 1 of the thread's two rows of an m16 tile
template <int DT>
static __device__ __forceinline__ void fa_rescale(float (&acc)[DT][4], const float (&alpha)[2]) {
    #pragma unroll
    for (int t = 0; t < DT; ++t) {
        acc[t][0] *= alpha[0]; acc[t][1] *= alpha[0];
        acc[t][2] *= alpha[1]; acc[t][3] *= alpha[1];
    }
}

// t[0] = max (SUM = false) or sum (SUM = true) of t[0 .. 2 W) as a tree, unrolled by recursion (a loop whose
// inner bound halves is left rolled by nvcc, and t then lives in local memory)
template <int W, bool SUM, int N>
static __device__ __forceinline__ void fa_tree(float (&t)[N]) {
    if constexpr (W >= 1) {
        #pragma unroll
        for (int n = 0; n < W; ++n) t[n] = SUM ? t[n] + t[n + W] : fmaxf(t[n], t[n + W]);
        fa_tree<W / 2, SUM>(t);
    }
}

// max (SUM = false) or sum (SUM = true) of the thread's 2 NT accumulator values of row r (e >> 1 == r) of an m16 tile
// as a tree: NT is a power of two, and a chain of 2 NT dependent instructions stalls at few warps a scheduler
template <int NT, bool SUM>
static __device__ __forceinline__ float fa_row_reduce(const float (&S)[NT][4], int r) {
    static_assert((NT & (NT - 1)) == 0, "NT a power of two");
    float t[NT];
    #pragma unroll
    for (int n = 0; n < NT; ++n) t[n] = SUM ? S[n][2 * r] + S[n][2 * r + 1] : fmaxf(S[n][2 * r], S[n][2 * r + 1]);
    fa_tree<NT / 2, SUM>(t);
    return t[0];
}

// rows [r0, r0 + ROWS) of a [T, heads, D] matrix of head `head` -> tile [ROWS][D + 8], zero past T
template <int ROWS, int D, int THREADS>
static __device__ __forceinline__ void fa_load_tile(u16 (*tile)[D + 8], const u16* g, int r0, int T, int heads,
                                                    int head, int tid) {
    constexpr int CHUNKS = ROWS * D / 8;                          // 16-byte pieces
    #pragma unroll
    for (int c = tid; c < CHUNKS; c += THREADS) {
        const int r = c / (D / 8), col = (c % (D / 8)) * 8;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (r0 + r < T) val = *reinterpret_cast<const uint4*>(g + (size_t(r0 + r) * heads + head) * D + col);
        *reinterpret_cast<uint4*>(&tile[r][col]) = val;
    }
}

static __device__ __forceinline__ bool fa_visible(int i, int j, int T, int window, const u8* mask_b) {
    return i < T && j <= i && i - j < window && (mask_b == nullptr || mask_b[j]);
}

// A tile that is not fully visible: hidden scores -> -inf (the thread's s[4 n + e] is S[rows[e >> 1]][j0 + 8 n +
// 2 tig + (e & 1)]). Kept out of fa_online_softmax so that fully visible tiles (all but the diagonal, window-edge and
// padded ones) run no per-element test: the caller branches once a tile.
template <int NT>
static __device__ __forceinline__ void fa_mask_tile(float (&S)[NT][4], const int (&rows)[2], int j0, int tig, int T,
                                                int window, const u8* mask_b) {
    #pragma unroll
    for (int n = 0; n < NT; ++n)
        #pragma unroll
        for (int e = 0; e < 4; ++e)
            if (!fa_visible(rows[e >> 1], j0 + 8 * n + 2 * tig + (e & 1), T, window, mask_b)) S[n][e] = -FA_INF;
}

// The online softmax of one tile on the raw scores S (hidden ones -inf), in place: the row max over the thread's
// values (a tree) and the 4 lanes of the row, m (log2 units) = max(m, row max scale log2e), P = exp2(S scale log2e
// - m) (one FFMA and one ex2 an element), alpha = exp2(old m - m), l = l alpha + the thread's part of the row sum.
template <int NT>
static __device__ __forceinline__ void fa_online_softmax(float (&S)[NT][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                                   float sl2) {
    float base[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = fa_row_reduce<NT, false>(S, r);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));           // the 4 lanes of a row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m[r], mx * sl2);                         // sl2 > 0: max(S) sl2 = max(S sl2)
        base[r] = mn == -FA_INF ? 0.f : mn;
        alpha[r] = fa_exp2(m[r] - base[r]);                             // m = -inf: 0
        m[r] = mn;
    }
    #pragma unroll
    for (int n = 0; n < NT; ++n)
        #pragma unroll
        for (int e = 0; e < 4; ++e) S[n][e] = fa_exp2(fmaf(S[n][e], sl2, -base[e >> 1]));   // hidden: exp2(-inf) = 0
    #pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + fa_row_reduce<NT, true>(S, r);
}

// The forward's end for one m16 tile of a warp (rows[r]: the thread's rows gid, gid + 8; acc[t][e] =
// O[rows[e >> 1]][8 t + 2 tig + (e & 1)] unnormalised, m: the row max in log2 units, l: the thread's part
// of the row sum): l summed over the 4 lanes of a row, o = acc / l (float32, or 16 bits as OUT says),
// lse = m ln 2 + ln l (+inf and o = 0 for a row that sees no key). Rows past T are not written.
template <int D, int OUT>
static __device__ __forceinline__ void fa_finish_rows(const float (&acc)[D / 8][4], const float (&m)[2], float (&l)[2],
                                                      const int (&rows)[2], int b, int h, int T, int H, int tig,
                                                      void* o, float* lse) {
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= T) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        const size_t orow = ((size_t(b) * T + rows[r]) * H + h) * D;
        #pragma unroll
        for (int t = 0; t < D / 8; ++t) {
            if (OUT == 0)
                *reinterpret_cast<float2*>(static_cast<float*>(o) + orow + 8 * t + 2 * tig) =
                    make_float2(acc[t][2 * r] * inv, acc[t][2 * r + 1] * inv);
            else                                                 // two 16-bit values in one word
                *reinterpret_cast<u32*>(static_cast<u16*>(o) + orow + 8 * t + 2 * tig) =
                    fa_pack<OUT == 2>(acc[t][2 * r] * inv, acc[t][2 * r + 1] * inv);
        }
        if (tig == 0) lse[(size_t(b) * H + h) * T + rows[r]] = l[r] > 0.f ? m[r] * FA_LN2 + logf(l[r]) : FA_INF;
    }
}

template <int D, int WARPS, int BC, bool BF16, int OUT = 0, int MT = 1>
static __device__ __forceinline__ void fa_forward(const u16* q, const u16* k, const u16* v, const u8* mask, int T,
                                                  int H, int KV, int window, float scale, void* o, float* lse) {
    constexpr int RW = 16 * MT, BR = RW * WARPS, THREADS = 32 * WARPS, KD = D / 16, NT = BC / 8, DT = D / 8;
    __shared__ __align__(16) u16 ks[2][BC][D + 8];                // two stages: tile n+1 lands during tile n
    __shared__ __align__(16) u16 vs[2][BC][D + 8];
    constexpr int STAGE_BYTES = BC * (D + 8) * 2;
    const int tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tig = lane % 4;
    const int kvh = h / (H / KV);
    const int lm_lo = fa_lm_lo(lane), lm_hi = fa_lm_hi(lane);   // this lane's ldmatrix row / column offsets
    const int lm_n = lm_hi + lm_lo % 8, lm_k = lm_lo - lm_lo % 8;   // ... for B from [n][k] rows
    const fa_saddr k_nk0 = fa_smem(&ks[0][lm_n][lm_k]), v_kn0 = fa_smem(&vs[0][lm_lo][lm_hi]);
    const int i0 = tile * BR, wi0 = i0 + RW * warp;               // this warp's rows wi0 .. wi0 + RW - 1
    int rows[MT][2];                                             // m-tile mt: rows wi0 + 16 mt + gid (+ 8)
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) rows[mt][0] = wi0 + 16 * mt + gid, rows[mt][1] = wi0 + 16 * mt + gid + 8;
    const u16* qb = q + size_t(b) * T * H * D;
    const u16* kb = k + size_t(b) * T * KV * D;
    const u16* vb = v + size_t(b) * T * KV * D;
    const u8* mask_b = mask ? mask + size_t(b) * T : nullptr;

    u32 qa[MT][KD][4];                                           // this warp's RW rows of Q as A fragments
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        #pragma unroll
        for (int kk = 0; kk < KD; ++kk)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = rows[mt][e & 1], col = 16 * kk + 2 * tig + 8 * (e >> 1);
                qa[mt][kk][e] = r < T ? *reinterpret_cast<const u32*>(qb + (size_t(r) * H + h) * D + col) : 0u;
            }
    float acc[MT][DT][4];
    float m[MT][2], l[MT][2];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        #pragma unroll
        for (int t = 0; t < DT; ++t) acc[mt][t][0] = acc[mt][t][1] = acc[mt][t][2] = acc[mt][t][3] = 0.f;
        m[mt][0] = m[mt][1] = -FA_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }
    const float sl2 = scale * FA_LOG2E;

    const int i1 = min(T, i0 + BR);
    const int j_first = (max(0, i0 - window + 1) / BC) * BC;
    if (j_first < i1) {
        fa_async_tile13<BC, D, THREADS>(ks[0], kb, j_first, T, KV, kvh, tid);
        fa_async_tile13<BC, D, THREADS>(vs[0], vb, j_first, T, KV, kvh, tid);
    }
    fa_cp_commit();
    for (int j0 = j_first, stage = 0; j0 < i1; j0 += BC, stage ^= 1) {
        if (j0 + BC < i1) {                                      // the next tile into the other stage
            fa_async_tile13<BC, D, THREADS>(ks[stage ^ 1], kb, j0 + BC, T, KV, kvh, tid);
            fa_async_tile13<BC, D, THREADS>(vs[stage ^ 1], vb, j0 + BC, T, KV, kvh, tid);
        }
        fa_cp_commit();                                          // (an empty group on the last tile)
        fa_cp_wait<1>();                                         // this thread's pieces of tile j0 have landed
        __syncthreads();                                         // ... and every thread's
        const fa_saddr k_nk = k_nk0 + stage * STAGE_BYTES, v_kn = v_kn0 + stage * STAGE_BYTES;
        if (wi0 < T && j0 <= wi0 + RW - 1 && wi0 - (j0 + BC - 1) < window) {   // anything visible to this warp
            // (an m-tile that sees none of the tile's keys is multiplied anyway: its P is 0, m and l stay)
            // per m-tile: every (row, key) pair visible (no padding mask, below the diagonal, inside the window)
            bool all_visible[MT];
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int r0 = wi0 + 16 * mt;
                all_visible[mt] = mask_b == nullptr && r0 + 15 < T && j0 + BC - 1 <= r0 && r0 + 15 - j0 < window;
            }
            float s[MT][NT][4];
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int t = 0; t < NT; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.f;
            #pragma unroll
            for (int kk = 0; kk < KD; ++kk)
                #pragma unroll
                for (int t = 0; t < NT; t += 2) {                    // S = Q K^T: K rows are B's columns
                    u32 kf[4];                                       // (one load, an mma per m-tile)
                    fa_ldm4<false>(kf, k_nk + 2 * ((8 * t) * (D + 8) + 16 * kk));
                    #pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        fa_mma<BF16>(s[mt][t], qa[mt][kk], kf[0], kf[1]);
                        fa_mma<BF16>(s[mt][t + 1], qa[mt][kk], kf[2], kf[3]);
                    }
                }
            // one mask branch an m-tile, tree reductions, one FFMA an element
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (!all_visible[mt]) fa_mask_tile<NT>(s[mt], rows[mt], j0, tig, T, window, mask_b);
                float alpha[2];
                fa_online_softmax<NT>(s[mt], m[mt], l[mt], alpha, sl2);
                fa_rescale(acc[mt], alpha);
            }
            #pragma unroll
            for (int kc = 0; kc < BC / 16; ++kc) {                   // O += P V, P from the S registers
                u32 pa[MT][4];
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    pa[mt][0] = fa_pack<BF16>(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                    pa[mt][1] = fa_pack<BF16>(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                    pa[mt][2] = fa_pack<BF16>(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                    pa[mt][3] = fa_pack<BF16>(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
                }
                #pragma unroll
                for (int t = 0; t < DT; t += 2) {
                    u32 vf[4];                                       // (one load, an mma per m-tile)
                    fa_ldm4<true>(vf, v_kn + 2 * ((16 * kc) * (D + 8) + 8 * t));
                    #pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        fa_mma<BF16>(acc[mt][t], pa[mt], vf[0], vf[1]);
                        fa_mma<BF16>(acc[mt][t + 1], pa[mt], vf[2], vf[3]);
                    }
                }
            }
        }
        __syncthreads();                                         // every warp done with this stage before its refill
    }
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) fa_finish_rows<D, OUT>(acc[mt], m[mt], l[mt], rows[mt], b, h, T, H, tig, o, lse);
}

// two columns (at, at + 1) of a key row's dK and dV: stored where one query head owns the kv head (G = 1),
// added where the G query heads of a kv head share it (dk, dv zeroed by the caller)
static __device__ __forceinline__ void fa_put_dkdv(float* dk, float* dv, size_t at, float k0, float k1, float v0,
                                                   float v1, int G) {
    if (G == 1) {
        *reinterpret_cast<float2*>(dk + at) = make_float2(k0, k1);
        *reinterpret_cast<float2*>(dv + at) = make_float2(v0, v1);
    } else {
        fa_red2(dk + at, k0, k1);
        fa_red2(dv + at, v0, v1);
    }
}

// P^T = exp2(S^T scale log2e - lse log2e) in place on a thread's S^T fragments (rows: its keys keys[e >> 1];
// columns: queries i0 + 8 n + 2 tig + (e & 1)); lq: the query tile's lse as the forward wrote it (copied by cp.async;
// rows past T zero, and hidden there). MASKED: hidden pairs get P = 0 by a select (an all-masked query row has
// lse = -inf, so exp2 gives NaN there); unmasked: no visibility test at all (schedule 13 branches once a tile on
// "all visible").
template <int NT, bool MASKED>
static __device__ __forceinline__ void fa_p(float (&S)[NT][4], const float* lq, float sl2, int i0, const int (&keys)[2],
                                            int tig, int T, int window, const u8* mask_b) {
    #pragma unroll
    for (int n = 0; n < NT; ++n)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = 8 * n + 2 * tig + (e & 1);
            float p = fa_exp2(fmaf(S[n][e], sl2, -lq[r] * FA_LOG2E));
            if (MASKED && !fa_visible(i0 + r, keys[e >> 1], T, window, mask_b)) p = 0.f;
            S[n][e] = p;
        }
}

// dS^T = P^T (dP^T - drow) in place on a thread's dP^T fragments (P^T from fa_p; dr: the tile's drow)
template <int NT>
static __device__ __forceinline__ void fa_ds(const float (&P)[NT][4], float (&DP)[NT][4], const float* dr, int tig) {
    #pragma unroll
    for (int n = 0; n < NT; ++n)
        #pragma unroll
        for (int e = 0; e < 4; ++e) DP[n][e] = P[n][e] * (DP[n][e] - dr[8 * n + 2 * tig + (e & 1)]);   // (unscaled)
}

// P^T (fa_p) and dS^T (fa_ds) of a tile whose S^T and dP^T are both done
template <int NT, bool MASKED>
static __device__ __forceinline__ void fa_p_ds(float (&S)[NT][4], float (&DP)[NT][4], const float* lq, const float* dr,
                                               float sl2, int i0, const int (&keys)[2], int tig, int T, int window,
                                               const u8* mask_b) {
    fa_p<NT, MASKED>(S, lq, sl2, i0, keys, tig, T, window, mask_b);
    fa_ds<NT>(S, DP, dr, tig);
}

// lse and drow of the next query tile copied by cp.async with its Q and dO, and P / dS through fa_p_ds with one
// mask branch a tile (schedule 13; schedule 12, which read lse and drow at the top of each tile, is gone). The Q / dO
// loads keep fa_async_tile's loop: they overlap the dQ step, and unrolled (fa_async_tile13) they spilled 156 bytes
// under the 168-register cap (36 so).
template <int D, int BC, int DSPLIT, bool BF16>
static __device__ __forceinline__ void fa_backward(const u16* q, const u16* k, const u16* v, const u16* dout,
                                                   const float* lse, const float* drow, const u8* mask, int T, int H,
                                                   int KV, int window, float scale, const float* dout_scale,
                                                   float* dq, float* dk, float* dv) {
    constexpr int BR = BC, GROUPS = BC / 16, WARPS = GROUPS * DSPLIT, THREADS = 32 * WARPS;
    constexpr int KD = D / 16, NT = BR / 8, DP = D / DSPLIT, DPT = DP / 8;
    __shared__ __align__(16) u16 ks[BC][D + 8];
    __shared__ __align__(16) u16 vs[BC][D + 8];
    __shared__ __align__(16) u16 qs[BR][D + 8];
    __shared__ __align__(16) u16 dos[BR][D + 8];
    __shared__ __align__(16) u16 dss[BR][BC + 8];                // dS [query][key], 16-bit
    __shared__ float ls[BR], drs[BR];                            // lse * log2e, drow of the query tile
    const int G = H / KV, lin = blockIdx.y * gridDim.x + blockIdx.x;   // gridDim.x * gridDim.y = key tiles x H
    const int tile = lin / H, h = lin % H, kvh = h / G, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tig = lane % 4;
    const int grp = warp % GROUPS, d0 = (warp / GROUPS) * DP;   // this warp's 16 keys (queries in the dQ step), columns
    const int lm_lo = fa_lm_lo(lane), lm_hi = fa_lm_hi(lane);   // this lane's ldmatrix row / column offsets
    const int lm_n = lm_hi + lm_lo % 8, lm_k = lm_lo - lm_lo % 8;   // ... for B from [n][k] rows
    const fa_saddr k_a = fa_smem(&ks[16 * grp + lm_lo][lm_hi]), v_a = fa_smem(&vs[16 * grp + lm_lo][lm_hi]);
    const fa_saddr q_nk = fa_smem(&qs[lm_n][lm_k]), do_nk = fa_smem(&dos[lm_n][lm_k]);
    const fa_saddr q_kn = fa_smem(&qs[lm_lo][d0 + lm_hi]), do_kn = fa_smem(&dos[lm_lo][d0 + lm_hi]);
    const fa_saddr ds_a = fa_smem(&dss[16 * grp + lm_lo][lm_hi]), k_kn = fa_smem(&ks[lm_lo][d0 + lm_hi]);
    const int j0 = tile * BC;
    const int keys[2] = {j0 + 16 * grp + gid, j0 + 16 * grp + gid + 8};
    const u16* kb = k + size_t(b) * T * KV * D;
    const u16* vb = v + size_t(b) * T * KV * D;
    const u8* mask_b = mask ? mask + size_t(b) * T : nullptr;
    const float sl2 = scale * FA_LOG2E;
    const float unscale = 1.f / *dout_scale;                    // dO (and drow) arrive multiplied by *dout_scale

    fa_load_tile<BC, D, THREADS>(ks, kb, j0, T, KV, kvh, tid);
    fa_load_tile<BC, D, THREADS>(vs, vb, j0, T, KV, kvh, tid);
    float dka[DPT][4], dva[DPT][4];
    #pragma unroll
    for (int t = 0; t < DPT; ++t)
        #pragma unroll
        for (int e = 0; e < 4; ++e) dka[t][e] = dva[t][e] = 0.f;

    // Query tiles i0 = j0, j0 + BR, .. < i_end of head h. Q and dO of the next tile are requested by
    // cp.async as soon as this tile's products that read them are done, and land while the dQ step
    // runs (it reads dS and K only).
    const int i_end = min(T, j0 + BC - 1 + window);
    const u16* qb = q + size_t(b) * T * H * D;
    const u16* db = dout + size_t(b) * T * H * D;
    fa_async_tile<BR, D, THREADS>(qs, qb, j0, T, H, h, tid);
    fa_async_tile<BR, D, THREADS>(dos, db, j0, T, H, h, tid);
    static_assert(BR <= THREADS, "a thread per query row for lse, drow");
    const float* lse_h = lse + (size_t(b) * H + h) * T;
    const float* drow_h = drow + (size_t(b) * H + h) * T;
    if (tid < BR) {                                             // lse raw, in the tile's group
        fa_cp4(&ls[tid], lse_h + min(j0 + tid, T - 1), j0 + tid < T);
        fa_cp4(&drs[tid], drow_h + min(j0 + tid, T - 1), j0 + tid < T);
    }
    fa_cp_commit();
    {
        for (int i0 = j0; i0 < i_end; i0 += BR) {
            fa_cp_wait<0>();                                     // this thread's pieces of Q, dO have landed
            __syncthreads();                                     // ... every thread's, and ls, drs written

            // every (key, query) pair visible: no padding mask, keys below the diagonal, inside the window
            const bool all_visible = mask_b == nullptr && i0 + BR - 1 < T && j0 + 16 * grp + 15 <= i0 &&
                                     i0 + BR - 1 - (j0 + 16 * grp) < window;
            float s[NT][4], dp[NT][4];                           // S^T, dP^T: rows = this warp's keys, cols = queries
            #pragma unroll
            for (int t = 0; t < NT; ++t)
                #pragma unroll
                for (int e = 0; e < 4; ++e) s[t][e] = dp[t][e] = 0.f;
            #pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                u32 ka[4], va[4];                                // this warp's 16 keys of K and V as A
                fa_ldm4<false>(ka, k_a + 2 * 16 * kk);
                fa_ldm4<false>(va, v_a + 2 * 16 * kk);
                #pragma unroll
                for (int t = 0; t < NT; t += 2) {               // Q and dO rows are B's columns
                    u32 qf[4], df[4];
                    fa_ldm4<false>(qf, q_nk + 2 * ((8 * t) * (D + 8) + 16 * kk));
                    fa_ldm4<false>(df, do_nk + 2 * ((8 * t) * (D + 8) + 16 * kk));
                    fa_mma<BF16>(s[t], ka, qf[0], qf[1]);
                    fa_mma<BF16>(s[t + 1], ka, qf[2], qf[3]);
                    fa_mma<BF16>(dp[t], va, df[0], df[1]);
                    fa_mma<BF16>(dp[t + 1], va, df[2], df[3]);
                }
            }
            if (all_visible) fa_p_ds<NT, false>(s, dp, ls, drs, sl2, i0, keys, tig, T, window, mask_b);
            else fa_p_ds<NT, true>(s, dp, ls, drs, sl2, i0, keys, tig, T, window, mask_b);
            if (d0 == 0) {
                #pragma unroll
                for (int t = 0; t < NT; ++t)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e)
                        dss[8 * t + 2 * tig + (e & 1)][16 * grp + gid + 8 * (e >> 1)] =
                            u16(fa_pack<BF16>(dp[t][e], 0.f) & 0xffffu);
            }
            #pragma unroll
            for (int kc = 0; kc < BR / 16; ++kc) {               // dV += P^T dO, dK += dS^T Q over 16 queries
                const u32 pa[4] = {fa_pack<BF16>(s[2 * kc][0], s[2 * kc][1]), fa_pack<BF16>(s[2 * kc][2], s[2 * kc][3]),
                                   fa_pack<BF16>(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                   fa_pack<BF16>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
                const u32 sa[4] = {fa_pack<BF16>(dp[2 * kc][0], dp[2 * kc][1]),
                                   fa_pack<BF16>(dp[2 * kc][2], dp[2 * kc][3]),
                                   fa_pack<BF16>(dp[2 * kc + 1][0], dp[2 * kc + 1][1]),
                                   fa_pack<BF16>(dp[2 * kc + 1][2], dp[2 * kc + 1][3])};
                #pragma unroll
                for (int t = 0; t < DPT; t += 2) {              // dO and Q rows (queries) are B's k
                    u32 df[4], qf[4];
                    fa_ldm4<true>(df, do_kn + 2 * ((16 * kc) * (D + 8) + 8 * t));
                    fa_ldm4<true>(qf, q_kn + 2 * ((16 * kc) * (D + 8) + 8 * t));
                    fa_mma<BF16>(dva[t], pa, df[0], df[1]);
                    fa_mma<BF16>(dva[t + 1], pa, df[2], df[3]);
                    fa_mma<BF16>(dka[t], sa, qf[0], qf[1]);
                    fa_mma<BF16>(dka[t + 1], sa, qf[2], qf[3]);
                }
            }
            __syncthreads();                                     // dS complete; every warp done with Q, dO

            if (i0 + BR < i_end) {                               // the next query tile into qs, dos
                fa_async_tile<BR, D, THREADS>(qs, qb, i0 + BR, T, H, h, tid);
                fa_async_tile<BR, D, THREADS>(dos, db, i0 + BR, T, H, h, tid);
            }
            if (tid < BR && i0 + BR < i_end) {                 // its lse, drow (every warp is done with ls, drs)
                const int i = i0 + BR + tid;
                fa_cp4(&ls[tid], lse_h + min(i, T - 1), i < T);
                fa_cp4(&drs[tid], drow_h + min(i, T - 1), i < T);
            }
            fa_cp_commit();

            float dqa[DPT][4];                                   // dQ rows = queries 16 grp .. +15 of the tile
            #pragma unroll
            for (int t = 0; t < DPT; ++t) dqa[t][0] = dqa[t][1] = dqa[t][2] = dqa[t][3] = 0.f;
            #pragma unroll
            for (int kc = 0; kc < BC / 16; ++kc) {
                u32 a[4];                                        // dS rows of this warp's 16 queries
                fa_ldm4<false>(a, ds_a + 2 * 16 * kc);
                #pragma unroll
                for (int t = 0; t < DPT; t += 2) {              // K rows (keys) are B's k
                    u32 kf[4];
                    fa_ldm4<true>(kf, k_kn + 2 * ((16 * kc) * (D + 8) + 8 * t));
                    fa_mma<BF16>(dqa[t], a, kf[0], kf[1]);
                    fa_mma<BF16>(dqa[t + 1], a, kf[2], kf[3]);
                }
            }
            #pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = i0 + 16 * grp + gid + 8 * r;
                if (i >= T) continue;
                float* dqrow = dq + ((size_t(b) * T + i) * H + h) * D + d0;
                #pragma unroll
                for (int t = 0; t < DPT; ++t) {
                    fa_red2(dqrow + 8 * t + 2 * tig, dqa[t][2 * r] * (scale * unscale),
                            dqa[t][2 * r + 1] * (scale * unscale));
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (keys[r] >= T) continue;
        const size_t row = (size_t(b) * T + keys[r]) * KV + kvh;
        #pragma unroll
        for (int t = 0; t < DPT; ++t) {
            const int col = d0 + 8 * t + 2 * tig;
            fa_put_dkdv(dk, dv, row * D + col, dka[t][2 * r] * (scale * unscale), dka[t][2 * r + 1] * (scale * unscale),
                        dva[t][2 * r] * unscale, dva[t][2 * r + 1] * unscale, G);
        }
    }
}
