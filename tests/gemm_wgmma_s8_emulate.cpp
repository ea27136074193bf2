// Runs kernels/csrc/gemm_wgmma_s8.cu on the CPU (a host thread per CUDA thread, tests/warp_emulate.h), with
// cp.async and wgmma (int8: exact s32 sums) as tests/wgmma_emulate.h emulates them: deferred to the waits that
// wait for them, descriptors decoded by the PTX manual's rules; cp.async reads stay inside W and x8 / dx.
// tests/test_kernels_gemm_wgmma_s8.py builds this with g++ and compares with kernels/requant8.py.
#define GW_EMULATE
#include "warp_emulate.h"

#include "common_host.h"
#include "wgmma_emulate.h"
#include "gemm_wgmma_host.h"

#include GS_SOURCE   // kernels/csrc/gemm_wgmma_s8.cu (the build passes its path and -I kernels/csrc)

// x8 and dx are copied into one buffer (the x region cp.async may read)
extern "C" int emu_gemm_s8(int q, int out16, const u8* w, int rb, int n, int K, int M, const signed char* x8,
                           const float* dx, int Mp, void* out, int ldo) {
    std::vector<u8> xs(size_t(M) * K + 16 + size_t(K / 256) * Mp * 4);
    const size_t dx_at = (size_t(M) * K + 15) / 16 * 16;
    memcpy(xs.data(), x8, size_t(M) * K);
    memcpy(xs.data() + dx_at, dx, size_t(K / 256) * Mp * 4);
    const signed char* xx = reinterpret_cast<const signed char*>(xs.data());
    const float* dd = reinterpret_cast<const float*>(xs.data() + dx_at);
    emu_bounds(w, size_t(n) * rb, xs.data(), xs.size());
    const int grid = (n + 127) / 128 * ((M + 127) / 128);
#define GS_CASE(Q_, O_)                                                                                        \
    if (q == Q_ && out16 == O_) {                                                                              \
        run_grid(grid, 1, 1, 256, [&] { gemm_wgmma_s8<Q_, O_>(w, rb, n, K, M, xx, dd, Mp, out, ldo); });       \
        return 0;                                                                                              \
    }
    GS_CASE(4, 0) GS_CASE(4, 1) GS_CASE(6, 0) GS_CASE(6, 1)
    return 1;
}

extern "C" int emu_gemm_s8_smem(int q) { return q == 4 ? GsSmem<4>::BYTES : q == 6 ? GsSmem<6>::BYTES : 0; }
