"""What every fused elementwise/row kernel shares: element storage types and block reductions.

Storage types (``code``), all read into float32 registers and written back rounded:

    F32   float32 array
    BF16  bfloat16 as uint16 bit patterns (NumPy has no bfloat16; a CuPy ``bfloat16`` array is
          viewed as uint16 by ``storage``), rounded to nearest even on store
    F16   IEEE half, viewed as uint16 as well (cvt.f32.f16 / cvt.rn.f16 on the GPU)

Kernels index flat 1-D views (``flat``): row r, column j of a C-contiguous [R, C] array is at
r * C + j. Device functions, each with a path the simulator can run:

    loader(code)(a, i) -> float32          storer(code)(a, i, v)          rounder(code)(v) -> float32
    block_reducers(threads) -> (block_sum(v, buf), block_max(v, buf))
        every thread of the block calls them and gets the block's total / maximum; ``buf`` is a
        shared float32 array of ``reduce_slots(threads)`` entries, free again when they return.

Host side: ``code_of(a)``, ``storage(a)`` (the array the kernel indexes), ``aligned16(a)``, ``threads_for(n)``,
``row_grid`` (rows x column tiles),
``launch_shared`` (a launch whose arguments may alias: outputs written in place over inputs).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from q4kdistill.errors import Q4KError

from ._device import SIMULATOR, U, f32_bits, f32_from_bits, launch
from ._ptx import f16lo, half2

F = np.float32
F32, BF16, F16 = 0, 1, 2
NEG_INF = -math.inf
FULL_MASK = 0xFFFFFFFF


# -- host side ---------------------------------------------------------------------------------
def code_of(a) -> int:
    """The storage code of an array: float32, float16, bfloat16 (a CuPy/ml_dtypes dtype) or uint16
    (the package's bfloat16 bits)."""
    return _code_of_dtype(a.dtype)


@functools.lru_cache(maxsize=None)
def _code_of_dtype(dtype) -> int:   # (dtype.name costs ~2 us of host time; the step asks ~1,800 times)
    name = dtype.name
    if name == "float32":
        return F32
    if name in ("bfloat16", "uint16"):
        return BF16
    if name == "float16":
        return F16
    raise Q4KError(f"fused kernels take float32, bfloat16 (or its uint16 bits) or float16 arrays, got {name}")


def storage(a):
    """a as the kernel indexes it: a flat view, float32 or uint16 (no copy; a must be C-contiguous)."""
    if not a.flags.c_contiguous:
        raise Q4KError(f"fused kernels need C-contiguous arrays, got strides {a.strides}")
    flat = a.reshape(-1)
    return flat if code_of(a) == F32 else flat.view(np.uint16)


def empty_as(xp, shape, like):
    """A new array of ``like``'s dtype (a CuPy bfloat16 input gives a bfloat16 output, uint16 bits give bits)."""
    return xp.empty(shape, dtype=like.dtype)


def aligned16(a) -> bool:
    """Whether a's data starts on a 16-byte boundary (the 16-byte loads and stores of ld4 / st4)."""
    from .weights import address

    return address(a) % 16 == 0


def threads_for(n: int, most: int = 512) -> int:
    """Threads per block for rows of n elements: a power of two, 32 in the simulator (every
    simulated thread is a Python thread), up to ``most`` on the GPU."""
    if SIMULATOR:
        return 32
    t = 32
    while t < most and t < n:
        t *= 2
    return t


def launch_shared(kernel, grid, block, *args):
    """``_device.launch``, where two arguments may be views of the same memory (in place: the
    output is the input). On the GPU that is plain launch; the simulator would copy each NumPy
    argument to its own "device" buffer and copy them back one after the other, so here they are
    wrapped as simulator device arrays that alias the NumPy memory instead."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        args = [FakeCUDAArray(a) if isinstance(a, np.ndarray) and a.ndim > 0 else a for a in args]
    launch(kernel, grid, block, *args)


def row_grid(R: int, columns: int, per_thread: int = 1, threads: int = 256):
    """(grid (column blocks, row blocks), threads) for a kernel whose blocks stride over rows (y) and
    over column tiles of threads * per_thread (x): ~8k blocks in all, row and column from the loops,
    no division per element (the simulator: 32 threads, at most 2 x 2 blocks)."""
    threads = 32 if SIMULATOR else threads
    gx = max(1, min(-(-columns // (threads * per_thread)), 2 if SIMULATOR else 64))
    gy = max(1, min(R, 2 if SIMULATOR else max(1, 8 * 1024 // gx)))
    return (gx, gy), threads


def reduce_slots(threads: int) -> int:
    """Length of the shared scratch the block reductions need."""
    return threads if SIMULATOR else 33


# -- device side: loads and stores -------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def loader(code: int):
    if code == F32:
        @cuda.jit(device=True, inline=True)
        def load(a, i):
            return F(a[i])
    elif code == BF16:
        @cuda.jit(device=True, inline=True)
        def load(a, i):
            return f32_from_bits(U(a[i]) << U(16))
    else:
        @cuda.jit(device=True, inline=True)
        def load(a, i):
            return f16lo(U(a[i]))
    return load


@cuda.jit(device=True, inline=True)
def bf16_bits(f):
    """float32 -> bfloat16 bit pattern (uint16), rounding to nearest even; NaN stays NaN."""
    b = f32_bits(f)
    if (b & U(0x7FFFFFFF)) > U(0x7F800000):
        return np.uint16((b >> U(16)) | U(0x40))
    return np.uint16((b + U(0x7FFF) + ((b >> U(16)) & U(1))) >> U(16))


@functools.lru_cache(maxsize=None)
def rounder(code: int):
    """v -> the float32 value that storing v in storage ``code`` and loading it back gives."""
    if code == F32:
        @cuda.jit(device=True, inline=True)
        def rnd(v):
            return v
    elif code == BF16:
        @cuda.jit(device=True, inline=True)
        def rnd(v):
            return f32_from_bits(U(bf16_bits(v)) << U(16))
    else:
        @cuda.jit(device=True, inline=True)
        def rnd(v):
            return f16lo(half2(v, F(0)))
    return rnd


@functools.lru_cache(maxsize=None)
def storer(code: int):
    if code == F32:
        @cuda.jit(device=True, inline=True)
        def store(a, i, v):
            a[i] = v
    elif code == BF16:
        @cuda.jit(device=True, inline=True)
        def store(a, i, v):
            a[i] = bf16_bits(v)
    else:
        @cuda.jit(device=True, inline=True)
        def store(a, i, v):
            a[i] = np.uint16(half2(v, F(0)) & U(0xFFFF))
    return store


# -- device side: block reductions -------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def block_reducers(threads: int):
    """(block_sum, block_max) for blocks of ``threads`` threads (a power of two, >= 32)."""
    if threads < 32 or threads & (threads - 1):
        raise ValueError(f"threads must be a power of two >= 32, got {threads}")
    NW = threads // 32
    if SIMULATOR:
        # A tree in shared memory (the simulator has no warp shuffles).
        @cuda.jit(device=True)
        def block_sum(v, buf):
            tid = cuda.threadIdx.x
            buf[tid] = v
            cuda.syncthreads()           # every thread's value is in buf
            half = threads // 2
            while half > 0:
                if tid < half:
                    buf[tid] += buf[tid + half]
                cuda.syncthreads()       # this level is summed before the next reads it
                half //= 2
            total = buf[0]
            cuda.syncthreads()           # everyone has read buf[0] before buf is reused
            return total

        @cuda.jit(device=True)
        def block_max(v, buf):
            tid = cuda.threadIdx.x
            buf[tid] = v
            cuda.syncthreads()           # every thread's value is in buf
            half = threads // 2
            while half > 0:
                if tid < half:
                    buf[tid] = max(buf[tid], buf[tid + half])
                cuda.syncthreads()       # this level is done before the next reads it
                half //= 2
            total = buf[0]
            cuda.syncthreads()           # everyone has read buf[0] before buf is reused
            return total

        return block_sum, block_max

    # GPU: butterfly shuffles within each warp, the NW warp results through buf[0:NW],
    # the block's result through buf[32].
    @cuda.jit(device=True, inline=True)
    def block_sum(v, buf):
        tid = cuda.threadIdx.x
        for off in (16, 8, 4, 2, 1):
            v += cuda.shfl_xor_sync(FULL_MASK, v, off)
        if tid % 32 == 0:
            buf[tid // 32] = v
        cuda.syncthreads()               # every warp's total is in buf[0:NW]
        if tid < 32:
            w = buf[tid] if tid < NW else F(0)
            for off in (16, 8, 4, 2, 1):
                w += cuda.shfl_xor_sync(FULL_MASK, w, off)
            if tid == 0:
                buf[32] = w
        cuda.syncthreads()               # the block's total is in buf[32]
        total = buf[32]
        cuda.syncthreads()               # everyone has read it before buf is reused
        return total

    @cuda.jit(device=True, inline=True)
    def block_max(v, buf):
        tid = cuda.threadIdx.x
        for off in (16, 8, 4, 2, 1):
            v = max(v, cuda.shfl_xor_sync(FULL_MASK, v, off))
        if tid % 32 == 0:
            buf[tid // 32] = v
        cuda.syncthreads()               # every warp's maximum is in buf[0:NW]
        if tid < 32:
            w = buf[tid] if tid < NW else F(NEG_INF)
            for off in (16, 8, 4, 2, 1):
                w = max(w, cuda.shfl_xor_sync(FULL_MASK, w, off))
            if tid == 0:
                buf[32] = w
        cuda.syncthreads()               # the block's maximum is in buf[32]
        total = buf[32]
        cuda.syncthreads()               # everyone has read it before buf is reused
        return total

    return block_sum, block_max
