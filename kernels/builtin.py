"""The variants that ship with the package (see registry.py for how to add your own)."""
from __future__ import annotations

from . import linked
from .cpu import matmul_slabs, slabs_workspace
from .gemm import gemm, gemm_workspace
from .gemv import gemv, gemv_workspace
from .gemv_chunk import CHUNKS, gemv_chunk, gemv_chunk_workspace
from .gemv_dp4a import gemv_dp4a, gemv_dp4a_workspace
from .linked import (dequant_linked_cublas, dequant_linked_workspace, gemm_mma_linked, gemm_mma_workspace,
                     gemm_wgmma_linked, gemm_wgmma_rs_linked, gemm_wgmma_s8_linked, gemm_wgmma_s8_workspace,
                     gemv_f32_linked, gemv_f32_workspace, gemv_mma_linked, gemv_mma_rows_linked, gemv_mma_rows_workspace, gemv_mma_workspace,
                     gemv_q8_linked, gemv_q8_workspace)
from .registry import ALL_QTYPES, Variant, register
from .scratch import dequant_matmul, dequant_workspace

CHUNK_QTYPES = tuple(CHUNKS)          # the types gemv_chunk has a chunk decoder for
LINKED_QTYPES = linked.QTYPES         # the types csrc/ decodes
F16_IN = ("float32", "float16")       # activations the decode + cuBLAS paths take as they are


def _gemv(rows, warps, m_max=16):
    return Variant(
        name=f"gemv_warp_r{rows}w{warps}", qtypes=ALL_QTYPES, fn=gemv, m_max=m_max, workspace=gemv_workspace,
        params={"rows": rows, "warps": warps},
        description=f"fused GEMV, {warps} warps split K for {rows} weight row(s); decode in registers, shuffle reduce")


def _chunk(rows, warps, m_max=16):
    return Variant(
        name=f"gemv_chunk_r{rows}w{warps}", qtypes=CHUNK_QTYPES, fn=gemv_chunk, m_max=m_max, workspace=gemv_chunk_workspace,
        params={"rows": rows, "warps": warps},
        description=f"fused GEMV for K-quants: a thread decodes 64-weight chunks of {rows} row(s) (header once), 16-byte loads")


def _dp4a(rows, warps, m_max=16):
    return Variant(
        name=f"gemv_dp4a_r{rows}w{warps}", qtypes=("Q4_K",), fn=gemv_dp4a, m_max=m_max, rel_err=2e-2, workspace=gemv_dp4a_workspace,
        params={"rows": rows, "warps": warps},
        description=f"Q4_K GEMV on int8 activations (q8 per 32) with dp4a, 64-weight chunks of {rows} row(s)")


def _linked(rows, warps):
    return Variant(
        name=f"gemv_q8_linked_r{rows}w{warps}", qtypes=LINKED_QTYPES, fn=gemv_q8_linked, m_max=16, rel_err=2e-2, workspace=gemv_q8_workspace,
        device="gpu", simulated=False, params={"rows": rows, "warps": warps},
        description=f"linked CUDA C: int8 x (q8 per 32) and dp4a; a block of {warps} warps owns {rows} row(s), 16-byte loads")


def _mma(warps, stages=4):
    return Variant(
        name=f"gemv_mma_linked_w{warps}" + (f"s{stages}" if stages != 4 else ""), qtypes=LINKED_QTYPES, fn=gemv_mma_linked,
        m_max=16, workspace=gemv_mma_workspace, rel_err=2e-2, device="gpu", simulated=False, params={"warps": warps, "stages": stages},
        description=f"linked CUDA C: int8 x, int8 tensor cores (mma per sub-block); {warps} warps split K of 16 rows "
                    f"(Q4_K: a {stages}-slot cp.async ring)")


def _mma_k8(warps):
    return Variant(
        name=f"gemv_mma_k8_linked_w{warps}", qtypes=("Q4_K",), fn=gemv_mma_linked, m_max=16, rel_err=2e-2, workspace=gemv_mma_workspace,
        device="gpu", simulated=False, params={"warps": warps, "x256": True},
        description=f"as gemv_mma_linked_w{warps}, x scaled per 256 (llama.cpp's Q8_K): sub-block scales applied "
                    f"in integers, FP32 once per super-block")


def _mma_rows(warps):
    # kept as a measured alternative (docs/perf.md, log step 19): a quarter of the x traffic, not faster
    return Variant(
        name=f"gemv_mma_rows_linked_w{warps}", qtypes=("Q4_K",), fn=gemv_mma_rows_linked, m_max=16 if warps <= 4 else 8,
        workspace=gemv_mma_rows_workspace,
        rel_err=2e-2, device="gpu", simulated=False, params={"warps": warps},
        description=f"linked CUDA C: int8 x, int8 tensor cores; a block of {warps} warps owns {16 * warps} rows and "
                    f"shares one x slot of its cp.async ring")


