// Host versions of kernels/csrc/wgmma_ptx.cuh for the CPU emulations of the wgmma kernels
// (tests/gemm_wgmma_emulate.cpp, tests/flash_attention_wgmma_emulate.cpp), with the asynchronous parts
// run as late as the hardware may run them:
//   cp.async     queued per thread; a group's copies happen at the cp.async.wait_group that waits
//                for it (or never, if none does): a wait depth one too shallow reads stale bytes.
//                Aborts on a misaligned address or a read outside the bounds the harness set.
//   wgmma        queued per thread with the accumulator it writes; a group runs at the
//                wgmma.wait_group that waits for it, reading shared memory through the descriptors
//                then; it also reads the operands at issue, and aborts if they changed in between
//                (the kernel overwrote a tile, or an A register, that a wgmma in flight still reads).
//                A MN-major (both operands transposed) for attention's dQ = dS K.
//                A from registers: the 128 threads of the warpgroup exchange their fragments at issue
//                (the instruction is warpgroup-wide), A[16 w + g + 8 (e & 1)][2 i + 8 (e >> 1) + h] of
//                thread 32 w + 4 g + i from its a[e] (half h).
//   races        a wgmma reading, at its issue, shared memory that another thread wrote (by cp.async or
//                gw_st32) with no __syncthreads in between aborts.
//   descriptors  decoded by the PTX manual's rules, independently of the kernels' layout code:
//                K-major: no swizzle (core matrices of 8 rows x 16 bytes; LBO between core matrices
//                along K, SBO between 8-row groups) and the 128-byte swizzle (8-row atoms of 128-byte
//                rows, SBO between atoms); MN-major with the 128-byte swizzle (128-byte rows of 64
//                M/N elements per k, LBO between 64-element M/N blocks, SBO between 8-k groups;
//                cute's canonical ((8,n),(8,k)):((1,LBO),(8,SBO)) in 16-byte units). The swizzle is of
//                the address: bits 4-6 XOR bits 7-9.
//   accumulator  thread t of a warpgroup (warp w, lane 4 g + i) holds D[16 w + g + 8 (e >> 1),
//                8 j + 2 i + (e & 1)] in d[4 j + e].
#pragma once
#include <deque>

typedef unsigned long long u64;

// ---- dynamic shared memory: one buffer (blocks run one after another), at a shared-window address
// that is 16- but not 1024-byte aligned, so the kernels' own alignment is exercised
alignas(1024) static u8 emu_dyn[232448 + 2048];
static const u32 EMU_BIAS = 0x1230;
static u8* gw_dynamic_smem() { return emu_dyn + 0; }
static inline u32 gw_smem(const void* p) {
    const u8* b = static_cast<const u8*>(p);
    if (b < emu_dyn || b >= emu_dyn + sizeof(emu_dyn)) { fprintf(stderr, "not shared memory: %p\n", p); abort(); }
    return u32(b - emu_dyn) + EMU_BIAS;
}
// Who wrote each byte of it last, and in which barrier epoch (warp_emulate.h's emu_epoch): (epoch << 16) | (thread
// + 1), 0 where unknown (never written, or by a store the emulation does not see). A wgmma that reads, at its
// issue, a byte another thread wrote in the same epoch read it with no __syncthreads in between: a race.
static std::atomic<uint64_t> emu_writer[sizeof(emu_dyn)];
static inline void emu_wrote(const void* p, int n) {
    const size_t at = static_cast<const u8*>(p) - emu_dyn;
    const uint64_t tag = (uint64_t(emu_epoch.load()) << 16) | uint64_t(threadIdx.x + 1);
    for (int i = 0; i < n; ++i) emu_writer[at + i].store(tag);
}
static thread_local bool emu_issuing = false;                    // emu_products at a wgmma's issue
static inline const u8* emu_at(u32 addr, int bytes = 2) {
    if (addr < EMU_BIAS || addr - EMU_BIAS + bytes > sizeof(emu_dyn)) { fprintf(stderr, "descriptor address %u\n", addr); abort(); }
    const size_t at = addr - EMU_BIAS;
    if (emu_issuing)
        for (int i = 0; i < bytes; ++i) {
            const uint64_t tag = emu_writer[at + i].load();
            if (tag && (tag >> 16) == uint64_t(emu_epoch.load()) && int(tag & 0xFFFF) != threadIdx.x + 1) {
                fprintf(stderr, "a wgmma of thread %d reads shared memory thread %d wrote with no barrier in between\n",
                        threadIdx.x, int(tag & 0xFFFF) - 1);
                abort();
            }
        }
    return emu_dyn + at;
}

