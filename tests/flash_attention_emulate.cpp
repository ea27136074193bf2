// Runs kernels/csrc/flash_attention.cu on the CPU: every CUDA thread is a host thread, the warp-wide
// instructions (mma.sync, ldmatrix, shuffles) are emulated by the 32 threads of a warp exchanging
// their fragments through a barrier, exactly as the PTX manual defines the fragment layouts:
//
//   mma.m16n8k16 (A row, B col):  a0 = A[gid][2tig..+1]  a1 = A[gid+8][2tig..+1]  a2 = A[gid][2tig+8..+9]
//                                 a3 = A[gid+8][2tig+8..+9]   b0 = B[2tig..+1][gid]  b1 = B[2tig+8..+9][gid]
//                                 c0,c1 = C[gid][2tig..+1]  c2,c3 = C[gid+8][2tig..+1]   (lane = 4 gid + tig)
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives matrix i's
//                (row l/4, cols 2(l%4)..+1), or with .trans (rows 2(l%4)..+1, col l/4)
//
// tests/test_attention_flash.py builds this as a shared library (g++ -std=c++20) and checks the
// kernels' outputs against the float64 reference: the CUDA C logic (tiling, masks, online softmax,
// fragment plumbing, the backward's atomics) is tested in CI without a GPU. Rounding of the
// 16-bit operands is the same as on the GPU; accumulation order inside an mma is not.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <barrier>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define FA_EMULATE
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

struct dim3e { int x, y, z; };
static thread_local dim3e threadIdx, blockIdx;
static dim3e gridDim;

struct alignas(16) uint4 { u32 x, y, z, w; };
static inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return uint4{x, y, z, w}; }
struct alignas(8) float2 { float x, y; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }

struct Warp {
    std::barrier<> bar{32};
    u32 a[32][4], b[32][2];
    uintptr_t addr[32];
    float f[32];
};
static thread_local Warp* my_warp;
static thread_local int my_lane;
static thread_local std::barrier<>* my_block;
static std::mutex atomic_lock;

static inline void __syncthreads() { my_block->arrive_and_wait(); }

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
static inline void fa_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    Warp& w = *my_warp;
    const int l = my_lane;
    for (int e = 0; e < 4; ++e) w.a[l][e] = a[e];
    w.b[l][0] = b0;
    w.b[l][1] = b1;
    w.bar.arrive_and_wait();
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L) {
        const int g = L / 4, t = L % 4;
        for (int e = 0; e < 4; ++e) {
            const int row = g + 8 * (e & 1), col = 2 * t + 8 * (e >> 1);
            A[row][col] = fa_half_to_float<BF16>(u16(w.a[L][e] & 0xffff));
            A[row][col + 1] = fa_half_to_float<BF16>(u16(w.a[L][e] >> 16));
        }
        for (int e = 0; e < 2; ++e) {
            B[2 * t + 8 * e][g] = fa_half_to_float<BF16>(u16(w.b[L][e] & 0xffff));
            B[2 * t + 8 * e + 1][g] = fa_half_to_float<BF16>(u16(w.b[L][e] >> 16));
        }
    }
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        c[e] = acc;
    }
    w.bar.arrive_and_wait();
}

template <bool TRANS>
static inline void fa_ldm4(u32 (&r)[4], fa_saddr a) {
    Warp& w = *my_warp;
    const int l = my_lane;
    if (a % 16) abort();                                        // ldmatrix rows are 16-byte aligned
    w.addr[l] = a;
    w.bar.arrive_and_wait();
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
        auto at = [&](int row, int col) { return reinterpret_cast<const u16*>(w.addr[8 * i + row])[col]; };
        r[i] = TRANS ? u32(at(2 * t, g)) | (u32(at(2 * t + 1, g)) << 16)
                     : u32(at(g, 2 * t)) | (u32(at(g, 2 * t + 1)) << 16);
    }
    w.bar.arrive_and_wait();
}

// cp.async as a plain copy: the emulation checks which bytes go where, not the asynchrony
static inline void fa_cp16(void* smem, const void* g, bool valid) {
    if (valid) memcpy(smem, g, 16);
    else memset(smem, 0, 16);
}
static inline void fa_cp_commit() {}
template <int N>
static inline void fa_cp_wait() {}

#include FA_SOURCE   // kernels/csrc/flash_attention.cu (the build passes its path)

// one host thread per CUDA thread, blocks one after another (their shared arrays are statics)
static void run_grid(int gx, int gy, int gz, int threads, const std::function<void()>& body) {
    gridDim = dim3e{gx, gy, gz};
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x) {
                std::barrier<> block(threads);
                std::vector<std::unique_ptr<Warp>> warps;
                for (int i = 0; i < threads / 32; ++i) warps.emplace_back(new Warp());
                std::vector<std::thread> pool;
                for (int tid = 0; tid < threads; ++tid)
                    pool.emplace_back([&, tid] {
                        threadIdx = dim3e{tid, 0, 0};
                        blockIdx = dim3e{x, y, z};
                        my_warp = warps[tid / 32].get();
                        my_lane = tid % 32;
                        my_block = &block;
                        body();
                    });
                for (auto& th : pool) th.join();
            }
}

// The instantiations kernels/flash_attention_mma.py ships (forward_tiles / backward_tiles).
#define FA_FWD(D_, W_, BC_)                                                                                    \
    if (D == D_) {                                                                                             \
        run_grid((T + 16 * W_ - 1) / (16 * W_), H, B, 32 * W_, [&] {                                         \
            if (bf16) fa_forward<D_, W_, BC_, true>(q, k, v, has_mask ? mask : nullptr, T, H, KV, window, scale, o, lse); \
            else fa_forward<D_, W_, BC_, false>(q, k, v, has_mask ? mask : nullptr, T, H, KV, window, scale, o, lse); \
        });                                                                                                    \
        return 0;                                                                                              \
    }

#define FA_BWD(D_, BC_, S_)                                                                                    \
    if (D == D_) {                                                                                             \
        run_grid((T + BC_ - 1) / BC_, KV, B, 32 * (BC_ / 16) * S_, [&] {                                      \
            if (bf16) fa_backward<D_, BC_, S_, true>(q, k, v, dout, lse, drow, has_mask ? mask : nullptr, T, H, KV, \
                                                     window, scale, dout_scale, dq, dk, dv);                   \
            else fa_backward<D_, BC_, S_, false>(q, k, v, dout, lse, drow, has_mask ? mask : nullptr, T, H, KV,  \
                                                 window, scale, dout_scale, dq, dk, dv);                       \
        });                                                                                                    \
        return 0;                                                                                              \
    }

extern "C" int emu_forward(int D, int bf16, const u16* q, const u16* k, const u16* v, const u8* mask, int has_mask,
                           int B, int T, int H, int KV, int window, float scale, float* o, float* lse) {
    FA_FWD(32, 4, 64)
    FA_FWD(64, 4, 64)
    FA_FWD(128, 4, 32)
    FA_FWD(256, 4, 16)
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
