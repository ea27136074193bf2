// Runs kernels/csrc/gemm_mma.cu on the CPU with the warp emulation of tests/warp_emulate.h (mma.sync,
// ldmatrix), as tests/flash_attention_emulate.cpp does for flash attention, and:
//   cp.async with src-size: `valid` bytes copied, the rest of the 16 zero-filled; the emulation
//                aborts on a misaligned address or a read outside W / x (the bounds are set per run)
//
// common.cuh's device helpers (inline PTX, __ldg, byte permutes) are replaced by host versions of the
// same meaning below (its include guard is defined first); block_layouts.cuh and block_decode.cuh
// are the real ones. tests/test_kernels_gemm_mma.py builds this with g++ and compares the kernel's
// output with the float64 reference: the CUDA C itself (tiling, ring, byte offsets, decode, guards)
// is tested in CI without a GPU. Rounding of the fp16 operands is the GPU's; the accumulation
// order inside an mma is not.
#define GM_EMULATE
#include "warp_emulate.h"

#include "common_host.h"        // common.cuh's device helpers, on the host

static inline u32 gm_smem(const void* p) { return u32(reinterpret_cast<uintptr_t>(p)); }

static inline void gm_cp16(void* smem, const void* g, int valid) {
    emu_check_cp16(smem, g, valid);
    memcpy(smem, g, valid);
    memset(static_cast<u8*>(smem) + valid, 0, 16 - valid);
}
static inline void gm_commit() {}
template <int N> static inline void gm_wait() {}

static inline void gm_ldm4(u32 (&r)[4], const void* p) { emu_ldm4<false>(r, reinterpret_cast<uintptr_t>(p)); }

static inline void gm_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) { emu_mma<half_to_float>(c, a, b0, b1); }

#include GM_SOURCE   // kernels/csrc/gemm_mma.cu (the build passes its path and -I kernels/csrc)

// The instantiations: the registered tiles (kernels/builtin.py, ring depths of linked.gemm_mma_stages)
// and a small one (2 x 2 warps of one m16n8 tile, no ring) that keeps CI fast.
#define GM_CASE(Q_, BM_, BN_, WM_, WN_, S_)                                                                        \
    if (q == Q_ && bm == BM_ && bn == BN_ && wm == WM_ && wn == WN_ && stages == S_) {                             \
        run_grid((n + BN_ - 1) / BN_ * ((M + BM_ - 1) / BM_), 1, 1, 32 * (BM_ / WM_) * (BN_ / WN_),                 \
                 [&] { gemm_mma<Q_, BM_, BN_, WM_, WN_, S_>(w, rb, n, K, M, x, out); });                          \
        return 0;                                                                                                  \
    }

extern "C" int emu_gemm(int q, int bm, int bn, int wm, int wn, int stages, const u8* w, int rb, int n, int K, int M,
                        const u16* x, float* out) {
    emu_bounds(w, size_t(n) * rb, x, size_t(M) * K * 2);
    GM_CASE(4, 64, 64, 32, 32, 3) GM_CASE(6, 64, 64, 32, 32, 2)
    GM_CASE(4, 128, 64, 32, 32, 2) GM_CASE(6, 128, 64, 32, 32, 1)
    GM_CASE(4, 128, 64, 64, 32, 2) GM_CASE(6, 128, 64, 64, 32, 1)
    GM_CASE(4, 32, 16, 16, 8, 2) GM_CASE(6, 32, 16, 16, 8, 2)
    return 1;
}
