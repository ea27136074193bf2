// Runs kernels/csrc/gemm_wgmma.cu on the CPU (a host thread per CUDA thread, tests/warp_emulate.h),
// with cp.async and wgmma as tests/wgmma_emulate.h emulates them (deferred to the waits that wait
// for them; descriptors decoded independently of the kernel's gw_chunk). cp.async reads stay inside W / x.
// fp16x2 arithmetic is rounded as the GPU rounds (to nearest even, once per operation).
// tests/test_kernels_gemm_wgmma.py builds this with g++ and compares with a float64 reference.
#define GW_EMULATE
#include "warp_emulate.h"

#include "common_host.h"
#include "wgmma_emulate.h"

struct alignas(8) float2 { float x, y; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }

static inline u32 __byte_perm(u32 x, u32 y, u32 s) {
    const uint64_t v = (uint64_t(y) << 32) | x;
    u32 r = 0;
    for (int i = 0; i < 4; ++i) r |= u32((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}

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
