"""The variants that ship with the package (see registry.py for how to add your own)."""
from __future__ import annotations

from .cpu import matmul_slabs
from .gemm import gemm
from .gemv import gemv
from .gemv_chunk import gemv_chunk
from .gemv_dp4a import gemv_dp4a
from .registry import ALL_QTYPES, Variant, register
from .scratch import dequant_matmul


def _gemv(rows, warps, m_max=16):
    return Variant(
        name=f"gemv_warp_r{rows}w{warps}", qtypes=ALL_QTYPES, fn=gemv, m_max=m_max,
        params={"rows": rows, "warps": warps},
        description=f"fused GEMV, {warps} warps split K for {rows} weight row(s); decode in registers, shuffle reduce")


def _chunk(rows, warps, m_max=16):
    return Variant(
        name=f"gemv_chunk_r{rows}w{warps}", qtypes=("Q4_K", "Q6_K"), fn=gemv_chunk, m_max=m_max,
        params={"rows": rows, "warps": warps},
        description=f"fused GEMV for K-quants: a thread decodes 64-weight chunks of {rows} row(s) (header once), 16-byte loads")


def _dp4a(rows, warps, m_max=16):
    return Variant(
        name=f"gemv_dp4a_r{rows}w{warps}", qtypes=("Q4_K",), fn=gemv_dp4a, m_max=m_max, rel_err=2e-2,
        params={"rows": rows, "warps": warps},
        description=f"Q4_K GEMV on int8 activations (q8 per 32) with dp4a, 64-weight chunks of {rows} row(s)")


def _gemm(bm, bn, tm, tn):
    return Variant(
        name=f"gemm_tile_{bm}x{bn}", qtypes=ALL_QTYPES, fn=gemm,
        params={"bm": bm, "bn": bn, "tm": tm, "tn": tn},
        description=f"fused tiled GEMM, {bm}x{bn} tile, {tm}x{tn} per thread; decode to shared memory, FP32 FMA")


BUILTIN = [
    _gemv(1, 4), _gemv(2, 4), _gemv(4, 4, m_max=8), _gemv(2, 8),
    _chunk(1, 4), _chunk(2, 4), _chunk(4, 4, m_max=8),
    _dp4a(1, 4), _dp4a(2, 4), _dp4a(4, 4, m_max=8),
    _gemm(64, 64, 4, 4), _gemm(128, 64, 8, 4),
    Variant(name="dequant_f16_cublas", qtypes=ALL_QTYPES, fn=dequant_matmul, device="gpu",
            params={"dtype": "float16"}, rel_err=2e-3,
            description="decode into one reusable fp16 scratch, then cuBLAS GemmEx (fp16 in, FP32 accumulate/out)"),
    Variant(name="dequant_f32_cublas", qtypes=ALL_QTYPES, fn=dequant_matmul, device="gpu",
            params={"dtype": "float32"},
            description="decode into one reusable fp32 scratch, then cuBLAS SGEMM"),
    Variant(name="numpy_slab", qtypes=ALL_QTYPES, fn=matmul_slabs, device="cpu",
            description="NumPy: decode a slab of rows with quants.dequantize, matmul, next slab"),
]

for _v in BUILTIN:
    register(_v)
