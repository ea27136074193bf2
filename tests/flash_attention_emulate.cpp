// Runs kernels/csrc/flash_attention.cu on the CPU, with the warp emulation of tests/warp_emulate.h
// (mma.sync, ldmatrix; shuffles and atomics below). tests/test_attention_flash.py builds this as a
// shared library (g++ -std=c++20) and checks the kernels' outputs against the float64 reference: the
// CUDA C logic (tiling, masks, online softmax, fragment plumbing, the backward's atomics) is tested in
// CI without a GPU.
#include <mutex>

#define FA_EMULATE
#include "warp_emulate.h"

static inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return uint4{x, y, z, w}; }
struct alignas(8) float2 { float x, y; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }

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
static inline void fa_cp_commit() {}
template <int N>
static inline void fa_cp_wait() {}

#include FA_SOURCE   // kernels/csrc/flash_attention.cu (the build passes its path)

// The instantiations kernels/flash_attention_mma.py ships (forward_tiles / backward_tiles); the forward's
// MT (m16 tiles per warp: 16 MT query rows per warp) is picked by the caller.
#define FA_FWD(D_, W_, BC_, MT_)                                                                               \
    if (D == D_ && mt == MT_) {                                                                                \
        run_grid((T + 16 * MT_ * W_ - 1) / (16 * MT_ * W_), H, B, 32 * W_, [&] {                             \
            const u8* m = has_mask ? mask : nullptr;                                                           \
            if (bf16) fa_forward<D_, W_, BC_, true, 0, MT_>(q, k, v, m, T, H, KV, window, scale, o, lse);       \
            else fa_forward<D_, W_, BC_, false, 0, MT_>(q, k, v, m, T, H, KV, window, scale, o, lse);           \
        });                                                                                                    \
        return 0;                                                                                              \
    }

#define FA_BWD(D_, BC_, S_)                                                                                    \
    if (D == D_) {                                                                                             \
        run_grid((T + BC_ - 1) / BC_, H, B, 32 * (BC_ / 16) * S_, [&] {                                      \
            if (bf16) fa_backward<D_, BC_, S_, true>(q, k, v, dout, lse, drow, has_mask ? mask : nullptr, T, H, KV, \
                                                     window, scale, dout_scale, dq, dk, dv);                   \
            else fa_backward<D_, BC_, S_, false>(q, k, v, dout, lse, drow, has_mask ? mask : nullptr, T, H, KV,  \
                                                 window, scale, dout_scale, dq, dk, dv);                       \
        });                                                                                                    \
        return 0;                                                                                              \
    }

extern "C" int emu_forward(int D, int mt, int bf16, const u16* q, const u16* k, const u16* v, const u8* mask,
                           int has_mask, int B, int T, int H, int KV, int window, float scale, float* o, float* lse) {
    FA_FWD(32, 4, 64, 1)
    FA_FWD(32, 4, 64, 2)
    FA_FWD(64, 4, 64, 1)
    FA_FWD(64, 4, 64, 2)
    FA_FWD(128, 4, 32, 1)
    FA_FWD(256, 4, 16, 1)
    return 1;
}

// the forward writing o in 16 bits (OUT 1: fp16, 2: bf16)
#define FA_FWD16(D_, W_, BC_, MT_)                                                                             \
    if (D == D_ && mt == MT_) {                                                                                \
        run_grid((T + 16 * MT_ * W_ - 1) / (16 * MT_ * W_), H, B, 32 * W_, [&] {                             \
            const u8* m = has_mask ? mask : nullptr;                                                           \
            if (bf16 && out == 2) fa_forward<D_, W_, BC_, true, 2, MT_>(q, k, v, m, T, H, KV, window, scale, o, lse); \
            else if (bf16) fa_forward<D_, W_, BC_, true, 1, MT_>(q, k, v, m, T, H, KV, window, scale, o, lse);  \
            else if (out == 2) fa_forward<D_, W_, BC_, false, 2, MT_>(q, k, v, m, T, H, KV, window, scale, o, lse); \
            else fa_forward<D_, W_, BC_, false, 1, MT_>(q, k, v, m, T, H, KV, window, scale, o, lse);          \
        });                                                                                                    \
        return 0;                                                                                              \
    }

extern "C" int emu_forward16(int D, int mt, int bf16, int out, const u16* q, const u16* k, const u16* v,
                             const u8* mask, int has_mask, int B, int T, int H, int KV, int window, float scale,
                             void* o, float* lse) {
    FA_FWD16(64, 4, 64, 1)
    FA_FWD16(64, 4, 64, 2)
    FA_FWD16(128, 4, 32, 1)
    return 1;
}

extern "C" int emu_backward(int D, int bf16, const u16* q, const u16* k, const u16* v, const u16* dout,
                            const float* lse, const float* drow, const u8* mask, int has_mask, int B, int T, int H,
                            int KV, int window, float scale, const float* dout_scale, float* dq, float* dk,
                            float* dv) {
    FA_BWD(32, 64, 1)
    FA_BWD(64, 64, 1)
    FA_BWD(128, 32, 2)
    FA_BWD(256, 16, 4)
    return 1;
}
