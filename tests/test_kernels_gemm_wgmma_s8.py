"""The int8 GEMM with W re-quantized per super-block in the kernel (kernels/csrc/gemm_wgmma_s8.cu; issue 17's
int8-activation variant) against kernels/requant8.py, the same arithmetic in NumPy, and against the exact product.

* simulator: the activation quantizer (gemm_s8_twin.quantize_s8, used on the GPU too) bit for bit against
  requant8.quantize_x; the Numba twin against requant8.matmul (1e-6)
* CPU emulation: the C file itself (tests/gemm_wgmma_s8_emulate.cpp: cp.async and int8 wgmma deferred to
  their waits, exact s32 sums) against requant8.matmul: float32 out to 1e-6 (the rescale's float32 order),
  fp16 out as its rounding; odd super-block counts (the kernel's tail), M and N off the tiles, a column block
* nvcc sm_90a: no spills, <= 255 registers, no ptxas note of a serialised wgmma pipeline
* GPU (sm_90): against requant8 at 7B sizes and within its bound of the exact product
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kernels import linked, registry, requant8
from q4kdistill import backend
from q4kdistill.errors import Q4KError
from q4kdistill.formats.quants import quantize

SIM = not backend.on_gpu()


def _case(qtype, M, N, K, seed=0):
    rng = np.random.default_rng([M, N, K, len(qtype), seed])
    raw = quantize((rng.standard_normal((N, K)) * rng.uniform(0.2, 2.0, (N, 1))).astype(np.float32), qtype)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 3.0, (M, 1))).astype(np.float32)
    return x, raw


@pytest.mark.skipif(not SIM, reason="the twin runs on the simulator")
def test_quantizer_is_requant8s_rule_bit_for_bit():
    from kernels.gemm_s8_twin import quantize_s8
    x, _ = _case("Q4_K", 5, 1, 768)
    x[2] = 0.0                                         # a zero row: dx = 0, x8 = 0
    x8, dxt, Mp = quantize_s8(x)
    want8, wantd = requant8.quantize_x(x, 256)
    assert Mp == 8 and np.array_equal(np.asarray(x8), want8)
    assert np.array_equal(np.asarray(dxt)[:, :5], wantd.T) and (np.asarray(dxt)[:, 5:] == 0).all()
    x16 = x.astype(np.float16)
    assert np.array_equal(np.asarray(quantize_s8(x16)[0]), requant8.quantize_x(x16.astype(np.float32), 256)[0])


@pytest.mark.skipif(not SIM, reason="the twin runs on the simulator")
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_twin_is_requant8(qtype):
    from kernels.gemm_s8_twin import gemm_s8_twin
    x, raw = _case(qtype, 3, 5, 512)
    out = np.full((3, 5), np.nan, np.float32)
    gemm_s8_twin(x, raw, qtype, 5, out)
    want = requant8.matmul(x, raw, qtype, x_block=256)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_twin_rejects_bad_input():
    from kernels.gemm_s8_twin import gemm_s8_twin, quantize_s8
    x, raw = _case("Q4_K", 2, 3, 256)
    with pytest.raises(Q4KError, match="Q4_K or Q6_K"):
        gemm_s8_twin(x, raw, "Q8_0", 3, np.zeros((2, 3), np.float32))
    with pytest.raises(Q4KError, match="multiple of 256"):
        quantize_s8(np.zeros((2, 100), np.float32))


# -- the C itself on the CPU ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from _helpers_emulate import build_emulator

    return build_emulator(tmp_path_factory, "gemm_wgmma_s8_emulate.cpp", {"GS_SOURCE": linked.CSRC / "gemm_wgmma_s8.cu"},
                          include_dirs=[linked.CSRC])


def emulate(lib, qtype, x, raw, out16=False, pad=0):
    """out [M, N] (float32 or float16) of the emulated kernel, written into a [M, N + pad] matrix (NaN-poisoned)."""
    M, K = x.shape
    N = raw.shape[0]
    x8, dx = requant8.quantize_x(x, 256)
    Mp = -(-M // 4) * 4
    dxt = np.zeros((K // 256, Mp), np.float32)
    dxt[:, :M] = dx.T
    full = np.full((M, N + pad), np.nan, np.float16 if out16 else np.float32)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)             # noqa: E731
    I = ctypes.c_int
    rc = lib.emu_gemm_s8(I(int(qtype[1])), I(int(out16)), p(raw), I(raw.shape[1]), I(N), I(K), I(M), p(x8), p(dxt),
                         I(Mp), p(full), I(N + pad))
    assert rc == 0
    if pad:
        assert np.isnan(full[:, N:].astype(np.float32)).all(), "wrote outside its column block"
    return full[:, :N]


@pytest.mark.parametrize("qtype,M,N,K,out16,pad", [
    ("Q4_K", 70, 40, 256, False, 0),       # one super-block: no loop body, the tail only
    ("Q4_K", 130, 136, 768, False, 3),     # three: a pair and the tail; M, N off the 128 tiles; a column block
    ("Q6_K", 129, 130, 1280, True, 0),     # five, fp16 out; Q6_K blocks at 2-byte offsets
    ("Q6_K", 64, 128, 1024, False, 0),     # four: two pairs
    ("Q4_K", 200, 64, 1024, True, 2),
])
def test_cuda_source_emulated_is_requant8(emulated, qtype, M, N, K, out16, pad):
    x, raw = _case(qtype, M, N, K)
    got = emulate(emulated, qtype, x, raw, out16, pad).astype(np.float64)
    want = requant8.matmul(x, raw, qtype, x_block=256)
    bound = 1e-3 if out16 else 1e-6                     # fp16 out: its rounding (2^-11 relative)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= bound, err


def test_shared_memory_size_is_the_kernels(emulated):
    for q in ("Q4_K", "Q6_K"):
        assert emulated.emu_gemm_s8_smem(int(q[1])) == linked.gemm_wgmma_s8_smem(q) <= linked.WGMMA_SMEM_LIMIT


def test_registered_without_scratch_and_with_its_bound():
    v = registry.get("gemm_wgmma_s8_linked")
    assert v.qtypes == ("Q4_K", "Q6_K") and v.m_min == 64 and v.rel_err == 2e-2 and not v.simulated
    ws = v.workspace_bytes("Q4_K", 4096, 18944, 3584)
    assert ws == {"x int8": 4096 * 3584, "x scales": 4 * 14 * 4096}
    from kernels import autotune
    shape = {"qtype": "Q4_K", "M": 4096, "N": 18944, "K": 3584}
    rows = [dict(shape, variant="gemm_wgmma_s8_linked", time_us=1.0), dict(shape, variant="dequant_linked_cublas", time_us=2.0)]
    table = autotune.entries_from_rows(rows)            # faster, but over the tuner's bound: never picked
    assert table["Q4_K"][0]["variant"] == "dequant_linked_cublas"


def test_source_compiles_without_spills_or_serialised_wgmma(tmp_path):
    from _helpers_nvcc import ptxas_sm90a
    text = linked.source_text("gemm_wgmma_s8.cu")
    names = []
    for q in ("Q4_K", "Q6_K"):
        for o16 in (False, True):
            _, fn, wrapper = linked.gemm_wgmma_s8_source(q, o16)
            text += wrapper + (f'extern "C" __global__ void k_{fn}(const u8* w, int rb, int n, int K, int M, '
                               f'const signed char* x8, const float* dx, int Mp, void* out, int ldo) '
                               f'{{ {fn}(w, rb, n, K, M, x8, dx, Mp, out, ldo); }}\n')
            names.append(f"k_{fn}")
    ptxas_sm90a(tmp_path, text, names)


def test_cpu_call_is_a_clear_error():
    if not SIM:
        pytest.skip("on a GPU the call runs")
    x, raw = _case("Q4_K", 64, 4, 256)
    with pytest.raises(Q4KError, match="GPU"):
        linked.gemm_wgmma_s8_linked(x, raw, "Q4_K", 4, np.zeros((64, 4), np.float32))


# -- on a GPU (sm_90) ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("N,K", [(3584, 3584), (18944, 3584), (3584, 18944), (1031, 3584)])
def test_gpu_is_requant8_and_within_its_bound(qtype, N, K):
    if not linked.wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU")
    import cupy as cp

    from q4kdistill.formats.quants import dequantize
    x, raw = _case(qtype, 512, N, K)
    want = requant8.matmul(x, raw, qtype, x_block=256)
    exact = x.astype(np.float64) @ dequantize(raw, qtype).astype(np.float64).T
    for dtype in (np.float32, np.float16):
        out = cp.full((512, N), np.nan, dtype=dtype)
        linked.gemm_wgmma_s8_linked(cp.asarray(x).astype(dtype), cp.asarray(raw), qtype, N, out)
        got = cp.asnumpy(out).astype(np.float64)
        if dtype == np.float32:        # requant8's arithmetic up to the GPU's fused multiply-adds: a few x8 off by one
            assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3           # (H200: 1.8e-4, 2e-6 of x8 differ)
            assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4
        assert np.linalg.norm(got - exact) / np.linalg.norm(exact) <= registry.get("gemm_wgmma_s8_linked").rel_err
