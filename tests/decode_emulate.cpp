// Runs kernels/csrc/decode_cast.cu's decoders on the CPU (a host thread per CUDA thread; shared memory
// and __syncthreads as tests/warp_emulate.h gives them, common.cuh's helpers from tests/common_host.h),
// so the indexing, staging and alignment cases of the C are tested in CI without a GPU.
// tests/test_kernels_linked.py builds it with g++ and compares with the float64 reference.
#define DC_EMULATE
#include "warp_emulate.h"
#include "common_host.h"

#include DC_SOURCE   // kernels/csrc/decode_cast.cu (the build passes its path and -I kernels/csrc)

// which: 0 q4k_decode_f16, 1 q6k_decode_f16, 2 q6k_decode_f16_staged; threads: the direct kernels' block
extern "C" int emu_decode(int which, const u8* w, int row_bytes, int n, int K, u32* out, int threads) {
    if (which == 2) {
        run_grid(n, (K / 256 + Q6K_STAGE_WARPS - 1) / Q6K_STAGE_WARPS, 1, 32 * Q6K_STAGE_WARPS,
                 [&] { q6k_decode_f16_staged(w, row_bytes, n, K, out); });
        return 0;
    }
    const int octs = K / 8;
    run_grid(n, (octs + threads - 1) / threads, 1, threads, [&] {
        if (which == 0) q4k_decode_f16(w, row_bytes, n, K, out);
        else q6k_decode_f16(w, row_bytes, n, K, out);
    });
    return 0;
}