static inline u32 __float_as_uint(float f) { u32 u; memcpy(&u, &f, 4); return u; }

// a 4-byte store to shared memory that wgmma will read (csrc/wgmma_ptx.cuh's gw_st32)
static inline void gw_st32(void* smem, u32 v) {
    gw_smem(smem);
    memcpy(smem, &v, 4);
    emu_wrote(smem, 4);
}

// ---- cp.async, deferred to its wait ------------------------------------------------------------
struct Copy { u8* dst; const u8* src; int valid, size; };
static thread_local std::vector<Copy> cp_open;
static thread_local std::deque<std::vector<Copy>> cp_groups;

static inline void gw_cp16(void* smem, const void* g, int valid) {
    emu_check_cp16(smem, g, valid);
    gw_smem(smem);
    cp_open.push_back(Copy{static_cast<u8*>(smem), static_cast<const u8*>(g), valid, 16});
}
static inline void gw_cp4(void* smem, const void* g, bool valid) {
    emu_check_cp16(smem, g, valid ? 4 : 0, 4);
    gw_smem(smem);
    cp_open.push_back(Copy{static_cast<u8*>(smem), static_cast<const u8*>(g), valid ? 4 : 0, 4});
}
static inline void gw_cp_commit() { cp_groups.push_back(std::move(cp_open)); cp_open.clear(); }
template <int N> static inline void gw_cp_wait() {
    while (int(cp_groups.size()) > N) {
        for (const Copy& c : cp_groups.front()) {
            memcpy(c.dst, c.src, c.valid);
            memset(c.dst + c.valid, 0, c.size - c.valid);
            emu_wrote(c.dst, c.size);
        }
        cp_groups.pop_front();
    }
}

static inline void gw_cp_wait_all() { gw_cp_commit(); gw_cp_wait<0>(); }

