"""The fused Q4_K / Q6_K GEMM on Hopper's wgmma (csrc/gemm_wgmma.cu) and its Numba twin.

* the generated header csrc/wgmma_ops.cuh is current (kernels/wgmma_header.py);
* simulator: kernels/gemm_wgmma_twin.py (the C's tiles, shared layout, rings, decode; wgmma done in
  FP32 through the descriptors) against float64 references, on tiny tiles;
* CPU emulation: the C file itself built with tests/gemm_wgmma_emulate.cpp (g++; cp.async and wgmma
  run as late as their waits allow, and a wgmma whose operands change in flight aborts), every
  registered instantiation and small ones;
* offline: the C compiles for sm_90a, registered instantiations, without spills and without ptxas
  serialising the wgmma pipeline (its C7517 "warpgroup.wait is injected" note);
* GPU (@pytest.mark.gpu, an sm_90 card): the registered variants at the 7B shapes, and no memory kept.

Bounds. The kernel rounds x, each sub-block scale and each decoded weight to fp16 and accumulates in
FP32. Against a float64 product of the fp16 x and W decoded that way (gemm_wgmma_twin.decoded_as_kernel)
the twin and the emulated C differ only by FP32 summation order: 1e-5 (seen ~1e-7), while an indexing
error (a wrong scale, nibble, row, chunk, swizzle or fragment owner) gives O(1). Against the exact
product: the variants' 2e-3 (seen ~4e-4: one more rounding than the scratch's decode, the scales').
"""
import ctypes
import functools
from pathlib import Path

import numpy as np
import pytest

import kernels
from kernel_cases import aligned, check_twin_rejects
from kernel_cases import rel_err as rel
from kernels import linked
from kernels.gemm_wgmma_twin import decoded_as_kernel, gemm_wgmma_twin
from kernels.wgmma_header import header
from q4kdistill.errors import Q4KError
from q4kdistill.formats import quants

VARIANTS = [n for n in kernels.variants() if n.startswith("gemm_wgmma_linked")]


def references(x, w, qtype):
    """(exact, as_kernel): x @ W.T in float64 with W from the reference codec; the same with x in fp16
    and W decoded as the kernel decodes it."""
    x64 = np.asarray(x, np.float64)
    exact = x64 @ quants.dequantize(w, qtype).astype(np.float64).T
    return exact, np.asarray(x, np.float16).astype(np.float64) @ decoded_as_kernel(w, qtype).astype(np.float64).T


def test_header_is_current():
    path = Path(linked.CSRC) / "wgmma_ops.cuh"
    assert path.read_text() == header(), "regenerate: python -m kernels.wgmma_header > kernels/csrc/wgmma_ops.cuh"


def test_reference_decode_is_the_codec_within_fp16():
    """decoded_as_kernel is the reference codec up to the fp16 roundings (a layout slip would be O(1))."""
    rng = np.random.default_rng(3)
    for qtype in ("Q4_K", "Q6_K"):
        w = quants.random_blocks(qtype, 9, 768, rng)
        a, r = decoded_as_kernel(w, qtype).astype(np.float64), quants.dequantize(w, qtype).astype(np.float64)
        assert rel(a, r) <= 1e-3 and np.abs(a - r).max() <= 2e-3 * np.abs(r).max(), qtype


# -- the twin in the simulator ----------------------------------------------------------------------
simulator = pytest.mark.skipif(not linked.SIMULATOR, reason="the twin is the simulator's check (a GPU runs the C)")


@simulator
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("swz", [1, 0])
def test_twin_matches_float64_reference(qtype, swz):
    """One warpgroup, a 64 x 32 tile, a 3-slot ring over one super-block (4 K steps: the ring wraps);
    N = 40 spans two N tiles (the second partly past N), M = 5 one M tile mostly past M. Q6_K rows
    of 210 bytes: every row at another 2-byte offset in its chunks."""
    rng = np.random.default_rng([swz, len(qtype)])
    N, K, M = 40, 256, 5
    w = aligned(quants.random_blocks(qtype, N, K, rng))
    x = rng.standard_normal((M, K)).astype(np.float32)
    out = np.full((M, N), np.nan, np.float32)
    gemm_wgmma_twin(x, w, qtype, N, out, bn=32, nwg=1, stages=3, swz=swz)
    exact, as_kernel = references(x, w, qtype)
    assert rel(out, as_kernel) <= 1e-5, (qtype, swz)
    assert rel(out, exact) <= 2e-3, (qtype, swz)


