"""The Numba twin of csrc/gemm_wgmma_rs.cu (kernels/gemm_wgmma_rs_twin.py) in the simulator.

The twin repeats the C's tiles, producer copies (swizzled x slots, raw-W slots, rows past N clamped), the consumer
threads' register decode into wgmma A fragments, the fragments' gather across the warpgroup, x read through the
128-byte-swizzle descriptor and the accumulator layout; tests/test_kernels_gemm_wgmma_rs.py runs the C itself on the
CPU. Bounds as there: 1e-5 against the float64 product of the fp16 x and W decoded as the kernel decodes it
(gemm_wgmma_twin.decoded_as_kernel; FP32 summation order only, seen 2e-7 .. 5e-7), while an indexing error gives
O(1) (each of a swapped fragment row, an unswizzled x chunk, a wrong SBO, scale, slot or epilogue index was
seen to fail it); 2e-3 against the exact product (seen ~4e-4). The simulator is slow: the shapes are tiny, and the
twin skips the products nothing stores (its docstring): the whole file takes ~10 s of one idle core (late in the
CI's two-worker run the first case, then K = 768 at N = 130, took 175-210 s: the shapes stay this small).
"""
import numpy as np
import pytest

from kernel_cases import aligned, check_twin_rejects
from kernel_cases import rel_err as rel
from kernels import linked
from kernels.gemm_wgmma_rs_twin import gemm_wgmma_rs_twin
from kernels.gemm_wgmma_twin import decoded_as_kernel
from q4kdistill.errors import Q4KError
from q4kdistill.formats import quants

simulator = pytest.mark.skipif(not linked.SIMULATOR, reason="the twin is the simulator's check (a GPU runs the C)")

CASES = [  # (bx, xs, ws), M, N, K
    ((64, 2, 2), 5, 130, 256),     # 4 steps through 2 x slots; N = 130: a full W tile (every warp, lane and row of
                                   # both consumers) and one of 2 rows
    ((64, 2, 2), 3, 16, 768),      # 3 super-blocks through 2 W slots: slot 0 reused
    ((64, 2, 2), 70, 20, 256),     # two M tiles, the first with all 64 x rows (every swizzle row, 8 row groups)
    ((64, 3, 3), 3, 16, 1024),     # 3 W slots, 4 super-blocks: slot 0 reused
    ((128, 6, 2), 20, 8, 512),     # 8 steps through 6 x slots
    ((256, 4, 2), 3, 16, 256),     # the default (registered) shape
]


@simulator
@pytest.mark.parametrize("shape,M,N,K", CASES)
def test_twin_matches_float64_reference(shape, M, N, K):
    rng = np.random.default_rng([shape[0], shape[1], M, N, K])
    w = aligned(quants.random_blocks("Q4_K", N, K, rng))
    x = rng.standard_normal((M, K)).astype(np.float32)          # float32 x: the twin rounds it to fp16
    out = np.full((M, N), np.nan, np.float32)
    bx, xs, ws = shape
    gemm_wgmma_rs_twin(x, w, "Q4_K", N, out, bx=bx, xs=xs, ws=ws)
    x64 = x.astype(np.float16).astype(np.float64)
    assert rel(out, x64 @ decoded_as_kernel(w, "Q4_K").astype(np.float64).T) <= 1e-5, shape
    assert rel(out, x.astype(np.float64) @ quants.dequantize(w, "Q4_K").astype(np.float64).T) <= 2e-3, shape


def test_twin_rejects_bad_input():
    check_twin_rejects(gemm_wgmma_rs_twin, {"bx": 96}, "not a shape")
    x, out, w = np.zeros((2, 256), np.float32), np.zeros((2, 4), np.float32), aligned(np.zeros((4, 144), np.uint8))
    with pytest.raises(Q4KError, match="not a shape"):
        gemm_wgmma_rs_twin(x, w, "Q4_K", 4, out, bx=64, xs=4, ws=2)
    with pytest.raises(Q4KError, match="decodes Q4_K"):
        gemm_wgmma_rs_twin(x, aligned(np.zeros((4, 210), np.uint8)), "Q6_K", 4, out)
