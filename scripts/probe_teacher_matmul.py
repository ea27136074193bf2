"""Probe: where does the native teacher's matmul time go at M = 4096? (one 7B layer + the head)

Times, with CUDA events (median of 20 after warm-up), per weight of block 0 and one head slab:
  native      kernels.matmul (decode to fp16 scratch + cuBLAS GemmEx fp16 -> fp32)
  decode      kernels.dequantize_to(..., float16) alone
  gemmex      the GemmEx product alone on pre-decoded fp16 weights (the dense baseline's GEMM)
  fp16 out    cupy.matmul(x16, W16.T) (fp16 out, CuPy's default path)

    python3 scripts/probe_teacher_matmul.py [M]        (default M = 4096)
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout first


def timed(fn, reps=20):
    import cupy
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b) * 1e3)
    return float(np.median(ts))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("M", nargs="?", type=int, default=4096, help="activation rows (default 4096)")
    M = p.parse_args(argv).M
    from q4kdistill import backend

    if not backend.on_gpu():
        sys.exit("probe_teacher_matmul.py needs a CUDA GPU (CuPy)")
    import cupy

    import kernels
    from q4kdistill.data import MANIFEST_7B
    from q4kdistill.teacher.model import Teacher

    t = Teacher.load(MANIFEST_7B, log=lambda *a: None)
    names = [n for n in t.weights if n.startswith("blk.0.") and t.weights[n].quantized] + ["output.weight"]
    print(f"{'weight':28s} {'qtype':5s} {'N x K':>14s} {'choose':20s} {'native':>9s} {'decode':>9s} {'gemmex':>9s} {'fp16out':>9s}  us")
    tot = dict(native=0.0, decode=0.0, gemmex=0.0, f16=0.0)
    for name in names:
        w = t.weights[name]
        if name == "output.weight":
            w = w.rows(0, 16384)
        N, K = w.shape
        x = cupy.random.standard_normal((M, K), dtype=cupy.float32)
        x16 = x.astype(cupy.float16)
        w16 = kernels.dequantize_to(w.data, w.qtype, N, "float16")
        out = cupy.empty((M, N), cupy.float32)
        r = dict(native=timed(lambda: kernels.matmul(x, w.data, w.qtype, N)),
                 decode=timed(lambda: kernels.dequantize_to(w.data, w.qtype, N, "float16")),
                 gemmex=timed(lambda: kernels.gemm_f16_f32(x16, w16, out)),
                 f16=timed(lambda: cupy.matmul(x16, w16.T)))
        for k in tot:
            tot[k] += r[k]
        print(f"{name:28s} {w.qtype.name:5s} {N:>6d}x{K:<7d} {kernels.choose(w.qtype.name, M, N, K):20s} "
              f"{r['native']:9.1f} {r['decode']:9.1f} {r['gemmex']:9.1f} {r['f16']:9.1f}")
    print(f"{'total':28s} {'':5s} {'':14s} {'':20s} {tot['native']:9.1f} {tot['decode']:9.1f} {tot['gemmex']:9.1f} {tot['f16']:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
