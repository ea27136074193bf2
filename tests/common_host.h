// kernels/csrc/common.cuh's device helpers on the host, for the CPU emulations of the CUDA C
// (tests/gemm_mma_emulate.cpp, tests/decode_emulate.cpp): the same meaning, plain C++. Include after
// warp_emulate.h; defining common.cuh's include guard keeps the real one out.
#pragma once
#define Q4KDISTILL_COMMON_CUH

struct alignas(8) uint2 { u32 x, y; };
struct alignas(16) float4 { float x, y, z, w; };
static inline uint2 make_uint2(u32 x, u32 y) { return uint2{x, y}; }

template <class T> static inline T __ldg(const T* p) { return *p; }
static inline uint4 ldg16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
static inline void st16(void* p, u32 a, u32 b, u32 c, u32 d) {
    if (reinterpret_cast<uintptr_t>(p) % 16) { fprintf(stderr, "misaligned 16-byte store %p\n", p); abort(); }
    const u32 v[4] = {a, b, c, d};
    memcpy(p, v, 16);
}
static inline float half_to_float(u16 h) { _Float16 x; memcpy(&x, &h, 2); return float(x); }
static inline u16 float_to_half(float f) { _Float16 x = _Float16(f); u16 h; memcpy(&h, &x, 2); return h; }   // nearest even
static inline u32 pack_half2(float lo, float hi) { return u32(float_to_half(lo)) | (u32(float_to_half(hi)) << 16); }
static inline float small_int_to_float(u32 n) { return float(n); }
static inline float byte_to_float(u32 word, int k) { return float((word >> (8 * k)) & 0xFFu); }
static inline u32 __funnelshift_r(u32 lo, u32 hi, u32 s) { return u32(((uint64_t(hi) << 32) | lo) >> (s & 31)); }
static inline u32 __vsub4(u32 a, u32 b) {
    u32 r = 0;
    for (int i = 0; i < 4; ++i) r |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xFFu) << (8 * i);
    return r;
}
static inline uint2 ld8_a2(const u8* p) { uint2 r; memcpy(&r, p, 8); return r; }
