// Flash attention forward on Hopper's warpgroup tensor cores (wgmma, sm_90a): FlashAttention-3's
// consumer algorithm without its producer warpgroup. The same problem, masks, outputs and log-sum-exp
// as fa_forward in flash_attention.cu (whose helpers it uses), for head sizes 64 and 128.
//
// Why a second forward: fa_forward issues mma.sync with fragments loaded by ldmatrix, so at most 4
// KB of shared-memory loads feed each warp's 16-row products and the 48 KB static shared memory
// caps its tiles at 64 x 64 (D = 64) and 64 x 32 (D = 128); it measured 100-140 TFLOP/s at T = 8192
// on the H200 (docs/perf.md, sixth and ninth stops), a third of torch's SDPA. wgmma reads both
// operands of S = Q K^T from shared memory itself and P of O += P V from registers, 64 rows per
// warpgroup and up to 256 columns per instruction, from tiles in dynamic shared memory (> 48 KB:
// kernels/_device.launch(shared=)).
//
// Tiling. CTA = NWG warpgroups (128 threads each) over BM = 64 NWG query rows of one head of one
// sequence, walking key tiles of BN keys. Launch: grid (ceil(T / BM), H, B), 128 NWG threads,
// FawSmem<...>::BYTES of dynamic shared memory. Query tiles run heaviest first (causal: the last
// tiles see the most keys); a CTA walks the key tiles from the window's first to its own diagonal.
//
// Shared memory (1024-byte aligned base): Q [BM x D], then STAGES slots of K [BN x D] and V [BN x D].
// All three in one layout: the 16-byte chunk c (columns 8c .. 8c + 7) of row r sits at
//     faw_chunk(r, c) = (c / 8) ROWS 128 + 128 r + 16 ((c % 8) ^ (r % 8))
// i.e. 64-column blocks of 128-byte rows with the 128-byte swizzle; read by the descriptors as
//   Q  (A, K-major):  k16 slice kk of warpgroup g at block kk / 4, row 64 g, + 32 (kk % 4); SBO 1024
//   K  (B, K-major, N = keys):  slice kk at block kk / 4, + 32 (kk % 4); SBO 1024
//   V  (B, MN-major, N = D, K = keys):  keys 16 kc .. + 15 at 2048 kc; SBO 1024 (the next 8 keys),
//      LBO = BN 128 (the next 64 columns of D); imm-trans-b = 1
// (the same bytes, read K-major or MN-major: the 128-byte rows of 64 columns are K-major rows of K
// and MN-major k-rows of V; cute::make_gmma_desc reads them the same way).
//
// The key loop (tile t = keys j_first + BN t; slot t % STAGES; the 16-bit P of tile t - 1 in
// registers pa). Per thread, with the accumulators S [BN / 2] and O [D / 2] (the m64nNk16 layout:
// s[4 n + e] = S[16 w + g + 8 (e >> 1), 8 n + 2 i + (e & 1)]):
//   1. cp.async.wait_group STAGES - 3 (this thread's copies of tile t landed); fence.proxy.async
//      (they are visible to wgmma); __syncthreads (everyone's, and every warpgroup is past the wait
//      that ended tile t - 2's P V: its slot is free)
//   2. cp.async of tile t + STAGES - 2 into that slot; commit
//   3. wgmma.fence; S = Q K_t^T (D / 16 wgmma, the first with scale-d 0); commit
//   4. t > 0: O += P_{t-1} V_{t-1} (BN / 16 wgmma, A = pa); commit
//   5. wgmma.wait_group 1 (S is done; P V still runs): mask, row max (the 4 lanes of a row by
//      shuffles), P = exp2(S log2e scale - m) in place, l = l alpha + row sums
//   6. wgmma.wait_group 0: O *= alpha (O holds P_{t-1} V_{t-1}, in the old max's units); pa = P
// after the last tile: O += P V of it; O / l -> o, m + log l -> lse.
// Step 5's exponentials run while the tensor cores do step 4 (FlashAttention-3's intra-warpgroup
// overlap); the two warpgroups share the K/V slots and meet at step 1's barrier.
// tests/flash_attention_wgmma_emulate.cpp runs this file on the CPU (cp.async and wgmma deferred to
// their waits, descriptors decoded by the PTX manual's rules).
#include "flash_attention.cu"
#include "wgmma_ptx.cuh"

template <int D, int BN, int NWG, int STAGES>
struct FawSmem {
    static constexpr int BM = 64 * NWG;
    static constexpr int Q = BM * D * 2, KV = BN * D * 2;           // bytes: the Q tile, one K (or V) tile
    static constexpr int Q_OFF = 0, K_OFF = Q, V_OFF = Q + STAGES * KV;
    static constexpr int BYTES = V_OFF + STAGES * KV + 1024;         // + the alignment of the base
    static_assert(Q % 1024 == 0 && KV % 1024 == 0, "1024-byte aligned tiles");
};

// byte offset of the 16-byte chunk c (columns 8c .. 8c + 7) of row r in a tile of ROWS rows
template <int ROWS>
static __device__ __forceinline__ u32 faw_chunk(int r, int c) {
    return u32((c >> 3) * ROWS * 128 + 128 * r + 16 * ((c & 7) ^ (r & 7)));
}

// rows r0 .. r0 + ROWS of head `head` of a [T, heads, D] matrix -> tile (zero rows past T), by cp.async. Thread tid
// copies chunk tid % CH of rows tid / CH + k THREADS / CH: a fixed trip count (it unrolls whatever tid is), one
// global pointer stepped by a row stride, and shared offsets that differ by constants (THREADS / CH is a multiple
// of 8, so the swizzle's r % 8 is the same for all k)
template <int ROWS, int D, int THREADS>
static __device__ __forceinline__ void faw_load(u8* tile, const u16* g, int r0, int T, int heads, int head, int tid) {
    constexpr int CH = D / 8, N = ROWS * CH, RS = THREADS / CH;
    static_assert(N % THREADS == 0 && THREADS % CH == 0 && RS % 8 == 0, "every thread copies the same chunk column");
    const int rr = tid / CH, c = tid % CH;
    const size_t stride = size_t(heads) * D;
    const u16* p = g + size_t(r0 + rr) * stride + size_t(head) * D + 8 * c;
    u8* const t = tile + faw_chunk<ROWS>(rr, c);
    #pragma unroll
    for (int k = 0; k < N / THREADS; ++k)   // past T: 0 bytes read, 16 zeroed (the address is not accessed, as CUTLASS's zfill)
        gw_cp16(t + k * RS * 128, p + size_t(k * RS) * stride, r0 + rr + k * RS < T ? 16 : 0);
}

// faw_load for the warp-specialised forward's producer, whose threads keep 40 registers (setmaxnreg): the same copies,
// in a loop left rolled, each row's address one pointer step from the last. Unrolled, ptxas kept the 16 row offsets
// k RS stride of a K / V tile as 64-bit values across the tile loop; nvJitLink 13.0's ptxas (the GPU image's) then
// spilled 20 registers of the producer, reloaded every tile (ncu, H200, seventeenth stop)
template <int ROWS, int D, int THREADS>
static __device__ __forceinline__ void faw_load_lean(u8* tile, const u16* g, int r0, int T, int heads, int head, int tid) {
    constexpr int CH = D / 8, N = ROWS * CH, RS = THREADS / CH;
    static_assert(N % THREADS == 0 && THREADS % CH == 0 && RS % 8 == 0, "every thread copies the same chunk column");
    const int rr = tid / CH, c = tid % CH;
    const size_t step = size_t(heads) * D * RS;
    const u16* p = g + size_t(r0 + rr) * heads * D + size_t(head) * D + 8 * c;
    u8* t = tile + faw_chunk<ROWS>(rr, c);
    int r = r0 + rr;
    #pragma unroll 1
    for (int k = 0; k < N / THREADS; ++k, p += step, t += RS * 128, r += RS)
        gw_cp16(t, p, r < T ? 16 : 0);
}

