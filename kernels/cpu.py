"""NumPy path for the CPU: decode a slab of weight rows at a time, matmul, move on.

The decoded matrix is never held whole: a slab is at most SLAB_BYTES of float32, so the CPU
teacher can run the real gemma-3 (262144 x 640 token_embd as its output head) in little memory.
"""
from __future__ import annotations

import numpy as np

from q4kdistill.formats.quants import dequantize

SLAB_BYTES = 32 << 20


def slab_rows(K: int) -> int:
    return max(1, SLAB_BYTES // (4 * K))


def matmul_slabs(x, w_raw, qtype, n_out, out):
    """out[:] = x @ W.T with W decoded `slab_rows(K)` rows at a time (x float32 [M, K])."""
    step = slab_rows(x.shape[1])
    for r0 in range(0, n_out, step):
        w = dequantize(w_raw[r0:r0 + step], qtype)            # [rows, K] float32
        np.matmul(x, w.T, out=out[:, r0:r0 + step])
    return out


def decode_rows(w_raw, qtype, K, out_dtype, out, ids=None):
    """Like dequant.decode_rows, in NumPy (bf16 as uint16 bit patterns, rounded to nearest even)."""
    rows = w_raw if ids is None else w_raw[np.asarray(ids)]
    n = rows.shape[0]
    if out is None:
        out = np.empty((n, K), dtype=np.uint16 if out_dtype == "bfloat16" else out_dtype)
    step = slab_rows(K)
    for r0 in range(0, n, step):
        w = dequantize(rows[r0:r0 + step], qtype)
        out[r0:r0 + step] = _bf16_bits(w) if out_dtype == "bfloat16" else w
    return out


def _bf16_bits(w):
    b = w.view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(w)
    return np.where(nan, ((b >> 16) | 0x40).astype(np.uint16), rounded)


def slabs_workspace(qtype, M, N, K, x_dtype):
    """matmul_slabs' largest buffer (host memory): one decoded float32 slab [rows, K]. quants.dequantize's
    own temporaries come on top."""
    return {"decoded slab (host)": 4 * min(N, slab_rows(K)) * K}
