// Host versions of kernels/csrc/flash_attention.cu's device helpers (FA_EMULATE), on the warp emulation of
// tests/warp_emulate.h: mma.sync and ldmatrix through it, shuffles through the warp's barrier, atomics
// under a lock, cp.async as a plain copy (the emulation checks which bytes go where, not the asynchrony;
// the wgmma forward's cp.async are tests/wgmma_emulate.h's, deferred). Include after warp_emulate.h.
#pragma once
#include <mutex>

static inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return uint4{x, y, z, w}; }
struct alignas(8) float2 { float x, y; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }

static std::mutex atomic_lock;

static inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> g(atomic_lock);
    const float old = *p;
    *p = old + v;
    return old;
}

static inline float __shfl_xor_sync(unsigned, float v, int x) {
    Warp& w = *my_warp;
    w.f[my_lane] = v;
    w.bar.arrive_and_wait();
    const float r = w.f[my_lane ^ x];
    w.bar.arrive_and_wait();
    return r;
}

template <bool BF16>
static inline float fa_half_to_float(u16 h) {
    if (BF16) return __int_as_float(int(u32(h) << 16));
    _Float16 x;
    memcpy(&x, &h, 2);
    return float(x);
}

template <bool BF16>
static inline u16 fa_float_to_half(float f) {
    if (BF16) {
        u32 n;
        memcpy(&n, &f, 4);
        return u16((n + 0x7FFFu + ((n >> 16) & 1u)) >> 16);   // round to nearest even (finite f)
    }
    _Float16 x = _Float16(f);                                   // round to nearest even
    u16 h;
    memcpy(&h, &x, 2);
    return h;
}

typedef uintptr_t fa_saddr;

template <bool BF16>
static inline u32 fa_pack(float lo, float hi) {
    return u32(fa_float_to_half<BF16>(lo)) | (u32(fa_float_to_half<BF16>(hi)) << 16);
}

static inline fa_saddr fa_smem(const void* p) { return reinterpret_cast<uintptr_t>(p); }

static inline float fa_exp2(float x) { return exp2f(x); }

static inline void fa_red2(float* p, float a, float b) {
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
}

template <bool BF16>
static inline void fa_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma<fa_half_to_float<BF16>>(c, a, b0, b1); }

template <bool TRANS>
static inline void fa_ldm4(u32 (&r)[4], fa_saddr a) { emu_ldm4<TRANS>(r, a); }

// cp.async as a plain copy: the emulation checks which bytes go where, not the asynchrony
static inline void fa_cp16(void* smem, const void* g, bool valid) {
    if (valid) memcpy(smem, g, 16);
    else memset(smem, 0, 16);
}
static inline void fa_cp4(void* smem, const void* g, bool valid) {
    if (reinterpret_cast<uintptr_t>(smem) % 4 || reinterpret_cast<uintptr_t>(g) % 4) {
        fprintf(stderr, "bad cp.async of 4 bytes: smem %p global %p\n", smem, g);
        abort();
    }
    if (valid) memcpy(smem, g, 4);
    else memset(smem, 0, 4);
}
static inline void fa_cp_commit() {}
template <int N>
static inline void fa_cp_wait() {}

