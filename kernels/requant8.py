"""8-bit products for Q4_K / Q6_K weights, in NumPy: the numerics of an int8 tensor-core GEMM that
re-quantizes each weight super-block to int8 inside the kernel (issue 17's int8-activation variant;
docs/perf.md, twelfth stop: the design and the accuracy it keeps on the real gemma-3 teacher).

Why re-quantize. Q4_K has a (scale, min) per 32 weights and Q6_K a scale per 16, so an int8 product
on the stored quants must rescale its integer sums every 16-32 of K: ~4 instructions per accumulator
per 32 of K, more than the int8 MMA itself takes. Re-quantizing W to int8 per 256-weight super-block
(one scale dw per row and super-block) and x per XB = 128 values (one dx per row and 128 of K: the
kernel's K step) leaves one integer dot product per step, accumulated by the tensor cores, and one
rescale per 128 of K:

    out[m, n] = sum over steps s of  dx[m, s] dw[n, s // 2] sum_{k in s} x8[m, k] w8[n, k]

The weights stay Q4_K / Q6_K in memory; w8 exists only in the kernel's shared memory.

    requant_rows(w_raw, qtype) -> (w8 int8 [n, K], dw float32 [n, K / 256])
    quantize_x(x, block=XB) -> (x8 int8 [M, K], dx float32 [M, K / block])   (csrc/quantize_x.cu's rule)
    matmul(x, w_raw, qtype, x_block=XB) -> float32 [M, n]

requant_rows does what the kernel's fp16x2 decode does (csrc/gemm_wgmma_s8.cu): per sub-block
A = fp16(D / dw) and C = fp16(-M / dw) (w = D q - M: quants.Codec.parts), t = fp16(q A + C) (one fused
multiply-add, rounded once), w8 = rint(t) (adding 1536 in fp16, whose spacing is 1 there). dw = bound / 126,
bound the largest |w| the super-block's scales allow, so |t| stays below 127 after the roundings.
"""
from __future__ import annotations

import numpy as np

from q4kdistill.errors import Q4KError
from q4kdistill.formats.quants import QK_K, _codec

QTYPES = ("Q4_K", "Q6_K")
LEVELS = 126          # |w8| <= 126: the fp16 roundings of A, C and t cannot push it past 127
XB = 128              # values of x per scale


def _f16(a):
    return np.asarray(a, np.float64).astype(np.float16).astype(np.float64)


def requant_rows(w_raw, qtype):
    """Raw Q4_K / Q6_K rows uint8 [n, row_bytes] -> (w8 int8 [n, K], dw float32 [n, K / 256]), in the
    kernel's float32 and fp16 arithmetic: bound, dw = bound / 126 and 1 / dw in float32, A and C rounded
    to fp16 from their float32 products, t = fp16(q A + C) (an exact fma rounded once), w8 = rint(t)."""
    codec = _codec(qtype)
    if codec.qtype.name not in QTYPES:
        raise Q4KError(f"requant_rows takes {' or '.join(QTYPES)}, not {codec.qtype.name}")
    raw = np.ascontiguousarray(w_raw, dtype=np.uint8)
    n = raw.shape[0]
    blocks = raw.reshape(-1, codec.type_size)
    q, D, M = codec.parts(blocks)                                     # float32 [nb, S, L], [nb, S, 1], [nb, S, 1]
    qmax = np.float32(15 if codec.qtype.name == "Q4_K" else 63)
    bound = np.maximum(np.abs(D * qmax - M), np.abs(M)).max(axis=(1, 2))     # [nb] float32: max |w| the scales allow
    dw = (bound / np.float32(LEVELS)).astype(np.float32)
    inv = np.divide(np.float32(1), dw, out=np.zeros_like(dw), where=dw > 0)[:, None, None]
    A = _f16((D * inv).astype(np.float32))
    C = _f16((-M * inv).astype(np.float32))
    t = _f16(q.astype(np.float64) * A + C)                            # one rounding, as fma.rn.f16x2
    w8 = np.rint(t).astype(np.int8)                                   # ties to even, as fp16 at spacing 1
    return w8.reshape(n, -1), dw.reshape(n, -1)


def quantize_x(x, block: int = XB):
    """x float32 [M, K] -> (x8 int8 [M, K], dx float32 [M, K / block]): dx = max|x| / 127 per `block` values,
    x8 = rint(x * 127 / max|x|) (kernels/csrc/quantize_x.cu's rule)."""
    x = np.asarray(x, np.float32)
    M, K = x.shape
    if K % block:
        raise Q4KError(f"quantize_x: K = {K} is not a multiple of {block}")
    xb = x.reshape(M, K // block, block)
    amax = np.abs(xb).max(axis=-1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    x8 = np.rint(xb * inv[..., None]).astype(np.int8)
    return x8.reshape(M, K), (amax / np.float32(127)).astype(np.float32)


def matmul(x, w_raw, qtype, x_block: int = XB, rows: int = 4096):
    """x [M, K] @ W.T through 8-bit x (one scale per x_block, a divisor of 256) and 8-bit re-quantized W:
    exact integer dot products per x_block of K, scaled by dx dw (float64 here; the kernel accumulates in
    float32). W `rows` rows at a time."""
    if QK_K % x_block:
        raise Q4KError(f"matmul: x_block {x_block} must divide {QK_K}")
    x8, dx = quantize_x(x, x_block)
    M, K = x8.shape
    ns, per = K // x_block, QK_K // x_block
    xi = x8.astype(np.int64).reshape(M, ns, x_block)
    out = np.empty((M, w_raw.shape[0]), np.float32)
    for r0 in range(0, w_raw.shape[0], rows):
        w8, dw = requant_rows(w_raw[r0:r0 + rows], qtype)
        wi = w8.astype(np.int64).reshape(-1, ns, x_block)
        dots = np.einsum("msk,nsk->mns", xi, wi)                         # exact integers
        scale = dx[:, None, :].astype(np.float64) * np.repeat(dw, per, axis=1)[None, :, :]
        out[:, r0:r0 + rows] = (dots * scale).sum(-1)
    return out
