// Unpacking Q4_K and Q6_K super-blocks (layouts: block_layouts.cuh, drawn in q4kdistill/block_layouts.py).
#ifndef Q4KDISTILL_BLOCK_DECODE_CUH
#define Q4KDISTILL_BLOCK_DECODE_CUH

#include "block_layouts.cuh"
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Q4_K. q4k_scales unpacks the 16-byte head (d | dmin | 12 scale bytes, read as one uint4) into
// the 8 six-bit (scale, min) pairs at once, one per byte: sc[0..3] = sc_lo, sc[4..7] = sc_hi,
// m[0..3] = m_lo, m[4..7] = m_hi (the word formulas of block_layouts.Q4_K).
static_assert(Q4_K_D == 0 && Q4_K_DMIN == 2 && Q4_K_SCALES == 4 && Q4_K_QS == 16, "the head is one uint4");
struct Q4Scales { u32 sc_lo, sc_hi, m_lo, m_hi; float d, dmin; };
static __device__ __forceinline__ Q4Scales q4k_scales(uint4 hd) {
    Q4Scales o;
    o.sc_lo = hd.y & 0x3F3F3F3Fu;
    o.m_lo = hd.z & 0x3F3F3F3Fu;
    o.sc_hi = (hd.w & 0x0F0F0F0Fu) | ((hd.y >> 2) & 0x30303030u);
    o.m_hi = ((hd.w >> 4) & 0x0F0F0F0Fu) | ((hd.z >> 2) & 0x30303030u);
    o.d = half_to_float(u16(hd.x & 0xFFFF));
    o.dmin = half_to_float(u16(hd.x >> 16));
    return o;
}

// D = d * sc and Dm = dmin * m of sub-block s (0..7)
static __device__ __forceinline__ void q4k_sub(const Q4Scales& q, int s, float& D, float& Dm) {
    D = q.d * byte_to_float(s < 4 ? q.sc_lo : q.sc_hi, s & 3);
    Dm = q.dmin * byte_to_float(s < 4 ? q.m_lo : q.m_hi, s & 3);
}

// One Q4_K "item" of R rows: the 16 quant bytes 32j + 16h .. +16 of super-block sb (16 weights of

// (scale, min) of sub-block s as integers (0..63)
static __device__ __forceinline__ void q4k_sub_int(const Q4Scales& q, int s, int& sc, int& m) {
    const int bs = 8 * (s & 3);
    sc = int(((s < 4 ? q.sc_lo : q.sc_hi) >> bs) & 0xFFu);
    m = int(((s < 4 ? q.m_lo : q.m_hi) >> bs) & 0xFFu);
}

// One Q4_K "item" of R rows. Item p (0..7) of a super-block: j = p / 2, h = p % 2 -> the 16 quant
// bytes 32j + 16h .. +16 of qs, i.e. weights 64j + 16h + [0, 16) (low nibbles, sub-block 2j) and
// 64j + 32 + 16h + [0, 16) (high nibbles, sub-block 2j + 1), with the scales of those sub-blocks.
template <int R>
struct Q4Item {
    u32 q[R][4];
    float D0[R], M0[R], D1[R], M1[R];
};

template <int R>
static __device__ __forceinline__ void q4k_load_item(const u8* __restrict__ w, int row_bytes, int n_out, int row0,
                                                     int sb, int j, int h, Q4Item<R>& o) {
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        const u8* blk = w + size_t(min(row0 + r, n_out - 1)) * row_bytes + sb * Q4_K_BYTES;
        const uint4 qq = ldg16(blk + Q4_K_QS + 32 * j + 16 * h);
        o.q[r][0] = qq.x; o.q[r][1] = qq.y; o.q[r][2] = qq.z; o.q[r][3] = qq.w;
        const Q4Scales sc = q4k_scales(ldg16(blk));
        q4k_sub(sc, 2 * j, o.D0[r], o.M0[r]);
        q4k_sub(sc, 2 * j + 1, o.D1[r], o.M1[r]);
    }
}

// ---------------------------------------------------------------------------------------------
// Q6_K: the four lines of a half n (block_layouts.Q6_K). Item p (0..7): n = p / 4,
// l = 8 (p % 4) .. +8 -> 32 weights in four runs k = 0..3 of 8 (weights 128n + 32k + l .. +8).
struct Q6Item {
    u32 v[4][2];     // (q - 32) as int8, run k, two words of 4
    float dk[4];     // d * scale of run k
};

static __device__ __forceinline__ void q6k_item(const u8* blk, int n, int l, Q6Item& o) {
    const uint2 qa = ld8_a2(blk + Q6_K_QL + 64 * n + l);           // runs 0 (low nibbles) and 2 (high)
    const uint2 qb = ld8_a2(blk + Q6_K_QL + 64 * n + 32 + l);      // runs 1 and 3
    const uint2 qh = ld8_a2(blk + Q6_K_QH + 32 * n + l);
    const uint2 sc = ld8_a2(blk + Q6_K_SCALES + 8 * n);          // S[0..7]
    const float d = half_to_float(__ldg(reinterpret_cast<const u16*>(blk + Q6_K_D)));
    const u32 is = u32(l >> 4) * 8;                      // bit offset of S[l/16] in sc.x
    const u32 A[2] = {qa.x, qa.y}, B[2] = {qb.x, qb.y}, H[2] = {qh.x, qh.y};
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        o.v[0][i] = __vsub4((A[i] & 0x0F0F0F0Fu) | ((H[i] & 0x03030303u) << 4), 0x20202020u);
        o.v[1][i] = __vsub4((B[i] & 0x0F0F0F0Fu) | (((H[i] >> 2) & 0x03030303u) << 4), 0x20202020u);
        o.v[2][i] = __vsub4(((A[i] >> 4) & 0x0F0F0F0Fu) | (((H[i] >> 4) & 0x03030303u) << 4), 0x20202020u);
        o.v[3][i] = __vsub4(((B[i] >> 4) & 0x0F0F0F0Fu) | (((H[i] >> 6) & 0x03030303u) << 4), 0x20202020u);
    }
    // S[l/16 + 2k]: k = 0, 1 in sc.x, k = 2, 3 in sc.y (byte l/16 and l/16 + 2 of each word)
    o.dk[0] = d * float(int(sc.x << (24 - is)) >> 24);
    o.dk[1] = d * float(int(sc.x << (8 - is)) >> 24);
    o.dk[2] = d * float(int(sc.y << (24 - is)) >> 24);
    o.dk[3] = d * float(int(sc.y << (8 - is)) >> 24);
}

#endif
