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
Block sizes and field offsets come from q4kdistill/formats/block_layouts.py, which draws each layout
(the NumPy codecs and the CUDA C in csrc/ read the same table).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import cuda

from q4kdistill.formats.block_layouts import LAYOUTS, BlockLayout

from ._device import F, I, U, byte_at, f16_at, u32_at, unit_float
from ._ptx import f16hi, f16lo

# compile-time constants of the layouts: bytes per block and byte offsets of the fields
_Q4K, _Q6K, _Q80, _Q50 = (LAYOUTS[q] for q in ("Q4_K", "Q6_K", "Q8_0", "Q5_0"))
Q4K_BYTES, Q4K_D, Q4K_DMIN, Q4K_SCALES, Q4K_QS = (_Q4K.nbytes, _Q4K.at("d"), _Q4K.at("dmin"), _Q4K.at("scales"),
                                                  _Q4K.at("qs"))
Q6K_BYTES, Q6K_QL, Q6K_QH, Q6K_SCALES, Q6K_D = (_Q6K.nbytes, _Q6K.at("ql"), _Q6K.at("qh"), _Q6K.at("scales"),
                                                _Q6K.at("d"))
Q80_BYTES, Q80_D, Q80_QS = _Q80.nbytes, _Q80.at("d"), _Q80.at("qs")
Q50_BYTES, Q50_D, Q50_QH, Q50_QS = _Q50.nbytes, _Q50.at("d"), _Q50.at("qh"), _Q50.at("qs")
# the Q4_K decoders read the 16-byte head (d, dmin, scales) as 4 words and qs as words
assert (Q4K_D, Q4K_DMIN, Q4K_SCALES, Q4K_QS) == (0, 2, 4, 16) and Q4K_BYTES % 16 == 0


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


# --- Q4_K (block_layouts.Q4_K): weight = d*sc*q - dmin*m per 32-weight sub-block -----------------
@cuda.jit(device=True, inline=True)
def q4_k_scale_min(s0, s1, s2, s):
    """(scale, min) of sub-block s (0..7) from the three words of the 12 scale bytes."""
    t = U(I(8) * (s & I(3)))
    if s < I(4):
        return (s0 >> t) & U(63), (s1 >> t) & U(63)
    lo = s2 >> t
    return ((lo & U(15)) | ((((s0 >> t) >> U(6)) & U(3)) << U(4)),
            ((lo >> U(4)) & U(15)) | ((((s1 >> t) >> U(6)) & U(3)) << U(4)))


@cuda.jit(device=True, inline=True)
def q4_k_chunk_scales(h0, h1, h2, h3, j):
    """(d*sc, dmin*m) of sub-blocks 2j and 2j+1 -- the 64-weight chunk j (0..3) -- as (D0, M0, D1, M1),
    from the four words of a super-block's 16-byte head (d | dmin, then the 12 scale bytes)."""
    sc0, m0 = q4_k_scale_min(h1, h2, h3, I(2) * j)
    sc1, m1 = q4_k_scale_min(h1, h2, h3, I(2) * j + I(1))
    d, dmin = f16lo(h0), f16hi(h0)
    return d * F(sc0), dmin * F(m0), d * F(sc1), dmin * F(m1)


