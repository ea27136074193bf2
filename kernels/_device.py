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
import os

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


# -- launching ---------------------------------------------------------------------------------
# Numba's own launch (kernel[grid, block, stream](*args)) types every argument and wraps every
# CuPy array in a Numba device array through __cuda_array_interface__ on every call: measured on
# an H200 (2026-12-04, docs/perf.md) 213-418 us of host time for a kernel of ten CuPy arrays and
# two scalars, against 9-15 us for a CuPy elementwise op. The 7B teacher's forward launches ~450
# kernels, so the GPU waited on Python. The fast path below does that work once per (kernel,
# argument kinds): the first call goes through Numba (which compiles), then the compiled kernel
# and how each argument is marshalled are kept, and later calls lay the arguments out exactly as
# Numba's _Kernel.launch does (an array: meminfo, parent, size, itemsize, data, shape, strides;
# a scalar: its value) and launch with one driver call:
#   packed  every scalar an integer or float: the parameters are packed by one struct.pack_into
#           (native alignment, which is the kernel-parameter layout) into a buffer handed to
#           cuLaunchKernel as CU_LAUNCH_PARAM_BUFFER_POINTER (cupy.cuda.driver.launchKernel)
#   core    otherwise (a bool): Numba's converters, launched through cuda.core as Numba does
# Anything else (a Numba device array, a record, a kernel Numba will not name one overload for)
# keeps Numba's path. Q4KDISTILL_SLOW_LAUNCH=1 turns the fast path off (to compare, or to rule it out).
_PLANS: dict = {}
_ARRAY = object()          # marshalling tag: a CuPy array, expanded into Numba's array fields
_PASS = object()           # marshalling tag: passed as it is (bool, core path)
_STRUCT_CODES = {"int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
                 "int64": "q", "uint64": "Q", "float32": "f", "float64": "d"}
FAST_LAUNCH = not SIMULATOR and os.environ.get("Q4KDISTILL_SLOW_LAUNCH", "") in ("", "0")
launch_counts = {"fast": 0, "numba": 0}
_NDARRAY = [type(None)]    # cupy.ndarray, once CuPy is imported


def _arg_key(a):
    """What decides a kernel's overload and how an argument is marshalled: for a CuPy array its
    dtype, rank and contiguity (Numba's layout), for anything else its Python type."""
    if isinstance(a, _NDARRAY[0]):
        f = a.flags
        return (a.dtype.str, a.ndim, f.c_contiguous, f.f_contiguous)
    return type(a)


class _Packed:
    """A kernel's parameters as one buffer for cuLaunchKernel's `extra` (kept per plan and reused:
    the driver copies the parameters when the launch is issued)."""

    def __init__(self, handle: int, fmt: str):
        import ctypes
        import struct

        self.handle, self.st = handle, struct.Struct(fmt)
        self.buf = ctypes.create_string_buffer(max(self.st.size, 8))
        self.size = ctypes.c_size_t(self.st.size)
        # CU_LAUNCH_PARAM_BUFFER_POINTER (1), &buf, CU_LAUNCH_PARAM_BUFFER_SIZE (2), &size, CU_LAUNCH_PARAM_END (0)
        self.extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(self.buf), 2, ctypes.addressof(self.size), 0)
        self.extra_ptr = ctypes.addressof(self.extra)


def _compiled(kernel, args, compile: bool = False):
    """Numba's compiled kernel for these arguments' types (compiled now if `compile`), or None."""
    argtypes = tuple(kernel.typeof_pyval(a) for a in args)
    found = kernel.overloads.get(argtypes)
    return kernel.compile(argtypes) if found is None and compile else found


def _make_plan(kernel, args):
    """("packed", _Packed, kinds) or ("core", cuda.core kernel, converters) for these arguments'
    kinds, or None (keep Numba's path)."""
    import ctypes

    try:
        from numba.cuda import types as nt

        compiled = _compiled(kernel, args)
        if compiled is None or compiled.debug or kernel.targetoptions.get("extensions"):
            return None
        conv, fmt, packable = [], "@", True
        for t, a in zip(compiled.argument_types, args):
            if isinstance(t, nt.Array):
                if not isinstance(a, _NDARRAY[0]):
                    return None
                conv.append(_ARRAY)
                fmt += "q" * (5 + 2 * t.ndim)
            elif isinstance(t, (nt.Integer, nt.Float)) and str(t) in _STRUCT_CODES:
                conv.append(getattr(ctypes, "c_float" if str(t) == "float32" else "c_double" if str(t) == "float64"
                                    else f"c_{t}"))
                fmt += _STRUCT_CODES[str(t)]
            elif t == nt.boolean:
                conv.append(_PASS)
                packable = False
            else:
                return None
        cufunc = compiled._codelibrary.get_cufunc()
        if packable:
            return "packed", _Packed(int(cufunc.handle), fmt), tuple(c is _ARRAY for c in conv)
        return "core", cufunc.kernel, tuple(conv)
    except Exception:          # Numba internals moved: the plain path still works
        return None


