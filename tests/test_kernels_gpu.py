"""Every registered kernel variant on a GPU at realistic sizes against a float64 reference.

Weights are real blocks from the gemma-3 file (drawn at random, so any shape), or the npz of
rows named by $Q4KDISTILL_KERNEL_ROWS (scripts/gpu_kernels.py carries one to the device machine),
else random valid blocks. Shapes are odd on purpose; outputs are poisoned with NaN first.
"""
import os

import numpy as np
import pytest

import kernels
from kernel_cases import QTYPES, bf16_to_f32, real_block_matrix, real_tensors, reference, rel_err
from q4kdistill import quants

pytestmark = pytest.mark.gpu
N = 1031
K_OF = {"Q4_K": 3584, "Q6_K": 2816, "Q8_0": 640, "Q5_0": 3616}   # 3616 = 113 blocks: odd-sized rows


@pytest.fixture(scope="module")
def pool(request):
    path = os.environ.get("Q4KDISTILL_KERNEL_ROWS")
    if path:
        with np.load(path) as z:
            return {q: z[q] for q in QTYPES}
    try:
        return real_tensors(request.getfixturevalue("gemma_path"))
    except pytest.skip.Exception:
        return {}


def weight(pool, qtype, rng, n=N, K=None):
    K = K or K_OF[qtype]
    if qtype in pool:
        return real_block_matrix(pool[qtype], qtype, n, K, rng)
    return quants.random_blocks(qtype, n, K, rng)


def _cases():
    for name in kernels.variants():
        v = kernels.get(name)
        if v.device == "cpu":
            continue
        ms = (1, 5, 16) if v.m_max == 16 else (1, 3, v.m_max) if v.m_max else (1, 37, 300)
        for q in QTYPES:
            if q in v.qtypes:
                yield name, q, ms


@pytest.mark.parametrize("name,qtype,ms", list(_cases()))
def test_variant_on_gpu(pool, name, qtype, ms):
    import cupy as cp

    rng = np.random.default_rng([len(name), QTYPES.index(qtype)])
    w = weight(pool, qtype, rng)
    wd = cp.asarray(w)
    v = kernels.get(name)
    for M in ms:
        x = rng.standard_normal((M, w.shape[1] // quants.type_size(qtype) * quants.block_size(qtype)), dtype=np.float32)
        out = cp.full((M, N), np.nan, dtype=cp.float32)
        kernels.matmul(cp.asarray(x), wd, qtype, N, variant=name, out=out)
        assert rel_err(out.get(), reference(x, w, qtype)) <= v.rel_err, (name, qtype, M)


def test_default_choice_on_gpu(pool):
    import cupy as cp

    rng = np.random.default_rng(3)
    w = weight(pool, "Q4_K", rng, n=777, K=1024)
    for M in (1, 16, 17, 64):
        x = rng.standard_normal((M, 1024), dtype=np.float32)
        out = kernels.matmul(cp.asarray(x), cp.asarray(w), "Q4_K", 777)
        assert rel_err(out.get(), reference(x, w, "Q4_K")) <= kernels.get(kernels.choose("Q4_K", M, 777, 1024)).rel_err


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_to_and_embedding_rows_on_gpu(pool, qtype):
    import cupy as cp

    rng = np.random.default_rng(QTYPES.index(qtype))
    w = weight(pool, qtype, rng, n=517)
    wd = cp.asarray(w)
    ref = quants.dequantize(w, qtype)
    tol = 1e-6 * np.abs(ref).max()
    f32 = kernels.dequantize_to(wd, qtype, 517, cp.float32).get()
    np.testing.assert_allclose(f32, ref, rtol=1e-6, atol=tol)
    np.testing.assert_array_equal(kernels.dequantize_to(wd, qtype, 517, "float16").get(), f32.astype(np.float16))
    bf = kernels.dequantize_to(wd, qtype, 517, "bfloat16").get()
    np.testing.assert_allclose(bf16_to_f32(bf), ref, rtol=2**-8, atol=tol)
    ids = rng.integers(0, 517, (3, 41))
    emb = kernels.embedding_rows(wd, qtype, cp.asarray(ids)).get()
    np.testing.assert_array_equal(emb, f32[ids.reshape(-1)])


def test_scratch_is_one_matrix():
    import cupy as cp

    rng = np.random.default_rng(5)
    kernels.release_scratch()
    for n, K in ((300, 2048), (100, 1024)):
        w = cp.asarray(quants.random_blocks("Q4_K", n, K, rng))
        kernels.matmul(cp.ones((64, K), cp.float32), w, "Q4_K", n, variant="dequant_f16_cublas")
    assert kernels.scratch_bytes() == 300 * 2048 * 2             # the largest matrix, once
    kernels.release_scratch()
    assert kernels.scratch_bytes() == 0


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_linked_decode_f16_on_gpu(pool, qtype):
    """The linked C decode: FP32 math then one rounding to fp16, so within half an fp16 ulp of the
    float64 decode plus a few FP32 ulps (checked on every element, output poisoned first)."""
    import cupy as cp

    from kernels.linked import decode_f16_linked

    rng = np.random.default_rng(11 + QTYPES.index(qtype))
    for n, K in ((517, K_OF[qtype]), (3, 256)):
        w = weight(pool, qtype, rng, n=n, K=K)
        out = cp.full((n, K), np.nan, dtype=cp.float16)
        got = decode_f16_linked(cp.asarray(w), qtype, K, out).get().astype(np.float64)
        ref = quants.dequantize(w, qtype).astype(np.float64)
        assert np.isfinite(got).all()
        assert np.all(np.abs(got - ref) <= 2.0**-11 * np.abs(ref) * 1.01 + 2.0**-24 + 1e-6 * np.abs(ref).max())
        same = np.mean(got == ref.astype(np.float32).astype(np.float16))
        assert same > 0.999, same                       # almost all equal the correctly rounded value
