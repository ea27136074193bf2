// Decode to fp16 (decode-to-scratch for cuBLAS) and the fp32 -> fp16 cast of x:
//
//   q4k_decode_f16     raw Q4_K rows -> fp16 [n, K]
//   q6k_decode_f16     raw Q6_K rows -> fp16 [n, K]
//   f32_to_f16         x float32 -> fp16 at copy speed (CuPy's astype reached ~1.2 TB/s)
//
// Decode: one thread per 8 consecutive weights (one 16-byte store), so a warp writes 512
// contiguous bytes; grid = (rows, ceil(K / 8 / blockDim)). out is [n, K] halves seen as uint32
// words. FP32 math, one rounding to fp16.
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
    const u32 shl = 4 * (k >> 1), shh = 2 * k;
    u32 h[4];
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
    st16(out + (size_t(row) * K + 8 * size_t(oct)) / 2, h[0], h[1], h[2], h[3]);
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