// S = Q K^T of this warpgroup's 64 rows against a K tile (D / 16 wgmma, the first with scale-d 0) and O += P V over a
// tile of BN keys (BN / 16 wgmma, P's A fragments from registers, V MN-major), from descriptors built once: qd, kd,
// vd describe the tiles' first bytes and each instruction's operand is gw_desc_add of a constant from them
// (gw_make_desc per instruction, the twelfth stop's form, cost ~9 uniform-datapath instructions: 158 a tile in the
// linked SASS for 16 wgmma)
template <int D, int BN, int BM, bool BF16>
static __device__ __forceinline__ void faw_qk_d(float (&s)[BN / 2], u64 qd, u64 kd) {
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        gw_mma<BN, BF16>(s, gw_desc_add(qd, (kk >> 2) * BM * 128 + 32 * (kk & 3)),
                         gw_desc_add(kd, (kk >> 2) * BN * 128 + 32 * (kk & 3)), kk > 0);
}
template <int D, int BN, bool BF16>
static __device__ __forceinline__ void faw_pv_d(float (&acc)[D / 2], const u32 (&pa)[BN / 16][4], u64 vd) {
    #pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) gw_mma_rs<D, BF16>(acc, pa[kc], gw_desc_add(vd, 2048 * kc));
}

// (schedule 13's mask and online softmax of a tile: fa_mask_tile, fa_online_softmax in flash_attention.cu)
// (the row reductions as trees: fa_row_reduce, flash_attention.cu)
// O *= alpha (per row), and P (= S after the softmax) to 16 bits as the A fragments of keys 16 kc ..
template <int NT, int DT, bool BF16>
static __device__ __forceinline__ void faw_rescale_pack(float (&O)[DT][4], const float (&S)[NT][4], u32 (&pa)[NT / 2][4],
                                                        const float (&alpha)[2]) {
    fa_rescale(O, alpha);
    #pragma unroll
    for (int kc = 0; kc < NT / 2; ++kc) {
        pa[kc][0] = fa_pack<BF16>(S[2 * kc][0], S[2 * kc][1]);
        pa[kc][1] = fa_pack<BF16>(S[2 * kc][2], S[2 * kc][3]);
        pa[kc][2] = fa_pack<BF16>(S[2 * kc + 1][0], S[2 * kc + 1][1]);
        pa[kc][3] = fa_pack<BF16>(S[2 * kc + 1][2], S[2 * kc + 1][3]);
    }
}

template <int D, int BN, int NWG, int STAGES, bool BF16, int OUT = 0>
static __device__ __forceinline__ void faw_forward(const u16* q, const u16* k, const u16* v, const u8* mask, int T,
                                                   int H, int KV, int window, float scale, void* o, float* lse) {
    using L = FawSmem<D, BN, NWG, STAGES>;
    constexpr int BM = L::BM, THREADS = 128 * NWG, NT = BN / 8, DT = D / 8;
    static_assert(D == 64 || D == 128, "head sizes 64 and 128 (O's wgmma is m64nDk16)");
    static_assert(BN == 64 || BN == 128, "key tiles of 64 or 128");
    static_assert(STAGES >= 3 && NWG >= 1 && NWG <= 2, "3+ slots: tile t - 1's V is read while t + STAGES - 2 lands");
    static_assert(L::BYTES <= 227 * 1024, "dynamic shared memory is at most 227 KB");
    u8* const sm = gw_aligned_smem();
    u8* const Qs = sm + L::Q_OFF;
    u8* const Ks = sm + L::K_OFF;
    u8* const Vs = sm + L::V_OFF;

    const int tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int kvh = h / (H / KV);
    const int i0 = tile * BM, r0 = i0 + 64 * wg + 16 * warp;      // this warp's rows r0 .. r0 + 15
    const int rows[2] = {r0 + gid, r0 + gid + 8};
    const u16* kb = k + size_t(b) * T * KV * D;
    const u16* vb = v + size_t(b) * T * KV * D;
    const u8* mask_b = mask ? mask + size_t(b) * T : nullptr;
    const float sl2 = scale * FA_LOG2E;

    const int i1 = min(T, i0 + BM);
    const int j_first = (max(0, i0 - window + 1) / BN) * BN;
    const int ntiles = (i1 - j_first + BN - 1) / BN;              // >= 1: i0 < T

    // prologue: group 0 = Q and tile 0, groups 1 .. STAGES - 3 = tiles 1 ..
    faw_load<BM, D, THREADS>(Qs, q + size_t(b) * T * H * D, i0, T, H, h, tid);
    #pragma unroll
    for (int t = 0; t < STAGES - 2; ++t) {
        if (t < ntiles) {
            faw_load<BN, D, THREADS>(Ks + t * L::KV, kb, j_first + BN * t, T, KV, kvh, tid);
            faw_load<BN, D, THREADS>(Vs + t * L::KV, vb, j_first + BN * t, T, KV, kvh, tid);
        }
        gw_cp_commit();
    }

    const u32 q_at = gw_smem(Qs) + 64 * 128 * wg;
    const u64 q_d = gw_make_desc(q_at, 16, 1024, 1), k_d = gw_make_desc(gw_smem(Ks), 16, 1024, 1),
              v_d = gw_make_desc(gw_smem(Vs), BN * 128, 1024, 1);
    float s[BN / 2], acc[D / 2];
    u32 pa[BN / 16][4];
    float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f}, alpha[2];
    #pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
    #pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    float (&S)[NT][4] = reinterpret_cast<float (&)[NT][4]>(s);
    float (&O)[DT][4] = reinterpret_cast<float (&)[DT][4]>(acc);

    // Tile t. Tile 0 has no previous tile's P V: it multiplies P = 0 (pa zeroed) by tile 0's V instead, so that
    // every iteration issues the same two wgmma groups (a group issued in a branch of its own makes ptxas
    // serialise the pipeline; NVRTC compiles no lambda to give tile 0 its own copy of the body). V is finite
    // (rows past T are zero-filled), so 0 V adds zeros to the zero O.
    #pragma unroll
    for (int i = 0; i < BN / 16; ++i) pa[i][0] = pa[i][1] = pa[i][2] = pa[i][3] = 0u;
    for (int t = 0; t < ntiles; ++t) {
        const int j0 = j_first + BN * t;
        gw_cp_wait<STAGES - 3>();                                  // 1.
        gw_fence_async();
        __syncthreads();
        // 3., 4. before 2.: the tensor cores start while the copies are issued
        gw_pin(s);
        gw_pin(acc);
        gw_pin(pa);
        gw_mma_fence();
        faw_qk_d<D, BN, BM, BF16>(s, q_d, gw_desc_add(k_d, (t % STAGES) * L::KV));
        gw_mma_commit();
        faw_pv_d<D, BN, BF16>(acc, pa, gw_desc_add(v_d, (t == 0 ? 0 : (t - 1) % STAGES) * L::KV));
        gw_mma_commit();
        if (t + STAGES - 2 < ntiles) {                             // 2.
            const int ahead = t + STAGES - 2, at = ahead % STAGES;
            faw_load<BN, D, THREADS>(Ks + at * L::KV, kb, j_first + BN * ahead, T, KV, kvh, tid);
            faw_load<BN, D, THREADS>(Vs + at * L::KV, vb, j_first + BN * ahead, T, KV, kvh, tid);
        }
        gw_cp_commit();

        gw_mma_wait<1>();                                          // 5.
        gw_pin(s);
        // every (row, key) pair of this warp's 16 rows visible: no padding mask, below the diagonal, inside the window
        const bool all_visible = mask_b == nullptr && r0 + 15 < T && j0 + BN - 1 <= r0 && r0 + 15 - j0 < window;
        if (!all_visible) fa_mask_tile<NT>(S, rows, j0, tig, T, window, mask_b);
        fa_online_softmax<NT>(S, m, l, alpha, sl2);
        gw_pin(s);                                                 // the softmax stays before the wait below (else
        gw_pin(l);                                                 // the compilers move it after, and P V no longer
        gw_pin(alpha);                                             // hides its exponentials, as in the twelfth
        gw_schedule_fence();                                       // stop's kernel)
        gw_mma_wait<0>();                                          // 6.
        gw_pin(acc);
        gw_pin(pa);
        faw_rescale_pack<NT, DT, BF16>(O, S, pa, alpha);
    }
    gw_pin(acc);                                                   // the last tile's P V
    gw_pin(pa);
    gw_mma_fence();
    faw_pv_d<D, BN, BF16>(acc, pa, gw_desc_add(v_d, ((ntiles - 1) % STAGES) * L::KV));
    gw_mma_commit();
    gw_mma_wait<0>();
    gw_pin(acc);
    gw_pin(pa);
    gw_cp_wait<0>();
    fa_finish_rows<D, OUT>(O, m, l, rows, b, h, T, H, tig, o, lse);
}