// ---- mbarriers, named barriers, setmaxnreg (the warp-specialised forward) ---------------------------
// An mbarrier's state lives here, keyed by its shared-memory address (the kernel's 8 bytes are not used).
// cp.async's arrive hands the thread's copies not yet waited for to the barrier, which performs them when the
// phase completes (the latest the hardware may land them): a consumer that read a slot before waiting for its
// phase reads stale bytes. Those bytes are written untagged (the epoch race check knows only __syncthreads; the
// wgmma's own check, operands unchanged between issue and wait, still catches a slot refilled under it).
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>
struct EmuMbar { int count = 0, pending = 0, phase = 0; std::vector<Copy> copies; long long tx = 0; };
static std::mutex emu_sync_mu;
static std::condition_variable emu_sync_cv;
static std::map<u32, EmuMbar> emu_mbars;
static void emu_mbar_complete_locked(EmuMbar& m) {
    for (const Copy& c : m.copies) {
        memcpy(c.dst, c.src, c.valid);
        memset(c.dst + c.valid, 0, c.size - c.valid);
        const size_t at = c.dst - emu_dyn;
        for (int i = 0; i < c.size; ++i) emu_writer[at + i].store(0);
    }
    m.copies.clear();
    m.phase ^= 1;
    m.pending = m.count;
    emu_sync_cv.notify_all();
}
static inline void gw_mbar_init(u64* bar, int count) {
    std::lock_guard<std::mutex> g(emu_sync_mu);
    EmuMbar& m = emu_mbars[gw_smem(bar)];
    m = EmuMbar{count, count, 0, {}, 0};
}
static inline void emu_mbar_arrive(u64* bar, bool with_copies) {
    std::lock_guard<std::mutex> g(emu_sync_mu);
    auto it = emu_mbars.find(gw_smem(bar));
    if (it == emu_mbars.end()) { fprintf(stderr, "arrive on an mbarrier never initialised\n"); abort(); }
    EmuMbar& m = it->second;
    if (with_copies) {
        for (auto& grp : cp_groups) m.copies.insert(m.copies.end(), grp.begin(), grp.end());
        m.copies.insert(m.copies.end(), cp_open.begin(), cp_open.end());
        cp_groups.clear();
        cp_open.clear();
    }
    if (--m.pending == 0 && m.tx == 0) emu_mbar_complete_locked(m);
}
static inline void gw_mbar_arrive(u64* bar) { emu_mbar_arrive(bar, false); }
// The tensor-memory accelerator (csrc/gemm_wgmma_rs.cu's x ring): expect_tx is an arrival that also adds the bytes the
// phase waits for; a 2-D tile copy hands its copies to the barrier and counts its bytes off, so the phase completes
// (and the copies land) once every arrival is in and every expected byte has come, in either order. The tensor map
// is the emulation's own EmuTmap (the driver's CUtensorMap is opaque): a [dim1][dim0] array of elem-byte elements,
// rows stride1 bytes apart, a box0 x box1 box written row after row, 128-byte rows swizzled (chunk c of row r at
// 16 (c ^ (r % 8))) when swz128; elements outside the array are zero-filled, and count, as on the hardware.
struct EmuTmap { const u8* base; unsigned long long dim0, dim1, stride1; unsigned box0, box1, elem; int swz128; };
static inline void gw_mbar_expect_tx(u64* bar, u32 bytes) {
    std::lock_guard<std::mutex> g(emu_sync_mu);
    EmuMbar& m = emu_mbars.at(gw_smem(bar));
    m.tx += bytes;
    if (--m.pending == 0 && m.tx == 0) emu_mbar_complete_locked(m);
}
static inline void gw_tma_2d(void* dst, const void* tmap, int c0, int c1, u64* bar) {
    const EmuTmap& t = *static_cast<const EmuTmap*>(tmap);
    const unsigned row = t.box0 * t.elem, chunks = row / 16;
    if (row % 16 || (t.swz128 && row != 128) || gw_smem(dst) % (t.swz128 ? 1024 : 16)) {
        fprintf(stderr, "tma: a box row of %u bytes at smem %u is not what the emulation models\n", row, gw_smem(dst));
        abort();
    }
    std::vector<Copy> cs;
    for (unsigned r = 0; r < t.box1; ++r)
        for (unsigned c = 0; c < chunks; ++c) {
            const unsigned long long e0 = (unsigned long long)c0 + 16ull * c / t.elem, e1 = (unsigned long long)c1 + r;
            const bool in = e1 < t.dim1 && e0 + 16 / t.elem <= t.dim0;
            u8* d = static_cast<u8*>(dst) + row * r + 16 * (t.swz128 ? (c ^ (r % 8)) : c);
            cs.push_back(Copy{d, in ? t.base + e1 * t.stride1 + e0 * t.elem : t.base, in ? 16 : 0, 16});
        }
    std::lock_guard<std::mutex> g(emu_sync_mu);
    EmuMbar& m = emu_mbars.at(gw_smem(bar));
    m.copies.insert(m.copies.end(), cs.begin(), cs.end());
    m.tx -= (long long)row * t.box1;
    if (m.pending == 0 && m.tx == 0) emu_mbar_complete_locked(m);
}
static inline void gw_cp_mbar_arrive(u64* bar) { emu_mbar_arrive(bar, true); }
static inline void gw_mbar_wait(u64* bar, int parity) {   // until the phase of this parity has completed
    std::unique_lock<std::mutex> g(emu_sync_mu);
    EmuMbar& m = emu_mbars.at(gw_smem(bar));
    emu_sync_cv.wait(g, [&] { return m.phase != (parity & 1); });
}
struct EmuNamedBar { int arrived = 0; long gen = 0; };
static EmuNamedBar emu_named[16];
static inline void emu_named_arrive(int id, int n, bool wait) {
    std::unique_lock<std::mutex> g(emu_sync_mu);
    EmuNamedBar& b = emu_named[id];
    const long gen = b.gen;
    if (++b.arrived == n) {
        b.arrived = 0;
        ++b.gen;
        emu_sync_cv.notify_all();
    } else if (wait) {
        emu_sync_cv.wait(g, [&] { return b.gen != gen; });
    }
}
static inline void gw_bar_sync(int id, int n) { emu_named_arrive(id, n, true); }
static inline void gw_bar_arrive(int id, int n) { emu_named_arrive(id, n, false); }
// the bulk-copy engine's reduction (cp.reduce.async.bulk ... .add.f32), per thread: the source is read at issue and
// again at the wait that releases it (wait_read / wait), and the emulation aborts if the two differ (another thread
// had not finished writing it at the issue, or it was overwritten while the engine may still read it); the adds
// land at that wait, under a lock (blocks run one after another, so no red.add of another block is under way)
static std::mutex emu_bulk_mu;
struct BulkRed { float* out; const u8* src; std::vector<u8> seen; };
static thread_local std::vector<BulkRed> bulk_open;
static thread_local std::deque<std::vector<BulkRed>> bulk_groups;
static inline void gw_bulk_red_add(float* out, const void* smem, int bytes) {
    gw_smem(smem);
    if (bytes % 16 || reinterpret_cast<uintptr_t>(out) % 16 || (gw_smem(smem) - EMU_BIAS) % 16) {
        fprintf(stderr, "bulk reduce: %d bytes, out %p, smem %u: not 16-byte multiples\n", bytes, (void*)out, gw_smem(smem));
        abort();
    }
    const u8* s = static_cast<const u8*>(smem);
    bulk_open.push_back(BulkRed{out, s, std::vector<u8>(s, s + bytes)});
}
static inline void gw_bulk_commit() { bulk_groups.push_back(std::move(bulk_open)); bulk_open.clear(); }
template <int N> static inline void gw_bulk_wait() {
    while (int(bulk_groups.size()) > N) {
        for (const BulkRed& r : bulk_groups.front()) {
            if (memcmp(r.seen.data(), r.src, r.seen.size()) != 0) {
                fprintf(stderr, "thread %d: a bulk reduce's source changed between its issue and its wait\n", threadIdx.x);
                abort();
            }
            const float* v = reinterpret_cast<const float*>(r.seen.data());
            std::lock_guard<std::mutex> g(emu_bulk_mu);
            for (size_t i = 0; i < r.seen.size() / 4; ++i) r.out[i] += v[i];
        }
        bulk_groups.pop_front();
    }
}
template <int N> static inline void gw_bulk_wait_read() { gw_bulk_wait<N>(); }
template <int N> static inline void gw_regs_dec() {}
template <int N> static inline void gw_regs_inc() {}

