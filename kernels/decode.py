"""Device functions that decode GGUF quant blocks: Q4_K, Q6_K, Q8_0, Q5_0.

Every decoder has one signature, so every kernel (GEMV, GEMM, decode-to-buffer) is written once
and specialised per type:

    decode8(w32, w16, row_off, k8) -> 8 float32
        w32, w16  the weight buffer seen as uint32 words and as float16 halves (same bytes)
        row_off   byte offset of the row (rows are `row_bytes` apart, row_bytes % 4 == 0)
        k8        which 8 consecutive weights of the row: weights 8*k8 .. 8*k8+7
        (row_off and k8 are uint64: see _device.py)

Each decoder turns quants into floats with `unit_float` (1 + q/2**bits from bit patterns) and one
FMA, w = A*unit + C, with A and C computed per 8 weights from the block's scales.
Layouts follow gguf-py's quants.py and ggml-quants.c (dequantize_row_*).
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from numba import cuda

from ._device import F, I, U, byte_at, f16_at, u32_at, unit_float


@cuda.jit(device=True, inline=True)
def fma4(v, width, A, C):
    """Four weights A * (1 + f/2**width) + C from a word of four `width`-bit fields f, one per byte."""
    return (cuda.fma(A, unit_float(v & U(0xFF), width), C),
            cuda.fma(A, unit_float((v >> U(8)) & U(0xFF), width), C),
            cuda.fma(A, unit_float((v >> U(16)) & U(0xFF), width), C),
            cuda.fma(A, unit_float(v >> U(24), width), C))


@cuda.jit(device=True, inline=True)
def _fma8(lo, hi, width, A, C):
    """Eight weights from two words of four `width`-bit fields (one field per byte)."""
    return fma4(lo, width, A, C) + fma4(hi, width, A, C)


# --- Q4_K: 256 weights in 144 bytes ------------------------------------------------------------
#   bytes 0..1   d     (f16)  super-block scale of the 6-bit sub-block scales
#   bytes 2..3   dmin  (f16)  super-block scale of the 6-bit sub-block mins
#   bytes 4..15  scales: 8 (scale, min) pairs, 6 bits each, packed as (q = these 12 bytes)
#                  s < 4:  sc = q[s] & 63                    m = q[s+4] & 63
#                  s >= 4: sc = q[s+4] & 15 | (q[s-4] >> 6) << 4
#                          m  = q[s+4] >> 4 | (q[s]   >> 6) << 4
#   bytes 16..143 qs: 4 chunks j of 32 bytes; byte l of chunk j holds weight 64j+l in its low
#                 nibble (sub-block 2j) and weight 64j+32+l in its high nibble (sub-block 2j+1)
#   weight = d*sc*q - dmin*m
@cuda.jit(device=True, inline=True)
def q4_k_scale_min(s0, s1, s2, s):
    """(scale, min) of sub-block s (0..7) from the three scale words (bytes 4..7, 8..11, 12..15)."""
    t = U(I(8) * (s & I(3)))
    if s < I(4):
        return (s0 >> t) & U(63), (s1 >> t) & U(63)
    lo = s2 >> t
    return ((lo & U(15)) | ((((s0 >> t) >> U(6)) & U(3)) << U(4)),
            ((lo >> U(4)) & U(15)) | ((((s1 >> t) >> U(6)) & U(3)) << U(4)))


@cuda.jit(device=True, inline=True)
def q4_k_decode8(w32, w16, row_off, k8):
    o = row_off + (k8 >> I(5)) * I(144)      # super-block, 16-byte aligned
    g = k8 & I(31)                           # 8-weight group in the super-block
    s = g >> I(2)                            # sub-block 0..7
    wo = o >> I(2)
    sc, m = q4_k_scale_min(w32[wo + I(1)], w32[wo + I(2)], w32[wo + I(3)], s)
    a = f16_at(w16, o) * F(sc)
    b = f16_at(w16, o + I(2)) * F(m)
    q = wo + I(4) + I(8) * (s >> I(1)) + I(2) * (g & I(3))   # qs words: chunk s//2, bytes 8*(g%4)..
    shift = U(I(4) * (s & I(1)))
    lo = (w32[q] >> shift) & U(0x0F0F0F0F)
    hi = (w32[q + I(1)] >> shift) & U(0x0F0F0F0F)
    return _fma8(lo, hi, 4, F(16) * a, -(F(16) * a + b))


# --- Q6_K: 256 weights in 210 bytes -----------------------------------------------------------
#   bytes 0..127   ql: low 4 bits;  bytes 128..191 qh: high 2 bits;  bytes 192..207 scales (int8)
#   bytes 208..209 d (f16).  Two halves n of 128 weights; in half n, for l in 0..31:
#     w[128n+l]    = ql[64n+l]    & 15 | (qh[32n+l] >> 0 & 3) << 4,  scale sc[8n + l/16 + 0]
#     w[128n+l+32] = ql[64n+l+32] & 15 | (qh[32n+l] >> 2 & 3) << 4,  scale sc[8n + l/16 + 2]
#     w[128n+l+64] = ql[64n+l]    >> 4 | (qh[32n+l] >> 4 & 3) << 4,  scale sc[8n + l/16 + 4]
#     w[128n+l+96] = ql[64n+l+32] >> 4 | (qh[32n+l] >> 6 & 3) << 4,  scale sc[8n + l/16 + 6]
#   weight = d * sc * (q - 32)
@cuda.jit(device=True, inline=True)
def _int8_float(b):
    """A byte (held in a uint32) read as a signed int8, as float32."""
    return F(np.int32(b ^ U(0x80)) - np.int32(128))


@cuda.jit(device=True, inline=True)
def q6_k_decode8(w32, w16, row_off, k8):
    o = row_off + (k8 >> I(5)) * I(210)      # super-block, 2-byte aligned
    i0 = I(8) * (k8 & I(31))                 # first of the 8 weights in the super-block
    n = i0 >> I(7)                           # half
    qd = (i0 >> I(5)) & I(3)                 # which of the 4 lines above
    l0 = i0 & I(31)
    qlo = o + I(64) * n + I(32) * (qd & I(1)) + l0
    qho = o + I(128) + I(32) * n + l0
    nib = U(I(4) * (qd >> I(1)))
    hsh = U(I(2) * qd)
    lo = (((u32_at(w32, qlo) >> nib) & U(0x0F0F0F0F))
          | (((u32_at(w32, qho) >> hsh) & U(0x03030303)) << U(4)))
    hi = (((u32_at(w32, qlo + I(4)) >> nib) & U(0x0F0F0F0F))
          | (((u32_at(w32, qho + I(4)) >> hsh) & U(0x03030303)) << U(4)))
    sc = _int8_float(byte_at(w32, o + I(192) + I(8) * n + (l0 >> I(4)) + I(2) * qd))
    a = f16_at(w16, o + I(208)) * sc
    return _fma8(lo, hi, 6, F(64) * a, F(-96) * a)


# --- Q8_0: 32 weights in 34 bytes: d (f16), then 32 int8 quants; weight = d*q ------------------
@cuda.jit(device=True, inline=True)
def q8_0_decode8(w32, w16, row_off, k8):
    o = row_off + (k8 >> I(2)) * I(34)
    qo = o + I(2) + I(8) * (k8 & I(3))
    d = f16_at(w16, o)
    # u = q ^ 0x80 is q + 128 as an unsigned byte, so d*q == 256d * (1 + u/256) - 384d
    lo = u32_at(w32, qo) ^ U(0x80808080)
    hi = u32_at(w32, qo + I(4)) ^ U(0x80808080)
    return _fma8(lo, hi, 8, F(256) * d, F(-384) * d)


# --- Q5_0: 32 weights in 22 bytes: d (f16), qh (4 bytes: 5th bits), qs (16 bytes) ---------------
#   weight j    (j < 16) = (qs[j] & 15 | (qh >> j      & 1) << 4) - 16
#   weight j+16          = (qs[j] >> 4 | (qh >> (j+16) & 1) << 4) - 16;   weight = d * that
@cuda.jit(device=True, inline=True)
def _spread4(bits):
    """Bits 0..3 of `bits` moved to bit 4 of bytes 0..3."""
    return (((bits & U(1)) | ((bits & U(2)) << U(7)) | ((bits & U(4)) << U(14))
             | ((bits & U(8)) << U(21))) << U(4))


@cuda.jit(device=True, inline=True)
def q5_0_decode8(w32, w16, row_off, k8):
    o = row_off + (k8 >> I(2)) * I(22)
    g = k8 & I(3)
    half = g >> I(1)                         # 0: low nibbles (weights 0..15), 1: high (16..31)
    j0 = I(8) * (g & I(1))
    d = f16_at(w16, o)
    h = u32_at(w32, o + I(2)) >> U(j0 + I(16) * half)
    nib = U(I(4) * half)
    lo = ((u32_at(w32, o + I(6) + j0) >> nib) & U(0x0F0F0F0F)) | _spread4(h)
    hi = ((u32_at(w32, o + I(10) + j0) >> nib) & U(0x0F0F0F0F)) | _spread4(h >> U(4))
    return _fma8(lo, hi, 5, F(32) * d, F(-48) * d)


@dataclass(frozen=True)
class Format:
    """What kernels need to know about a quant type."""
    name: str           # "Q4_K"
    block_weights: int  # weights per block (256 or 32)
    block_bytes: int    # bytes per block
    decode8: object     # the device function above


FORMATS = {
    "Q4_K": Format("Q4_K", 256, 144, q4_k_decode8),
    "Q6_K": Format("Q6_K", 256, 210, q6_k_decode8),
    "Q8_0": Format("Q8_0", 32, 34, q8_0_decode8),
    "Q5_0": Format("Q5_0", 32, 22, q5_0_decode8),
}
for _f in FORMATS.values():  # the table above must agree with the gguf package
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[_f.name]] == (_f.block_weights, _f.block_bytes)