@cuda.jit(device=True, inline=True)
def q4_k_decode8(w32, w16, row_off, k8):
    o = row_off + (k8 >> I(5)) * I(Q4K_BYTES)   # super-block, 16-byte aligned
    g = k8 & I(31)                           # 8-weight group in the super-block
    s = g >> I(2)                            # sub-block 0..7
    wo = o >> I(2)
    sw = wo + I(Q4K_SCALES // 4)
    sc, m = q4_k_scale_min(w32[sw], w32[sw + I(1)], w32[sw + I(2)], s)
    a = f16_at(w16, o + I(Q4K_D)) * F(sc)
    b = f16_at(w16, o + I(Q4K_DMIN)) * F(m)
    q = wo + I(Q4K_QS // 4) + I(8) * (s >> I(1)) + I(2) * (g & I(3))   # qs words: chunk s//2, bytes 8*(g%4)..
    shift = U(I(4) * (s & I(1)))
    lo = (w32[q] >> shift) & U(0x0F0F0F0F)
    hi = (w32[q + I(1)] >> shift) & U(0x0F0F0F0F)
    return _fma8(lo, hi, 4, F(16) * a, -(F(16) * a + b))


# --- Q6_K (block_layouts.Q6_K): weight = d * sc * (q - 32), four lines qd per 128-weight half -----
@cuda.jit(device=True, inline=True)
def _int8_float(b):
    """A byte (held in a uint32) read as a signed int8, as float32."""
    return F(np.int32(b ^ U(0x80)) - np.int32(128))


@cuda.jit(device=True, inline=True)
def q6_k_decode8(w32, w16, row_off, k8):
    o = row_off + (k8 >> I(5)) * I(Q6K_BYTES)   # super-block, 2-byte aligned
    i0 = I(8) * (k8 & I(31))                 # first of the 8 weights in the super-block
    n = i0 >> I(7)                           # half
    qd = (i0 >> I(5)) & I(3)                 # which of the half's 4 lines
    l0 = i0 & I(31)
    qlo = o + I(Q6K_QL) + I(64) * n + I(32) * (qd & I(1)) + l0
    qho = o + I(Q6K_QH) + I(32) * n + l0
    nib = U(I(4) * (qd >> I(1)))
    hsh = U(I(2) * qd)
    lo = (((u32_at(w32, qlo) >> nib) & U(0x0F0F0F0F))
          | (((u32_at(w32, qho) >> hsh) & U(0x03030303)) << U(4)))
    hi = (((u32_at(w32, qlo + I(4)) >> nib) & U(0x0F0F0F0F))
          | (((u32_at(w32, qho + I(4)) >> hsh) & U(0x03030303)) << U(4)))
    sc = _int8_float(byte_at(w32, o + I(Q6K_SCALES) + I(8) * n + (l0 >> I(4)) + I(2) * qd))
    a = f16_at(w16, o + I(Q6K_D)) * sc
    return _fma8(lo, hi, 6, F(64) * a, F(-96) * a)


# --- Q8_0 (block_layouts.Q8_0): weight = d*q ------------------------------------------------------
@cuda.jit(device=True, inline=True)
def q8_0_decode8(w32, w16, row_off, k8):
    o = row_off + (k8 >> I(2)) * I(Q80_BYTES)
    qo = o + I(Q80_QS) + I(8) * (k8 & I(3))
    d = f16_at(w16, o + I(Q80_D))
    # u = q ^ 0x80 is q + 128 as an unsigned byte, so d*q == 256d * (1 + u/256) - 384d
    lo = u32_at(w32, qo) ^ U(0x80808080)
    hi = u32_at(w32, qo + I(4)) ^ U(0x80808080)
    return _fma8(lo, hi, 8, F(256) * d, F(-384) * d)


# --- Q5_0 (block_layouts.Q5_0): weight = d * (q - 16), the 5th bits in qh ------------------------
@cuda.jit(device=True, inline=True)
def _spread4(bits):
    """Bits 0..3 of `bits` moved to bit 4 of bytes 0..3."""
    return (((bits & U(1)) | ((bits & U(2)) << U(7)) | ((bits & U(4)) << U(14))
             | ((bits & U(8)) << U(21))) << U(4))


@cuda.jit(device=True, inline=True)
def q5_0_decode8(w32, w16, row_off, k8):
    o = row_off + (k8 >> I(2)) * I(Q50_BYTES)
    g = k8 & I(3)
    half = g >> I(1)                         # 0: low nibbles (weights 0..15), 1: high (16..31)
    j0 = I(8) * (g & I(1))
    d = f16_at(w16, o + I(Q50_D))
    h = u32_at(w32, o + I(Q50_QH)) >> U(j0 + I(16) * half)
    nib = U(I(4) * half)
    lo = ((u32_at(w32, o + I(Q50_QS) + j0) >> nib) & U(0x0F0F0F0F)) | _spread4(h)
    hi = ((u32_at(w32, o + I(Q50_QS + 4) + j0) >> nib) & U(0x0F0F0F0F)) | _spread4(h >> U(4))
    return _fma8(lo, hi, 5, F(32) * d, F(-48) * d)


@dataclass(frozen=True)
class Format:
    """What kernels need to know about a quant type: its layout and its decode8."""
    layout: BlockLayout
    decode8: object     # the device function above

    @property
    def name(self) -> str:          # "Q4_K"
        return self.layout.name

    @property
    def block_weights(self) -> int:  # weights per block (256 or 32)
        return self.layout.weights

    @property
    def block_bytes(self) -> int:   # bytes per block
        return self.layout.nbytes


# The types the kernels decode: those of block_layouts.LAYOUTS with a decode8 here.
DECODE8 = {"Q4_K": q4_k_decode8, "Q6_K": q6_k_decode8, "Q8_0": q8_0_decode8, "Q5_0": q5_0_decode8}
FORMATS = {q: Format(LAYOUTS[q], fn) for q, fn in DECODE8.items()}
