// Decode to fp16 (decode-to-scratch for cuBLAS) and the fp32 -> fp16 cast of x:
//
//   q4k_decode_f16         raw Q4_K rows -> fp16 [n, K]
//   q6k_decode_f16         raw Q6_K rows -> fp16 [n, K]
//   q6k_decode_f16_staged  the same, the super-blocks staged through shared memory
//   f32_to_f16             x float32 -> fp16 at copy speed (CuPy's astype reached ~1.2 TB/s)
//
// Decode: one thread per 8 consecutive weights (one 16-byte store), so a warp writes 512
// contiguous bytes; grid = (rows, ceil(K / 8 / blockDim)) (staged: (rows, ceil(K / 1024)), 128
// threads). out is [n, K] halves seen as uint32 words. FP32 math, one rounding to fp16.
#include "block_decode.cuh"

extern "C" __device__ int q4k_decode_f16(const u8* __restrict__ w, int row_bytes, int n_rows, int K,
                                         u32* __restrict__ out) {
    const int oct = blockIdx.y * blockDim.x + threadIdx.x;   // weights 8 oct .. 8 oct + 7
    const int row = blockIdx.x;
    if (8 * oct >= K || row >= n_rows) return 0;
    const int sb = oct >> 5, tt = oct & 31;
    const int j = tt >> 3, hi = (tt >> 2) & 1, u = tt & 3;   // position 64 j + 32 hi + 8 u
    const u8* blk = w + size_t(row) * row_bytes + sb * Q4_K_BYTES;
    const uint4 hd = ldg16(blk);
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(blk + Q4_K_QS + 32 * j + 8 * u));
    float D, Mn;
    q4k_sub(q4k_scales(hd), 2 * j + hi, D, Mn);
    const u32 sh = 4 * hi;
    const u32 a = q.x >> sh, b = q.y >> sh;
    u32 h[4];
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const u32 v = i ? b : a;
        h[2 * i] = pack_half2(D * small_int_to_float(v & 15u) - Mn, D * small_int_to_float((v >> 8) & 15u) - Mn);
        h[2 * i + 1] = pack_half2(D * small_int_to_float((v >> 16) & 15u) - Mn, D * small_int_to_float((v >> 24) & 15u) - Mn);
    }
    st16(out + (size_t(row) * K + 8 * size_t(oct)) / 2, h[0], h[1], h[2], h[3]);
    return 0;
}

// Eight weights of a Q6_K super-block (positions 128 n + 32 k + l .. + 7, l = 8 (tt & 3)) to four fp16
// pairs: ql, qh their low-nibble and high-bit bytes, dk = d * their sub-block's int8 scale.
static __device__ __forceinline__ void q6k_oct(uint2 ql, uint2 qh, float dk, int k, u32 (&h)[4]) {
    const u32 shl = 4 * (k >> 1), shh = 2 * k;
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const u32 L = (i ? ql.y : ql.x) >> shl, H = (i ? qh.y : qh.x) >> shh;
        float f[4];
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const u32 qv = ((L >> (8 * e)) & 15u) | (((H >> (8 * e)) & 3u) << 4);
            f[e] = dk * (small_int_to_float(qv) - 32.0f);
        }
        h[2 * i] = pack_half2(f[0], f[1]);
        h[2 * i + 1] = pack_half2(f[2], f[3]);
    }
}

extern "C" __device__ int q6k_decode_f16(const u8* __restrict__ w, int row_bytes, int n_rows, int K,
                                         u32* __restrict__ out) {
    const int oct = blockIdx.y * blockDim.x + threadIdx.x;
    const int row = blockIdx.x;
    if (8 * oct >= K || row >= n_rows) return 0;
    const int sb = oct >> 5, tt = oct & 31;
    const int n = tt >> 4, k = (tt >> 2) & 3, l = 8 * (tt & 3);   // position 128 n + 32 k + l
    const u8* blk = w + size_t(row) * row_bytes + sb * Q6_K_BYTES;
    const uint2 ql = ld8_a2(blk + Q6_K_QL + 64 * n + 32 * (k & 1) + l);     // runs 0, 2 use QL[l], runs 1, 3 QL[l + 32]
    const uint2 qh = ld8_a2(blk + Q6_K_QH + 32 * n + l);
    const float d = half_to_float(__ldg(reinterpret_cast<const u16*>(blk + Q6_K_D)));
    const float dk = d * float(reinterpret_cast<const signed char*>(blk)[Q6_K_SCALES + 8 * n + (l >> 4) + 2 * k]);
    u32 h[4];
    q6k_oct(ql, qh, dk, k, h);
    st16(out + (size_t(row) * K + 8 * size_t(oct)) / 2, h[0], h[1], h[2], h[3]);
    return 0;
}

