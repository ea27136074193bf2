// Runs kernels/csrc/gemm_wgmma_rs.cu on the CPU (a host thread per CUDA thread, tests/warp_emulate.h), with
// cp.async, mbarriers, setmaxnreg and wgmma as tests/wgmma_emulate.h emulates them: a slot's copies land when its
// full mbarrier's phase completes, a wgmma runs at the wait_group that waits for it and aborts if its A registers
// or its shared operand changed in flight (a slot refilled too early), the register-A fragments are exchanged
// across the warpgroup at issue. fp16x2 arithmetic is rounded as the GPU rounds.
// tests/test_kernels_gemm_wgmma_rs.py builds this with g++ and compares with a float64 reference.
#define GW_EMULATE
#include "warp_emulate.h"

#include "common_host.h"
#include "wgmma_emulate.h"

#include "gemm_wgmma_host.h"

#include GR_SOURCE   // kernels/csrc/gemm_wgmma_rs.cu (the build passes its path and -I kernels/csrc)

#define GR_CASE(BX_, XS_, WS_, O16_, TMA_, MT_, Q_)                                                         \
    if (bx == BX_ && xs == XS_ && ws == WS_ && out16 == O16_ && tma == TMA_ && mt == MT_ && q == Q_) {      \
        if (GrSmem<BX_, XS_, WS_, MT_, Q_>::BYTES > int(sizeof(emu_dyn))) return 2;                         \
        run_grid((n + 128 * MT_ - 1) / (128 * MT_) * ((M + BX_ - 1) / BX_), 1, 1, 384, [&] {                \
            gemm_wgmma_rs<BX_, XS_, WS_, O16_, TMA_, MT_, Q_>(w, rb, n, K, M, x, out, ldo, &map);           \
        });                                                                                                \
        return 0;                                                                                          \
    }

// tma: x through the tensor-memory accelerator, its tensor map the emulation's EmuTmap of x (fp16 [M, K], box 64 x bx)
extern "C" int emu_gemm_rs(int q, int bx, int xs, int ws, int mt, int out16, int tma, const u8* w, int rb, int n, int K,
                           int M, const u16* x, void* out, int ldo) {
    emu_bounds(w, size_t(n) * rb, x, size_t(M) * K * 2);
    const EmuTmap map{reinterpret_cast<const u8*>(x), (unsigned long long)K, (unsigned long long)M,
                      2ull * (unsigned long long)K, 64u, unsigned(bx), 2u, 1};
    // the cases of tests/test_kernels_gemm_wgmma_rs.py
    GR_CASE(256, 4, 2, 0, false, 1, 4) GR_CASE(128, 6, 2, 1, false, 1, 4) GR_CASE(64, 2, 2, 0, false, 1, 4)
    GR_CASE(256, 4, 2, 0, true, 1, 4) GR_CASE(64, 3, 3, 1, true, 1, 4) GR_CASE(128, 5, 2, 0, true, 2, 4)
    GR_CASE(64, 3, 2, 1, false, 2, 4) GR_CASE(64, 3, 2, 1, false, 2, 6) GR_CASE(256, 4, 2, 0, true, 1, 6)
    GR_CASE(128, 5, 2, 0, true, 2, 6)
    return 1;
}

extern "C" int emu_gemm_rs_smem(int q, int bx, int xs, int ws, int mt) {
#define GR_BYTES(BX_, XS_, WS_, MT_)                                                                         \
    if (bx == BX_ && xs == XS_ && ws == WS_ && mt == MT_)                                                  \
        return q == 4 ? GrSmem<BX_, XS_, WS_, MT_, 4>::BYTES : GrSmem<BX_, XS_, WS_, MT_, 6>::BYTES;
    GR_BYTES(256, 4, 2, 1) GR_BYTES(128, 6, 2, 1) GR_BYTES(64, 2, 2, 1) GR_BYTES(64, 3, 3, 1) GR_BYTES(128, 5, 2, 2)
    GR_BYTES(64, 3, 2, 2)
    return -1;
}
