// Runs kernels/csrc/flash_attention.cu on the CPU, with the warp emulation of tests/warp_emulate.h
// (mma.sync, ldmatrix; shuffles and atomics: tests/fa_emulate.h). tests/test_attention_flash.py builds this as a
// shared library (g++ -std=c++20) and checks the kernels' outputs against the float64 reference: the
// CUDA C logic (tiling, masks, online softmax, fragment plumbing, the backward's atomics) is tested in
// CI without a GPU.
#define FA_EMULATE
#include "warp_emulate.h"
#include "fa_emulate.h"

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