// q6k_decode_f16 reads its 8 weights' bytes with 8 narrow loads a thread (a 210-byte super-block is
// only 2-byte aligned: ld8_a2's funnel-shifted words for ql and qh, the scale byte, d): on an H200 the
// 7B's Q6_K LM head decoded at ~1.4 TB/s against ~3.2 TB/s for Q4_K (docs/perf.md, ninth stop). Here a
// block of Q6K_STAGE_WARPS warps takes that many consecutive super-blocks of one row, copies their
// bytes to shared memory with 4-byte loads (2-byte where the run does not start 4-byte aligned: odd
// super-block counts per row), two a thread, and each warp decodes its super-block from there exactly
// as q6k_decode_f16 does (same positions, same FP32 math, same rounding: the same bits).
#define Q6K_STAGE_WARPS 4
static __device__ __forceinline__ uint2 lds8_a2(const u8* p) {   // 8 bytes of shared memory, 2-byte aligned
    const u16* h = reinterpret_cast<const u16*>(p);
    return make_uint2(u32(h[0]) | (u32(h[1]) << 16), u32(h[2]) | (u32(h[3]) << 16));
}

extern "C" __device__ int q6k_decode_f16_staged(const u8* __restrict__ w, int row_bytes, int n_rows, int K,
                                                u32* __restrict__ out) {
    __shared__ __align__(16) u8 stage[Q6K_STAGE_WARPS * Q6_K_BYTES];
    const int row = blockIdx.x, tid = threadIdx.x;               // blockDim.x == 32 * Q6K_STAGE_WARPS
    const int nsb = K / 256, sb0 = blockIdx.y * Q6K_STAGE_WARPS;
    if (row >= n_rows || sb0 >= nsb) return 0;                   // (the whole block: no barrier skipped)
    const int bytes = min(Q6K_STAGE_WARPS, nsb - sb0) * Q6_K_BYTES;
    const u8* src = w + size_t(row) * row_bytes + size_t(sb0) * Q6_K_BYTES;
    if ((reinterpret_cast<size_t>(src) & 3) == 0) {
        for (int i = tid; i < bytes / 4; i += 32 * Q6K_STAGE_WARPS)
            reinterpret_cast<u32*>(stage)[i] = __ldg(reinterpret_cast<const u32*>(src) + i);
        if ((bytes & 3) && tid == 0)                             // an odd count of super-blocks: 2 bytes more
            reinterpret_cast<u16*>(stage)[bytes / 2 - 1] = __ldg(reinterpret_cast<const u16*>(src) + bytes / 2 - 1);
    } else {
        for (int i = tid; i < bytes / 2; i += 32 * Q6K_STAGE_WARPS)
            reinterpret_cast<u16*>(stage)[i] = __ldg(reinterpret_cast<const u16*>(src) + i);
    }
    __syncthreads();
    const int s = tid >> 5, tt = tid & 31;
    if (sb0 + s >= nsb) return 0;
    const int n = tt >> 4, k = (tt >> 2) & 3, l = 8 * (tt & 3);  // position 128 n + 32 k + l = 8 tt
    const u8* blk = stage + s * Q6_K_BYTES;
    const uint2 ql = lds8_a2(blk + Q6_K_QL + 64 * n + 32 * (k & 1) + l);
    const uint2 qh = lds8_a2(blk + Q6_K_QH + 32 * n + l);
    const float d = half_to_float(*reinterpret_cast<const u16*>(blk + Q6_K_D));
    const float dk = d * float(reinterpret_cast<const signed char*>(blk)[Q6_K_SCALES + 8 * n + (l >> 4) + 2 * k]);
    u32 h[4];
    q6k_oct(ql, qh, dk, k, h);
    st16(out + (size_t(row) * K + 256 * size_t(sb0 + s) + 8 * tt) / 2, h[0], h[1], h[2], h[3]);
    return 0;
}

// x float32 -> fp16, 8 values per thread (two 16-byte loads, one 16-byte store); n % 8 == 0.
extern "C" __device__ int f32_to_f16(const float* __restrict__ x, u32* __restrict__ out, int n8) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return 0;
    const float4 a = __ldg(reinterpret_cast<const float4*>(x) + 2 * size_t(i));
    const float4 b = __ldg(reinterpret_cast<const float4*>(x) + 2 * size_t(i) + 1);
    st16(out + 4 * size_t(i), pack_half2(a.x, a.y), pack_half2(a.z, a.w), pack_half2(b.x, b.y), pack_half2(b.z, b.w));
    return 0;
}
