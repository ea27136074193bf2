// Which output tile a CTA of the fused GEMMs owns (gemm_mma.cu, gemm_wgmma.cu; the Python twin is
// kernels/gemm_mma_twin.tile_order). CTA b of the 1-D grid: groups of TILE_GROUP consecutive M tiles
// sweep the N tiles together, M fastest inside a group, so the CTAs resident at once share W tiles in
// L2 and W comes from memory about ceil(M / (TILE_GROUP * BM)) times (x [M, K] fp16 is the smaller
// operand at prefill sizes).
#ifndef Q4KDISTILL_TILE_ORDER_CUH
#define Q4KDISTILL_TILE_ORDER_CUH

constexpr int TILE_GROUP = 8;
static __device__ __forceinline__ void grouped_tile(int b, int tiles_m, int tiles_n, int& tm, int& tn) {
    const int per_group = TILE_GROUP * tiles_n, first = b / per_group * TILE_GROUP;
    const int rows = min(tiles_m - first, TILE_GROUP), in = b % per_group;   // the last group may be short
    tm = first + in % rows;
    tn = in / rows;
}

#endif