def _f32(rows, warps):
    return Variant(
        name=f"gemv_f32_linked_r{rows}w{warps}", qtypes=("Q4_K",), fn=gemv_f32_linked, m_max=4, device="gpu", workspace=gemv_f32_workspace,
        simulated=False, params={"rows": rows, "warps": warps},
        description=f"linked CUDA C: float32 x as is (exact), one kernel; {warps} warps split K of {rows} row(s)")


def _gemm(bm, bn, tm, tn):
    return Variant(
        name=f"gemm_tile_{bm}x{bn}", qtypes=ALL_QTYPES, fn=gemm, workspace=gemm_workspace,
        params={"bm": bm, "bn": bn, "tm": tm, "tn": tn},
        description=f"fused tiled GEMM, {bm}x{bn} tile, {tm}x{tn} per thread; decode to shared memory, FP32 FMA")


def _gemm_mma(bm, bn, wm=32, wn=32, suffix=""):
    # fp16 x and W (decoded once to fp16, as the scratch holds it), FP32 accumulation: the error of
    # dequant_linked_cublas, so its bound. M >= 16: below that a warp's m16 tiles are mostly padding.
    # Taller warp tiles (wm = 64) decode each B fragment once for 4 mma instead of 2.
    warps = (bm // wm) * (bn // wn)
    return Variant(
        name=f"gemm_mma_linked_{bm}x{bn}{suffix}", qtypes=LINKED_QTYPES, fn=gemm_mma_linked, m_min=16, rel_err=2e-3,
        workspace=gemm_mma_workspace, accepts=F16_IN, device="gpu", simulated=False,
        params={"bm": bm, "bn": bn, "wm": wm, "wn": wn},
        description=f"linked CUDA C: fused GEMM, {bm}x{bn} tile, {warps} warps of {wm}x{wn}; W decoded into fp16 mma fragments "
                    f"from a cp.async ring, no scratch (not yet run on a GPU)")


def _gemm_wgmma(name, bn, swz=1, what="", mt=1, qtypes=LINKED_QTYPES):
    # fp16 x; W decoded to fp16 with its scales rounded to fp16 (one more rounding than the scratch,
    # well inside the same bound: ~4e-4 against the exact product on random blocks), FP32 accumulation.
    # bn = 0: 256 columns for Q4_K, 128 for Q6_K (its staged super-blocks do not fit 256 beside the rings).
    tile = "256 (Q4_K) / 128 (Q6_K)" if not bn else str(bn)
    return Variant(
        name=name, qtypes=qtypes, fn=gemm_wgmma_linked, m_min=64, rel_err=2e-3,
        workspace=gemm_mma_workspace, accepts=F16_IN, device="gpu", simulated=False,
        params={"bn": bn, "nwg": 2, "stages": 4, "swz": swz, "mt": mt},
        description=f"linked CUDA C, sm_90 only: fused GEMM on wgmma, {128 * mt} x {tile} tile, W decoded once per CTA "
                    f"and K step into shared memory{what}, cp.async rings in dynamic shared memory, no scratch "
                    f"(its twin: gemm_wgmma_twin.py)")


def _gemm_wgmma_rs(name, bx, xs, ws=2, tma=False, mt=1):
    # the numbers of gemm_wgmma (fp16 x, W decoded to fp16 with its scales rounded to fp16, FP32 accumulation)
    return Variant(
        name=name, qtypes=LINKED_QTYPES, fn=gemm_wgmma_rs_linked, m_min=64, rel_err=2e-3,
        workspace=gemm_mma_workspace, accepts=F16_IN, device="gpu", simulated=False,
        params={"bx": bx, "xs": xs, "ws": ws, "tma": tma, "mt": mt},
        description=f"linked CUDA C, sm_90 only: fused GEMM on wgmma computed as W x^T, {128 * mt} W rows x {bx} x rows a CTA, "
                    f"each consumer thread decoding Q4_K / Q6_K straight into its register A fragments, a producer "
                    f"warpgroup filling {xs} x slots ({'by TMA' if tma else 'by cp.async'}) and {ws} raw-W slots "
                    f"(mbarriers), no scratch "
                    f"(its twin: gemm_wgmma_rs_twin.py; {'not yet run on a GPU' if mt > 1 else 'Q6_K not yet run on a GPU'})")


BUILTIN = [
    _gemv(1, 4), _gemv(2, 4), _gemv(4, 4, m_max=8), _gemv(2, 8),
    _chunk(1, 4), _chunk(2, 4), _chunk(4, 4, m_max=8),
    _dp4a(1, 4), _dp4a(2, 4), _dp4a(4, 4, m_max=8),
    _linked(1, 4), _linked(2, 4), _linked(4, 4), _linked(2, 2), _linked(4, 2), _mma(1), _mma(2), _mma(4),
    _mma_k8(2), _mma_k8(4), _mma_rows(4),
    _f32(1, 4), _f32(2, 4), _f32(2, 2), _f32(4, 4),
    _gemm(64, 64, 4, 4), _gemm(128, 64, 8, 4), _gemm_mma(64, 64), _gemm_mma(128, 64),
    _gemm_mma(128, 64, 64, 32, suffix="w4"),
    _gemm_wgmma("gemm_wgmma_linked", 0), _gemm_wgmma("gemm_wgmma_linked_n128", 128),
    _gemm_wgmma("gemm_wgmma_linked_plain", 0, swz=0, what=" (no swizzle: the fallback layout)"),
    _gemm_wgmma("gemm_wgmma_linked_m2", 128, mt=2, qtypes=("Q4_K",),   # (Q6_K's decode spills 36 bytes beside them)
                what=" (two m-tiles a warpgroup: half the decode a multiply-add)"),
    _gemm_wgmma_rs("gemm_wgmma_rs_linked", 256, 4), _gemm_wgmma_rs("gemm_wgmma_rs_linked_x128", 128, 6),
    _gemm_wgmma_rs("gemm_wgmma_rs_linked_tma", 256, 4, tma=True),
    _gemm_wgmma_rs("gemm_wgmma_rs_linked_m2", 128, 5, mt=2), _gemm_wgmma_rs("gemm_wgmma_rs_linked_m2_tma", 128, 5, tma=True, mt=2),
    Variant(name="gemm_wgmma_s8_linked", qtypes=LINKED_QTYPES, fn=gemm_wgmma_s8_linked, m_min=64, rel_err=2e-2,
            workspace=gemm_wgmma_s8_workspace, accepts=F16_IN, device="gpu", simulated=False,
            description="linked CUDA C, sm_90 only: int8 GEMM on wgmma, x to int8 per 256, each W super-block "
                        "re-quantized to int8 in the kernel (kernels/requant8.py), one rescale per 256 of K, no "
                        "scratch (its twin: gemm_s8_twin.py; ~1e-2 relative error)"),
    Variant(name="dequant_f16_cublas", qtypes=ALL_QTYPES, fn=dequant_matmul, device="gpu",
            params={"dtype": "float16"}, rel_err=2e-3, workspace=dequant_workspace,
            description="decode into one reusable fp16 scratch, then cuBLAS GemmEx (fp16 in, FP32 accumulate/out)"),
    Variant(name="dequant_linked_cublas", qtypes=LINKED_QTYPES, fn=dequant_linked_cublas, device="gpu",
            workspace=dequant_linked_workspace, accepts=F16_IN,
            rel_err=2e-3, simulated=False, description="linked CUDA C decode into the fp16 scratch, then cuBLAS GemmEx (FP32 out)"),
    Variant(name="dequant_linked_overlap4", qtypes=LINKED_QTYPES, fn=dequant_linked_cublas, device="gpu",
            workspace=dequant_linked_workspace, accepts=F16_IN,
            params={"chunks": 4}, rel_err=2e-3, simulated=False,
            description="linked CUDA C decode of 4 row blocks on a side stream, each GemmEx'd as soon as it is decoded"),
    Variant(name="dequant_linked_overlap16", qtypes=LINKED_QTYPES, fn=dequant_linked_cublas, device="gpu",
            workspace=dequant_linked_workspace, accepts=F16_IN,
            params={"chunks": 16}, rel_err=2e-3, simulated=False,
            description="as dequant_linked_overlap4 with 16 row blocks (the LM head at large M: 0.97x cuBLAS)"),
    Variant(name="dequant_linked_cublas16", qtypes=LINKED_QTYPES, fn=dequant_linked_cublas, device="gpu",
            workspace=dequant_linked_workspace, accepts=F16_IN,
            params={"out16": True}, rel_err=2e-3, simulated=False,
            description="linked CUDA C decode into the fp16 scratch, then CuPy's fp16 matmul cast to FP32"),
    Variant(name="dequant_f32_cublas", qtypes=ALL_QTYPES, fn=dequant_matmul, device="gpu",
            params={"dtype": "float32"}, workspace=dequant_workspace,
            description="decode into one reusable fp32 scratch, then cuBLAS SGEMM"),
    Variant(name="numpy_slab", qtypes=ALL_QTYPES, fn=matmul_slabs, device="cpu", workspace=slabs_workspace,
            description="NumPy: decode a slab of rows with quants.dequantize, matmul, next slab"),
]

for _v in BUILTIN:
    register(_v)
