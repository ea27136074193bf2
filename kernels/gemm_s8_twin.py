"""The int8 GEMM's Numba parts: the activation quantizer it reads (GPU and simulator alike) and the twin of
csrc/gemm_wgmma_s8.cu for the simulator.

    quantize_s8(x) -> (x8 int8 [M, K], dx float32 [K / 256, Mp], Mp)
        x (float32 or float16, [M, K], K % 256 == 0) to int8 per 256 values: dx = max|x| / 127,
        x8 = rint(x * 127 / max|x|) (kernels/requant8.quantize_x's rule, bit for bit); dx transposed and
        its rows padded to Mp = M rounded up to 4 (zeros), so a CTA's 128 scales are whole 16-byte chunks
    gemm_s8_twin(x, w_raw, qtype, n_out, out)
        out[M, n_out] (float32 or float16) = the kernel's sum over super-blocks of dx dw (x8 . w8), one
        thread per output: the same re-quantization of each Q4_K / Q6_K super-block (the scales'
        bound, dw = bound / 126, A and C rounded to fp16, t = fp16(q A + C) from the exact product,
        w8 = t rounded to the integer as fp16 does at 1536), exact integer dot products, the rescale
        in float32. Not the kernel's tiling: its job is the numerics on the simulator, where the C
        cannot run (tests/gemm_wgmma_s8_emulate.cpp runs the C itself on the CPU).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from q4kdistill import backend
from q4kdistill.errors import Q4KError

from ._device import F, launch
from .decode import Q4K_BYTES, Q4K_QS, Q6K_BYTES, Q6K_D, Q6K_QH, Q6K_QL, Q6K_SCALES

QK = 256
MAGIC = np.float32(12582912.0)        # 1.5 * 2^23: (v + MAGIC) - MAGIC is v rounded to the nearest integer, ties to even


@cuda.jit
def _quantize_kernel(x, x8, dxt, M, K, Mp):
    """Blocks of 128 threads, 32 per (row, super-block): thread l of a group holds values 8 l .. 8 l + 7; the
    group's max |x| through shared memory (the simulator has no shuffles)."""
    part = cuda.shared.array(128, dtype=np.float32)
    tid = cuda.threadIdx.x
    group = cuda.blockIdx.x * 4 + tid // 32
    lane = tid % 32
    nsb = K // QK
    live = group < M * nsb
    m = group // nsb if live else 0
    j = group % nsb if live else 0
    base = m * K + j * QK + 8 * lane
    amax = F(0)
    if live:
        for i in range(8):
            amax = max(amax, abs(F(x[base + i])))
    part[tid] = amax
    cuda.syncthreads()
    g0 = tid - lane
    for i in range(32):
        amax = max(amax, part[g0 + i])
    if live:
        inv = F(127) / amax if amax > F(0) else F(0)
        for i in range(8):
            v = F(x[base + i]) * inv
            x8[base + i] = np.int8((v + MAGIC) - MAGIC)
        if lane == 0:
            dxt[j * Mp + m] = amax / F(127)


