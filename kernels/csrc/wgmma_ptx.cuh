// What the wgmma kernels (gemm_wgmma.cu, flash_attention_wgmma.cu) share: shared-memory addresses,
// dynamic shared memory, cp.async, the wgmma fences / groups / instructions (wgmma_ops.cuh) and the
// matrix descriptor. tests/wgmma_emulate.h defines GW_EMULATE and host versions of the PTX wrappers
// (cp.async and wgmma deferred to the waits that wait for them).
#ifndef Q4KDISTILL_WGMMA_PTX_CUH
#define Q4KDISTILL_WGMMA_PTX_CUH
#include "wgmma_ops.cuh"

typedef unsigned long long u64;


#ifndef GW_EMULATE
static __device__ __forceinline__ u32 gw_smem(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// the block's dynamic shared memory (the launch gives its size)
static __device__ __forceinline__ u8* gw_dynamic_smem() {
    extern __shared__ __align__(16) u8 gw_dyn[];
    return gw_dyn;
}

// 16 bytes global -> shared, of which the first `valid` (0..16) are read, the rest zero-filled
static __device__ __forceinline__ void gw_cp16(void* smem, const void* g, int valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(gw_smem(smem)), "l"(g), "r"(valid) : "memory");
}
// 4 bytes global -> shared (both 4-byte aligned), zeros where !valid (src-size 0): lse and drow rows
static __device__ __forceinline__ void gw_cp4(void* smem, const void* g, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(gw_smem(smem)), "l"(g), "r"(valid ? 4 : 0) : "memory");
}
// a 4-byte store to shared memory that a wgmma will read (the emulation tracks these for races)
static __device__ __forceinline__ void gw_st32(void* smem, u32 v) { *static_cast<u32*>(smem) = v; }
static __device__ __forceinline__ void gw_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
static __device__ __forceinline__ void gw_cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

static __device__ __forceinline__ void gw_fence_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
static __device__ __forceinline__ void gw_mma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
static __device__ __forceinline__ void gw_mma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
static __device__ __forceinline__ void gw_mma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
// d = scale_d * d + A B^T, A and B K-major in shared memory
template <int N, bool BF16 = false>
static __device__ __forceinline__ void gw_mma(float (&d)[N / 2], u64 a, u64 b, int scale_d = 1) {
    GwMma<N, BF16>::run(d, a, b, scale_d);
}
// d = scale_d * d + A B, A in registers (m16n8k16 A fragments), B MN-major in shared memory
template <int N, bool BF16 = false>
static __device__ __forceinline__ void gw_mma_rs(float (&d)[N / 2], const u32 (&a)[4], u64 b, int scale_d = 1) {
    GwMmaRS<N, BF16>::run(d, a, b, scale_d);
}

// d = scale_d * d + A B^T, A in registers (m16n8k16 A fragments), B K-major in shared memory
template <int N, bool BF16 = false>
static __device__ __forceinline__ void gw_mma_rk(float (&d)[N / 2], const u32 (&a)[4], u64 b, int scale_d = 1) {
    GwMmaRK<N, BF16>::run(d, a, b, scale_d);
}

// d = scale_d * d + A B, A (M-contiguous) and B (N-contiguous) both MN-major in shared memory
template <int N, bool BF16 = false>
static __device__ __forceinline__ void gw_mma_tt(float (&d)[N / 2], u64 a, u64 b, int scale_d = 1) {
    GwMmaTT<N, BF16>::run(d, a, b, scale_d);
}

// d = scale_d * d + A B^T on int8 A and B (K-major, shared memory), s32 accumulators, k32 an instruction
template <int N>
static __device__ __forceinline__ void gw_mma_s8(int (&d)[N / 2], u64 a, u64 b, int scale_d = 1) {
    GwMmaS8<N>::run(d, a, b, scale_d);
}

// A point ptxas schedules nothing across, for work that must stay between two wgmma waits: ptxas hoists a
// wgmma.wait_group above independent instructions in its basic block (it sits on the critical path of what
// reads the accumulators), which moved the attention forward's exponentials after the wait for P V so that
// they no longer overlapped it. fence.acq_rel.cta (MEMBAR.ALL.CTA) keeps them before it; the CTA's memory
// operations before it are cp.async (async proxy, not waited for) and none else in that loop.
static __device__ __forceinline__ void gw_schedule_fence() { asm volatile("fence.acq_rel.cta;" ::: "memory"); }

