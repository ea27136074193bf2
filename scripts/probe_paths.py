"""Time the pieces of the quantized matmul paths separately (GPU only), to see where time goes.

    python3 scripts/probe_paths.py            prints one line per (piece, shape)

Same timer as the benchmark (kernels/bench.py: spin kernel ahead, CUDA events, median).
Pieces: the launch floor (an empty Numba kernel, a tiny CuPy op), x quantization to q8, the
GEMV kernels alone on pre-quantized x, the decode kernels, the x -> fp16 cast, and the cuBLAS
calls the scratch path can use (GemmEx fp16 -> fp32 out, CuPy fp16 matmul).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout first


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    from q4kdistill import backend

    if not backend.on_gpu():
        sys.exit("probe_paths.py needs a CUDA GPU (CuPy)")
    import cupy as cp
    from numba import cuda

    import kernels
    from kernels import bench as kb
    from kernels import dequant, linked
    from kernels.scratch import gemm_f16_f32
    from q4kdistill.formats.quants import random_blocks

    timer = kb.Timer(cp)
    copy_bw = kb.copy_bandwidth(cp, timer)
    print(f"# {kb._device_info(cp)[0]} copy {copy_bw:.0f} GB/s")

    @cuda.jit
    def empty(a):
        pass

    a = cp.zeros(1, cp.float32)
    from kernels._device import launch
    print(f"floor  numba empty kernel        {timer(lambda i: launch(empty, 1, 32, a), 1) * 1e6:7.1f} us")
    print(f"floor  cupy a += 1               {timer(lambda i: a.__iadd__(1), 1) * 1e6:7.1f} us")
    rng = np.random.default_rng(0)
    for K, N in ((3584, 512), (3584, 3584), (3584, 18944), (18944, 3584)):
        w = cp.asarray(random_blocks("Q4_K", N, K, rng))
        ws = kb._copies(cp, w, 3 * 50 << 20)
        tag = f"{K}x{N}"
        for M in (1, 8):
            x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32))
            out = cp.empty((M, N), cp.float32)
            xq, xds = linked.quantize_q8(x)
            t_q = timer(lambda i: linked.quantize_q8(x), 1)
            k_mma = linked.mma_kernel("Q4_K", 1, 4)
            k_dp = linked.gemv_kernel("Q4_K", M, 2, 2)
            xf, dsf = linked.quantize_q8_fragments(x, 1)
            t_qf = timer(lambda i: linked.quantize_q8_fragments(x, 1), 1)
            k_rows = linked.mma_kernel("Q4_K", 1, 4, 4, rows=True)
            # no split along K (plain stores): the short wide 18944x3584 under-fills the GPU here
            t_mma = timer(lambda i: launch(k_mma, ((N + 15) // 16, 1), 128, ws[i % len(ws)].reshape(-1), w.shape[1], N, K, M, xf, dsf, out), len(ws))
            t_rows = timer(lambda i: launch(k_rows, ((N + 63) // 64, 1), 128, ws[i % len(ws)].reshape(-1), w.shape[1], N, K, M, xf, dsf, out), len(ws))
            t_dp = timer(lambda i: launch(k_dp, (N + 1) // 2, 64, ws[i % len(ws)].reshape(-1), w.shape[1], N, K, xq, xds, out), len(ws))
            mb = w.nbytes / 1e6
            pct = lambda t: 100 * mb / t / 1e3 / copy_bw
            print(f"M={M} {tag:11} quantize {t_q * 1e6:5.1f} us, fragments {t_qf * 1e6:5.1f} us | alone, no split: "
                  f"mma_w4 {t_mma * 1e6:6.1f} us ({pct(t_mma):.0f}%) | mma_rows_w4 {t_rows * 1e6:6.1f} us ({pct(t_rows):.0f}%) "
                  f"| dp4a_r2w2 {t_dp * 1e6:6.1f} us ({pct(t_dp):.0f}% copy)")
        w16 = cp.empty((N, K), cp.float16)
        t_dold = timer(lambda i: dequant.decode_rows(ws[i % len(ws)], "Q4_K", K, "float16", w16), len(ws))
        t_dnew = timer(lambda i: linked.decode_f16_linked(ws[i % len(ws)], "Q4_K", K, w16), len(ws))
        gb = (w.nbytes + w16.nbytes) / 1e9
        print(f"decode {tag:11} numba {t_dold * 1e6:7.1f} us ({gb / t_dold:.0f} GB/s) | linked {t_dnew * 1e6:7.1f} us ({gb / t_dnew:.0f} GB/s)")
        for M in (512, 4096):
            x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32))
            x16 = x.astype(cp.float16)
            out = cp.empty((M, N), cp.float32)
            t_cast = timer(lambda i: x.astype(cp.float16), 1)
            t_ex = timer(lambda i: gemm_f16_f32(x16, w16, out), 1)
            t_mm = timer(lambda i: cp.matmul(x16, w16.T), 1)
            print(f"M={M} {tag:11} cast {t_cast * 1e6:7.1f} us | GemmEx f16->f32 {t_ex * 1e6:7.1f} us | cupy fp16 matmul {t_mm * 1e6:7.1f} us")
        ws = None
        cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
