// Runs kernels/csrc/flash_attention_wgmma.cu on the CPU: a host thread per CUDA thread (tests/warp_emulate.h),
// flash_attention.cu's helpers as tests/fa_emulate.h has them, cp.async and wgmma as tests/wgmma_emulate.h
// emulates them (deferred to the waits that wait for them; descriptors, K-major and MN-major, decoded
// by the PTX manual's rules; A-from-register fragments exchanged across the warpgroup).
// tests/test_attention_flash.py builds this with g++ and compares with the float64 reference.
#define FA_EMULATE
#define GW_EMULATE
#include "warp_emulate.h"

#include "common_host.h"
#include "fa_emulate.h"
#include "wgmma_emulate.h"

#include FAW_SOURCE   // kernels/csrc/flash_attention_wgmma.cu (the build passes its path and -I kernels/csrc)

// The instantiations kernels/flash_attention_mma.py ships (WGMMA_TILES) and small ones that keep CI fast;
// q, k, v are copied into one buffer, the only memory cp.async may read.
#ifndef FAW_SCHED
#define FAW_SCHED 13   // the instruction schedule (kernels/flash_attention_mma.py SCHEDS)
#endif

#define FAW_CASE(D_, BN_, NWG_, ST_)                                                                         \
    if (D == D_ && bn == BN_ && nwg == NWG_ && stages == ST_) {                                              \
        if (FawSmem<D_, BN_, NWG_, ST_>::BYTES > int(sizeof(emu_dyn))) return 2;                              \
        run_grid((T + 64 * NWG_ - 1) / (64 * NWG_), H, B, 128 * NWG_, [&] {                                  \
            if (bf16 && out == 0) faw_forward<D_, BN_, NWG_, ST_, true, 0>(qq, kk, vv, m, T, H, KV, window, scale, o, lse); \
            else if (bf16 && out == 2) faw_forward<D_, BN_, NWG_, ST_, true, 2>(qq, kk, vv, m, T, H, KV, window, scale, o, lse); \
            else if (!bf16 && out == 0) faw_forward<D_, BN_, NWG_, ST_, false, 0>(qq, kk, vv, m, T, H, KV, window, scale, o, lse); \
            else faw_forward<D_, BN_, NWG_, ST_, false, 1>(qq, kk, vv, m, T, H, KV, window, scale, o, lse);  \
        });                                                                                                  \
        return 0;                                                                                            \
    }

// q, k, v copied into one buffer, the only memory cp.async may read (nq, nk: elements of q and of k)
struct EmuQKV {
    std::vector<u16> all;
    const u16 *q, *k, *v;
    EmuQKV(const u16* q_, const u16* k_, const u16* v_, size_t nq, size_t nk) : all(nq + 2 * nk) {
        memcpy(all.data(), q_, 2 * nq);
        memcpy(all.data() + nq, k_, 2 * nk);
        memcpy(all.data() + nq + nk, v_, 2 * nk);
        q = all.data(), k = q + nq, v = k + nk;
        emu_bounds(reinterpret_cast<const u8*>(q), 2 * all.size(), q, 0);
    }
};

// out: 0 o float32, 1 fp16 bits (fp16 inputs only), 2 bf16 bits (bf16 inputs only)
extern "C" int emu_wgmma_forward(int D, int bn, int nwg, int stages, int bf16, int out, const u16* q, const u16* k,
                                 const u16* v, const u8* mask, int has_mask, int B, int T, int H, int KV, int window,
                                 float scale, void* o, float* lse) {
    if (out != 0 && out != (bf16 ? 2 : 1)) return 3;
    const EmuQKV in(q, k, v, size_t(B) * T * H * D, size_t(B) * T * KV * D);
    const u16 *qq = in.q, *kk = in.k, *vv = in.v;
    const u8* m = has_mask ? mask : nullptr;
    FAW_CASE(64, 64, 1, 3)
    FAW_CASE(64, 64, 2, 4)
    FAW_CASE(128, 64, 1, 3)
    FAW_CASE(64, 128, 2, 4)
    FAW_CASE(128, 128, 2, 3)
    return 1;
}

// the warp-specialised forward (faw_forward_ws<D, BN, STAGES>, schedule 15): 384 threads a block; out as above
#define FAW_WS_CASE(D_, BN_, ST_)                                                                            \
    if (D == D_ && bn == BN_ && stages == ST_) {                                                             \
        if (FawWsSmem<D_, BN_, ST_>::BYTES > int(sizeof(emu_dyn))) return 2;                                 \
        run_grid((T + 127) / 128, H, B, 384, [&] {                                                           \
            if (bf16 && out == 0) faw_forward_ws<D_, BN_, ST_, true, 0>(qq, kk, vv, m, T, H, KV, window, scale, o, lse); \
            else if (bf16) faw_forward_ws<D_, BN_, ST_, true, 2>(qq, kk, vv, m, T, H, KV, window, scale, o, lse); \
            else if (out == 0) faw_forward_ws<D_, BN_, ST_, false, 0>(qq, kk, vv, m, T, H, KV, window, scale, o, lse); \
            else faw_forward_ws<D_, BN_, ST_, false, 1>(qq, kk, vv, m, T, H, KV, window, scale, o, lse);     \
        });                                                                                                  \
        return 0;                                                                                            \
    }
