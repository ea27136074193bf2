"""A small workload for Nsight Compute: each named variant once on 3584x18944 Q4_K (GPU only).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 scripts/ncu_targets.py gemv_mma_linked_w8:8 gemv_q8_linked_r2w2:1

Each argument is variant:M. Every variant runs twice; profile the second launch of each kernel.
--n N picks the output size (default 18944; 152064 = the LM head).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout first


def variant_and_m(spec: str):
    name, sep, m = spec.rpartition(":")
    if not sep or not name or not m.isdigit() or int(m) < 1:
        raise argparse.ArgumentTypeError(f"expected VARIANT:M like gemv_q8_linked_r2w2:1, got {spec!r}")
    return name, int(m)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="+", type=variant_and_m, metavar="VARIANT:M", help="variant name and activation rows")
    p.add_argument("--n", type=int, default=18944, help="output features N (default 18944; 152064 = the LM head)")
    args = p.parse_args(argv)

    from q4kdistill import backend

    if not backend.on_gpu():
        sys.exit("ncu_targets.py needs a CUDA GPU (CuPy)")
    import cupy as cp
    import numpy as np

    import kernels
    from q4kdistill.formats.quants import random_blocks

    rng = np.random.default_rng(0)
    K, N = 3584, args.n
    w = cp.asarray(random_blocks("Q4_K", N, K, rng))
    for name, M in args.targets:
        x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32))
        o = cp.empty((M, N), cp.float32)
        for _ in range(2):
            kernels.get(name)(x, w, "Q4_K", N, o)
    cp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