@simulator
@pytest.mark.parametrize("seed,N,K,M,mt", [(11, 33, 512, 3, 1), (12, 40, 256, 70, 2)])
def test_twin_raw_ring_refill_and_two_m_tiles(seed, N, K, M, mt):
    """K = 512: the raw W ring's second super-block comes from the prologue, the A ring refills; mt = 2: one
    warpgroup's rows 0 .. 63 and 64 .. 127 of a 128-row tile, M = 70 ending in the second."""
    rng = np.random.default_rng(seed)
    w = aligned(quants.random_blocks("Q4_K", N, K, rng))
    x = rng.standard_normal((M, K)).astype(np.float16)
    out = np.full((M, N), np.nan, np.float32)
    gemm_wgmma_twin(x, w, "Q4_K", N, out, bn=32, nwg=1, stages=3, swz=1, mt=mt)
    assert rel(out, references(x, w, "Q4_K")[1]) <= 1e-5


def test_twin_rejects_bad_input():
    check_twin_rejects(gemm_wgmma_twin, {"bn": 48}, "not a shape")
    x, out = np.zeros((2, 256), np.float32), np.zeros((2, 4), np.float32)
    with pytest.raises(Q4KError, match="shared memory"):
        gemm_wgmma_twin(x, aligned(np.zeros((4, 210), np.uint8)), "Q6_K", 4, out, bn=256, nwg=2, stages=4)


# -- the CUDA C itself on the CPU: tests/gemm_wgmma_emulate.cpp ------------------------------------
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from _helpers_emulate import build_emulator

    return build_emulator(tmp_path_factory, "gemm_wgmma_emulate.cpp", {"GW_SOURCE": linked.CSRC / "gemm_wgmma.cu"},
                          include_dirs=[linked.CSRC])


def emulate(lib, qtype, inst, w, x16, N, pad=0):
    """out [M, N] of gemm_wgmma<qtype, *inst> run by the emulation; inst = (bn, nwg, stages, swz, out16[, mt]).
    pad > 0: written as columns 3 .. 3 + N of a [M, N + pad] matrix (row stride ldo = N + pad), whose
    other columns must stay untouched."""
    M, K = x16.shape
    full = np.full((M, N + pad), np.nan, np.float16 if inst[4] else np.float32)
    out = full[:, 3:3 + N] if pad else full
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    inst = tuple(inst) + (1,) * (6 - len(inst))
    assert lib.emu_gemm(int(qtype[1]), *inst, ptr(w), w.shape[1], N, K, M, ptr(x16), ptr(out), N + pad) == 0, inst
    if pad:
        assert np.isnan(full[:, :3]).all() and np.isnan(full[:, 3 + N:]).all(), "written outside the block"
    return out


def _registered():
    """(qtype, (bn, nwg, stages, swz, 0, mt)) of every registered variant and type."""
    for name in VARIANTS:
        v = kernels.get(name)
        p = v.params
        for q in v.qtypes:
            yield q, (p["bn"] or linked.WGMMA_BN[q], p["nwg"], p["stages"], p["swz"], 0, p["mt"])


