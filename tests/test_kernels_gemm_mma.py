"""The fused Q4_K / Q6_K tensor-core GEMM (csrc/gemm_mma.cu) and its Numba twin.

* simulator: kernels/gemm_mma_twin.py (the C's tiling, fragment ownership, K loop and edge guards,
  mma done in FP32) against float64 references, on tiny tiles;
* CPU emulation: the C file itself built with tests/gemm_mma_emulate.cpp (g++; a host thread per CUDA
  thread, mma.sync / ldmatrix / cp.async emulated per the PTX manual), every registered tile;
* offline: the C compiles for sm_90a for both types and every registered tile without spills;
* GPU (@pytest.mark.gpu): the registered linked variants at real sizes, and no memory kept.

Bounds. The C rounds x and each decoded weight once to fp16 (relative 2^-11 each) and accumulates
in FP32, as dequant_linked_cublas does, so both hold the same bound (2e-3 on ||out - ref|| / ||ref||
against the exact float64 product; random signs make the norm error ~ 2^-11 ~ 5e-4). Against a
float64 product of the fp16-rounded x and W the twin and the emulated C differ only by FP32 summation order and the
last fp32 bit of a decoded weight before its rounding (a rare fp16 ulp): 1e-5 there (seen: ~1e-7),
while an indexing error (a wrong scale, nibble, row, lane address or fragment owner) gives O(1).
"""
import re
import shutil
import subprocess

import numpy as np
import pytest

import kernels
from kernel_cases import aligned, check_twin_rejects
from kernel_cases import rel_err as rel
from kernels import linked
from kernels.gemm_mma_twin import gemm_mma_twin
from q4kdistill.errors import Q4KError
from q4kdistill.formats import quants

VARIANTS = [n for n in kernels.variants() if n.startswith("gemm_mma_linked")]


def references(x, w, qtype):
    """(exact, rounded): x @ W.T in float64 with W decoded by the reference codec; the same with x
    and W rounded to fp16 first (what the tensor cores multiply)."""
    wd = quants.dequantize(w, qtype).astype(np.float64)
    x64 = np.asarray(x, np.float64)
    r16 = lambda a: np.asarray(a, np.float16).astype(np.float64)
    return x64 @ wd.T, r16(x64) @ r16(wd).T


# -- the twin in the simulator ------------------------------------------------------------------
simulator = pytest.mark.skipif(not linked.SIMULATOR, reason="the twin is the simulator's check (a GPU runs the C)")

# (bm, bn, wm, wn, stages, K, M): 2 x 2 warps of one m16n8 tile each, M spanning two CTA rows;
# 2 warps of 1 x 2 tiles with a 3-slot ring over two super-blocks (8 K steps), one x row; 1 warp of 2 x 1
# tiles with no ring (stages = 1, as the 128x64 Q6_K variant). A super-block is 4 K steps: every
# ring wraps. N = 20 is not a multiple of any tile. (The simulator runs a thread per Python thread:
# one M per tile keeps this at seconds.)
TILES = [(32, 16, 16, 8, 2, 256, 37), (16, 32, 16, 16, 3, 512, 1), (32, 8, 32, 8, 1, 256, 5)]


@simulator
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("tile", TILES)
def test_twin_matches_float64_reference(qtype, tile):
    bm, bn, wm, wn, stages, K, M = tile
    rng = np.random.default_rng([bm, bn, stages, len(qtype), 17])
    N = 20
    w = aligned(quants.random_blocks(qtype, N, K, rng))
    x = rng.standard_normal((M, K)).astype(np.float32)
    out = np.full((M, N), np.nan, np.float32)
    gemm_mma_twin(x, w, qtype, N, out, bm=bm, bn=bn, wm=wm, wn=wn, stages=stages)
    exact, rounded = references(x, w, qtype)
    assert rel(out, rounded) <= 1e-5, (qtype, tile)
    assert rel(out, exact) <= 2e-3, (qtype, tile)


@simulator
def test_twin_single_super_block_and_fp16_x():
    """K = 256 (one super-block: Q6_K rows of 210 bytes, so every row at another 2-byte offset in a
    16-byte chunk, the last row's last chunk clipped at the end of W), x given as fp16."""
    rng = np.random.default_rng(5)
    for qtype in ("Q4_K", "Q6_K"):
        N, K, M = 11, 256, 3
        w = aligned(quants.random_blocks(qtype, N, K, rng))
        x = rng.standard_normal((M, K)).astype(np.float16)
        out = np.full((M, N), np.nan, np.float32)
        gemm_mma_twin(x, w, qtype, N, out, bm=16, bn=16, wm=16, wn=8, stages=2)
        assert rel(out, references(x, w, qtype)[1]) <= 1e-5, qtype