@functools.lru_cache(maxsize=None)
def _core_stream(ptr: int):
    from numba.cuda.cudadrv.driver import _to_core_stream

    return _to_core_stream(_numba_stream(ptr) if ptr else 0)


@functools.lru_cache(maxsize=4096)
def _config(grid, block, shared=0):
    from cuda.core import LaunchConfig

    return LaunchConfig(grid=grid, block=block, shmem_size=shared)


def _dim3(d):
    if type(d) is int:
        return d, 1, 1
    d = tuple(d) + (1, 1)
    return d[0], d[1], d[2]


def _array_fields(a) -> tuple:
    """A CuPy array as Numba passes an array parameter: meminfo, parent, size, itemsize, data, shape, strides."""
    return (0, 0, a.size, a.itemsize, a.data.ptr) + a.shape + a.strides


def _fast_launch(plan, grid, block, ptr, args, shared=0):
    kind, what, conv = plan
    if kind == "packed":
        from cupy.cuda import driver

        vals = []
        for is_array, a in zip(conv, args):
            if is_array:
                vals += _array_fields(a)
            else:
                vals.append(a)
        what.st.pack_into(what.buf, 0, *vals)
        gx, gy, gz = _dim3(grid)
        bx, by, bz = _dim3(block)
        driver.launchKernel(what.handle, gx, gy, gz, bx, by, bz, shared, ptr, 0, what.extra_ptr)
        return
    from cuda.core import launch as core_launch

    out = []
    for c, a in zip(conv, args):
        if c is _ARRAY:
            out += _array_fields(a)
        elif c is _PASS:
            out.append(a)
        else:
            out.append(c(a))
    core_launch(_core_stream(ptr), _config(grid if type(grid) is int else tuple(grid),
                                           block if type(block) is int else tuple(block), shared), what, *out)


STATIC_SHARED = 48 * 1024     # dynamic shared memory a kernel may take without raising its limit
_SHARED_RAISED: dict = {}


def _raise_shared_limit(kernel, key, args, shared: int):
    """Compile `kernel` for these arguments (if Numba has not yet) and let it take `shared` bytes of
    dynamic shared memory (cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES: above 48 KB a launch
    fails without it). Kept per (kernel, argument kinds) = `key`: the attribute only ever grows."""
    if _SHARED_RAISED.get(key, 0) >= shared:
        return
    from numba.cuda.cudadrv.driver import binding, driver

    # Numba loads kernels as a library's CUkernel (cuLaunchKernel takes it for a CUfunction, cuFuncSetAttribute
    # does not: CUDA_ERROR_INVALID_HANDLE on the H200), so the attribute goes through cuKernelSetAttribute, as
    # Numba's own set_shared_memory_carveout does
    cufunc = _compiled(kernel, args, compile=True)._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(shared), cufunc.handle, cufunc.device.id)
    _SHARED_RAISED[key] = shared


def launch(kernel, grid, block, *args, shared: int = 0):
    """kernel[grid, block](*args) on CuPy's current stream (the simulator has no streams), through
    the fast path above once Numba has compiled the kernel for these argument kinds. `shared`: bytes
    of dynamic shared memory (above 48 KB the kernel's limit is raised first)."""
    if SIMULATOR:
        if shared:
            kernel[grid, block, 0, shared](*args)
        else:
            kernel[grid, block](*args)
        return
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    _NDARRAY[0] = cupy.ndarray
    key = (kernel, tuple(map(_arg_key, args)))
    if shared > STATIC_SHARED:
        _raise_shared_limit(kernel, key, args, shared)
    if FAST_LAUNCH:
        plan = _PLANS.get(key, False)
        if plan:
            _fast_launch(plan, grid, block, ptr, args, shared)
            launch_counts["fast"] += 1
            return
    launch_counts["numba"] += 1
    if ptr == 0:
        kernel[grid, block, 0, shared](*args)
    else:
        kernel[grid, block, _numba_stream(ptr), shared](*args)
    if FAST_LAUNCH and plan is False:
        _PLANS[key] = _make_plan(kernel, args)


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