// ==== The warp-specialised forward (schedule 15) ===================================================
// faw_forward_ws: FlashAttention-3's forward structure on schedule 13's tile math. Three warpgroups: warpgroup 2
// produces (it copies Q and the K / V tiles by cp.async into STAGES slots and keeps 40 registers a thread:
// setmaxnreg), warpgroups 0 and 1 consume (64 query rows each, 232 registers). No __syncthreads in the loop:
//   full[s]   mbarrier, 128 arrivals: the producer's cp.async of the tile in slot s have landed
//             (cp.async.mbarrier.arrive.noinc); consumers wait for its phase (tile t: parity (t / STAGES) & 1)
//   empty[s]  mbarrier, 256 arrivals: every consumer thread is past its wait for P V of the tile in slot s; the
//             producer waits for it before refilling the slot (tile t: parity (t / STAGES - 1) & 1)
//   named barriers 1, 2 (256 threads): ping-pong between the consumers, so that one warpgroup's products run on
//             the tensor cores while the other's softmax runs on the CUDA cores: warpgroup w waits on barrier
//             1 + w before issuing its tile's two products and then arrives on the other's (warpgroup 1 arrives
//             once first, so warpgroup 0 starts; it skips its arrival after the last tile, so counts match)
// A consumer's tile is schedule 13's (faw_forward): S = Q K_t^T and O += P_{t-1} V_{t-1} issued together, the
// mask and online softmax between the waits for S and for P V, then O rescaled and P packed. Launch: 384 threads,
// built with a cap of 168 registers (65536 / 384; setmaxnreg moves them), FawWsSmem::BYTES of dynamic shared memory.
// setmaxnreg.inc waits until the CTA's pool has the registers: the split must fit what the launch holds (FAW_WS_REGS
// x 384). The sixteenth stop's 48 / 232 asked 512 a producer thread and two consumer threads against 504 and hung on
// an H200 (the consumers' inc waited forever); 40 / 232 is CUTLASS's split for one producer and two consumers.
#define FAW_WS_REGS 168            // the launch's cap (kernels/flash_attention_mma.py WS_REGISTERS)
constexpr int FAW_WS_PRODUCER_REGS = 40, FAW_WS_CONSUMER_REGS = 232;
static_assert(128 * FAW_WS_PRODUCER_REGS + 256 * FAW_WS_CONSUMER_REGS <= 384 * FAW_WS_REGS,
              "setmaxnreg: the producer's and consumers' registers must fit the launch's (else the inc hangs)");
template <int D, int BN, int STAGES>
struct FawWsSmem {
    using L = FawSmem<D, BN, 2, STAGES>;
    static constexpr int BAR_OFF = L::BYTES - 1024;                  // after the K / V slots (8-byte aligned)
    static constexpr int BYTES = L::BYTES + 8 * (2 * STAGES + 1);
};

