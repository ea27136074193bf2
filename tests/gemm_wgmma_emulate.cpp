// Runs kernels/csrc/gemm_wgmma.cu on the CPU (a host thread per CUDA thread, tests/warp_emulate.h),
// with the asynchronous parts emulated as late as the hardware may run them:
//   cp.async     queued per thread; a group's copies happen at the cp.async.wait_group that waits
//                for it (or never, if none does): a wait depth one too shallow reads stale bytes.
//                Aborts on a misaligned address or a read outside W / x.
//   wgmma        queued per thread with the accumulator it adds to; a group runs at the
//                wgmma.wait_group that waits for it, reading shared memory through the descriptors
//                then; it also reads the operands at issue, and aborts if they changed in between
//                (the kernel overwrote a tile a wgmma in flight still reads).
//   descriptors  decoded by the PTX manual's rules for K-major fp16 operands: no swizzle (core
//                matrices of 8 rows x 16 bytes; LBO between core matrices along K, SBO between
//                8-row groups) and the 128-byte swizzle (8-row atoms of 128-byte rows, SBO between
//                atoms; address bits 4-6 XOR bits 7-9) -- independently of the kernel's gw_chunk.
//   accumulator  thread t of a warpgroup (warp w, lane 4 g + i) holds D[16 w + g + 8 (e >> 1),
//                8 j + 2 i + (e & 1)] in d[4 j + e].
// fp16x2 arithmetic is rounded as the GPU rounds (to nearest even, once per operation).
// tests/test_kernels_gemm_wgmma.py builds this with g++ and compares with a float64 reference.
#define GW_EMULATE
#include "warp_emulate.h"

#include "common_host.h"

#include <deque>

typedef unsigned long long u64;
struct alignas(8) float2 { float x, y; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }

