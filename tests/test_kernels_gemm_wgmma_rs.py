"""The fused Q4_K GEMM with W decoded into wgmma's register A operand (csrc/gemm_wgmma_rs.cu) and its Numba twin.

* CPU emulation: the C file itself built with tests/gemm_wgmma_rs_emulate.cpp (g++; a host thread per CUDA thread,
  the producer's cp.async landing when their mbarrier phase completes, wgmma at its wait, the register-A fragments
  exchanged across the warpgroup at issue; a wgmma whose A registers or x slot change in flight aborts), every
  instantiated shape, against float64 references;
* registration, shared-memory sizes as the C computes them, the errors a caller can cause;
* offline link (tests/test_link_check.py: the registered instantiations, no spills, no serialised wgmma);
* GPU (@pytest.mark.gpu, an sm_90 card): the registered variants at the 7B shapes, no memory kept.

Bounds: as gemm_wgmma (the same decode): 1e-5 against the float64 product of the fp16 x and W decoded as the kernel
does (FP32 summation order), 2e-3 against the exact product.
"""
import ctypes

import numpy as np
import pytest

import kernels
from kernel_cases import aligned
from kernel_cases import rel_err as rel
from kernels import linked
from kernels.gemm_wgmma_twin import decoded_as_kernel
from q4kdistill.errors import Q4KError
from q4kdistill.formats import quants

VARIANTS = [n for n in kernels.variants() if n.startswith("gemm_wgmma_rs_linked")]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from _helpers_emulate import build_emulator

    return build_emulator(tmp_path_factory, "gemm_wgmma_rs_emulate.cpp",
                          {"GR_SOURCE": linked.CSRC / "gemm_wgmma_rs.cu"}, include_dirs=[linked.CSRC])


def emulate(lib, qtype, shape, out16, w, x16, N, pad=0, tma=False):
    """out [M, N] of gemm_wgmma_rs<bx, xs, ws, out16, tma, mt, Q> (shape = (bx, xs, ws, mt)) run by the emulation;
    pad > 0: written as columns 3 .. 3 + N of a [M, N + pad] matrix whose other columns must stay untouched."""
    M, K = x16.shape
    full = np.full((M, N + pad), np.nan, np.float16 if out16 else np.float32)
    out = full[:, 3:3 + N] if pad else full
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    assert lib.emu_gemm_rs(int(qtype[1]), *shape, int(out16), int(tma), ptr(w), w.shape[1], N, K, M, ptr(x16), ptr(out), N + pad) == 0, shape
    if pad:
        assert np.isnan(full[:, :3]).all() and np.isnan(full[:, 3 + N:]).all(), "written outside the block"
    return out


CASES = [  # qtype, (bx, xs, ws, mt), out16, tma, Ms, N, K
    ("Q4_K", (256, 4, 2, 1), 0, False, (300,), 129, 1024),  # a registered tile: two M tiles, a short N tile
    ("Q4_K", (128, 6, 2, 1), 1, False, (33,), 200, 512),    # another registered tile, fp16 out
    ("Q4_K", (64, 2, 2, 1), 0, False, (70,), 260, 1280),    # 20 steps through 2 x slots: every slot reused 10 times
    ("Q4_K", (256, 4, 2, 1), 0, True, (300,), 129, 1024),   # x by TMA: a short last M tile (zero-filled by the copy)
    ("Q4_K", (64, 3, 3, 1), 1, True, (64,), 128, 2048),     # ... 3 W slots, 8 super-blocks, fp16 out
    ("Q4_K", (128, 5, 2, 2), 0, True, (130,), 129, 1024),   # two W tiles a warpgroup (256 W rows a CTA), TMA
    ("Q4_K", (64, 3, 2, 2), 1, False, (100,), 300, 512),    # ... cp.async, fp16 out, a short second N tile
    ("Q6_K", (64, 3, 2, 2), 1, False, (100,), 300, 768),    # Q6_K (2-byte aligned blocks staged by 16-byte chunks):
                                                            # two W tiles a warpgroup, 3 super-blocks, fp16 out
    ("Q6_K", (256, 4, 2, 1), 0, True, (260,), 129, 768),    # ... the registered tile, TMA, the end of W clipped
    ("Q6_K", (128, 5, 2, 2), 0, True, (130,), 257, 512),    # ... 256 W rows a CTA, TMA
]