template <int D, int BN, int STAGES, bool BF16, int OUT = 0>
static __device__ __forceinline__ void faw_forward_ws(const u16* q, const u16* k, const u16* v, const u8* mask, int T,
                                                      int H, int KV, int window, float scale, void* o, float* lse) {
    using L = FawSmem<D, BN, 2, STAGES>;
    using W = FawWsSmem<D, BN, STAGES>;
    constexpr int BM = L::BM, NT = BN / 8, DT = D / 8, CONSUMERS = 256;
    static_assert(D == 64 || D == 128, "head sizes 64 and 128");
    static_assert(BN == 64 || BN == 128, "key tiles of 64 or 128");
    static_assert(STAGES >= 2, "two slots at least");
    static_assert(W::BYTES <= 227 * 1024, "dynamic shared memory is at most 227 KB");
    u8* const sm = gw_aligned_smem();
    u8* const Qs = sm + L::Q_OFF;
    u8* const Ks = sm + L::K_OFF;
    u8* const Vs = sm + L::V_OFF;
    u64* const full = reinterpret_cast<u64*>(sm + W::BAR_OFF);
    u64* const empty = full + STAGES;
    u64* const qbar = empty + STAGES;

    const int tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, wg = tid >> 7;
    const int kvh = h / (H / KV);
    const int i0 = tile * BM, i1 = min(T, i0 + BM);
    const int j_first = (max(0, i0 - window + 1) / BN) * BN;
    const int ntiles = (i1 - j_first + BN - 1) / BN;              // >= 1: i0 < T
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) gw_mbar_init(full + s, 128), gw_mbar_init(empty + s, CONSUMERS);
        gw_mbar_init(qbar, 128);
    }
    __syncthreads();                                               // (the barriers initialised; none after this)

    if (wg == 2) {                                                 // ---- the producer
        gw_regs_dec<FAW_WS_PRODUCER_REGS>();
        const int pt = tid - CONSUMERS;
        const u16* kb = k + size_t(b) * T * KV * D;
        const u16* vb = v + size_t(b) * T * KV * D;
        faw_load_lean<BM, D, 128>(Qs, q + size_t(b) * T * H * D, i0, T, H, h, pt);
        gw_cp_mbar_arrive(qbar);
        for (int t = 0; t < ntiles; ++t) {
            const int s = t % STAGES;
            if (t >= STAGES) gw_mbar_wait(empty + s, (t / STAGES - 1) & 1);
            faw_load_lean<BN, D, 128>(Ks + s * L::KV, kb, j_first + BN * t, T, KV, kvh, pt);
            faw_load_lean<BN, D, 128>(Vs + s * L::KV, vb, j_first + BN * t, T, KV, kvh, pt);
            gw_cp_mbar_arrive(full + s);
        }
        gw_cp_wait_all();                                          // (no copy in flight when its threads exit)
        return;
    }

    gw_regs_inc<FAW_WS_CONSUMER_REGS>();                           // ---- the consumers
    const int warp = (tid >> 5) & 3, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int r0 = i0 + 64 * wg + 16 * warp;                       // this warp's rows r0 .. r0 + 15
    const int rows[2] = {r0 + gid, r0 + gid + 8};
    const u8* mask_b = mask ? mask + size_t(b) * T : nullptr;
    const float sl2 = scale * FA_LOG2E;
    const u64 q_d = gw_make_desc(gw_smem(Qs) + 64 * 128 * wg, 16, 1024, 1), k_d = gw_make_desc(gw_smem(Ks), 16, 1024, 1),
              v_d = gw_make_desc(gw_smem(Vs), BN * 128, 1024, 1);

    float s[BN / 2], acc[D / 2];
    u32 pa[BN / 16][4];
    float m[2] = {-FA_INF, -FA_INF}, l[2] = {0.f, 0.f}, alpha[2];
    #pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
    #pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    #pragma unroll
    for (int i = 0; i < BN / 16; ++i) pa[i][0] = pa[i][1] = pa[i][2] = pa[i][3] = 0u;
    float (&S)[NT][4] = reinterpret_cast<float (&)[NT][4]>(s);
    float (&O)[DT][4] = reinterpret_cast<float (&)[DT][4]>(acc);

    gw_mbar_wait(qbar, 0);
    gw_fence_async();
    if (wg == 1) gw_bar_arrive(1, CONSUMERS);                      // warpgroup 0 issues first
    int t = 0;
    do {                                                           // (ntiles >= 1: no zero-trip path)
        const int j0 = j_first + BN * t, st = t % STAGES;
        gw_mbar_wait(full + st, (t / STAGES) & 1);                 // tile t landed
        gw_fence_async();
        gw_bar_sync(1 + wg, CONSUMERS);                            // my turn at the tensor cores
        gw_pin(s);
        gw_pin(acc);
        gw_pin(pa);
        gw_mma_fence();
        faw_qk_d<D, BN, BM, BF16>(s, q_d, gw_desc_add(k_d, st * L::KV));
        gw_mma_commit();
        faw_pv_d<D, BN, BF16>(acc, pa, gw_desc_add(v_d, (t == 0 ? 0 : (t - 1) % STAGES) * L::KV));
        gw_mma_commit();                                           // (tile 0: P = 0 times its own V)
        if (wg == 0 || t + 1 < ntiles) gw_bar_arrive(2 - wg, CONSUMERS);   // the other's turn
        gw_mma_wait<1>();
        gw_pin(s);
        const bool all_visible = mask_b == nullptr && r0 + 15 < T && j0 + BN - 1 <= r0 && r0 + 15 - j0 < window;
        if (!all_visible) fa_mask_tile<NT>(S, rows, j0, tig, T, window, mask_b);
        fa_online_softmax<NT>(S, m, l, alpha, sl2);
        gw_pin(s);
        gw_pin(l);
        gw_pin(alpha);
        gw_schedule_fence();                                       // (the exponentials stay before the wait: 13)
        gw_mma_wait<0>();
        gw_pin(acc);
        gw_pin(pa);
        if (t > 0) gw_mbar_arrive(empty + (t - 1) % STAGES);       // P V of tile t - 1 done: its slot is free
        faw_rescale_pack<NT, DT, BF16>(O, S, pa, alpha);
    } while (++t < ntiles);
    gw_pin(acc);                                                   // the last tile's P V
    gw_pin(pa);
    gw_mma_fence();
    faw_pv_d<D, BN, BF16>(acc, pa, gw_desc_add(v_d, ((ntiles - 1) % STAGES) * L::KV));
    gw_mma_commit();
    gw_mma_wait<0>();
    gw_pin(acc);
    gw_pin(pa);
    fa_finish_rows<D, OUT>(O, m, l, rows, b, h, T, H, tig, o, lse);
}

// ==== The backward =================================================================================
// faw_backward<D, BF16>: FlashAttention-2's grid as fa_backward has it (a CTA per key tile of BN = 128
// keys and query head, heaviest key tiles first; dQ and, under GQA, dK / dV added with
// red.global.add.v2.f32 into zeroed buffers), FlashAttention-3's products on wgmma. Two warpgroups, each
// owning 64 of the keys, walk the query tiles of BM = 64 queries that see the key tile; K and V stay in
// shared memory. The steps below are a query tile's products in the twelfth stop's unpipelined order (its
// kernel, with Q, dO of tile i + 1 in the other of two stages, went with schedule 12 in the nineteenth stop);
// faw_backward_v13 pipelines the same steps. Per query tile, per warpgroup (keys 64 w ..; accumulators in the
// m64nNk16 layout):
//   1. cp.async.wait_group 0, fence.proxy.async, __syncthreads (tile i landed everywhere; everyone is
//      past tile i - 1's last wgmma wait, so its stage and the dS tile are free)
//   2. cp.async of Q, dO of tile i + 1 into the other stage; lse, drow of tile i + 1 read into registers
//   3. S^T = K_w Q^T and dP^T = V_w dO^T (SS, K-major, N = 64 queries; one group); wait
//   4. P^T = exp2(S^T scale log2e - lse log2e) masked, dS^T = P^T (dP^T - drow) (registers)
//   5. P^T and dS^T to 16-bit A fragments; dS^T to shared memory ([key][query]: 128-byte rows, swizzled)
//   6. dV += P^T dO and dK += dS^T Q (RS: B = dO, Q MN-major, N = D); commit (not waited yet)
//   7. fence.proxy.async, __syncthreads (both warpgroups' dS written)
//   8. D = 128: dQ[:, 64 w ..] = dS K[:, 64 w ..] (TT: A = dS read MN-major, M = 64 queries, K = 128 keys;
//      B = K MN-major, N = 64); D = 64: dQ += dS[:, keys of w] K[keys of w, :] (K = 64, N = 64; both
//      warpgroups add into dq); commit; wait 0 (6 and 8 done; D = 128 waits for 6 before 8, so that
//      the P^T, dS^T fragments are dead before dQ's accumulators live: 251 registers, no spills)
//   9. dQ * scale / dout_scale -> red.add into dq; lse, drow of tile i + 1 -> shared memory
// dK = scale sum dS^T Q, dV = sum P^T dO leave at the end (unscaled by *dout_scale as fa_backward does).
// Shared memory (1024-byte aligned): K [BN x D], V [BN x D] (faw_chunk layout), Q [2][BM x D], dO [2][BM x D],
// dS^T [BN x BM] (row = key: 128 bytes of 64 queries, chunk (q / 8) ^ (key % 8)), lse, drow [2][BM] floats.
// (P^T and dS^T of a tile in schedule 13: fa_p_ds, flash_attention.cu)