static inline void gw_fence_async() {}
static inline void gw_schedule_fence() {}
static inline void gw_mma_fence() {}
template <int R> static inline void gw_pin(float (&)[R]) {}
template <int R> static inline void gw_pin(u32 (&)[R][4]) {}
template <int R> static inline void gw_pin(int (&)[R]) {}
static inline void gw_opaque_zero(int& x) { x = 0; }

// ---- wgmma, deferred to its wait -----------------------------------------------------------------
static inline float emu_16(u16 h, bool bf16) {
    if (!bf16) return half_to_float(h);
    const u32 n = u32(h) << 16;
    float f;
    memcpy(&f, &n, 4);
    return f;
}

static inline u32 emu_swizzle(u32 a, int swz) { return swz == 1 ? a ^ (((a >> 7) & 7) << 4) : a; }

static void emu_desc(u64 desc, u32& start, u32& lbo, u32& sbo, int& swz) {
    start = u32(desc & 0x3FFF) << 4, lbo = u32((desc >> 16) & 0x3FFF) << 4, sbo = u32((desc >> 32) & 0x3FFF) << 4;
    swz = int(desc >> 62);
    const int base_off = int((desc >> 49) & 7);
    if (base_off) { fprintf(stderr, "descriptor base offset %d\n", base_off); abort(); }
    if (swz > 1) { fprintf(stderr, "swizzle mode %d not emulated\n", swz); abort(); }
}