static inline u32 __byte_perm(u32 x, u32 y, u32 s) {
    const uint64_t v = (uint64_t(y) << 32) | x;
    u32 r = 0;
    for (int i = 0; i < 4; ++i) r |= u32((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}

// ---- dynamic shared memory: one buffer (blocks run one after another), at a shared-window address
// that is 16- but not 1024-byte aligned, so the kernel's own alignment is exercised
alignas(1024) static u8 emu_dyn[232448 + 2048];
static const u32 EMU_BIAS = 0x1230;
static u8* gw_dynamic_smem() { return emu_dyn + 0; }
static inline u32 gw_smem(const void* p) {
    const u8* b = static_cast<const u8*>(p);
    if (b < emu_dyn || b >= emu_dyn + sizeof(emu_dyn)) { fprintf(stderr, "not shared memory: %p\n", p); abort(); }
    return u32(b - emu_dyn) + EMU_BIAS;
}
static inline const u8* emu_at(u32 addr) {
    if (addr < EMU_BIAS || addr - EMU_BIAS + 2 > sizeof(emu_dyn)) { fprintf(stderr, "descriptor address %u\n", addr); abort(); }
    return emu_dyn + (addr - EMU_BIAS);
}

// ---- cp.async, deferred to its wait ------------------------------------------------------------
struct Copy { u8* dst; const u8* src; int valid; };
static thread_local std::vector<Copy> cp_open;
static thread_local std::deque<std::vector<Copy>> cp_groups;

static inline void gw_cp16(void* smem, const void* g, int valid) {
    emu_check_cp16(smem, g, valid);
    gw_smem(smem);
    cp_open.push_back(Copy{static_cast<u8*>(smem), static_cast<const u8*>(g), valid});
}
static inline void gw_cp_commit() { cp_groups.push_back(std::move(cp_open)); cp_open.clear(); }
template <int N> static inline void gw_cp_wait() {
    while (int(cp_groups.size()) > N) {
        for (const Copy& c : cp_groups.front()) {
            memcpy(c.dst, c.src, c.valid);
            memset(c.dst + c.valid, 0, 16 - c.valid);
        }
        cp_groups.pop_front();
    }
}

static inline void gw_fence_async() {}
static inline void gw_mma_fence() {}
template <int R> static inline void gw_pin(float (&)[R]) {}

// ---- fp16x2 ---------------------------------------------------------------------------------------
static inline u16 float_to_half_d(double v) { _Float16 x = _Float16(v); u16 h; memcpy(&h, &x, 2); return h; }
static inline float lo16(u32 v) { return half_to_float(u16(v & 0xFFFF)); }
static inline float hi16(u32 v) { return half_to_float(u16(v >> 16)); }
static inline u32 pack_d(double lo, double hi) {
    return u32(float_to_half_d(lo)) | (u32(float_to_half_d(hi)) << 16);
}
static inline u32 h2_sub(u32 a, u32 b) { return pack_d(double(lo16(a)) - lo16(b), double(hi16(a)) - hi16(b)); }
static inline u32 h2_mul(u32 a, u32 b) { return pack_d(double(lo16(a)) * lo16(b), double(hi16(a)) * hi16(b)); }
static inline u32 h2_fma(u32 a, u32 b, u32 c) {
    return pack_d(double(lo16(a)) * lo16(b) + lo16(c), double(hi16(a)) * hi16(b) + hi16(c));
}

// ---- wgmma, deferred to its wait -----------------------------------------------------------------
// element (row, k) of a K-major fp16 operand, k < 16
static float emu_operand(u64 desc, int row, int k) {
    const u32 start = u32(desc & 0x3FFF) << 4, lbo = u32((desc >> 16) & 0x3FFF) << 4, sbo = u32((desc >> 32) & 0x3FFF) << 4;
    const int swz = int(desc >> 62), base_off = int((desc >> 49) & 7);
    if (base_off) { fprintf(stderr, "descriptor base offset %d\n", base_off); abort(); }
    u32 a;
    if (swz == 0) {
        a = start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
    } else if (swz == 1) {
        a = start + (row / 8) * sbo + (row % 8) * 128 + k * 2;
        a ^= ((a >> 7) & 7) << 4;
    } else {
        fprintf(stderr, "swizzle mode %d not emulated\n", swz);
        abort();
    }
    u16 h;
    memcpy(&h, emu_at(a), 2);
    return half_to_float(h);
}

struct Mma { float* d; int n; u64 a, b; std::vector<float> seen; };
static thread_local std::vector<Mma> mma_open;
static thread_local std::deque<std::vector<Mma>> mma_groups;

// this thread's products: p[4 j + e] = sum_k A[row, k] B[col, k]
static std::vector<float> emu_products(const Mma& m) {
    const int t = threadIdx.x & 127, warp = t / 32, lane = t % 32, g = lane / 4, i = lane % 4;
    std::vector<float> p(m.n / 2);
    for (int j = 0; j < m.n / 8; ++j)
        for (int e = 0; e < 4; ++e) {
            const int row = 16 * warp + g + 8 * (e >> 1), col = 8 * j + 2 * i + (e & 1);
            float s = 0.0f;
            for (int k = 0; k < 16; ++k) s += emu_operand(m.a, row, k) * emu_operand(m.b, col, k);
            p[4 * j + e] = s;
        }
    return p;
}

template <int N>
static inline void gw_mma(float (&d)[N / 2], u64 a, u64 b) {
    Mma m{d, N, a, b, {}};
    m.seen = emu_products(m);
    mma_open.push_back(std::move(m));
}
static inline void gw_mma_commit() { mma_groups.push_back(std::move(mma_open)); mma_open.clear(); }
template <int N> static inline void gw_mma_wait() {
    while (int(mma_groups.size()) > N) {
        for (const Mma& m : mma_groups.front()) {
            const std::vector<float> p = emu_products(m);
            if (p != m.seen) { fprintf(stderr, "a wgmma's operands changed while it was in flight\n"); abort(); }
            for (int i = 0; i < m.n / 2; ++i) m.d[i] += p[i];
        }
        mma_groups.pop_front();
    }
}

#include GW_SOURCE   // kernels/csrc/gemm_wgmma.cu (the build passes its path and -I kernels/csrc)

// The instantiations: the registered ones (kernels/builtin.py) and small ones that keep CI fast.
#define GW_CASE(Q_, BN_, NWG_, ST_, SWZ_, O16_)                                                             \
    if (q == Q_ && bn == BN_ && nwg == NWG_ && stages == ST_ && swz == SWZ_ && out16 == O16_) {           \
        if (GwSmem<Q_, BN_, NWG_, ST_>::BYTES > int(sizeof(emu_dyn))) return 2;                            \
        run_grid((n + BN_ - 1) / BN_ * ((M + 64 * NWG_ - 1) / (64 * NWG_)), 1, 1, 128 * NWG_,               \
                 [&] { gemm_wgmma<Q_, BN_, NWG_, ST_, SWZ_, O16_>(w, rb, n, K, M, x, out, ldo); });            \
        return 0;                                                                                          \
    }

extern "C" int emu_gemm(int q, int bn, int nwg, int stages, int swz, int out16, const u8* w, int rb, int n, int K,
                        int M, const u16* x, void* out, int ldo) {
    emu_bounds(w, size_t(n) * rb, x, size_t(M) * K * 2);
    GW_CASE(4, 256, 2, 4, 1, 0) GW_CASE(4, 256, 2, 4, 0, 0) GW_CASE(4, 256, 2, 4, 1, 1)
    GW_CASE(4, 128, 2, 4, 1, 0) GW_CASE(6, 128, 2, 4, 1, 0) GW_CASE(6, 128, 2, 4, 0, 0) GW_CASE(6, 128, 2, 4, 1, 1)
    GW_CASE(4, 32, 1, 3, 1, 0) GW_CASE(4, 32, 1, 3, 0, 0) GW_CASE(6, 32, 1, 3, 1, 0) GW_CASE(6, 32, 1, 3, 0, 0)
    GW_CASE(4, 32, 1, 3, 1, 1) GW_CASE(4, 64, 2, 5, 1, 0)
    return 1;
}