// P^T and dS^T (a backward tile's S[n][e], DP[n][e]) to 16-bit A fragments of keys 16 kc .. (both backwards)
template <int NT, bool BF16>
static __device__ __forceinline__ void faw_pack_p_ds(const float (&S)[NT][4], const float (&DP)[NT][4],
                                                     u32 (&pa)[NT / 2][4], u32 (&sa)[NT / 2][4]) {
    #pragma unroll
    for (int kc = 0; kc < NT / 2; ++kc) {
        pa[kc][0] = fa_pack<BF16>(S[2 * kc][0], S[2 * kc][1]);
        pa[kc][1] = fa_pack<BF16>(S[2 * kc][2], S[2 * kc][3]);
        pa[kc][2] = fa_pack<BF16>(S[2 * kc + 1][0], S[2 * kc + 1][1]);
        pa[kc][3] = fa_pack<BF16>(S[2 * kc + 1][2], S[2 * kc + 1][3]);
        sa[kc][0] = fa_pack<BF16>(DP[2 * kc][0], DP[2 * kc][1]);
        sa[kc][1] = fa_pack<BF16>(DP[2 * kc][2], DP[2 * kc][3]);
        sa[kc][2] = fa_pack<BF16>(DP[2 * kc + 1][0], DP[2 * kc + 1][1]);
        sa[kc][3] = fa_pack<BF16>(DP[2 * kc + 1][2], DP[2 * kc + 1][3]);
    }
}

// this thread's dS^T fragments -> the dS^T tile ds ([key][query]: 128-byte rows of 64 queries, chunk (q / 8) ^ (key % 8);
// 128 queries (NT = 16): two such blocks of 128 keys, queries 64 .. in the second)
template <int NT>
static __device__ __forceinline__ void faw_store_ds(u8* ds, const u32 (&sa)[NT / 2][4], int wg, int warp, int gid,
                                                    int tig) {
    #pragma unroll
    for (int kc = 0; kc < NT / 2; ++kc)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = 64 * wg + 16 * warp + gid + 8 * (e & 1), qc = 2 * kc + (e >> 1);   // query chunk
            gw_st32(ds + 128 * 128 * (qc >> 3) + 128 * key + 16 * ((qc & 7) ^ (key & 7)) + 4 * tig, sa[kc][e]);
        }
}

// faw_backward_v13 (schedules 13 on): the products, masks and outputs of the steps above, pipelined so that
// the copies run beside the products and the tensor cores take dQ of one tile and S, dP of the next back to back:
// Q, dO, lse and drow (raw, as the forward wrote them, by cp.async) in three stages (query tile i + 2 lands while
// i is computed), dS^T in two buffers, one barrier a tile. Per query tile i (stage i % 3), per warpgroup:
//   1. dQ_{i-1} = dS_{i-1} K (as step 8 above, from dS buffer (i - 1) % 2); commit. Tile 0 multiplies buffer 1's
//      stale bytes and drops the product: every iteration issues the same wgmma groups (a group issued in a
//      branch makes ptxas serialise the pipeline)
//   2. S_i^T = K_w Q_i^T, dP_i^T = V_w dO_i^T (SS, as step 3 above); commit
//   3. wait 1 (dQ_{i-1} done, S_i and dP_i still running), dQ_{i-1} -> red.add into dq: at D = 128 the dK, dV,
//      dQ, S and dP accumulators (224 registers) live together here; the descriptors are then no registers of
//      their own (one base register, constants folded into each use: 251 registers, no spills)
//   4. wait 0; P^T, dS^T (fa_p_ds, one mask branch a tile) -> 16-bit A fragments; dS^T -> dS buffer i % 2
//   5. dV += P^T dO_i, dK += dS^T Q_i (RS); commit
//   6. cp.async.wait_group 0 (this thread's copies of tile i + 1), fence.proxy.async, __syncthreads: tile i + 1
//      and both warpgroups' dS^T_i visible; every warpgroup is past its wait for dV / dK of i - 1 (the last reader
//      of stage (i + 2) % 3) and for dQ_{i-2} (the last reader of dS buffer i % 2)
//   7. cp.async of Q, dO, lse, drow of tile i + 2 into stage (i + 2) % 3; commit
//   8. wait 0 (dV / dK of i)
// Schedule 18 (17's tile at D = 64, 13's at D = 128): S and dP in two groups; after step 3, wait 1 (S done) and P^T
// (fa_p) while dP is still on the tensor cores (FlashAttention-3's order), a gw_schedule_fence (so that ptxas keeps
// the exponentials before the next wait, as in the forward of 13), wait 0, then dS^T (fa_ds).
// Schedule 20 (18 at D = 64, with dQ by the bulk-copy engine; BULK): at step 3, after a warpgroup barrier (every warp
// of it past the wait for dQ_{i-1}), each warpgroup writes dQ_{i-1} (scaled) as [64 rows][D] float32 into the half of
// dS^T buffer (i - 1) % 2 that its own dQ product has just read (free until faw_store_ds of tile i + 1); after the
// softmax, fence.proxy.async and a second warpgroup barrier, each of its first 64 threads issues one
// cp.reduce.async.bulk .add.f32 of its row (D * 4 bytes) into dQ and commits; at step 6 every issuer waits for its
// reductions to have read shared memory (wait_group.read 0) before the barrier, after which the buffer may be
// written. No red.add a thread but the last tile's.
// Schedule 16 (D = 64 only, FawXch): step 3 stores the half of dQ_{i-1}'s columns that the other warpgroup adds to
// an out-box in shared memory, and after step 7's copies each warpgroup adds the other's half to its own and red.adds
// that half: one red.add of a query tile's dQ instead of one per warpgroup (half the L2 reduction traffic: 0.95
// instead of 1.9 GB a backward for the 0.5B student at T = 8192), at 8 shared stores and loads a thread.
// After the last tile: dQ_{nq-1}, waited, added. Nothing is in flight across the loop's edge: in-flight
// accumulators there made ptxas serialise the pipeline (C7514 / C7515, in the CPU's link check); the loop is a
// do-while (nq >= 1), whose missing zero-trip path would otherwise write the accumulators.
// XCH (schedule 16 at D = 64, FawXch): + out-boxes [2 tiles][2 warpgroups][D / 8 pairs][128 threads] float2 of dQ halves
template <int D, bool XCH = false, int BM_ = 64>
struct FawBwdSmem13 {
    static constexpr int BN = 128, BM = BM_, QST = 3;
    static constexpr int KV = BN * D * 2, QD = BM * D * 2, DS = BN * BM * 2, XH = 128 * (D / 8) * 8;   // (XH: an out-box)
    static constexpr int K_OFF = 0, V_OFF = KV, Q_OFF = 2 * KV, DO_OFF = Q_OFF + QST * QD, DS_OFF = DO_OFF + QST * QD;
    static constexpr int L_OFF = DS_OFF + 2 * DS, X_OFF = L_OFF + 2 * QST * BM * 4;
    static constexpr int BYTES = X_OFF + (XCH ? 4 * XH : 0) + 1024;
    static_assert(KV % 1024 == 0 && QD % 1024 == 0 && DS % 1024 == 0, "1024-byte aligned tiles");
};

// whether a schedule's backward sums the two warpgroups' dQ partials in shared memory (16, at D = 64, where each
// warpgroup's dQ covers only its own 64 keys: KSPLIT) before one red.add, instead of two red.adds (13)
template <int D, int SCHED>
struct FawXch { static constexpr bool value = D == 64 && SCHED == 16; };