def _emulated_cases():
    seen = set()
    for q, inst in _registered():
        if (q, inst) not in seen:
            seen.add((q, inst))
            yield q, inst, (37, 130), 70, 512
    for q in ("Q4_K", "Q6_K"):
        yield q, (linked.WGMMA_BN[q], 2, 4, 1, 1), (100,), 70, 512     # fp16 out
        yield q, (32, 1, 3, 0, 0), (1, 65), 75, 768                    # 3 super-blocks, plain layout
        yield q, (32, 1, 3, 1, 0), (600,), 33, 256                     # 10 M tiles: a full group of 8 and a short one
    yield "Q4_K", (32, 1, 3, 1, 1), (64,), 75, 1280                    # 5 super-blocks, odd N, fp16 out
    yield "Q4_K", (64, 2, 5, 1, 0), (129,), 70, 1024                   # a 5-slot ring
    yield "Q4_K", (128, 2, 4, 1, 1, 2), (300,), 140, 512               # two m-tiles a warpgroup, fp16 out
    yield "Q4_K", (32, 1, 3, 1, 0, 2), (1, 129, 300), 70, 768          # two m-tiles, one warpgroup: 128-row tiles
    yield "Q6_K", (32, 1, 3, 0, 0, 2), (200,), 33, 512                 # ... plain layout


@pytest.mark.parametrize("qtype,inst,ms,N,K", list(_emulated_cases()))
def test_cuda_source_emulated_matches_float64_reference(emulated, qtype, inst, ms, N, K):
    """The C kernel as the GPU runs it (the emulation aborts on a misaligned or out-of-W cp.async, and
    on a wgmma whose shared operands change before its wait); the last M writes a column block of a
    wider matrix (odd row stride: the scalar stores)."""
    rng = np.random.default_rng([inst[0], inst[2], inst[3], N, len(qtype)])
    w = aligned(quants.random_blocks(qtype, N, K, rng))
    for M in ms:
        x16 = aligned(rng.standard_normal((M, K)).astype(np.float16))
        out = emulate(emulated, qtype, inst, w, x16, N, pad=7 if M == ms[-1] else 0)
        exact, as_kernel = references(x16, w, qtype)
        if inst[4]:      # fp16 out: the FP32 sums rounded once more
            assert rel(out, as_kernel) <= 1e-3, (qtype, inst, M)
        else:
            assert rel(out, as_kernel) <= 1e-5, (qtype, inst, M)
        assert rel(out, exact) <= 2e-3, (qtype, inst, M)


# -- registration, shared memory ---------------------------------------------------------------------
def test_variants_registered_without_scratch():
    assert VARIANTS == ["gemm_wgmma_linked", "gemm_wgmma_linked_n128", "gemm_wgmma_linked_plain", "gemm_wgmma_linked_m2"]
    for name in VARIANTS:
        v = kernels.get(name)
        assert v.qtypes == (("Q4_K",) if name.endswith("_m2") else ("Q4_K", "Q6_K")) and v.m_min == 64 and v.m_max is None and v.rel_err == 2e-3
        assert v.device == "gpu" and not v.simulated and "float16" in v.accepts
        assert v.decode_scratch("Q4_K", 512, 3584, 3584) == (None, 0)
        assert v.workspace_bytes("Q6_K", 512, 3584, 3584, "float16") == {}
        assert v.workspace_bytes("Q4_K", 512, 3584, 3584, "float32") == {"x float16": 2 * 512 * 3584}


def test_shared_memory_sizes():
    """gemm_wgmma_smem is the C's GwSmem::BYTES (the emulation's harness refuses a larger one)."""
    assert linked.gemm_wgmma_smem("Q4_K", 256, 2, 4) == 4 * 16384 + 2 * 32768 + 2 * 256 * 144 + 1024
    assert linked.gemm_wgmma_smem("Q6_K", 128, 2, 4) == 4 * 16384 + 2 * 16384 + 2 * 128 * 240 + 1024
    assert linked.gemm_wgmma_smem("Q4_K", 128, 2, 4, 2) == 4 * 32768 + 2 * 16384 + 2 * 128 * 144 + 1024
    for q, inst in _registered():
        assert linked.gemm_wgmma_check(q, *inst[:4], mt=inst[5]) <= 227 * 1024
    with pytest.raises(Q4KError, match="not a shape"):
        linked.gemm_wgmma_check("Q4_K", 256, 2, 4, 1, 2)          # 256 accumulators a thread
    with pytest.raises(Q4KError, match="shared memory"):
        linked.gemm_wgmma_check("Q6_K", 256, 2, 3, 1)
    with pytest.raises(Q4KError, match="not a shape"):
        linked.gemm_wgmma_check("Q4_K", 256, 2, 2, 1)


