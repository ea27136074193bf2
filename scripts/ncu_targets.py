"""A small workload for Nsight Compute: each named variant once on 3584x18944 Q4_K (GPU only).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 scripts/ncu_targets.py gemv_mma_linked_w8:8 gemv_q8_linked_r2w2:1

Each argument is variant:M. Every variant runs twice; profile the second launch of each kernel.
--n N picks the output size (default 18944; 152064 = the LM head).
"""
import sys

import numpy as np


def main(args):
    import cupy as cp

    import kernels
    from q4kdistill.formats.quants import random_blocks

    rng = np.random.default_rng(0)
    K, N = 3584, 18944
    if args and args[0] == "--n":
        N, args = int(args[1]), args[2:]
    w = cp.asarray(random_blocks("Q4_K", N, K, rng))
    for spec in args:
        name, M = spec.split(":")
        x = cp.asarray(rng.standard_normal((int(M), K), dtype=np.float32))
        o = cp.empty((int(M), N), cp.float32)
        for _ in range(2):
            kernels.get(name)(x, w, "Q4_K", N, o)
    cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main(sys.argv[1:])
