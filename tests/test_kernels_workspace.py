"""What each kernel variant declares it allocates and accepts (kernels.Variant.workspace / accepts),
on the CPU: every shipped variant declares both, the numbers for known shapes, and dispatch
passing an activation dtype through only where the variant accepts it. The declared bytes are
checked against the GPU's own counter in tests/test_kernels_gpu.py (test_declared_workspace_*)."""
import numpy as np
import pytest

import kernels
from kernels import builtin, dispatch, registry
from q4kdistill.formats import quants
from q4kdistill.errors import Q4KError


def test_every_shipped_variant_declares_workspace_and_accepts():
    for v in builtin.BUILTIN:
        assert v.workspace is not None, v.name
        assert "float32" in v.accepts and set(v.accepts) <= set(registry.ACTIVATION_DTYPES), v.name
        for q in v.qtypes:
            ws = v.workspace_bytes(q, 16, 1024, 2816 if q in ("Q6_K",) else 1024)
            assert all(isinstance(b, int) and b > 0 for b in ws.values()), (v.name, ws)


def test_declared_bytes_of_known_shapes():
    M, N, K = 16, 1031, 3584
    ws = lambda name, q="Q4_K", x="float32", **kw: kernels.get(name).workspace_bytes(q, kw.get("M", M), N, kw.get("K", K), x)
    f16 = registry.DECODE_SCRATCH["float16"]
    assert ws("dequant_f16_cublas") == {f16: 2 * N * K, "x float16": 2 * M * K}
    assert ws("dequant_f32_cublas") == {registry.DECODE_SCRATCH["float32"]: 4 * N * K}
    assert ws("dequant_linked_cublas") == {f16: 2 * N * K, "x float16": 2 * M * K}
    assert ws("dequant_linked_cublas", x="float16") == {f16: 2 * N * K}            # fp16 x used as it is
    assert ws("dequant_linked_cublas16") == {f16: 2 * N * K, "x float16": 2 * M * K, "product float16": 2 * M * N}
    assert ws("gemv_dp4a_r2w4") == {"x int8": M * K, "x scales": M * K // 8, "x scaled sums": M * K // 8}
    assert ws("gemv_q8_linked_r2w4") == {"x int8": M * K, "x scales": M * K // 4}
    assert ws("gemv_mma_linked_w2") == {"x int8 fragments": 16 * K, "x fragment scales": 4 * K}     # 2 tiles of 8 rows
    assert ws("gemv_mma_linked_w2", M=8) == {"x int8 fragments": 8 * K, "x fragment scales": 2 * K}
    assert ws("gemv_mma_linked_w2", q="Q6_K") == {"x int8": M * K, "x scales": M * K // 4}
    assert ws("gemv_mma_rows_linked_w4", M=3) == {"x int8 fragments": 8 * K, "x fragment scales": 2 * K}
    assert ws("gemv_f32_linked_r2w4", M=4) == {} == ws("gemv_chunk_r2w4") == ws("gemv_warp_r2w4") == ws("gemm_tile_64x64")
    # rows of an odd number of Q6_K / Q5_0 blocks are copied, padded to 4 bytes (Q4_K rows for
    # gemv_chunk to 16): 11 Q6_K blocks = 2310 bytes -> 2312
    assert ws("gemv_warp_r2w4", q="Q6_K", K=2816) == {"padded rows": N * 2312}
    assert ws("gemv_chunk_r2w4", q="Q6_K", K=2816) == {"padded rows": N * 2312}
    assert ws("gemm_tile_64x64", q="Q5_0", K=3616) == {"padded rows": N * 2488}
    assert ws("dequant_f16_cublas", q="Q6_K", K=2816) == {f16: 2 * N * 2816, "x float16": 2 * M * 2816, "padded rows": N * 2312}
    assert kernels.get("dequant_f16_cublas").decode_scratch("Q4_K", M, N, K) == ("float16", 2 * N * K)
    assert kernels.get("dequant_f16_cublas").transient_bytes("Q4_K", M, N, K) == 2 * M * K
    assert kernels.get("gemv_chunk_r2w4").decode_scratch("Q4_K", M, N, K) == (None, 0)


def test_accepts_must_name_activation_dtypes():
    for bad in (("float16",), ("float32", "int8")):
        with pytest.raises(Q4KError, match="accepts"):
            registry.Variant(name="bad", qtypes=("Q4_K",), fn=None, description="", accepts=bad)


def test_dispatch_passes_only_accepted_dtypes():
    seen = []

    def record(x, w_raw, qtype, n_out, out):
        seen.append(x.dtype.name)
        out[:] = 0
        return out

    w = quants.random_blocks("Q8_0", 3, 64, np.random.default_rng(0))
    x16 = np.ones((2, 64), np.float16)
    try:
        for name, accepts in (("t_f32", ("float32",)), ("t_f16", ("float32", "float16"))):
            kernels.register(registry.Variant(name=name, qtypes=("Q8_0",), fn=record, description="records x's dtype",
                                              accepts=accepts, workspace=lambda *a, **k: {}))
            kernels.matmul(x16, w, "Q8_0", 3, variant=name)
            kernels.matmul(x16.astype(np.float64), w, "Q8_0", 3, variant=name)
    finally:
        for name in ("t_f32", "t_f16"):
            registry._REGISTRY.pop(name, None)
    assert seen == ["float32", "float32", "float16", "float32"]


def test_planner_reads_the_fields_not_the_function():
    """A variant with dequant_f16_cublas' function but no workspace declares no scratch."""
    import dataclasses

    v = dataclasses.replace(kernels.get("dequant_f16_cublas"), workspace=None)
    assert v.decode_scratch("Q4_K", 64, 512, 1024) == (None, 0) and v.transient_bytes("Q4_K", 64, 512, 1024) == 0
    assert dispatch.choose("Q4_K", 64, 512, 1024, on_gpu=True) == "dequant_f16_cublas"   # (no table entry for "cpu")