// the queries of a schedule's backward step: 128 in 17, 18 and 20 at D = 64 (FlashAttention-3's tile for head size 64: S^T and
// dP^T of N = 128, the per-tile work of the loop spread over twice the queries, and dQ split between the warpgroups
// by queries, so that each element has one red.add), else 64
template <int D, int SCHED>
struct FawBwdBM { static constexpr int value = D == 64 && (SCHED == 17 || SCHED == 18 || SCHED == 20) ? 128 : 64; };

// the shared-memory layout of faw_backward_v13 in a schedule
template <int D, int SCHED>
using FawBwdLayout13 = FawBwdSmem13<D, FawXch<D, SCHED>::value, FawBwdBM<D, SCHED>::value>;

// FawXch, the first half: this warpgroup's dQ columns that the other one adds (columns DQN / 2 (1 - wg) ..: those
// of n-tiles n with (n >= DQN / 16) != wg) -> its out-box x ([DQN / 8 pairs][128 threads] float2: a warp's store is
// 256 contiguous bytes)
template <int DQN>
static __device__ __forceinline__ void faw_xch_store(float2* x, const float (&dqa)[DQN / 2], int wg, int t) {
    constexpr int HN = DQN / 16;                                   // n-tiles of 8 columns a half
    #pragma unroll
    for (int n = 0; n < DQN / 8; ++n)
        #pragma unroll
        for (int r = 0; r < 2; ++r)
            if (int(n >= HN) != wg) x[((n % HN) * 2 + r) * 128 + t] = make_float2(dqa[4 * n + 2 * r], dqa[4 * n + 2 * r + 1]);
}

// dQ (the accumulators of the dQ product: this warp's rows of the query tile at i0, columns col0 ..) * sc -> red.add;
// FawXch's second half when x is given: only this warpgroup's half of the columns, (n >= DQN / 16) == wg, each its
// own partial plus the other warpgroup's from that one's out-box x
template <int DQN>
static __device__ __forceinline__ void faw_red_dq(float* dq, const float (&dqa)[DQN / 2], int i0, int warp, int gid,
                                                  int tig, int T, int H, int h, int b, int D, int col0, float sc,
                                                  const float2* x = nullptr, int wg = 0, int t = 0) {
    constexpr int HN = DQN / 16;
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = i0 + 16 * warp + gid + 8 * r;
        if (i >= T) continue;
        float* dqrow = dq + ((size_t(b) * T + i) * H + h) * D + col0;
        #pragma unroll
        for (int n = 0; n < DQN / 8; ++n) {
            float v0 = dqa[4 * n + 2 * r], v1 = dqa[4 * n + 2 * r + 1];
            if (x) {
                if (int(n >= HN) != wg) continue;
                const float2 o = x[((n % HN) * 2 + r) * 128 + t];
                v0 += o.x;
                v1 += o.y;
            }
            fa_red2(dqrow + 8 * n + 2 * tig, v0 * sc, v1 * sc);
        }
    }
}

// a barrier of this warpgroup's 128 threads (named barrier 1 + wg, its id an immediate: a register id made ptxas spill)
static __device__ __forceinline__ void faw_wg_bar(int wg) {
    if (wg == 0) gw_bar_sync(1, 128);
    else gw_bar_sync(2, 128);
}

// Schedule 20 (BULK, at D = 64 with 128 queries a step): this warpgroup's dQ tile of the previous step (its 64 queries
// x D, times sc) -> st, [64 rows][D] float32 with rows D * 4 bytes apart: what one bulk reduction a row adds into dQ.
// (The red.add of 18 left its source registers held until the L2 took them: ncu, H100, seventeenth stop: the next
// writes of R10 / R11 after the REDG.E.ADD.F32x2 stalled on the long scoreboard, ~15 % of the backward's samples.)
template <int DQN>
static __device__ __forceinline__ void faw_stage_dq(u8* st, const float (&dqa)[DQN / 2], int warp, int gid, int tig,
                                                    float sc) {
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        u8* const row = st + (16 * warp + gid + 8 * r) * (DQN * 4);
        #pragma unroll
        for (int n = 0; n < DQN / 8; ++n) {
            gw_st32(row + 4 * (8 * n + 2 * tig), __float_as_uint(dqa[4 * n + 2 * r] * sc));
            gw_st32(row + 4 * (8 * n + 2 * tig + 1), __float_as_uint(dqa[4 * n + 2 * r + 1] * sc));
        }
    }
}

// dQ = dS K (step 8 of the steps above faw_backward_v13): s_mn, k_mn the low words of the MN-major descriptors of the dS^T buffer
// and of K (gw_desc_lo)
template <bool KSPLIT, int DQN, bool BF16>
static __device__ __forceinline__ void faw_dq(float (&dqa)[DQN / 2], u32 s_mn, u32 k_mn, int wg) {
    #pragma unroll
    for (int kc = 0; kc < (KSPLIT ? 4 : 8); ++kc) {                // keys 16 kc .. (KSPLIT: of this warpgroup's 64)
        const u32 at = (2048 * (kc + (KSPLIT ? 4 * wg : 0))) >> 4;
        gw_mma_tt<DQN, BF16>(dqa, gw_desc_hi<1024, 1>(s_mn + at), gw_desc_hi<1024, 1>(k_mn + at), kc > 0);
    }
}

// lse and drow of query rows i0 .. i0 + ROWS (zeros past T: hidden there) -> at[0 .. ROWS), at[QST ROWS ..) by cp.async;
// QST: the stages between the two arrays (FawBwdSmem13)
template <int ROWS, int QST = 3>
static __device__ __forceinline__ void faw_load_lse(float* at, const float* lse_h, const float* drow_h, int i0, int T,
                                                    int tid) {
    if (tid < ROWS) {
        const int i = i0 + tid, ok = i < T, c = min(i, T - 1);
        gw_cp4(at + tid, lse_h + c, ok);
        gw_cp4(at + QST * ROWS + tid, drow_h + c, ok);
    }
}

