"""Decode a weight into one reusable scratch buffer, then let cuBLAS (through CuPy) multiply.

    x [M, K] float32 -> fp16 ; W -> fp16 scratch [N, K] ; out [M, N] = x16 @ W16.T in FP32 (cublasGemmEx)

Only one scratch buffer per dtype lives at a time; it grows to the largest matrix decoded so far
(``scratch_bytes()`` reports it, ``release_scratch()`` frees it). fp16 operands bound the error:
||out - ref|| / ||ref|| <= 2e-3 (each operand rounded to 11 bits; FP32 accumulation). The fp32
scratch variant is exact to FP32 rounding but runs at the FP32 SGEMM rate.
"""
from __future__ import annotations

import numpy as np

from q4kdistill.backend import array_module

from .blas import gemm
from .dequant import decode_rows
from .registry import DECODE_SCRATCH
from .weights import padded_bytes

_SCRATCH: dict = {}   # (array module name, dtype name) -> flat buffer


def scratch(xp, n: int, dtype):
    key = (xp.__name__, np.dtype(dtype).name)
    buf = _SCRATCH.get(key)
    if buf is None or buf.size < n:
        _SCRATCH.pop(key, None)                      # free the old one before the new one
        buf = _SCRATCH[key] = xp.empty(n, dtype=dtype)
    return buf[:n]


def scratch_bytes() -> int:
    """Bytes held by decode scratch buffers now."""
    return sum(b.nbytes for b in _SCRATCH.values())


def scratch_buffers() -> list:
    """The scratch arrays held now (a CUDA graph that captured products writing them keeps them alive)."""
    return list(_SCRATCH.values())


def release_scratch() -> None:
    _SCRATCH.clear()


def gemm_f16_f32(x16, w16, out):
    """out [M, N] float32 = x16 [M, K] @ w16 [N, K].T, fp16 operands, FP32 accumulate and output
    (blas.gemm: one cublasGemmEx). ``out`` may be a column block of a wider row-major matrix."""
    return gemm(out, x16, w16, trans_b=True)


def dequant_matmul(x, w_raw, qtype, n_out, out, dtype="float16"):
    """out[:] = x @ W.T through a decoded scratch copy of W (buffers: dequant_workspace)."""
    xp = array_module(w_raw)
    K = x.shape[1]
    w = scratch(xp, n_out * K, dtype).reshape(n_out, K)
    x16 = x.astype(np.float16) if dtype == "float16" else None     # before the decode: see dequant_workspace
    decode_rows(w_raw, qtype, K, dtype, w)
    if dtype == "float32":
        return gemm(out, x, w, trans_b=True)
    if xp is np:   # the simulator's stand-in for cuBLAS: same fp16 operands, float32 product
        out[:] = x16.astype(np.float32) @ w.astype(np.float32).T
        return out
    return gemm_f16_f32(x16, w, out)


def dequant_workspace(qtype, M, N, K, x_dtype, dtype="float16"):
    """dequant_matmul's buffers, all alive while the weight is decoded: the shared scratch [N, K] of
    `dtype`, x in fp16 (fp16 scratch), and decode_rows' padded copy of rows not a multiple of 4
    bytes. The scratch outlives the call; a larger matrix replaces it (the old one is freed
    once the new one is allocated)."""
    isize = np.dtype(dtype).itemsize
    return {DECODE_SCRATCH[dtype]: isize * N * K, "x float16": 2 * M * K if dtype == "float16" else 0,
            "padded rows": padded_bytes(qtype, N, K)}
