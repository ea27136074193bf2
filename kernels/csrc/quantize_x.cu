// Activations to int8 for the int8 GEMVs (gemv_dp4a.cu, gemv_mma.cu):
//
//   q8_quantize        x float32 [M*K] -> xq (int8, 4 per word) and xds (d, d*sum q) per 32 values
//   q8_quantize_frag   the same per 32 values, stored in the mma B-fragment order of gemv_mma.cu
//   q8k_quantize_frag  fragments with one scale per 256 values (llama.cpp's Q8_K; XK = true there)
//
// Each also clears `zero` (n_zero floats) on the way: the split-K GEMVs accumulate into it.
#include "common.cuh"

// Every extern "C" function returns 0 (the C ABI of cuda.declare_device wants a value).
// Activations to 8 bits per 32 values: d = max|x| / 127, q = round(x / d), ds = (d, d * sum q).
// 8 threads per 32 values, one float4 each. `zero` (n_zero floats) is cleared on the way, for the
// split-K tensor-core GEMVs that accumulate into it atomically (as q8_quantize_frag below).
extern "C" __device__ int q8_quantize(const float* __restrict__ x, u32* __restrict__ xq,
                                       float2* __restrict__ xds, int nblocks,
                                       float* __restrict__ zero, int n_zero) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    for (int i = t; i < n_zero; i += gridDim.x * blockDim.x) zero[i] = 0.0f;   // split-K output
    const int b = t >> 3;
    const bool live = b < nblocks;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (live) v = __ldg(reinterpret_cast<const float4*>(x) + t);
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    #pragma unroll
    for (int off = 1; off < 8; off <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float d = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const int q0 = __float2int_rn(v.x * inv), q1 = __float2int_rn(v.y * inv);
    const int q2 = __float2int_rn(v.z * inv), q3 = __float2int_rn(v.w * inv);
    const u32 word = (u32(q0) & 0xFF) | ((u32(q1) & 0xFF) << 8) | ((u32(q2) & 0xFF) << 16) | (u32(q3) << 24);
    int s = q0 + q1 + q2 + q3;
    #pragma unroll
    for (int off = 1; off < 8; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (live) {
        xq[t] = word;
        if ((t & 7) == 0) xds[b] = make_float2(d, d * float(s));
    }
    return 0;
}

// Eight consecutive values of x (two float4 at p; zeros where !load) -> 8 int8 in two words, with
// d = max|x| / 127 over LANES consecutive lanes (4: one 32-value block, 32: a 256-value super-block)
// and `sum`, the sum of the q over the 4 lanes of the 32-value block.
template <int LANES>
static __device__ __forceinline__ void q8_eight(const float* p, bool load, float& d, u32 (&word)[2], int& sum) {
    float v[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    if (load) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
    float amax = 0.0f;
    #pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
    #pragma unroll
    for (int o = 1; o < LANES; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    d = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    word[0] = word[1] = 0u;
    sum = 0;
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int q = __float2int_rn(v[i] * inv);
        sum += q;
        word[i >> 2] |= (u32(q) & 0xFFu) << (8 * (i & 3));
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
}

// x for the tensor-core kernel, quantized like q8_quantize but stored in fragment order so that
// a warp's B-fragment load is 256 contiguous bytes and its scale load 64: for n-tile nt (activation
// rows 8 nt .. 8 nt + 7, zero beyond M) and q8 block s (K / 32 of them), lane 4 g + t holds
//   xf[(nt * nsub + s) * 32 + lane] = x[8 nt + g][32 s + 8 t .. + 8] as 8 int8 (uint2)
//   dsf[(nt * nsub + s) * 8 + g]    = (d, d * sum q) of that 32-block (float2)
// One thread per lane entry; the 4 lanes of a block reduce max and sum with shuffles. `zero`
// (n_zero floats) is cleared on the way: the split-K GEMV below accumulates into it atomically.
extern "C" __device__ int q8_quantize_frag(const float* __restrict__ x, int M, int K, int NT,
                                           uint2* __restrict__ xf, float2* __restrict__ dsf,
                                           float* __restrict__ zero, int n_zero) {
    const int nsub = K >> 5;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;       // entry (nt, s, lane)
    for (int i = e; i < n_zero; i += gridDim.x * blockDim.x) zero[i] = 0.0f;   // split-K output
    const bool live = e < NT * nsub * 32;
    const int lane = e & 31, g = lane >> 2, t = lane & 3;
    const int ns = e >> 5, s = ns % nsub, nt = ns / nsub;
    const int m = 8 * nt + g;
    float d;
    u32 word[2];
    int sum;
    q8_eight<4>(x + size_t(m) * K + 32 * s + 8 * t, live && m < M, d, word, sum);
    if (live) {
        xf[e] = make_uint2(word[0], word[1]);
        if (t == 0) dsf[ns * 8 + g] = make_float2(d, d * float(sum));
    }
    return 0;
}

// x for the tensor-core kernel with one scale per 256 values (llama.cpp's Q8_K idea): fragments as
// q8_quantize_frag; the 512 bytes of scales per (tile nt, super-block sb) hold instead
//   int32 sums[8 sub-blocks][8 columns] (sum of the q of that 32-block)  | float d[8 columns] | unused
// at word (nt * K/256 + sb) * 128. A warp takes one (nt, sb, column g): lane = 4 sub + t holds the
// 8 values 256 sb + 32 sub + 8 t .. + 8 of row 8 nt + g; max over the warp, sums over the 4 t.
extern "C" __device__ int q8k_quantize_frag(const float* __restrict__ x, int M, int K, int NT,
                                            uint2* __restrict__ xf, u32* __restrict__ dsf,
                                            float* __restrict__ zero, int n_zero) {
    const int nsb = K >> 8, nsub = K >> 5;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;       // ((nt * nsb + sb) * 8 + g) * 32 + 4 sub + t
    for (int i = e; i < n_zero; i += gridDim.x * blockDim.x) zero[i] = 0.0f;
    const bool live = e < NT * nsb * 256;
    const int q = e & 31, sub = q >> 2, t = q & 3;
    const int g = (e >> 5) & 7, ns = e >> 8, sb = ns % nsb, nt = ns / nsb;
    const int m = 8 * nt + g;
    float d;
    u32 word[2];
    int sum;
    q8_eight<32>(x + size_t(m) * K + 256 * sb + 32 * sub + 8 * t, live && m < M, d, word, sum);
    if (live) {
        xf[(nt * nsub + 8 * sb + sub) * 32 + 4 * g + t] = make_uint2(word[0], word[1]);
        u32* area = dsf + size_t(ns) * 128;
        if (t == 0) area[8 * sub + g] = u32(sum);
        if (q == 0) area[64 + g] = __float_as_uint(d);
    }
    return 0;
}
