"""Sweep the Q4_K tensor-core GEMV's settings with the benchmark's timer (GPU only).

    python3 scripts/sweep_mma.py OUT [--m 1 8 16] [--shapes 3584x152064 ...]

Registers throw-away variants (kernels.register, as a notebook would) for
gemv_mma_linked(warps, stages, x256) and gemv_mma_rows_linked(warps, stages, x256), times them
with kernels.bench.run next to cuBLAS fp16 and the shipped variants, prints the table and writes
OUT/sweep.csv. The warp count times the ring depth sets the shared memory per block and so the
occupancy (csrc/gemv_mma.cu: 5 KB per warp and slot for q4k_mma).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for sweep.csv")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8, 16], help="activation rows")
    ap.add_argument("--shapes", nargs="+", default=["3584x152064", "3584x18944", "18944x3584"], help="K x N")
    args = ap.parse_args()
    from q4kdistill import backend

    if not backend.on_gpu():
        sys.exit("sweep_mma.py needs a CUDA GPU (CuPy)")

    import kernels
    from kernels import bench as kb
    from kernels.linked import gemv_mma_linked, gemv_mma_rows_linked

    names = []
    for x256 in (False, True):
        tag = "k8" if x256 else "k32"
        for warps, stages in ((1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4), (4, 2)):
            name = f"sweep_mma_{tag}_w{warps}s{stages}"
            kernels.register(kernels.Variant(name=name, qtypes=("Q4_K",), fn=gemv_mma_linked, m_max=16, rel_err=2e-2,
                                             device="gpu", simulated=False,
                                             params={"warps": warps, "stages": stages, "x256": x256},
                                             description="sweep"), replace=True)
            names.append(name)
        for warps, stages in ((2, 4), (4, 3), (4, 4)):
            name = f"sweep_rows_{tag}_w{warps}s{stages}"
            kernels.register(kernels.Variant(name=name, qtypes=("Q4_K",), fn=gemv_mma_rows_linked, m_max=16,
                                             rel_err=2e-2, device="gpu", simulated=False,
                                             params={"warps": warps, "stages": stages, "x256": x256},
                                             description="sweep"), replace=True)
            names.append(name)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    rows = kb.run(shapes=shapes, ms=args.m, variants=names + ["gemv_q8_linked_r4w4"], qtypes=["Q4_K"],
                  log=lambda s: None)
    os.makedirs(args.out, exist_ok=True)
    kb.write_csv(rows, os.path.join(args.out, "sweep.csv"))
    kb.print_table(rows)


if __name__ == "__main__":
    main()