def test_cpu_call_is_a_clear_error():
    if not linked.SIMULATOR:
        pytest.skip("a GPU is present")
    with pytest.raises(Q4KError, match="GPU only"):
        linked.gemm_wgmma_linked(np.zeros((64, 256), np.float32), np.zeros((4, 144), np.uint8), "Q4_K", 4,
                                 np.zeros((64, 4), np.float32))


# -- the CUDA C offline: registered instantiations, sm_90a --------------------------------------------
def test_source_compiles_without_spills_or_serialised_wgmma(tmp_path):
    from _helpers_nvcc import ptxas_sm90a
    text = linked.source_text("gemm_wgmma.cu")
    names = []
    insts = {(q, inst[:4] + (o16, inst[5])) for q, inst in _registered() for o16 in (0, 1)}
    for q, inst in sorted(insts):
        _, fn, wrapper = linked.gemm_wgmma_source(q, *inst[:4], bool(inst[4]), inst[5])
        text += wrapper + (f'extern "C" __global__ void k_{fn}(const u8* w, int rb, int n, int K, int M, '
                           f'const u16* x, void* out, int ldo) {{ {fn}(w, rb, n, K, M, x, out, ldo); }}\n')
        names.append(f"k_{fn}")
    ptxas_sm90a(tmp_path, text, names)


# -- on a GPU ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _weights(qtype, N, K):
    """Random blocks [N, K] and their decode as the kernel does it (NumPy: seconds at 7B sizes, so once
    per shape for all variants)."""
    w = quants.random_blocks(qtype, N, K, np.random.default_rng([N, K, len(qtype)]))
    return w, decoded_as_kernel(w, qtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("N,K", [(3584, 3584), (18944, 3584), (3584, 18944), (1031, 3584)])
def test_linked_on_gpu(name, qtype, N, K):
    if not linked.wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU")
    if qtype not in kernels.get(name).qtypes:
        pytest.skip(f"{name} is not registered for {qtype}")
    import cupy as cp

    rng = np.random.default_rng([N, K, len(name), len(qtype)])
    w, w16 = _weights(qtype, N, K)
    wd, w16 = cp.asarray(w), cp.asarray(w16, dtype=cp.float64)
    pool = cp.get_default_memory_pool()
    for M in (64, 100, 512, 4096):
        x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32)).astype(cp.float16)
        out = cp.full((M, N), np.nan, dtype=cp.float32)
        kernels.matmul(x, wd, qtype, N, variant=name, out=out)        # compiles, the first time
        out.fill(np.nan)
        cp.cuda.Device().synchronize()
        before = pool.used_bytes()
        kernels.matmul(x, wd, qtype, N, variant=name, out=out)
        cp.cuda.Device().synchronize()
        assert pool.used_bytes() == before, (name, M, "memory kept after the call")
        ref = x.astype(cp.float64) @ w16.T
        err = float(cp.linalg.norm(out.astype(cp.float64) - ref) / cp.linalg.norm(ref))
        # FP32 accumulation on the tensor cores over K up to 18944 (H200: 2.2e-5 at K = 18944; the CPU emulation's
        # exact-order sums 1e-7); the variants' bound against the exact product is 2e-3
        assert bool(cp.isfinite(out).all()) and err <= 1e-4, (name, qtype, N, K, M, err)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_fp16_out_on_gpu(qtype):
    if not linked.wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU")
    import cupy as cp

    rng = np.random.default_rng(7)
    N, K, M = 3584, 3584, 512
    w = quants.random_blocks(qtype, N, K, rng)
    x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32)).astype(cp.float16)
    out = cp.full((M, N), np.nan, dtype=cp.float16)
    linked.gemm_wgmma_linked(x, cp.asarray(w), qtype, N, out)
    ref = x.astype(cp.float64) @ cp.asarray(decoded_as_kernel(w, qtype), dtype=cp.float64).T
    assert float(cp.linalg.norm(out.astype(cp.float64) - ref) / cp.linalg.norm(ref)) <= 1e-3