def test_twin_rejects_bad_input():
    check_twin_rejects(gemm_mma_twin, {"bm": 24, "bn": 16, "wm": 24, "wn": 8}, "warp tiles")


# -- the CUDA C itself on the CPU: tests/gemm_mma_emulate.cpp ------------------------------------
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """kernels/csrc/gemm_mma.cu built with a host emulation of mma.sync / ldmatrix / cp.async."""
    from _helpers_emulate import build_emulator

    return build_emulator(tmp_path_factory, "gemm_mma_emulate.cpp", {"GM_SOURCE": linked.CSRC / "gemm_mma.cu"},
                          include_dirs=[linked.CSRC])


def emulate(lib, qtype, tile, w, x16, N):
    """out [M, N] of gemm_mma<qtype, *tile> run by the emulation (x16: fp16 [M, K])."""
    import ctypes

    M, K = x16.shape
    out = np.full((M, N), np.nan, np.float32)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    assert lib.emu_gemm(int(qtype[1]), *tile, ptr(w), w.shape[1], N, K, M, ptr(x16), ptr(out)) == 0, tile
    return out


def _emulated_cases():
    """Every registered tile (ring depth as launched) with M over one and two CTA rows, and the small
    tile of the twin tests."""
    for name in VARIANTS:
        p = kernels.get(name).params
        for q in ("Q4_K", "Q6_K"):
            tile = (p["bm"], p["bn"], p["wm"], p["wn"], linked.gemm_mma_stages(q, p["bm"], p["bn"]))
            yield q, tile, (1, 37, 100) if p["bm"] == 64 else (5, 130)
    for q in ("Q4_K", "Q6_K"):                 # 300 rows: 10 M tiles, a full group of 8 and a short one
        yield q, (32, 16, 16, 8, 2), (37, 300)


@pytest.mark.parametrize("qtype,tile,ms", list(_emulated_cases()))
def test_cuda_source_emulated_matches_float64_reference(emulated, qtype, tile, ms):
    """The C kernel as the GPU runs it (the emulation aborts on a misaligned or out-of-W cp.async);
    N = 70 is not a multiple of any tile, K = 512 is two super-blocks (8 K steps: every ring wraps).
    The bounds are the twin's. (What the emulation cannot see: the asynchrony of cp.async, i.e. a
    wait_group depth, and the hardware's own fragment mapping, which it takes from the PTX manual.)"""
    rng = np.random.default_rng([tile[0], tile[1], tile[4], len(qtype)])
    N, K = 70, 512
    w = aligned(quants.random_blocks(qtype, N, K, rng))
    for M in ms:
        x16 = aligned(rng.standard_normal((M, K)).astype(np.float16))
        out = emulate(emulated, qtype, tile, w, x16, N)
        exact, rounded = references(x16, w, qtype)
        assert rel(out, rounded) <= 1e-5, (qtype, tile, M)
        assert rel(out, exact) <= 2e-3, (qtype, tile, M)


def test_tile_order_covers_every_tile_once():
    """The grouped CTA order (gemm_mma_twin.tile_order = csrc grouped_tile) is a bijection onto the tiles."""
    from kernels.gemm_mma_twin import GROUP, tile_order

    for tiles_m, tiles_n in ((1, 1), (1, 7), (3, 5), (GROUP, 2), (GROUP + 3, 4), (2 * GROUP + 1, 1), (64, 296)):
        seen = [tile_order(b, tiles_m, tiles_n) for b in range(tiles_m * tiles_n)]
        assert sorted(seen) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)], (tiles_m, tiles_n)
    assert [tile_order(b, 20, 3)[0] for b in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]   # M fastest in a group


