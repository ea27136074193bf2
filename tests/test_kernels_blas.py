"""kernels.blas: cuBLAS through ctypes on our own handle (capturable in a CUDA graph).

GPU: every type pair, both transposes, a column block of a wider out, beta = 1 accumulation, against
float64 products of the same (rounded) operands; a captured graph replays with new operand values.
CPU: the NumPy branch and the shape/type checks (the same function the CPU paths call)."""
import numpy as np
import pytest

from kernels import blas


def _ref(a, b, ta, tb):
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a64.T if ta else a64) @ (b64.T if tb else b64)


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_numpy_branch_is_the_product(ta, tb):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5) if not ta else (5, 7))
    b = rng.standard_normal((5, 3) if not tb else (3, 5))
    out = np.full((7, 3), 2.0)
    blas.gemm(out, a, b, trans_a=ta, trans_b=tb, beta=1.0)
    np.testing.assert_allclose(out, 2.0 + _ref(a, b, ta, tb), rtol=1e-12)
    np.testing.assert_allclose(blas.product(a, b, ta, tb), _ref(a, b, ta, tb), rtol=1e-12)


def test_shape_mismatch_is_refused_and_only_unit_stride_rows_go_to_cublas():
    with pytest.raises(ValueError, match="shapes"):
        blas.gemm(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((2, 2)))
    a = np.zeros((4, 6), np.float32)
    assert blas._unit_rows(a) and blas._unit_rows(a[1:3, 2:5])          # a row block / column block: yes
    assert not blas._unit_rows(a.T) and not blas._unit_rows(a[::-1]) and not blas._unit_rows(a[:, ::2])
    assert not blas._unit_rows(a.astype(np.int32)) and not blas._unit_rows(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="unit-stride rows"):
        blas._rows(a[::-1], "a")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,out_dtype,rtol", [("float32", "float32", 1e-5), ("float16", "float32", 1e-5),
                                                  ("bfloat16", "float32", 1e-5), ("float16", "float16", 2e-3),
                                                  ("bfloat16", "bfloat16", 1e-2), ("float64", "float64", 1e-12)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_gpu_gemm_against_float64(dtype, out_dtype, rtol, ta, tb):
    import cupy

    rng = np.random.default_rng(1)
    M, N, K = 133, 67, 300                                      # odd sizes
    a = cupy.asarray(rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)).astype(dtype)
    b = cupy.asarray(rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)).astype(dtype)
    want = _ref(a.astype(np.float64).get(), b.astype(np.float64).get(), ta, tb)
    out = cupy.full((M, N), cupy.nan, dtype=out_dtype)        # poisoned
    blas.gemm(out, a, b, trans_a=ta, trans_b=tb)
    got = out.astype(np.float64).get()
    assert np.linalg.norm(got - want) <= rtol * np.linalg.norm(want)
    if out_dtype == "float32":                                # beta = 1 adds into what is there
        blas.gemm(out, a, b, trans_a=ta, trans_b=tb, beta=1.0)
        np.testing.assert_allclose(out.get(), 2 * got, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
def test_gpu_column_block_of_a_wider_out():
    import cupy

    rng = np.random.default_rng(2)
    x = cupy.asarray(rng.standard_normal((40, 64)), dtype=cupy.float16)
    w = cupy.asarray(rng.standard_normal((96, 64)), dtype=cupy.float16)
    out = cupy.full((40, 96), cupy.nan, dtype=cupy.float32)
    blas.gemm(out[:, :50], x, w[:50], trans_b=True)
    blas.gemm(out[:, 50:], x, w[50:], trans_b=True)
    want = _ref(x.get(), w.get(), False, True)
    np.testing.assert_allclose(out.get(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_gemm_is_captured_and_replays_new_values():
    import cupy

    rng = np.random.default_rng(3)
    a = cupy.asarray(rng.standard_normal((64, 32)), dtype=cupy.float32)
    b = cupy.asarray(rng.standard_normal((32, 48)), dtype=cupy.float32)
    out = cupy.zeros((64, 48), dtype=cupy.float32)
    blas.gemm(out, a, b)                                      # eager first (handle, workspace)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        blas.gemm(out, a, b)
        graph = stream.end_capture()
    for _ in range(2):
        a[...] = cupy.asarray(rng.standard_normal((64, 32)), dtype=cupy.float32)
        out[...] = cupy.nan
        cupy.cuda.get_current_stream().synchronize()          # the graph's stream does not wait on this one
        graph.launch(stream)
        stream.synchronize()
        np.testing.assert_allclose(out.get(), _ref(a.get(), b.get(), False, False), rtol=1e-5, atol=1e-5)