template <int D, bool BF16, int SCHED>
static __device__ __forceinline__ void faw_backward_v13(const u16* q, const u16* k, const u16* v, const u16* dout,
                                                        const float* lse, const float* drow, const u8* mask, int T,
                                                        int H, int KV, int window, float scale, const float* dout_scale,
                                                        float* dq, float* dk, float* dv) {
    constexpr bool XCH = FawXch<D, SCHED>::value;
    using L = FawBwdLayout13<D, SCHED>;
    constexpr int BN = L::BN, BM = L::BM, QST = L::QST, THREADS = 256, NT = BM / 8, DT = D / 8;
    // dQ = dS K: as step 8 (D = 128: the warpgroups split the columns; D = 64: the keys, KSPLIT), but with
    // 128 queries a step (QSPLIT, FawBwdBM) the warpgroups split the queries: each its 64 rows, all 128 keys, N = D
    constexpr bool QSPLIT = BM == 128, KSPLIT = D == 64 && !QSPLIT;
    constexpr int DQN = KSPLIT || QSPLIT ? D : D / 2;
    static_assert(!QSPLIT || D == 64, "128 queries a step at D = 64 only (registers)");
    constexpr bool PSPLIT = SCHED == 18 || SCHED == 20;         // P^T while dP^T is on the tensor cores
    constexpr bool BULK = SCHED == 20 && QSPLIT;                 // dQ by the bulk-copy engine (faw_stage_dq)
    static_assert(D == 64 || D == 128, "head sizes 64 and 128");
    static_assert(L::BYTES <= 227 * 1024, "dynamic shared memory is at most 227 KB");
    u8* const sm = gw_aligned_smem();
    u8* const Ks = sm + L::K_OFF;
    u8* const Vs = sm + L::V_OFF;
    u8* const Qs = sm + L::Q_OFF;
    u8* const Ds = sm + L::DO_OFF;
    u8* const Ss = sm + L::DS_OFF;
    float* const ls = reinterpret_cast<float*>(sm + L::L_OFF);   // [QST][BM] lse, then [QST][BM] drow
    float2* const xs = reinterpret_cast<float2*>(sm + L::X_OFF);  // XCH: [tile % 2][warpgroup] out-boxes of L::XH bytes

    const int G = H / KV, lin = blockIdx.y * gridDim.x + blockIdx.x;   // gridDim.x * gridDim.y = key tiles x H
    const int tile = lin / H, h = lin % H, kvh = h / G, b = blockIdx.z;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int j0 = tile * BN, k0 = j0 + 64 * wg + 16 * warp;     // this warp's keys k0 .. k0 + 15
    const int keys[2] = {k0 + gid, k0 + gid + 8};
    const size_t qoff = size_t(b) * T * H * D;                   // (Q and dO of this sequence: one offset)
    const u8* mask_b = mask ? mask + size_t(b) * T : nullptr;
    const float sl2 = scale * FA_LOG2E;
    const float unscale = 1.f / *dout_scale;                    // dO (and drow) arrive multiplied by *dout_scale
    const float dq_scale = scale * unscale;
    const size_t lrow = (size_t(b) * H + h) * T;                 // (lse and drow rows: an offset, not two pointers)

    const int i_start = (j0 / BM) * BM, i_end = min(T, j0 + BN - 1 + window);
    const int nq = (i_end - i_start + BM - 1) / BM;              // >= 1: j0 < T

    // prologue: K, V and query tile 0 with its lse, drow (group 0), tile 1 with its (group 1)
    faw_load<BN, D, THREADS>(Ks, k + size_t(b) * T * KV * D, j0, T, KV, kvh, tid);
    faw_load<BN, D, THREADS>(Vs, v + size_t(b) * T * KV * D, j0, T, KV, kvh, tid);
    faw_load<BM, D, THREADS>(Qs, q + qoff, i_start, T, H, h, tid);
    faw_load<BM, D, THREADS>(Ds, dout + qoff, i_start, T, H, h, tid);
    faw_load_lse<BM>(ls, lse + lrow, drow + lrow, i_start, T, tid);
    gw_cp_commit();
    if (nq > 1) {
        faw_load<BM, D, THREADS>(Qs + L::QD, q + qoff, i_start + BM, T, H, h, tid);
        faw_load<BM, D, THREADS>(Ds + L::QD, dout + qoff, i_start + BM, T, H, h, tid);
        faw_load_lse<BM>(ls + BM, lse + lrow, drow + lrow, i_start + BM, T, tid);
    }
    gw_cp_commit();

    float dka[D / 2], dva[D / 2], s[BM / 2], dp[BM / 2], dqa[DQN / 2];
    u32 pa[BM / 16][4], sa[BM / 16][4];
    #pragma unroll
    for (int i = 0; i < D / 2; ++i) dka[i] = dva[i] = 0.f;
    #pragma unroll
    for (int i = 0; i < BM / 2; ++i) s[i] = dp[i] = 0.f;
    #pragma unroll
    for (int i = 0; i < DQN / 2; ++i) dqa[i] = 0.f;
    float (&S)[NT][4] = reinterpret_cast<float (&)[NT][4]>(s);
    float (&DP)[NT][4] = reinterpret_cast<float (&)[NT][4]>(dp);
    // the descriptors, built once: this warpgroup's 64 keys of K and V (K-major), stage 0 of Q and dO (K-major for
    // S and dP, MN-major for dK and dV), dS^T buffer 0 and K (MN-major for dQ)
    // (low words only, gw_desc_hi adds SBO 1024 and the 128-byte swizzle: at D = 128 the u64 forms spilled)
    // (all from one register, the base's start field: the constants fold into each use, no register a descriptor)
    const u32 base = gw_desc_lo(gw_smem(sm), 0), wk = 512 * wg;   // 64 * 128 * wg bytes >> 4
    constexpr u32 L16 = 1u << 16, LBM = (BM * 128 / 16) << 16, LBN = (BN * 128 / 16) << 16;   // LBO fields
    const u32 k_d = base + (L::K_OFF >> 4) + wk + L16, v_d = base + (L::V_OFF >> 4) + wk + L16,
              q_d = base + (L::Q_OFF >> 4) + L16, do_d = base + (L::DO_OFF >> 4) + L16;
    const u32 q_mn = base + (L::Q_OFF >> 4) + LBM, do_mn = base + (L::DO_OFF >> 4) + LBM,
              s_mn = base + (L::DS_OFF >> 4) + (QSPLIT ? wg * BN * 8 : 0) + LBM,   // (QSPLIT: its block of queries)
              k_mn = base + (L::K_OFF >> 4) + (KSPLIT || QSPLIT ? 0 : wg * BN * 8) + LBN;
    const int dq_col = KSPLIT || QSPLIT ? 0 : DQN * wg, dq_row = QSPLIT ? 64 * wg : 0;   // (its dQ block)
    const size_t dq_off = (size_t(b) * T * H + h) * D;          // (BULK: dQ row i of this head at dq + i H D + dq_off)

    gw_cp_wait<1>();                                               // tile 0 (and K, V)
    gw_fence_async();
    __syncthreads();
    int it = 0;
    do {       // (nq >= 1; a do-while has no zero-trip path, whose zeroing moves of the accumulators ptxas took for
               // writes to in-flight accumulators and serialised the pipeline: C7515)
        const int i0 = i_start + BM * it, st = it % QST, sb = it & 1;
        gw_pin(dqa);                                               // 1. dQ_{it-1} (tile 0: of stale bytes, unused)
        gw_mma_fence();
        faw_dq<KSPLIT, DQN, BF16>(dqa, s_mn + (((sb ^ 1) * L::DS) >> 4), k_mn, wg);
        gw_mma_commit();
        const u32 qd = q_d + ((st * L::QD) >> 4), dd = do_d + ((st * L::QD) >> 4);
        gw_pin(s);                                                 // 2.
        gw_pin(dp);
        gw_mma_fence();
        #pragma unroll
        for (int g = 0; g < (PSPLIT ? 2 : 1); ++g) {               // (PSPLIT: S, then dP, two groups; else together)
            if (g > 0) gw_mma_commit();
            #pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const u32 a_off = (kk >> 2) * BN * 128 + 32 * (kk & 3), b_off = (kk >> 2) * BM * 128 + 32 * (kk & 3);
                if (!PSPLIT || g == 0)
                    gw_mma<BM, BF16>(s, gw_desc_hi<1024, 1>(k_d + (a_off >> 4)), gw_desc_hi<1024, 1>(qd + (b_off >> 4)), kk > 0);
                if (!PSPLIT || g == 1)
                    gw_mma<BM, BF16>(dp, gw_desc_hi<1024, 1>(v_d + (a_off >> 4)), gw_desc_hi<1024, 1>(dd + (b_off >> 4)), kk > 0);
            }
        }
        gw_mma_commit();

        gw_mma_wait<PSPLIT ? 2 : 1>();                             // 3.
        gw_pin(dqa);
        if constexpr (XCH) {             // the other warpgroup's half to its out-box; added after the barrier (7.)
            if (it > 0) faw_xch_store<DQN>(xs + ((sb ^ 1) * 2 + wg) * (L::XH / 8), dqa, wg, tid & 127);
        } else if constexpr (BULK) {     // dQ_{i-1} staged where this warpgroup's dQ product read its dS^T block (the
            if (it > 0) {                // product just waited for; the other warpgroup reads only its own block),
                faw_wg_bar(wg);              // once all four warps are past that wait (a warp's wait says nothing of
                faw_stage_dq<DQN>(Ss + (sb ^ 1) * L::DS + wg * (L::DS / 2), dqa, warp, gid, tig, dq_scale);   // the
            }                            // others' reads); the bulk reduction is issued after the softmax (fewer
        } else {                         // registers live there)
            if (it > 0) faw_red_dq<DQN>(dq, dqa, i0 - BM + dq_row, warp, gid, tig, T, H, h, b, D, dq_col, dq_scale);
        }

        const bool all_visible = mask_b == nullptr && i0 + BM - 1 < T && k0 + 15 <= i0 && i0 + BM - 1 - k0 < window;
        const float* lq = ls + st * BM;
        const float* dr = ls + QST * BM + st * BM;
        if constexpr (PSPLIT) {
            gw_mma_wait<1>();                                      // 4. S done, dP running
            gw_pin(s);
            if (all_visible) fa_p<NT, false>(S, lq, sl2, i0, keys, tig, T, window, mask_b);
            else fa_p<NT, true>(S, lq, sl2, i0, keys, tig, T, window, mask_b);
            gw_schedule_fence();                                   // (the exponentials stay before the wait)
            gw_mma_wait<0>();
            gw_pin(dp);
            fa_ds<NT>(S, DP, dr, tig);
        } else {
            gw_mma_wait<0>();                                      // 4.
            gw_pin(s);
            gw_pin(dp);
            if (all_visible) fa_p_ds<NT, false>(S, DP, lq, dr, sl2, i0, keys, tig, T, window, mask_b);
            else fa_p_ds<NT, true>(S, DP, lq, dr, sl2, i0, keys, tig, T, window, mask_b);
        }
        faw_pack_p_ds<NT, BF16>(S, DP, pa, sa);
        faw_store_ds<NT>(Ss + sb * L::DS, sa, wg, warp, gid, tig);
        if constexpr (BULK) {            // dQ_{i-1}, staged at step 3, a row a thread of the first 64 (faw_store_ds
            if (it > 0) {                // writes this buffer again at i + 1, after step 6's wait_read and barrier)
                gw_fence_async();
                faw_wg_bar(wg);
                const int row = tid & 127, i = i0 - BM + dq_row + row;
                if (row < 64 && i < T)
                    gw_bulk_red_add(dq + size_t(i) * (H * D) + dq_off,
                                    Ss + (sb ^ 1) * L::DS + wg * (L::DS / 2) + row * D * 4, D * 4);
                gw_bulk_commit();
            }
        }

        gw_pin(dka);                                               // 5.
        gw_pin(dva);
        gw_pin(pa);
        gw_pin(sa);
        gw_mma_fence();
        #pragma unroll
        for (int kc = 0; kc < BM / 16; ++kc) {
            gw_mma_rs<D, BF16>(dva, pa[kc], gw_desc_hi<1024, 1>(do_mn + ((st * L::QD + 2048 * kc) >> 4)));
            gw_mma_rs<D, BF16>(dka, sa[kc], gw_desc_hi<1024, 1>(q_mn + ((st * L::QD + 2048 * kc) >> 4)));
        }
        gw_mma_commit();

        gw_cp_wait<0>();                                           // 6.
        if constexpr (BULK) gw_bulk_wait_read<0>();                // (the staged dQ read: its buffer is free again)
        gw_fence_async();
        __syncthreads();

        if (it + 2 < nq) {                                         // 7.
            const int at = (it + 2) % QST;
            faw_load<BM, D, THREADS>(Qs + at * L::QD, q + qoff, i0 + 2 * BM, T, H, h, tid);
            faw_load<BM, D, THREADS>(Ds + at * L::QD, dout + qoff, i0 + 2 * BM, T, H, h, tid);
            faw_load_lse<BM>(ls + at * BM, lse + lrow, drow + lrow, i0 + 2 * BM, T, tid);
        }
        gw_cp_commit();
        if constexpr (XCH) {             // dQ_{i-1}: this warpgroup's half of the columns, both partials (the out-box
            if (it > 0)                  // of buffer (i - 1) % 2 is next written at tile i + 1, after its barrier)
                faw_red_dq<DQN>(dq, dqa, i0 - BM, warp, gid, tig, T, H, h, b, D, 0, dq_scale,
                                xs + ((sb ^ 1) * 2 + (wg ^ 1)) * (L::XH / 8), wg, tid & 127);
        }

        gw_mma_wait<0>();                                          // 8.
        gw_pin(dka);
        gw_pin(dva);
        gw_pin(pa);
        gw_pin(sa);
    } while (++it < nq);
    gw_pin(dqa);                                                   // the last tile's dQ
    gw_mma_fence();
    faw_dq<KSPLIT, DQN, BF16>(dqa, s_mn + ((((nq - 1) & 1) * L::DS) >> 4), k_mn, wg);
    gw_mma_commit();
    gw_mma_wait<0>();
    gw_pin(dqa);
    faw_red_dq<DQN>(dq, dqa, i_start + BM * (nq - 1) + dq_row, warp, gid, tig, T, H, h, b, D, dq_col, dq_scale);
    gw_cp_wait<0>();
    if constexpr (BULK) gw_bulk_wait<0>();                         // (no bulk reduction in flight at the exit)

    const float (&DK)[DT][4] = reinterpret_cast<const float (&)[DT][4]>(dka);
    const float (&DV)[DT][4] = reinterpret_cast<const float (&)[DT][4]>(dva);
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (keys[r] >= T) continue;
        const size_t row = (size_t(b) * T + keys[r]) * KV + kvh;
        #pragma unroll
        for (int n = 0; n < DT; ++n) {
            const int col = 8 * n + 2 * tig;
            fa_put_dkdv(dk, dv, row * D + col, DK[n][2 * r] * (scale * unscale), DK[n][2 * r + 1] * (scale * unscale),
                        DV[n][2 * r] * unscale, DV[n][2 * r + 1] * unscale, G);
        }
    }
}

// the backward of a schedule (kernels/flash_attention_mma.py kernel_sched: 13, 16, 17, 18, 20)
template <int D, bool BF16, int SCHED = 13>
static __device__ __forceinline__ void faw_backward(const u16* q, const u16* k, const u16* v, const u16* dout,
                                                    const float* lse, const float* drow, const u8* mask, int T, int H,
                                                    int KV, int window, float scale, const float* dout_scale,
                                                    float* dq, float* dk, float* dv) {
    faw_backward_v13<D, BF16, SCHED>(q, k, v, dout, lse, drow, mask, T, H, KV, window, scale, dout_scale, dq, dk, dv);
}
