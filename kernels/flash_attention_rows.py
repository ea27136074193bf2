"""The flash-attention backward's row terms in one pass (FlashAttention-2's "preprocess" kernel):

    do16[r, j]    = 16 bits of (dO[r, j] * s)                      (fp16 or bf16 bits, round to nearest even)
    drow[b, h, t] = sum_j (dO[r, j] * s) * O[r, j]                 float32, r = (b T + t) H + h

over the rows r of dO and O [B, T, H, D] (C-contiguous; float32, bfloat16 bits or float16: fused_io's storage
codes), s a float32 [1] on the device: the power of two the backward scales dO by (flash_attention_mma.grad_scale,
one reduction over dO before this). The products are float32 as the ops they replace computed them (dO * s is
exact: s is a power of two), the row sum in another order (float32 rounding of a sum of D terms).

What it replaces (kernels/flash_attention_mma.py before the seventeenth stop): O and dO widened to float32 copies,
their product, its row sums, a transpose into [B, H, T], a scaling, and the cast of dO * s: ~6 passes and three
[B, T, H, D] float32 temporaries; this reads dO and O once and writes do16 and drow.

GPU: one warp a row (lane j owns columns j, j + 32, ..., NC = ceil(D / 32) of them), its sum by shuffles (rows
never straddle warps), 8 rows a 256-thread block, the grid striding over rows. Simulator: blocks of one warp
(threads_for), the sum through shared memory (block_sum), as every fused kernel there.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from q4kdistill.errors import Q4KError

from ._device import SIMULATOR, launch, warp_sum
from .fused_io import BF16, F, F16, block_reducers, code_of, loader, reduce_slots, storage, storer

OUT_CODES = {"fp16": F16, "bf16": BF16}


@functools.lru_cache(maxsize=None)
def backward_rows_kernel(do_code: int, o_code: int, out_code: int, nc: int):
    ld_do, ld_o, st = loader(do_code), loader(o_code), storer(out_code)
    NC, SLOTS = nc, reduce_slots(32)
    if SIMULATOR:
        row_sum, _ = block_reducers(32)                  # the block is the warp: every lane gets the total
    else:
        @cuda.jit(device=True, inline=True)
        def row_sum(v, buf):                             # lane 0 gets the warp's total
            return warp_sum(v)

    @cuda.jit
    def kernel(do, o, s, R, T, H, D, do16, drow):        # do, o, do16 [R * D] flat; drow [B * H * T]; s [1]
        lane = cuda.threadIdx.x % 32
        warps = cuda.blockDim.x // 32
        buf = cuda.shared.array(SLOTS, F)
        sc = s[0]
        for r in range(cuda.blockIdx.x * warps + cuda.threadIdx.x // 32, R, cuda.gridDim.x * warps):
            base = r * D
            acc = F(0)
            for c in range(NC):
                j = lane + 32 * c
                if j < D:
                    g = ld_do(do, base + j) * sc
                    st(do16, base + j, g)
                    acc += g * ld_o(o, base + j)
            total = row_sum(acc, buf)
            if lane == 0:
                bt = r // H                              # b T + t
                drow[(bt // T * H + r % H) * T + bt % T] = total

    return kernel


def backward_rows(do, o, s, dtype: str):
    """(do16 uint16 [B, T, H, D] bits of dO * s in `dtype` ("fp16" / "bf16"), drow float32 [B, H, T]) as the module
    docstring says. do, o: NumPy (simulator) or CuPy arrays of the same shape, C-contiguous."""
    from q4kdistill.backend import array_module

    if dtype not in OUT_CODES:
        raise Q4KError(f"attention backward rows: dtype {dtype!r}, expected fp16 or bf16")
    if tuple(do.shape) != tuple(o.shape) or do.ndim != 4:
        raise Q4KError(f"attention backward rows: dO {tuple(do.shape)} and O {tuple(o.shape)}: expected one [B, T, H, D]")
    xp = array_module(do)
    B, T, H, D = do.shape
    R = B * T * H
    do16 = xp.empty((B, T, H, D), dtype=np.uint16)
    drow = xp.empty((B, H, T), dtype=np.float32)
    if R == 0:
        return do16, drow
    kernel = backward_rows_kernel(code_of(do), code_of(o), OUT_CODES[dtype], -(-D // 32))
    threads = 32 if SIMULATOR else 256
    blocks = min(-(-R // (threads // 32)), 2 if SIMULATOR else 132 * 16)   # GPU: 16 blocks an SM, ~7 rows a warp
    # (H100, T = 8192, 14 x 64: 82 us under ncu, 0.64 TB/s; a block for every 8 rows, 57,344 blocks, took 172 us
    # (CUDA events): its blocks' start-up, not memory, bounded it. Both far from the copy rate: a next step is
    # several rows a warp with their loads issued together)
    launch(kernel, blocks, threads, storage(do), storage(o), s, np.int64(R), np.int64(T), np.int64(H), np.int64(D),
           do16.reshape(-1), drow.reshape(-1))
    return do16, drow
