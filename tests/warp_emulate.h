// What tests/flash_attention_emulate.cpp and tests/gemm_mma_emulate.cpp share: CUDA C run on the CPU with
// every CUDA thread a host thread, and the warp-wide instructions emulated by the 32 threads of a warp
// exchanging their fragments through a barrier, with the fragment layouts of the PTX manual:
//
//   mma.m16n8k16 (A row, B col):  a0 = A[g][2t..+1]  a1 = A[g+8][2t..+1]  a2 = A[g][2t+8..+9]
//                                 a3 = A[g+8][2t+8..+9]   b0 = B[2t..+1][g]  b1 = B[2t+8..+9][g]
//                                 c0,c1 = C[g][2t..+1]  c2,c3 = C[g+8][2t..+1]   (lane = 4 g + t)
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives matrix i's
//                (row l/4, cols 2(l%4)..+1), or with .trans (rows 2(l%4)..+1, col l/4)
//
// Rounding of the 16-bit operands is the GPU's; the accumulation order inside an mma is not.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

struct dim3e { int x, y, z; };
static thread_local dim3e threadIdx, blockIdx;
static dim3e gridDim, blockDim;

struct alignas(16) uint4 { u32 x, y, z, w; };
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }

// ---- the warp: fragments exchanged through a barrier ----
struct Warp {
    std::barrier<> bar{32};
    u32 a[32][4], b[32][2];
    uintptr_t addr[32];
    float f[32];
};
static thread_local Warp* my_warp;
static thread_local int my_lane;
// The block barrier counts its phases: emu_epoch names the stretch between two __syncthreads, so
// the wgmma emulation can tell a shared-memory write that no barrier separates from a read.
static std::atomic<long> emu_epoch{1};
struct EmuEpochTick {
    void operator()() noexcept { emu_epoch.fetch_add(1); }
};
using EmuBlockBarrier = std::barrier<EmuEpochTick>;
static thread_local EmuBlockBarrier* my_block;

static inline void __syncthreads() { my_block->arrive_and_wait(); }

// mma.sync.m16n8k16 with f32 accumulators; TO_FLOAT reads one 16-bit operand (fp16 or bf16)
template <float (*TO_FLOAT)(u16)>
static inline void emu_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
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
            A[row][col] = TO_FLOAT(u16(w.a[L][e] & 0xffff));
            A[row][col + 1] = TO_FLOAT(u16(w.a[L][e] >> 16));
        }
        for (int e = 0; e < 2; ++e) {
            B[2 * t + 8 * e][g] = TO_FLOAT(u16(w.b[L][e] & 0xffff));
            B[2 * t + 8 * e + 1][g] = TO_FLOAT(u16(w.b[L][e] >> 16));
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

// ldmatrix.x4 (.trans with TRANS); `a` is this lane's row address
template <bool TRANS>
static inline void emu_ldm4(u32 (&r)[4], uintptr_t a) {
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

// cp.async's checks for the GEMM emulations: 16-byte aligned addresses, 0..16 bytes read, and those
// inside W or x (the bounds each run sets: emu_bounds)
static const u8 *emu_w_lo, *emu_w_hi, *emu_x_lo, *emu_x_hi;
static inline void emu_bounds(const u8* w, size_t w_bytes, const void* x, size_t x_bytes) {
    emu_w_lo = w, emu_w_hi = w + w_bytes;
    emu_x_lo = static_cast<const u8*>(x), emu_x_hi = emu_x_lo + x_bytes;
}
static inline void emu_check_cp16(const void* smem, const void* g, int valid, int size = 16) {
    const u8* s = static_cast<const u8*>(g);
    const bool in_w = s >= emu_w_lo && s + valid <= emu_w_hi, in_x = s >= emu_x_lo && s + valid <= emu_x_hi;
    if (reinterpret_cast<uintptr_t>(smem) % size || reinterpret_cast<uintptr_t>(g) % size || valid < 0 || valid > size ||
        (valid && !in_w && !in_x)) {
        fprintf(stderr, "bad cp.async: smem %p global %p valid %d\n", smem, g, valid);
        abort();
    }
}

// one host thread per CUDA thread, blocks one after another (their shared arrays are statics)
static void run_grid(int gx, int gy, int gz, int threads, const std::function<void()>& body) {
    gridDim = dim3e{gx, gy, gz};
    blockDim = dim3e{threads, 1, 1};
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x) {
                EmuBlockBarrier block(threads);
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