// element (row, k) of a K-major operand, k < 16
static float emu_operand(u64 desc, int row, int k, bool bf16 = false) {
    u32 start, lbo, sbo;
    int swz;
    emu_desc(desc, start, lbo, sbo, swz);
    const u32 a = swz == 0 ? start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2
                           : emu_swizzle(start + (row / 8) * sbo + (row % 8) * 128 + k * 2, 1);
    u16 h;
    memcpy(&h, emu_at(a), 2);
    return emu_16(h, bf16);
}

// element (row, k) of a K-major int8 operand with the 128-byte swizzle, k < 32
static int emu_operand_s8(u64 desc, int row, int k) {
    u32 start, lbo, sbo;
    int swz;
    emu_desc(desc, start, lbo, sbo, swz);
    if (swz != 1) { fprintf(stderr, "int8 operands without the 128-byte swizzle are not emulated\n"); abort(); }
    return int(static_cast<signed char>(*emu_at(emu_swizzle(start + (row / 8) * sbo + (row % 8) * 128 + k, 1), 1)));
}

// element (k, n) of an MN-major operand (128-byte swizzle only), k < 16
static float emu_operand_mn(u64 desc, int k, int n, bool bf16) {
    u32 start, lbo, sbo;
    int swz;
    emu_desc(desc, start, lbo, sbo, swz);
    if (swz != 1) { fprintf(stderr, "MN-major without the 128-byte swizzle is not emulated\n"); abort(); }
    const u32 a = emu_swizzle(start + (n / 64) * lbo + (k / 8) * sbo + (k % 8) * 128 + (n % 64) * 2, 1);
    u16 h;
    memcpy(&h, emu_at(a), 2);
    return emu_16(h, bf16);
}

// the warpgroup's A fragments, exchanged at a register-A wgmma's issue
struct EmuWarpgroup { std::barrier<> bar{128}; u32 a[128][4]; };
static EmuWarpgroup emu_warpgroups[4];

struct Mma {
    float* d;                         // (int8: di, s32 accumulators)
    int n, scale_d;
    bool bf16, rs, tt;                // tt: A and B both MN-major (shared memory)
    u64 a, b;
    std::vector<float> A;             // rs: the 64 x 16 A gathered at issue
    const u32* my_a;                  // rs: this thread's registers, which must not change in flight
    u32 my_a_seen[4];
    std::vector<float> seen;
    int* di = nullptr;                // s8: m64nNk32 on int8 operands, s32 accumulators
    bool bk = false;                  // rs: B K-major (imm-trans-b = 0)
};
static thread_local std::vector<Mma> mma_open;
static thread_local std::deque<std::vector<Mma>> mma_groups;

// this thread's products: p[4 j + e] = sum_k A[row, k] B(k, col)
static std::vector<float> emu_products(const Mma& m) {
    const int t = threadIdx.x & 127, warp = t / 32, lane = t % 32, g = lane / 4, i = lane % 4;
    std::vector<float> p(m.n / 2);
    for (int j = 0; j < m.n / 8; ++j)
        for (int e = 0; e < 4; ++e) {
            const int row = 16 * warp + g + 8 * (e >> 1), col = 8 * j + 2 * i + (e & 1);
            float s = 0.0f;
            if (m.di) {                                         // int8: exact integer sums over k32
                int si = 0;
                for (int k = 0; k < 32; ++k) si += emu_operand_s8(m.a, row, k) * emu_operand_s8(m.b, col, k);
                p[4 * j + e] = float(si);                       // |si| <= 32 * 128 * 128: exact in float
                continue;
            }
            for (int k = 0; k < 16; ++k) {
                const float a = m.rs ? m.A[row * 16 + k] : m.tt ? emu_operand_mn(m.a, k, row, m.bf16)
                                                                : emu_operand(m.a, row, k, m.bf16);
                const float b = (m.rs && !m.bk) || m.tt ? emu_operand_mn(m.b, k, col, m.bf16)
                                                        : emu_operand(m.b, col, k, m.bf16);
                s += a * b;
            }
            p[4 * j + e] = s;
        }
    return p;
}

