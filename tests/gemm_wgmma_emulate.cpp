// Runs kernels/csrc/gemm_wgmma.cu on the CPU (a host thread per CUDA thread, tests/warp_emulate.h),
// with cp.async and wgmma as tests/wgmma_emulate.h emulates them (deferred to the waits that wait
// for them; descriptors decoded independently of the kernel's gw_chunk). cp.async reads stay inside W / x.
// fp16x2 arithmetic is rounded as the GPU rounds (to nearest even, once per operation).
// tests/test_kernels_gemm_wgmma.py builds this with g++ and compares with a float64 reference.
#define GW_EMULATE
#include "warp_emulate.h"

#include "common_host.h"
#include "wgmma_emulate.h"

#include "gemm_wgmma_host.h"

#include GW_SOURCE   // kernels/csrc/gemm_wgmma.cu (the build passes its path and -I kernels/csrc)

// The instantiations: the registered ones (kernels/builtin.py) and small ones that keep CI fast.
#define GW_CASE_M(Q_, BN_, NWG_, ST_, SWZ_, O16_, MT_)                                                     \
    if (q == Q_ && bn == BN_ && nwg == NWG_ && stages == ST_ && swz == SWZ_ && out16 == O16_ && mt == MT_) { \
        if (GwSmem<Q_, BN_, NWG_, ST_, MT_>::BYTES > int(sizeof(emu_dyn))) return 2;                       \
        run_grid((n + BN_ - 1) / BN_ * ((M + 64 * NWG_ * MT_ - 1) / (64 * NWG_ * MT_)), 1, 1, 128 * NWG_,   \
                 [&] { gemm_wgmma<Q_, BN_, NWG_, ST_, SWZ_, O16_, MT_>(w, rb, n, K, M, x, out, ldo); });       \
        return 0;                                                                                          \
    }
#define GW_CASE(Q_, BN_, NWG_, ST_, SWZ_, O16_) GW_CASE_M(Q_, BN_, NWG_, ST_, SWZ_, O16_, 1)

extern "C" int emu_gemm(int q, int bn, int nwg, int stages, int swz, int out16, int mt, const u8* w, int rb, int n,
                        int K, int M, const u16* x, void* out, int ldo) {
    emu_bounds(w, size_t(n) * rb, x, size_t(M) * K * 2);
    GW_CASE_M(4, 128, 2, 4, 1, 0, 2) GW_CASE_M(6, 128, 2, 4, 1, 0, 2) GW_CASE_M(4, 128, 2, 4, 1, 1, 2)
    GW_CASE_M(6, 128, 2, 4, 1, 1, 2) GW_CASE_M(4, 32, 1, 3, 1, 0, 2) GW_CASE_M(6, 32, 1, 3, 0, 0, 2)
    GW_CASE(4, 256, 2, 4, 1, 0) GW_CASE(4, 256, 2, 4, 0, 0) GW_CASE(4, 256, 2, 4, 1, 1)
    GW_CASE(4, 128, 2, 4, 1, 0) GW_CASE(6, 128, 2, 4, 1, 0) GW_CASE(6, 128, 2, 4, 0, 0) GW_CASE(6, 128, 2, 4, 1, 1)
    GW_CASE(4, 32, 1, 3, 1, 0) GW_CASE(4, 32, 1, 3, 0, 0) GW_CASE(6, 32, 1, 3, 1, 0) GW_CASE(6, 32, 1, 3, 0, 0)
    GW_CASE(4, 32, 1, 3, 1, 1) GW_CASE(4, 64, 2, 5, 1, 0)
    return 1;
}