# -- registration and the ring sizes ------------------------------------------------------------
def test_variants_registered_without_scratch():
    assert VARIANTS == ["gemm_mma_linked_64x64", "gemm_mma_linked_128x64", "gemm_mma_linked_128x64w4"]
    bound = kernels.get("dequant_linked_cublas").rel_err
    for name in VARIANTS:
        v = kernels.get(name)
        assert v.qtypes == ("Q4_K", "Q6_K") and v.m_min == 16 and v.m_max is None and v.rel_err == bound
        assert v.device == "gpu" and not v.simulated and "float16" in v.accepts
        assert not v.supports("Q4_K", 15, True) and v.supports("Q6_K", 4096, True)
        assert v.decode_scratch("Q4_K", 512, 3584, 3584) == (None, 0)
        assert v.workspace_bytes("Q6_K", 512, 3584, 3584, "float16") == {}
        assert v.workspace_bytes("Q4_K", 512, 3584, 3584, "float32") == {"x float16": 2 * 512 * 3584}


def test_ring_fits_48_kb():
    for qtype, bm, bn, want in (("Q4_K", 64, 64, 3), ("Q6_K", 64, 64, 2), ("Q4_K", 128, 64, 2), ("Q6_K", 128, 64, 1)):
        s = linked.gemm_mma_stages(qtype, bm, bn)
        assert s == want and s * (bm * 72 * 2 + bn * 16 * linked.GEMM_W_CHUNKS[qtype]) <= 48 * 1024
    with pytest.raises(Q4KError, match="48 KB"):
        linked.gemm_mma_stages("Q6_K", 256, 128)


def test_cpu_call_is_a_clear_error():
    if not linked.SIMULATOR:
        pytest.skip("a GPU is present")
    with pytest.raises(Q4KError, match="GPU only"):
        linked.gemm_mma_linked(np.zeros((16, 256), np.float32), np.zeros((4, 144), np.uint8), "Q4_K", 4,
                               np.zeros((16, 4), np.float32))


# -- the CUDA C offline: every registered tile, both types, sm_90a, no spills --------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_source_compiles_without_spills(tmp_path):
    text = linked.source_text("gemm_mma.cu")
    names = []
    for name in VARIANTS:
        p = kernels.get(name).params
        for q in ("Q4_K", "Q6_K"):
            _, fn, wrapper = linked.gemm_mma_source(q, p["bm"], p["bn"], p["wm"], p["wn"],
                                                    linked.gemm_mma_stages(q, p["bm"], p["bn"]))
            text += wrapper + (f'extern "C" __global__ void k_{fn}(const u8* w, int rb, int n, int K, int M, '
                               f'const u16* x, float* out) {{ {fn}(w, rb, n, K, M, x, out); }}\n')
            names.append(f"k_{fn}")
    src = tmp_path / "gemm_mma.cu"
    src.write_text(text)
    r = subprocess.run(["nvcc", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c", "-o",
                        str(tmp_path / "g.o"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]
    stats = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers.*?"
                       r"(\d+) bytes smem", r.stderr, re.S)
    assert sorted(s[0] for s in stats) == sorted(names)
    for fn, spills, regs, smem in stats:
        assert int(spills) == 0 and int(regs) <= 255 and int(smem) <= 48 * 1024, (fn, spills, regs, smem)


# -- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("N,K", [(3584, 3584), (18944, 3584), (1031, 3584)])
def test_linked_on_gpu(name, qtype, N, K):
    import cupy as cp

    rng = np.random.default_rng([N, len(name), len(qtype)])
    w = quants.random_blocks(qtype, N, K, rng)
    wd = cp.asarray(w)
    w64 = cp.asarray(quants.dequantize(w, qtype), dtype=cp.float64)
    v = kernels.get(name)
    pool = cp.get_default_memory_pool()
    for M in (16, 100, 512, 4096):
        for x_dtype in (np.float32, np.float16):
            x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32)).astype(x_dtype)
            out = cp.full((M, N), np.nan, dtype=cp.float32)
            kernels.matmul(x, wd, qtype, N, variant=name, out=out)     # compiles, the first time
            out.fill(np.nan)
            cp.cuda.Device().synchronize()
            before = pool.used_bytes()
            kernels.matmul(x, wd, qtype, N, variant=name, out=out)
            cp.cuda.Device().synchronize()
            assert pool.used_bytes() == before, (name, M, "memory kept after the call")
            ref = x.astype(cp.float64) @ w64.T
            err = float(cp.linalg.norm(out.astype(cp.float64) - ref) / cp.linalg.norm(ref))
            assert bool(cp.isfinite(out).all()) and err <= v.rel_err, (name, qtype, N, M, x_dtype, err)