// the products at issue, checking that no other thread wrote an operand byte since the last barrier
static std::vector<float> emu_issue(const Mma& m) {
    emu_issuing = true;
    std::vector<float> p = emu_products(m);
    emu_issuing = false;
    return p;
}

template <int N, bool BF16 = false>
static inline void gw_mma(float (&d)[N / 2], u64 a, u64 b, int scale_d = 1) {
    Mma m{d, N, scale_d, BF16, false, false, a, b, {}, nullptr, {}, {}};
    m.seen = emu_issue(m);
    mma_open.push_back(std::move(m));
}

template <int N, bool BF16 = false>
static inline void gw_mma_tt(float (&d)[N / 2], u64 a, u64 b, int scale_d = 1) {
    Mma m{d, N, scale_d, BF16, false, true, a, b, {}, nullptr, {}, {}};
    m.seen = emu_issue(m);
    mma_open.push_back(std::move(m));
}

template <int N, bool BF16 = false>
static inline void gw_mma_rs(float (&d)[N / 2], const u32 (&a)[4], u64 b, int scale_d = 1, bool b_kmajor = false) {
    const int t = threadIdx.x & 127;
    EmuWarpgroup& wg = emu_warpgroups[threadIdx.x / 128];
    for (int e = 0; e < 4; ++e) wg.a[t][e] = a[e];
    wg.bar.arrive_and_wait();
    Mma m{d, N, scale_d, BF16, true, false, 0, b, std::vector<float>(64 * 16), a, {a[0], a[1], a[2], a[3]}, {}};
    for (int u = 0; u < 128; ++u) {
        const int w = u / 32, g = (u % 32) / 4, i = u % 4;
        for (int e = 0; e < 4; ++e)
            for (int h = 0; h < 2; ++h)
                m.A[(16 * w + g + 8 * (e & 1)) * 16 + 2 * i + 8 * (e >> 1) + h] = emu_16(u16(wg.a[u][e] >> (16 * h)), BF16);
    }
    m.bk = b_kmajor;
    wg.bar.arrive_and_wait();
    m.seen = emu_issue(m);
    mma_open.push_back(std::move(m));
}

// A from registers, B K-major (csrc/gemm_wgmma_rs.cu)
template <int N, bool BF16 = false>
static inline void gw_mma_rk(float (&d)[N / 2], const u32 (&a)[4], u64 b, int scale_d = 1) {
    gw_mma_rs<N, BF16>(d, a, b, scale_d, true);
}

template <int N>
static inline void gw_mma_s8(int (&d)[N / 2], u64 a, u64 b, int scale_d = 1) {
    Mma m{nullptr, N, scale_d, false, false, false, a, b, {}, nullptr, {}, {}};
    m.di = d;
    m.seen = emu_issue(m);
    mma_open.push_back(std::move(m));
}

static inline void gw_mma_commit() { mma_groups.push_back(std::move(mma_open)); mma_open.clear(); }
template <int N> static inline void gw_mma_wait() {
    while (int(mma_groups.size()) > N) {
        for (const Mma& m : mma_groups.front()) {
            const std::vector<float> p = emu_products(m);
            // (bit for bit: a product of stale bytes, as the attention backward's first dQ, may be NaN at both)
            if (p.size() != m.seen.size() || memcmp(p.data(), m.seen.data(), p.size() * sizeof(float)) ||
                (m.rs && memcmp(m.my_a, m.my_a_seen, 16))) {
                fprintf(stderr, "a wgmma's operands changed while it was in flight\n");
                abort();
            }
            for (int i = 0; i < m.n / 2; ++i) {
                if (m.di) m.di[i] = (m.scale_d ? m.di[i] : 0) + int(p[i]);
                else m.d[i] = (m.scale_d ? m.d[i] : 0.0f) + p[i];
            }
        }
        mma_groups.pop_front();
    }
}