@pytest.mark.parametrize("qtype,shape,out16,tma,ms,N,K", CASES)
def test_cuda_source_emulated_matches_float64_reference(emulated, qtype, shape, out16, tma, ms, N, K):
    rng = np.random.default_rng([shape[0], shape[1], N, K, len(qtype)])
    w = aligned(quants.random_blocks(qtype, N, K, rng))
    as_kernel = decoded_as_kernel(w, qtype).astype(np.float64)
    exact = quants.dequantize(w, qtype).astype(np.float64)
    for M in ms:
        x16 = aligned(rng.standard_normal((M, K)).astype(np.float16))
        out = emulate(emulated, qtype, shape, out16, w, x16, N, pad=7 if M == ms[-1] else 0, tma=tma)
        x64 = x16.astype(np.float64)
        assert rel(out, x64 @ as_kernel.T) <= (1e-3 if out16 else 1e-5), (qtype, shape, M)
        assert rel(out, x64 @ exact.T) <= 2e-3, (qtype, shape, M)


def test_shared_memory_sizes_are_the_cs(emulated):
    for shape in linked.GR_SHAPES:
        for q in ("Q4_K", "Q6_K"):
            assert emulated.emu_gemm_rs_smem(int(q[1]), *shape) == linked.gemm_wgmma_rs_smem(*shape, q), (shape, q)


def test_variants_registered_without_scratch():
    assert VARIANTS == ["gemm_wgmma_rs_linked", "gemm_wgmma_rs_linked_x128", "gemm_wgmma_rs_linked_tma",
                        "gemm_wgmma_rs_linked_m2", "gemm_wgmma_rs_linked_m2_tma"]
    for name in VARIANTS:
        v = kernels.get(name)
        assert v.qtypes == ("Q4_K", "Q6_K") and v.m_min == 64 and v.rel_err == 2e-3 and not v.simulated
        p = v.params
        for q in v.qtypes:       # an instantiated shape that fits the shared memory, else Q4KError
            assert linked.gemm_wgmma_rs_check(p["bx"], p["xs"], p["ws"], p["mt"], q) <= linked.WGMMA_SMEM_LIMIT
        assert v.workspace("Q4_K", 4096, 18944, 3584, "float16") == {"x float16": 0}


def test_bad_shapes_and_cpu_calls_are_clear_errors():
    with pytest.raises(Q4KError, match="not a shape"):
        linked.gemm_wgmma_rs_check(256, 5, 2)
    with pytest.raises(Q4KError, match="not a shape"):
        linked.gemm_wgmma_rs_check(256, 4, 2, 1, "Q8_0")
    with pytest.raises(Q4KError, match="GPU only"):
        linked.gemm_wgmma_rs_linked(np.zeros((64, 256), np.float16), np.zeros((4, 144), np.uint8), "Q4_K", 4,
                                    np.zeros((64, 4), np.float32))


# -- on a GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("N,K", [(3584, 3584), (18944, 3584), (3584, 18944), (1031, 3584)])
def test_linked_on_gpu(name, qtype, N, K):
    if not linked.wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU")
    import cupy as cp

    rng = np.random.default_rng([N, K, len(name)])
    w = quants.random_blocks(qtype, N, K, np.random.default_rng([N, K, len(qtype)]))
    wd, w16 = cp.asarray(w), cp.asarray(decoded_as_kernel(w, qtype), dtype=cp.float64)
    pool = cp.get_default_memory_pool()
    for M in (64, 100, 512, 4096):
        x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32)).astype(cp.float16)
        for dtype in (cp.float32, cp.float16):
            out = cp.full((M, N), np.nan, dtype=dtype)
            call = lambda: (kernels.matmul(x, wd, qtype, N, variant=name, out=out) if dtype == cp.float32 else
                            linked.gemm_wgmma_rs_linked(x, wd, qtype, N, out, **kernels.get(name).params))
            call()                                                         # compiles, the first time
            out.fill(np.nan)
            cp.cuda.Device().synchronize()
            before = pool.used_bytes()
            call()
            cp.cuda.Device().synchronize()
            assert pool.used_bytes() == before, (name, M, "memory kept after the call")
            ref = x.astype(cp.float64) @ w16.T
            err = float(cp.linalg.norm(out.astype(cp.float64) - ref) / cp.linalg.norm(ref))
            bound = 1e-3 if dtype == cp.float16 else 1e-4
            assert bool(cp.isfinite(out).all()) and err <= bound, (name, qtype, N, K, M, dtype, err)
