// Q4_K / Q6_K GEMV on int8 activations (q8_quantize's layout) with dp4a, M = 1..16:
//
//   q4k_gemv<M,R,NW>   out[m, row] = sum_k x[m,k] W[row,k] for Q4_K rows, x as q8 (llama.cpp's q8_1 idea)
//   q6k_gemv<M,R,NW>   the same for Q6_K rows (210-byte blocks, 2-byte aligned)
//
// Work split: a thread block owns R consecutive weight rows; its NW warps walk the row's "items"
// (32 weights each: 8 per 256-weight super-block; block_decode.cuh) with a stride of NW*32, so a
// warp reads 4 super-blocks' quants as contiguous 16-byte pieces. The R*M partial sums are
// reduced through shared memory at the end (reduce_store).
#include "block_decode.cuh"

template <int M, int R, int NW>
static __device__ __forceinline__ void q4k_gemv(const u8* __restrict__ w, int row_bytes, int n_out, int K,
                                                const u32* __restrict__ xq, const float2* __restrict__ xds,
                                                float* __restrict__ out) {
    const int row0 = blockIdx.x * R;
    const int nitems = K >> 5, kw = K >> 2, kb = K >> 5;
    float acc[R][M];
    zero(acc);

    for (int it = threadIdx.x; it < nitems; it += NW * 32) {
        const int sb = it >> 3, p = it & 7, j = p >> 1, h = p & 1;
        Q4Item<R> wi;
        q4k_load_item<R>(w, row_bytes, n_out, row0, sb, j, h, wi);
        const int xw = 64 * sb + 16 * j + 4 * h;      // word of x position 256 sb + 64 j + 16 h
        const int xb = 8 * sb + 2 * j;                // q8 blocks 2j (low nibbles) and 2j+1 (high)
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            const uint4 a = ldg16(xq + m * kw + xw);
            const uint4 b = ldg16(xq + m * kw + xw + 8);
            const float2 ds0 = __ldg(xds + m * kb + xb), ds1 = __ldg(xds + m * kb + xb + 1);
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                int i0 = __dp4a(int(wi.q[r][0] & 0x0F0F0F0Fu), int(a.x), 0);
                i0 = __dp4a(int(wi.q[r][1] & 0x0F0F0F0Fu), int(a.y), i0);
                i0 = __dp4a(int(wi.q[r][2] & 0x0F0F0F0Fu), int(a.z), i0);
                i0 = __dp4a(int(wi.q[r][3] & 0x0F0F0F0Fu), int(a.w), i0);
                int i1 = __dp4a(int((wi.q[r][0] >> 4) & 0x0F0F0F0Fu), int(b.x), 0);
                i1 = __dp4a(int((wi.q[r][1] >> 4) & 0x0F0F0F0Fu), int(b.y), i1);
                i1 = __dp4a(int((wi.q[r][2] >> 4) & 0x0F0F0F0Fu), int(b.z), i1);
                i1 = __dp4a(int((wi.q[r][3] >> 4) & 0x0F0F0F0Fu), int(b.w), i1);
                float v = wi.D0[r] * ds0.x * float(i0) + wi.D1[r] * ds1.x * float(i1);
                if (h == 0) v -= wi.M0[r] * ds0.y + wi.M1[r] * ds1.y;   // the min term once per sub-block
                acc[r][m] += v;
            }
        }
    }
    reduce_store<M, R, NW>(acc, out, row0, n_out);
}

template <int M, int R, int NW>
static __device__ __forceinline__ void q6k_gemv(const u8* __restrict__ w, int row_bytes, int n_out, int K,
                                                const u32* __restrict__ xq, const float2* __restrict__ xds,
                                                float* __restrict__ out) {
    const int row0 = blockIdx.x * R;
    const int nitems = K >> 5, kw = K >> 2, kb = K >> 5;
    float acc[R][M];
    zero(acc);

    for (int it = threadIdx.x; it < nitems; it += NW * 32) {
        const int sb = it >> 3, p = it & 7, n = p >> 2, l = 8 * (p & 3);
        Q6Item wi[R];
        #pragma unroll
        for (int r = 0; r < R; ++r)
            q6k_item(w + size_t(min(row0 + r, n_out - 1)) * row_bytes + sb * Q6_K_BYTES, n, l, wi[r]);
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            #pragma unroll
            for (int k = 0; k < 4; ++k) {
                // run k: positions 256 sb + 128 n + 32 k + l .. +8, in q8 block 8 sb + 4 n + k
                const uint2 a = __ldg(reinterpret_cast<const uint2*>(xq + m * kw + 64 * sb + 32 * n + 8 * k + (l >> 2)));
                const float dx = __ldg(reinterpret_cast<const float*>(xds + m * kb + 8 * sb + 4 * n + k));
                #pragma unroll
                for (int r = 0; r < R; ++r) {
                    const int s = __dp4a(int(wi[r].v[k][1]), int(a.y), __dp4a(int(wi[r].v[k][0]), int(a.x), 0));
                    acc[r][m] += wi[r].dk[k] * dx * float(s);
                }
            }
        }
    }
    reduce_store<M, R, NW>(acc, out, row0, n_out);
}
