"""Small device helpers shared by every kernel, each with a path the Numba simulator can run.

    SIMULATOR          True when NUMBA_ENABLE_CUDASIM=1 (no GPU: kernels run as Python threads)
    f32_from_bits(u)   uint32 bit pattern -> float32 (no conversion, a reinterpretation)
    f32_bits(f)        float32 -> its uint32 bit pattern
    u32_at(w32, off)   the 4 bytes at an EVEN byte offset of a buffer seen as uint32 words
    warp_sum(v)        sum of v over the 32 lanes of a warp (shuffles; GPU only)

Quant blocks are 2-byte aligned only (Q6_K 210 B, Q8_0 34 B, Q5_0 22 B), so a field may start
at byte 2 of a word: ``u32_at`` then joins the two words it straddles.

Types, kept explicit because Numba widens mixed integer arithmetic (and uint64 op int64 gives
float64): bit fields are uint32 (``U``), indices and byte offsets uint64 (``I``: unsigned, so
Numba adds no negative-index wraparound to each load), and every literal mixed with them is cast.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)
if not SIMULATOR:   # numba.cuda is loaded now: make sure its config took the no-sync default
    from q4kdistill.backend import no_array_interface_sync

    no_array_interface_sync()
U = np.uint32   # data words and bit fields
I = np.uint64   # indices and byte offsets
F = np.float32

if SIMULATOR:

    @cuda.jit(device=True)
    def f32_from_bits(u):
        return U(u).view(F)

    @cuda.jit(device=True)
    def f32_bits(f):
        return F(f).view(U)

    @cuda.jit(device=True)
    def warp_sum(v):  # never called in the simulator: kernels reduce through shared memory there
        raise NotImplementedError("warp shuffles are not simulated")

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def f32_from_bits(u):
        return libdevice.int_as_float(np.int32(u))

    @cuda.jit(device=True, inline=True)
    def f32_bits(f):
        return U(libdevice.float_as_int(f))

    @cuda.jit(device=True, inline=True)
    def warp_sum(v):
        for off in (16, 8, 4, 2, 1):
            v += cuda.shfl_down_sync(0xFFFFFFFF, v, off)
        return v


@cuda.jit(device=True, inline=True)
def u32_at(w32, off):
    """Bytes [off, off+4) of the buffer, little-endian; ``off`` even."""
    i = off >> I(2)
    if off & I(2):
        return U(w32[i] >> U(16)) | U(w32[i + I(1)] << U(16))
    return w32[i]


@cuda.jit(device=True, inline=True)
def byte_at(w32, off):
    """The byte at any offset, as uint32."""
    return U(w32[off >> I(2)] >> U(I(8) * (off & I(3)))) & U(0xFF)


@cuda.jit(device=True, inline=True)
def f16_at(w16, off):
    """The IEEE half at an even byte offset, as float32 (``w16`` is the buffer seen as float16)."""
    return F(w16[off >> I(1)])


@cuda.jit(device=True, inline=True)
def unit_float(field, width):
    """1 + field / 2**width as float32, exactly, for an unsigned ``field`` of ``width`` bits.

    Built from bits (0x3F800000 is 1.0f; the field becomes the top of the mantissa), which is
    two integer operations instead of a slow int->float conversion. Decoders fold the "1 +"
    into their per-block offset:  a*q + b == (a*2**width) * unit_float(q) + (b - a*2**width).
    """
    return f32_from_bits(U(0x3F800000) | U(field << U(23 - width)))


if not SIMULATOR:
    # CuPy arrays carry their stream in __cuda_array_interface__; by default Numba synchronizes
    # that stream at every launch, which would serialise host and GPU. We launch on CuPy's
    # current stream (``launch`` below), so the ordering holds without it.
    cuda.config.CUDA_ARRAY_INTERFACE_SYNC = 0


@functools.lru_cache(maxsize=None)
def _numba_stream(ptr: int):
    return cuda.external_stream(ptr)


def launch(kernel, grid, block, *args):
    """kernel[grid, block](*args) on CuPy's current stream (the simulator has no streams)."""
    if SIMULATOR:
        kernel[grid, block](*args)
        return
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    if ptr == 0:
        kernel[grid, block](*args)
    else:
        kernel[grid, block, _numba_stream(ptr)](*args)


@functools.lru_cache(maxsize=None)
def warp_rows_store(rows: int, m_tile: int, warps: int):
    """Device function store(acc, tid, lane, row0, M, n_out, out) for kernels where one warp owns
    `rows` output rows: lane partials acc[r*m_tile + m] are summed over the warp and written to
    out[m, row0 + r]. Warp shuffles on the GPU; the simulator has none, so there the warp's partials
    go through shared memory and lane i sums partial i."""
    MT, NACC, THREADS = m_tile, rows * m_tile, 32 * warps

    if not SIMULATOR:
        @cuda.jit(device=True, inline=True)
        def store(acc, tid, lane, row0, M, n_out, out):
            for i in range(NACC):
                v = warp_sum(acc[i])
                if lane == 0 and row0 + i // MT < n_out and i % MT < M:
                    out[i % MT, row0 + i // MT] = v
        return store

    @cuda.jit(device=True)
    def store(acc, tid, lane, row0, M, n_out, out):
        red = cuda.shared.array((THREADS, NACC), F)
        for i in range(NACC):
            red[tid, i] = acc[i]
        cuda.syncthreads()  # all partials of the block are in `red`
        if lane < NACC:
            s = F(0)
            for t in range(32):
                s += red[tid - lane + t, lane]
            if row0 + lane // MT < n_out and lane % MT < M:
                out[lane % MT, row0 + lane // MT] = s
    return store
