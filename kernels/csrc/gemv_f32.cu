// Q4_K GEMV on float32 activations as they are, exact FP32, one kernel (no x quantization), M = 1..4:
//
//   q4k_f32<M,R,NW>    out[m, row] = sum_k x[m,k] W[row,k]
//
// Same work split as q4k_gemv (gemv_dp4a.cu): item = 16 quant bytes = 16 weights of sub-block 2j
// + 16 of 2j+1. Per weight: nibble -> float through 2^23 + n (LOP3 + FADD, no I2F), one FFMA with
// x. The min term uses the item's own partial sum of x, so the two items of a sub-block add up exactly.
#include "block_decode.cuh"

template <int M, int R, int NW>
static __device__ __forceinline__ void q4k_f32(const u8* __restrict__ w, int row_bytes, int n_out, int K,
                                               const float* __restrict__ x, float* __restrict__ out) {
    const int row0 = blockIdx.x * R;
    const int nitems = K >> 5;
    float acc[R][M];
    zero(acc);

    for (int it = threadIdx.x; it < nitems; it += NW * 32) {
        const int sb = it >> 3, p = it & 7, j = p >> 1, h = p & 1;
        Q4Item<R> wi;
        q4k_load_item<R>(w, row_bytes, n_out, row0, sb, j, h, wi);
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            const float4* xa = reinterpret_cast<const float4*>(x + size_t(m) * K + 256 * sb + 64 * j + 16 * h);
            float a[16], b[16];                 // x under the low nibbles (sub-block 2j), high (2j+1)
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float4 u = __ldg(xa + i), v = __ldg(xa + 8 + i);
                a[4 * i] = u.x; a[4 * i + 1] = u.y; a[4 * i + 2] = u.z; a[4 * i + 3] = u.w;
                b[4 * i] = v.x; b[4 * i + 1] = v.y; b[4 * i + 2] = v.z; b[4 * i + 3] = v.w;
            }
            float sa = 0.0f, sbx = 0.0f;
            #pragma unroll
            for (int i = 0; i < 16; ++i) { sa += a[i]; sbx += b[i]; }
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                float s0 = 0.0f, s1 = 0.0f;
                #pragma unroll
                for (int i = 0; i < 4; ++i)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const u32 byte = wi.q[r][i] >> (8 * e);
                        s0 = fmaf(a[4 * i + e], small_int_to_float(byte & 15u), s0);
                        s1 = fmaf(b[4 * i + e], small_int_to_float((byte >> 4) & 15u), s1);
                    }
                acc[r][m] += (wi.D0[r] * s0 - wi.M0[r] * sa) + (wi.D1[r] * s1 - wi.M1[r] * sbx);
            }
        }
    }
    reduce_store<M, R, NW>(acc, out, row0, n_out);
}