extern "C" int emu_wgmma_forward_ws(int D, int bn, int stages, int bf16, int out, const u16* q, const u16* k,
                                    const u16* v, const u8* mask, int has_mask, int B, int T, int H, int KV, int window,
                                    float scale, void* o, float* lse) {
    if (out != 0 && out != (bf16 ? 2 : 1)) return 3;
    const EmuQKV in(q, k, v, size_t(B) * T * H * D, size_t(B) * T * KV * D);
    const u16 *qq = in.q, *kk = in.k, *vv = in.v;
    const u8* m = has_mask ? mask : nullptr;
    FAW_WS_CASE(64, 64, 2)
    FAW_WS_CASE(128, 64, 2)
    FAW_WS_CASE(64, 128, 4)
    FAW_WS_CASE(128, 128, 3)
    return 1;
}
extern "C" int emu_wgmma_ws_smem(int D, int bn, int stages) {
#define FAW_WS_SMEM(D_, BN_, ST_) if (D == D_ && bn == BN_ && stages == ST_) return FawWsSmem<D_, BN_, ST_>::BYTES;
    FAW_WS_SMEM(64, 64, 2) FAW_WS_SMEM(128, 64, 2) FAW_WS_SMEM(64, 128, 4) FAW_WS_SMEM(128, 128, 3)
    return 0;
}

// the backward (faw_backward<D, BF16>): dq zeroed by the caller, dk / dv too under GQA
extern "C" int emu_wgmma_backward(int D, int bf16, const u16* q, const u16* k, const u16* v, const u16* dout,
                                  const float* lse_in, const float* drow_in, const u8* mask, int has_mask, int B, int T, int H,
                                  int KV, int window, float scale, const float* dout_scale, float* dq, float* dk,
                                  float* dv) {
    const size_t nq = size_t(B) * T * H * D, nk = size_t(B) * T * KV * D;
    std::vector<u16> all(2 * nq + 2 * nk);
    memcpy(all.data(), q, 2 * nq);
    memcpy(all.data() + nq, dout, 2 * nq);
    memcpy(all.data() + 2 * nq, k, 2 * nk);
    memcpy(all.data() + 2 * nq + nk, v, 2 * nk);
    const u16 *qq = all.data(), *dd = qq + nq, *kk = dd + nq, *vv = kk + nk;
    const size_t nl = size_t(B) * H * T;                           // lse, drow: read by cp.async in schedule 13
    std::vector<float> lsd(2 * nl);
    memcpy(lsd.data(), lse_in, 4 * nl);
    memcpy(lsd.data() + nl, drow_in, 4 * nl);
    const float *lse = lsd.data(), *drow = lse + nl;
    emu_bounds(reinterpret_cast<const u8*>(qq), 2 * all.size(), lse, 4 * lsd.size());
    const u8* m = has_mask ? mask : nullptr;
#define FAW_BWD(D_)                                                                                            \
    if (D == D_) {                                                                                             \
        run_grid((T + 127) / 128, H, B, 256, [&] {                                                            \
            if (bf16) faw_backward<D_, true, FAW_SCHED>(qq, kk, vv, dd, lse, drow, m, T, H, KV, window, scale, dout_scale, dq, dk, dv); \
            else faw_backward<D_, false, FAW_SCHED>(qq, kk, vv, dd, lse, drow, m, T, H, KV, window, scale, dout_scale, dq, dk, dv); \
        });                                                                                                    \
        return 0;                                                                                              \
    }
    FAW_BWD(64)
    FAW_BWD(128)
    return 1;
}

// FawSmem<...>::BYTES of an instantiated tile (0: none), for the wrapper's wgmma_smem to be checked against
extern "C" int emu_wgmma_smem(int D, int bn, int nwg, int stages) {
#define FAW_SMEM(D_, BN_, NWG_, ST_) if (D == D_ && bn == BN_ && nwg == NWG_ && stages == ST_) return FawSmem<D_, BN_, NWG_, ST_>::BYTES;
    FAW_SMEM(64, 64, 1, 3) FAW_SMEM(64, 64, 2, 4) FAW_SMEM(128, 64, 1, 3) FAW_SMEM(64, 128, 2, 4) FAW_SMEM(128, 128, 2, 3)
    return 0;
}

template <int D>
static int bwd_smem() { return FawBwdLayout13<D, FAW_SCHED>::BYTES; }
extern "C" int emu_wgmma_bwd_smem(int D) { return D == 64 ? bwd_smem<64>() : D == 128 ? bwd_smem<128>() : 0; }
extern "C" int emu_faw_sched() { return FAW_SCHED; }
