"""Matrix products through cuBLAS, called with ctypes on a handle of our own: every product of the
teacher's and the student's step, so that a CUDA graph can capture them.

    gemm(out, a, b, trans_a=False, trans_b=False, beta=0.0)
        out [M, N] = op(a) @ op(b) (+ beta * out), row-major 2-D CuPy arrays, FP32 accumulation
    matmul(a, b, trans_b=False, out_dtype=None, trans_a=False) -> a fresh out
    product(a, b, trans_a=False, trans_b=False)     matmul where it applies, else ``@`` (NumPy too)

Why not CuPy's own: CuPy 14 refuses any cuBLAS call while a stream is capturing a graph (its
``cublas.setStream`` raises NotImplementedError before every call), although cuBLAS itself captures
(cuBLAS docs, "CUDA Graphs support"). Here one handle per device, its stream set to CuPy's current
stream on every call, and a workspace of our own (``WORKSPACE`` bytes, allocated once) so that cuBLAS
allocates nothing inside a capture and picks the same algorithm whether it is being captured or run:
a replay computes what the eager step computes. The ctypes call costs ~3 us of host time against
~15 us for ``cupy.matmul``.

Operands: C-contiguous rows (the last dimension unit-stride; ``out`` may be a column block of a
wider matrix: its row stride is its ``ldc``), a and b of one type -- float32, float16, bfloat16 or
float64 -- and out of that type or float32 (float64 with float64). Row-major to cuBLAS's column-major:
out^T = op(b)^T op(a)^T, so cuBLAS gets (b, a) in that order and nothing is copied or transposed.
NumPy arrays: ``gemm`` computes the same with NumPy (the simulator and CPU paths call it too).
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

WORKSPACE = 32 << 20           # bytes: what cuBLAS asks for on Hopper (cuBLAS docs, cublasSetWorkspace)
OP_N, OP_T = 0, 1
_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14, "float64": 1}     # cudaDataType
COMPUTE_32F, COMPUTE_64F = 68, 70                                       # cublasComputeType_t
GEMM_DEFAULT = -1
_ONE = {COMPUTE_32F: ctypes.c_float(1.0), COMPUTE_64F: ctypes.c_double(1.0)}
_BETA = {}                      # (compute, beta) -> ctypes scalar (kept alive: cuBLAS reads it at the call)


def _library_path() -> str:
    """The libcublas CuPy loaded (the same file, so one cuBLAS in the process)."""
    import cupy_backends.cuda.libs.cublas  # noqa: F401  (maps libcublas into the process)

    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libcublas.so"):
                return path
    import ctypes.util

    found = ctypes.util.find_library("cublas")
    if not found:
        raise OSError("libcublas not found (CuPy's cuBLAS is not loaded and none is on the library path)")
    return found


@functools.lru_cache(maxsize=None)
def _lib():
    lib = ctypes.CDLL(_library_path())
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
    lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
    for f in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2, lib.cublasGemmEx):
        f.restype = i
    return lib


class CublasError(RuntimeError):
    pass


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasError(f"{what} failed: cublasStatus_t {status}")


_HANDLES: dict = {}             # device id -> (handle, workspace array)


def _handle(cupy):
    dev = cupy.cuda.Device().id
    got = _HANDLES.get(dev)
    if got is None:
        lib = _lib()
        h = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(h)), "cublasCreate")
        ws = cupy.empty(WORKSPACE, dtype=np.uint8)
        _check(lib.cublasSetWorkspace_v2(h, ws.data.ptr, WORKSPACE), "cublasSetWorkspace")
        got = _HANDLES[dev] = (h, ws)
    return got[0]


def _beta(compute: int, beta: float):
    key = (compute, float(beta))
    s = _BETA.get(key)
    if s is None:
        s = _BETA[key] = (ctypes.c_double if compute == COMPUTE_64F else ctypes.c_float)(beta)
    return s


def _rows(a, what: str) -> int:
    """The row stride (elements) of a 2-D array whose rows are unit-stride."""
    if not _unit_rows(a):
        raise ValueError(f"blas: {what} must be 2-D with unit-stride rows, got shape {a.shape} strides {a.strides}")
    return max(a.strides[0] // a.itemsize, a.shape[1], 1)


def gemm(out, a, b, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0):
    """out [M, N] = op(a) @ op(b) + beta * out, op(x) = x.T when trans_x. Returns out."""
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    Kb, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if K != Kb or tuple(out.shape) != (M, N):
        raise ValueError(f"blas.gemm: shapes {a.shape}{'^T' * trans_a} @ {b.shape}{'^T' * trans_b} -> {out.shape}")
    if type(out).__module__.startswith("numpy"):
        prod = (a.T if trans_a else a) @ (b.T if trans_b else b)
        if beta:
            out *= beta
            out += prod.astype(out.dtype, copy=False)
        else:
            out[...] = prod
        return out
    import cupy

    t, to = a.dtype.name, out.dtype.name
    if b.dtype != a.dtype or t not in _TYPES or to not in (t, "float32") or (t == "float64") != (to == "float64"):
        raise ValueError(f"blas.gemm: operands {a.dtype}, {b.dtype} -> {out.dtype} not supported")
    if M == 0 or N == 0:
        return out
    if K == 0:                              # an empty sum: beta * out (0 * a NaN out is still NaN: fill)
        if beta:
            out *= beta
        else:
            out.fill(0)
        return out
    lda, ldb, ldc = _rows(a, "a"), _rows(b, "b"), _rows(out, "out")
    compute = COMPUTE_64F if t == "float64" else COMPUTE_32F
    lib, h = _lib(), _handle(cupy)
    _check(lib.cublasSetStream_v2(h, cupy.cuda.get_current_stream().ptr), "cublasSetStream")
    # column-major: out^T [N, M] = op(b)^T [N, K] @ op(a)^T [K, M]; a row-major x is x^T column-major
    _check(lib.cublasGemmEx(h, OP_T if trans_b else OP_N, OP_T if trans_a else OP_N, N, M, K,
                            ctypes.addressof(_ONE[compute]), b.data.ptr, _TYPES[t], ldb,
                            a.data.ptr, _TYPES[t], lda, ctypes.addressof(_beta(compute, beta)),
                            out.data.ptr, _TYPES[to], ldc, compute, GEMM_DEFAULT), "cublasGemmEx")
    return out


def matmul(a, b, trans_b: bool = False, out_dtype=None, trans_a: bool = False):
    """op(a) @ op(b) -> a new [M, N] array (a's type, or out_dtype); see gemm."""
    xp = np if type(a).__module__.startswith("numpy") else __import__("cupy")
    M = a.shape[1] if trans_a else a.shape[0]
    N = b.shape[0] if trans_b else b.shape[1]
    out = xp.empty((M, N), dtype=out_dtype or a.dtype)
    return gemm(out, a, b, trans_a=trans_a, trans_b=trans_b)


def product(a, b, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) in a's type: ``matmul`` for CuPy operands whose rows are unit-stride (one GemmEx,
    capturable), ``@`` otherwise (NumPy; other layouts)."""
    if type(a).__module__.startswith("numpy") or a.dtype != b.dtype or not (_unit_rows(a) and _unit_rows(b)):
        return (a.T if trans_a else a) @ (b.T if trans_b else b)
    return matmul(a, b, trans_b=trans_b, trans_a=trans_a)


def _unit_rows(a) -> bool:
    """2-D, each row unit-stride, rows at a non-negative stride (a reversed view is not one)."""
    return (a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize) and a.strides[0] >= 0
            and a.strides[0] % a.itemsize == 0 and a.dtype.name in _TYPES)