def quantize_s8(x):
    """x [M, K] CuPy, or NumPy on the simulator (float32 or float16) -> (x8 int8 [M, K], dx float32 [K / 256, Mp], Mp);
    see the module doc."""
    xp = backend.array_module(x)
    M, K = x.shape
    if K % QK:
        raise Q4KError(f"quantize_s8: K = {K} is not a multiple of {QK}")
    Mp = -(-M // 4) * 4
    x = xp.ascontiguousarray(x) if x.dtype in (np.float32, np.float16) else xp.ascontiguousarray(x, np.float32)
    x8 = xp.empty((M, K), dtype=np.int8)
    dxt = xp.zeros((K // QK, Mp), dtype=np.float32)
    warps = M * (K // QK)
    if warps:
        launch(_quantize_kernel, -(-warps // 4), 128, x.reshape(-1), x8.reshape(-1), dxt.reshape(-1), M, K, Mp)
    return x8, dxt, Mp


@cuda.jit(device=True, inline=True)
def _f16(v):
    """v (float64) rounded to fp16 (nearest even) and back, as float64."""
    return np.float64(np.float16(v))


@cuda.jit(device=True, inline=True)
def _w8(q, A, C):
    """fp16(q A + C) from the exact product, then to the integer as fp16 rounds at 1536 (requant8's rule)."""
    t = _f16(np.float64(q) * A + C)
    return np.int32(_f16(t + 1536.0) - 1536.0)


@cuda.jit(device=True, inline=True)
def _f16_at(w, at):
    """The fp16 at w[at], w[at + 1] (little-endian) as float32."""
    bits = np.int32(w[at]) | (np.int32(w[at + 1]) << 8)
    e = (bits >> 10) & 31
    mant = F(bits & 1023)
    v = mant * F(2.0 ** -24) if e == 0 else (F(1024) + mant) * F(2.0) ** F(e - 25)
    return -v if bits & 0x8000 else v


@functools.lru_cache(maxsize=None)
def twin_kernel(qtype: str):
    """out[m, n] for one thread each: arguments (w flat uint8, row_bytes, n_out, K, M, x8 flat int8, dxt flat
    float32 [K / 256 * Mp], Mp, out flat [M * n_out] float32 or float16)."""
    q4 = qtype == "Q4_K"
    BLOCK = Q4K_BYTES if q4 else Q6K_BYTES

    @cuda.jit
    def kernel(w, row_bytes, n_out, K, M, x8, dxt, Mp, out):
        t = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if t >= M * n_out:
            return
        m = t // n_out
        n = t % n_out
        acc = F(0)
        for j in range(K // QK):
            blk = n * row_bytes + j * BLOCK
            bound = F(0)
            if q4:
                d = _f16_at(w, blk)
                dmin = _f16_at(w, blk + 2)
                for s in range(8):
                    sc, mn = _q4k_scale_min(w, blk + 4, s)
                    D = d * F(sc)
                    Mn = dmin * F(mn)
                    bound = max(bound, max(abs(D * F(15) - Mn), abs(Mn)))
            else:
                d = _f16_at(w, blk + Q6K_D)
                for s in range(16):
                    D = d * F(np.int8(w[blk + Q6K_SCALES + s]))
                    Mn = F(32) * D
                    bound = max(bound, max(abs(D * F(63) - Mn), abs(Mn)))
            dw = bound / F(126)
            inv = F(1) / dw if dw > F(0) else F(0)
            dot = 0
            for l in range(QK):
                if q4:
                    s = l // 32
                    sc, mn = _q4k_scale_min(w, blk + 4, s)
                    D = d * F(sc)
                    Mn = dmin * F(mn)
                    byte = w[blk + Q4K_QS + 32 * (s // 2) + l % 32]
                    qv = (byte >> 4) if s % 2 else (byte & 15)
                else:
                    hf = l // 128
                    k = (l % 128) // 32
                    i = l % 32
                    ql = w[blk + Q6K_QL + 64 * hf + 32 * (k % 2) + i]
                    qh = w[blk + Q6K_QH + 32 * hf + i]
                    qv = ((ql >> (4 * (k // 2))) & 15) | (((qh >> (2 * k)) & 3) << 4)
                    D = d * F(np.int8(w[blk + Q6K_SCALES + 8 * hf + 2 * k + i // 16]))
                    Mn = F(32) * D
                A = _f16(np.float64(F(D * inv)))
                C = _f16(np.float64(F(-Mn * inv)))
                dot += np.int32(x8[m * K + j * QK + l]) * _w8(qv, A, C)
            acc += (dxt[j * Mp + m] * dw) * F(dot)
        out[t] = acc

    return kernel


@cuda.jit(device=True, inline=True)
def _q4k_scale_min(w, at, s):
    """6-bit (sc, m) of sub-block s from the 12 scale bytes at w[at] (ggml's get_scale_min_k4)."""
    if s < 4:
        return w[at + s] & 63, w[at + s + 4] & 63
    return (w[at + s + 4] & 15) | ((w[at + s - 4] >> 6) << 4), (w[at + s + 4] >> 4) | ((w[at + s] >> 6) << 4)


def gemm_s8_twin(x, w_raw, qtype, n_out, out):
    """out[:] = the int8 GEMM of x and the Q4_K / Q6_K rows w_raw, computed as the kernel computes it (see the
    module doc); out float32 or float16 [M, n_out], C-contiguous."""
    xp = backend.array_module(x)
    if qtype not in ("Q4_K", "Q6_K"):
        raise Q4KError(f"the int8 GEMM takes Q4_K or Q6_K, not {qtype}")
    M, K = x.shape
    row_bytes = w_raw.shape[1]
    if row_bytes * QK != K * (Q4K_BYTES if qtype == "Q4_K" else Q6K_BYTES) or w_raw.shape[0] != n_out:
        raise Q4KError(f"gemm_s8_twin: {qtype} rows of {row_bytes} bytes do not hold K = {K} ({n_out} rows expected)")
    x8, dxt, Mp = quantize_s8(x)
    flat = xp.empty(M * n_out, dtype=np.float32)
    if M * n_out:
        launch(twin_kernel(qtype), -(-(M * n_out) // 64), 64, w_raw.reshape(-1), row_bytes, n_out, K, M,
               x8.reshape(-1), dxt.reshape(-1), Mp, flat)
    out[:] = flat.reshape(M, n_out).astype(out.dtype)
    return out

