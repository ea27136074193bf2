"""Decode-to-buffer: raw quant rows -> a dense fp32 / fp16 / bf16 matrix, and embedding-row gather.

    out[i, k] = W[rows[i], k]          out [n, K]; rows = all rows, or a gather list of ids

Grid (rows, K/8/threads): one thread decodes one 8-weight group (``decode8``) and writes its 8
values with 16-byte stores (fp16/bf16 packed in pairs); a warp covers 256 consecutive weights. bf16 has no NumPy/CuPy dtype: it is written as uint16 bit patterns
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
from ._ptx import half2, st4
from .decode import FORMATS
from .weights import address, device_views

OUT_DTYPES = ("float32", "float16", "bfloat16")
THREADS = 256


@cuda.jit(device=True, inline=True)
def bf16_bits(f):
    """float32 -> bfloat16 bit pattern (uint16 value), rounding to nearest even; NaN stays NaN."""
    b = f32_bits(f)
    if (b & U(0x7FFFFFFF)) > U(0x7F800000):
        return np.uint16((b >> U(16)) | U(0x40))
    return np.uint16((b + U(0x7FFF) + ((b >> U(16)) & U(1))) >> U(16))


@cuda.jit(device=True, inline=True)
def _pack16(a, b, bf16):
    """Two float32 -> one uint32 of two 16-bit floats (a in the low half)."""
    if bf16:
        return U(bf16_bits(a)) | (U(bf16_bits(b)) << U(16))
    return half2(a, b)


@functools.lru_cache(maxsize=None)
def dequant_kernel(qtype: str, out_dtype: str, gather: bool):
    decode8 = FORMATS[qtype].decode8
    WIDE, BF16 = out_dtype == "float32", out_dtype == "bfloat16"

    @cuda.jit
    def kernel(w32, w16, row_bytes, ids, K, out32):   # out32: out [n, K] seen as flat uint32
        i = cuda.blockIdx.x                              # output row
        k8 = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if k8 < K >> 3:
            row = ids[i] if gather else i
            w = decode8(w32, w16, I(row) * I(row_bytes), I(k8))
            if WIDE:                                     # 8 x 4 bytes: two 16-byte stores
                o = I(i) * I(K) + I(8 * k8)
                st4(out32, o, f32_bits(w[0]), f32_bits(w[1]), f32_bits(w[2]), f32_bits(w[3]))
                st4(out32, o + I(4), f32_bits(w[4]), f32_bits(w[5]), f32_bits(w[6]), f32_bits(w[7]))
            else:                                        # 8 x 2 bytes: one 16-byte store
                st4(out32, I(i) * I(K >> 1) + I(4 * k8), _pack16(w[0], w[1], BF16), _pack16(w[2], w[3], BF16),
                    _pack16(w[4], w[5], BF16), _pack16(w[6], w[7], BF16))

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
    if n == 0:
        return out
    target = out if address(out) % 16 == 0 else xp.empty_like(out)   # 16-byte stores need alignment
    gather = ids is not None
    # without a gather list the kernel never reads ids: pass an int64 view of target's first 8 bytes
    # (a view allocates nothing, so a decode allocates only the padded rows device_views may copy)
    ids_arg = ids if gather else target.reshape(-1).view(np.uint8)[:8].view(np.int64)
    threads = min(THREADS, (K // 8 + 31) // 32 * 32)
    launch(dequant_kernel(qtype, name, gather), (n, (K // 8 + threads - 1) // threads), threads,
           w32, w16, stride, ids_arg, K, target.reshape(-1).view(np.uint32))
    if target is not out:
        out[...] = target
    return out
