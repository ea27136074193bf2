// Host versions of what kernels/csrc/gemm_wgmma.cu uses beyond wgmma_ptx.cuh (tests/wgmma_emulate.h) and
// common.cuh (tests/common_host.h): float2, __byte_perm and the fp16x2 arithmetic, rounded as the GPU rounds
// (to nearest even, once per operation). For tests/gemm_wgmma_emulate.cpp and tests/gemm_wgmma_s8_emulate.cpp.
#pragma once

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
static inline u32 h2_add(u32 a, u32 b) { return pack_d(double(lo16(a)) + lo16(b), double(hi16(a)) + hi16(b)); }
static inline u32 h2_fma(u32 a, u32 b, u32 c) {
    return pack_d(double(lo16(a)) * lo16(b) + lo16(c), double(hi16(a)) * hi16(b) + hi16(c));
}

