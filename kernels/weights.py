"""Host-side checks and views of a quantized weight as the kernels read it.

A weight is ``uint8 [n_out, row_bytes]`` exactly as the GGUF stores it: row i holds the blocks of
output feature i, K weights in K / block_weights blocks. Kernels read it as one flat buffer seen
two ways (uint32 words, float16 halves), with rows ``row_bytes`` apart.
"""
from __future__ import annotations

import gguf
import numpy as np

from q4kdistill.backend import array_module
from q4kdistill.errors import Q4KError

from .decode import FORMATS


def qtype_name(qtype) -> str:
    """"Q4_K" for "Q4_K", "q4_k", GGMLQuantizationType.Q4_K or its integer value."""
    if isinstance(qtype, str):
        name = qtype.upper()
    else:
        try:
            name = gguf.GGMLQuantizationType(int(qtype)).name
        except (ValueError, TypeError):
            raise Q4KError(f"unknown quant type {qtype!r}") from None
    if name not in FORMATS:
        raise Q4KError(f"quant type {name} has no kernels (supported: {', '.join(FORMATS)})")
    return name


def row_bytes(qtype, K: int) -> int:
    f = FORMATS[qtype_name(qtype)]
    if K % f.block_weights:
        raise Q4KError(f"{f.name} rows need K divisible by {f.block_weights}, got K={K}")
    return K // f.block_weights * f.block_bytes


def columns(w_raw, qtype, n_out: int) -> int:
    """K, the number of weights per row, after checking the raw array against (qtype, n_out)."""
    f = FORMATS[qtype_name(qtype)]
    if w_raw.dtype != np.uint8 or w_raw.ndim != 2:
        raise Q4KError(f"raw {f.name} weights must be uint8 [n_out, row_bytes], got {w_raw.dtype} {tuple(w_raw.shape)}")
    if w_raw.shape[0] != n_out:
        raise Q4KError(f"raw weights have {w_raw.shape[0]} rows but n_out={n_out}")
    if w_raw.shape[1] % f.block_bytes:
        raise Q4KError(f"{f.name} rows of {w_raw.shape[1]} bytes are not whole {f.block_bytes}-byte blocks")
    return w_raw.shape[1] // f.block_bytes * f.block_weights


def address(a) -> int:
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


def padded_rows_bytes(rows: int, nbytes: int, align: int = 4) -> int:
    """Bytes of the padded copy device_views(w_raw, align) makes of aligned, C-contiguous rows of
    `nbytes` bytes each: none unless that is not a multiple of `align`."""
    return rows * -(-nbytes // align) * align if nbytes % align else 0


def padded_bytes(qtype, n_out: int, K: int, align: int = 4) -> int:
    """padded_rows_bytes for a weight [n_out, K] of qtype."""
    return padded_rows_bytes(n_out, row_bytes(qtype, K), align)


def device_views(w_raw, align=4):
    """(w32, w16, row_bytes): flat uint32 and float16 views of the rows, rows `align`-byte aligned.

    Rows whose length is not a multiple of 4 bytes (an odd number of Q6_K/Q8_0/Q5_0 blocks), or
    an unaligned / non-contiguous array, are copied once into a padded buffer (a cost the caller
    pays per call: pre-pad such weights when loading them).
    """
    n, nbytes = w_raw.shape
    stride = nbytes
    if nbytes % align or address(w_raw) % align or not w_raw.flags.c_contiguous:
        stride = (nbytes + align - 1) // align * align
        xp = array_module(w_raw)
        padded = xp.zeros((n, stride), dtype=np.uint8)
        padded[:, :nbytes] = w_raw
        w_raw = padded
    flat = w_raw.reshape(-1)
    return flat.view(np.uint32), flat.view(np.float16), stride
