// Shared by every file of csrc/: types, loads and stores, float conversions, reductions.
//
// Conventions of csrc/ (kernels/linked.py compiles it; kernels/README.md says how to add to it):
//  * Each .cu file holds one job (quantize_x, gemv_dp4a, gemv_f32, gemv_mma, decode_cast) and
//    includes the headers it needs with #include "name.cuh". NVRTC gets no include path:
//    linked.py inlines those includes (each header once) and appends one `extern "C"` wrapper per
//    template instantiation; nvcc -I kernels/csrc compiles each file as it is.
//  * Every extern "C" function returns int 0: with abi="c", cuda.declare_device declares a return
//    value, and a void function would not match at link time.
//  * No system headers: NVRTC's built-ins cover __ldg, __dp4a, __vsub4, __funnelshift_r,
//    __shfl_xor_sync; fp16 <-> fp32 goes through inline PTX.
//  * Block sizes and field offsets come from block_layouts.cuh (generated from
//    q4kdistill/block_layouts.py, which also draws each layout); block_decode.cuh unpacks them.
//  * Integer index arithmetic is 32-bit except row offsets (size_t).
#ifndef Q4KDISTILL_COMMON_CUH
#define Q4KDISTILL_COMMON_CUH

#pragma nv_diag_suppress 177   // each instantiation uses only some of the helpers

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

static __device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

static __device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));   // first source -> upper half
    return r;
}

static __device__ __forceinline__ uint4 ldg16(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

static __device__ __forceinline__ void st16(void* p, u32 a, u32 b, u32 c, u32 d) {
    *reinterpret_cast<uint4*>(p) = make_uint4(a, b, c, d);
}

// 8 bytes at a 2-byte aligned address, as two words (three aligned loads, two funnel shifts)
static __device__ __forceinline__ uint2 ld8_a2(const u8* p) {
    const size_t a = reinterpret_cast<size_t>(p);
    const u32* q = reinterpret_cast<const u32*>(a & ~size_t(3));
    const u32 sh = u32(a & 3) * 8;
    const u32 w0 = __ldg(q), w1 = __ldg(q + 1), w2 = sh ? __ldg(q + 2) : 0u;   // no read past the block
    return make_uint2(__funnelshift_r(w0, w1, sh), __funnelshift_r(w1, w2, sh));
}

// float(n) for 0 <= n < 2^23 without the quarter-rate I2F: 2^23 + n is exact as a float
static __device__ __forceinline__ float small_int_to_float(u32 n) {
    return __int_as_float(0x4B000000u | n) - 8388608.0f;
}

// float(c) for |c| < 2^22, also without I2F: 1.5 * 2^23 + c is exact as a float
static __device__ __forceinline__ float int_to_float(int c) {
    return __int_as_float(0x4B400000 + c) - 12582912.0f;
}

// byte k (0..3) of a word, as a float: one PRMT builds 2^23 + byte (k folds to a constant in
// unrolled loops)
static __device__ __forceinline__ float byte_to_float(u32 word, int k) {
    return __int_as_float(__byte_perm(word, 0x4B000000u, 0x7540u | u32(k))) - 8388608.0f;
}

template <int A, int B>
static __device__ __forceinline__ void zero(float (&a)[A][B]) {
    #pragma unroll
    for (int i = 0; i < A; ++i)
        #pragma unroll
        for (int k = 0; k < B; ++k) a[i][k] = 0.0f;
}

// 4 bytes at a 2-byte aligned address
static __device__ __forceinline__ u32 ld4_a2(const u8* p) {
    const size_t a = reinterpret_cast<size_t>(p);
    const u32* q = reinterpret_cast<const u32*>(a & ~size_t(3));
    const u32 sh = u32(a & 3) * 8;
    return __funnelshift_r(__ldg(q), sh ? __ldg(q + 1) : 0u, sh);
}

// Block-wide reduction of R*M partial sums and the store of out[m, row0 + r].
template <int M, int R, int NW>
static __device__ __forceinline__ void reduce_store(float (&acc)[R][M], float* __restrict__ out,
                                                    int row0, int n_out) {
    __shared__ float red[R * M][NW * 32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    #pragma unroll
    for (int r = 0; r < R; ++r)
        #pragma unroll
        for (int m = 0; m < M; ++m) red[r * M + m][tid] = acc[r][m];
    __syncthreads();
    for (int v = warp; v < R * M; v += NW) {
        float s = 0.0f;
        #pragma unroll
        for (int k = 0; k < NW; ++k) s += red[v][lane + 32 * k];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const int r = v / M, m = v % M;
        if (lane == 0 && row0 + r < n_out) out[size_t(m) * n_out + row0 + r] = s;
    }
}

#endif