// ---- warp specialisation (the forward of schedule 15): mbarriers, named barriers, register reallocation ----
// An mbarrier (8 bytes of shared memory) completes a phase when `count` arrivals have happened; waits name the
// phase by its parity. cp.async's arrive counts once this thread's earlier cp.async have landed (.noinc: the
// arrival is one of the `count`).
static __device__ __forceinline__ void gw_mbar_init(u64* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(gw_smem(bar)), "r"(count) : "memory");
}
static __device__ __forceinline__ void gw_mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(gw_smem(bar)) : "memory");
}
static __device__ __forceinline__ void gw_cp_mbar_arrive(u64* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(gw_smem(bar)) : "memory");
}
static __device__ __forceinline__ void gw_mbar_wait(u64* bar, int parity) {
    asm volatile("{\n .reg .pred p;\n GW_MBAR_WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 " @!p bra GW_MBAR_WAIT;\n}" :: "r"(gw_smem(bar)), "r"(parity) : "memory");
}
// The tensor-memory accelerator: expect_tx arrives on the mbarrier and adds `bytes` to what its phase waits for; a 2-D
// tile copy by the tensor map at `tmap` (a CUtensorMap in global memory, cuTensorMapEncodeTiled) of the box at
// element coordinates (c0, c1) into shared memory, its bytes counted off the barrier as they land
static __device__ __forceinline__ void gw_mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(gw_smem(bar)), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void gw_tma_2d(void* dst, const void* tmap, int c0, int c1, u64* bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                 :: "r"(gw_smem(dst)), "l"(tmap), "r"(c0), "r"(c1), "r"(gw_smem(bar)) : "memory");
}
// named barrier `id` (1..15; 0 is __syncthreads) over `n` threads: sync waits, arrive does not
static __device__ __forceinline__ void gw_bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(n) : "memory"); }
static __device__ __forceinline__ void gw_bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;" :: "r"(id), "r"(n) : "memory");
}
// this warpgroup's registers a thread: down to N (a producer) or up to N (a consumer); N % 8 == 0, 24..256
template <int N> static __device__ __forceinline__ void gw_regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(N)); }
template <int N> static __device__ __forceinline__ void gw_regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(N)); }
static __device__ __forceinline__ void gw_cp_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// ---- the bulk-copy engine's reduction into global memory (the attention backward's dQ in schedule 20) ----------
// out[0 .. bytes / 4) += the float32 values at smem, by the async proxy (the smem writes made visible to it by
// gw_fence_async and a barrier before); bytes % 16 == 0, both addresses 16-byte aligned. Per issuing thread: commit
// closes a bulk group, wait_read<N> returns once at most N of its groups still read shared memory (the source may be
// overwritten), wait<N> once at most N are incomplete.
static __device__ __forceinline__ void gw_bulk_red_add(float* out, const void* smem, int bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                 :: "l"(out), "r"(gw_smem(smem)), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void gw_bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int N>
static __device__ __forceinline__ void gw_bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;" :: "n"(N) : "memory"); }
template <int N>
static __device__ __forceinline__ void gw_bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;" :: "n"(N) : "memory"); }

// x = 0 through an instruction the compiler cannot see through, so that accumulators never share a register
static __device__ __forceinline__ void gw_opaque_zero(int& x) { asm volatile("mov.b32 %0, 0;" : "=r"(x)); }

// keep the compiler from moving accesses to registers a wgmma in flight writes (accumulators) or reads
// (A fragments) across the asynchronous wgmma (CUTLASS's warpgroup_fence_operand): after a wait, the
// values count as written there, and registers read in flight stay allocated until then
template <int R>
static __device__ __forceinline__ void gw_pin(float (&d)[R]) {
    #pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int R>
static __device__ __forceinline__ void gw_pin(int (&d)[R]) {
    #pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
template <int R>
static __device__ __forceinline__ void gw_pin(u32 (&d)[R][4]) {
    #pragma unroll
    for (int i = 0; i < R; ++i)
        #pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(d[i][e])::"memory");
}
#endif

// the block's dynamic shared memory from its first 1024-byte boundary (the 128-byte swizzle's atoms are
// 1024-byte aligned; the launch gives 1024 bytes more than the tiles need)
static __device__ __forceinline__ u8* gw_aligned_smem() {
    u8* const base = gw_dynamic_smem();
    return base + ((1024u - (gw_smem(base) & 1023u)) & 1023u);
}

// The 64-bit matrix descriptor of an operand whose first element is at shared address `start`
// (16-byte aligned): start >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45, base offset 0 (the
// 128-byte swizzle's atoms are 1024-byte aligned), swizzle mode in 62-63 (1: 128-byte swizzle, 0: none).
// K-major, 128-byte swizzle: rows of 128 bytes, SBO the step between 8-row groups, LBO unused;
// no swizzle: 8 x 16-byte core matrices, LBO the step to the next one along K, SBO between 8-row groups.
// MN-major, 128-byte swizzle: 128-byte rows hold 64 consecutive M/N elements of one k, LBO the step
// between 64-element M/N blocks, SBO between 8-k groups (cute::make_gmma_desc<Major::MN>).
static __device__ __forceinline__ u64 gw_make_desc(u32 start, u32 lbo, u32 sbo, int swz128) {
    return u64((start & 0x3FFFFu) >> 4) | (u64((lbo & 0x3FFFFu) >> 4) << 16) | (u64((sbo & 0x3FFFFu) >> 4) << 32) |
           (u64(swz128 ? 1u : 0u) << 62);
}
// the descriptor of the same operand `bytes` further on (16-byte multiple): start + bytes in bits 0-13 (shared
// addresses are below 2^18, so the field never carries into LBO), one integer add where gw_make_desc is ~9
// uniform-datapath instructions; the loops build each tile's base descriptor once and step it with this
static __device__ __forceinline__ u64 gw_desc_add(u64 desc, u32 bytes) { return desc + u64(bytes >> 4); }
// The same descriptor as its low word (start and LBO: what varies) and a high word the compiler knows (SBO and
// the swizzle mode: template constants), so that a kernel short of registers keeps one register a descriptor:
// gw_desc_hi<SBO, SWZ>(gw_desc_lo(start, lbo) + (bytes >> 4)) == gw_desc_add(gw_make_desc(start, lbo, SBO, SWZ), bytes)
static __device__ __forceinline__ u32 gw_desc_lo(u32 start, u32 lbo) {
    return ((start & 0x3FFFFu) >> 4) | (((lbo & 0x3FFFFu) >> 4) << 16);
}
template <u32 SBO, int SWZ>
static __device__ __forceinline__ u64 gw_desc_hi(u32 lo) {
    return u64(lo) | (u64((SBO & 0x3FFFFu) >> 4) << 32) | (u64(SWZ ? 1u : 0u) << 62);
}
#endif
