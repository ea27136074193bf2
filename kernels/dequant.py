"""Decode-to-buffer: raw quant rows -> a dense fp32 / fp16 / bf16 matrix, and embedding-row gather.

    out[i, k] = W[rows[i], k]          out [n, K]; rows = all rows, or a gather list of ids

One thread decodes one 8-weight group (``decode8``) and writes its 8 values; a warp covers 256
consecutive weights of a row. bf16 has no NumPy/CuPy dtype: it is written as uint16 bit patterns
(round to nearest even). Used by the "decode a layer into a reusable scratch, then cuBLAS" matmul
variant and by the dequantize-everything teacher backends.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from q4kdistill.backend import array_module
from q4kdistill.errors import Q4KError

from ._device import I, U, f32_bits, launch
from .decode import FORMATS
from .weights import device_views

OUT_DTYPES = ("float32", "float16", "bfloat16")
THREADS = 256


@cuda.jit(device=True, inline=True)
def bf16_bits(f):
    """float32 -> bfloat16 bit pattern (uint16 value), rounding to nearest even; NaN stays NaN."""
    b = f32_bits(f)
    if (b & U(0x7FFFFFFF)) > U(0x7F800000):
        return np.uint16((b >> U(16)) | U(0x40))
    return np.uint16((b + U(0x7FFF) + ((b >> U(16)) & U(1))) >> U(16))


@functools.lru_cache(maxsize=None)
def dequant_kernel(qtype: str, out_dtype: str, gather: bool):
    decode8 = FORMATS[qtype].decode8
    BF16 = out_dtype == "bfloat16"

    @cuda.jit
    def kernel(w32, w16, row_bytes, ids, out):      # out [n, K]; ids used only when gathering
        n8 = out.shape[1] >> 3
        e = cuda.grid(1)
        if e < out.shape[0] * n8:
            i, k8 = e // n8, e % n8
            row = ids[i] if gather else i
            w = decode8(w32, w16, I(row * row_bytes), I(k8))
            for t in range(8):
                if BF16:
                    out[i, 8 * k8 + t] = bf16_bits(w[t])
                else:
                    out[i, 8 * k8 + t] = w[t]

    return kernel


def dtype_name(out_dtype) -> str:
    name = out_dtype if isinstance(out_dtype, str) else np.dtype(out_dtype).name
    if name not in OUT_DTYPES:
        raise Q4KError(f"dequantize_to: out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    return name


def _storage_dtype(name: str):
    return np.uint16 if name == "bfloat16" else np.dtype(name)


def decode_rows(w_raw, qtype: str, K: int, out_dtype, out, ids=None):
    """Decode rows of w_raw (all, or `ids`) into `out` [n, K] (allocated when None)."""
    name = dtype_name(out_dtype)
    w32, w16, stride = device_views(w_raw)
    n = w_raw.shape[0] if ids is None else ids.shape[0]
    xp = array_module(w_raw)
    if out is None:
        out = xp.empty((n, K), dtype=_storage_dtype(name))
    elif out.shape != (n, K) or out.dtype != _storage_dtype(name):
        raise Q4KError(f"dequantize_to: out must be {np.dtype(_storage_dtype(name)).name} {(n, K)}, got {out.dtype} {tuple(out.shape)}")
    gather = ids is not None
    kernel = dequant_kernel(qtype, name, gather)
    total = n * (K // 8)
    ids_arg = ids if gather else xp.zeros(1, dtype=np.int64)
    launch(kernel, (total + THREADS - 1) // THREADS, THREADS, w32, w16, stride, ids_arg, out)
    return out