def test_pin_puts_a_variant_above_m(tmp_path):
    """autotune.pin: the entries below m_from stay, the variant takes every larger M; dispatch reads it."""
    import json

    from kernels import autotune, dispatch

    path = tmp_path / "t.json"
    autotune.pin(dispatch.SHIPPED_TABLE, path, "NVIDIA H200", "gemm_wgmma_linked", 65)
    t = json.loads(path.read_text())["gpus"]["NVIDIA H200"]
    for q in ("Q4_K", "Q6_K"):
        assert [e["m_max"] for e in t[q]] == [1, 8, 16, 64, None] and t[q][-1]["variant"] == "gemm_wgmma_linked"
    assert json.loads(path.read_text())["gpus"]["NVIDIA H100 80GB HBM3"] == \
        json.loads(dispatch.SHIPPED_TABLE.read_text())["gpus"]["NVIDIA H100 80GB HBM3"]
    with pytest.raises(Q4KError, match="does not decode"):
        autotune.pin(path, path, "NVIDIA H200", "gemm_wgmma_linked", 65, qtypes=["Q8_0"])


@pytest.mark.gpu
def test_teacher_products_take_the_pinned_fused_gemm(tmp_path, monkeypatch):
    """With the table pinning gemm_wgmma_linked: decode_ahead.matmul_stacked (q, k, v) writes each
    weight's column block and matmul_ahead (the LM head) writes out in one call, float32 and float16,
    matching the kernel-decoded float64 product."""
    if not linked.wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU")
    import cupy as cp

    from kernels import autotune, decode_ahead, dispatch
    from q4kdistill import backend

    path = tmp_path / "pinned.json"
    autotune.pin(dispatch.table_path(), path, backend.gpu_name(), "gemm_wgmma_linked", 65)
    monkeypatch.setenv("Q4KDISTILL_TUNING", str(path))
    dispatch.reload_table()
    try:
        rng = np.random.default_rng(4)
        K, M = 3584, 512
        parts = [(quants.random_blocks(q, n, K, rng), q, n) for q, n in (("Q4_K", 3584), ("Q4_K", 512), ("Q6_K", 512))]
        x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32)).astype(cp.float16)
        ref = cp.concatenate([x.astype(cp.float64) @ cp.asarray(decoded_as_kernel(w, q), dtype=cp.float64).T
                              for w, q, _ in parts], axis=1)
        assert all(decode_ahead._fused(q, M, n, K) is not None for _, q, n in parts)
        for dtype, bound in ((cp.float32, 1e-5), (cp.float16, 1e-3)):
            out = cp.full((M, 4608), np.nan, dtype=dtype)
            decode_ahead.matmul_stacked(x, [(cp.asarray(w), q, n) for w, q, n in parts], out=out)
            err = float(cp.linalg.norm(out.astype(cp.float64) - ref) / cp.linalg.norm(ref))
            assert err <= bound, (dtype, err)
        w = quants.random_blocks("Q6_K", 20000, K, rng)
        assert decode_ahead.applies("Q6_K", M, 20000, K)
        out = cp.full((M, 20000), np.nan, dtype=cp.float16)
        decode_ahead.matmul_ahead(x, cp.asarray(w), "Q6_K", 20000, out)
        ref = x.astype(cp.float64) @ cp.asarray(decoded_as_kernel(w, "Q6_K"), dtype=cp.float64).T
        assert float(cp.linalg.norm(out.astype(cp.float64) - ref) / cp.linalg.norm(ref)) <= 1e-3
    finally:
        monkeypatch.delenv("Q4KDISTILL_TUNING")
        dispatch.reload_table()
