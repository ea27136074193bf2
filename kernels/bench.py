"""Benchmark every variant against the hardware and against cuBLAS fp16, in one run (GPU only).

    rows = kernels.bench.run(shapes=[(3584, 18944)], ms=[1, 8], variants=None, qtypes=["Q4_K"])
    kernels.bench.print_table(rows)

Method (one row per qtype x shape x M x variant):
  * time: median of CUDA-event times of single calls. Before each timed call a spin kernel keeps
    the GPU busy while the host enqueues the call, so host launch overhead stays out of the
    number. Inputs rotate over enough copies of W and x (> 2x L2 in all) that each call reads
    DRAM, not cache.
  * GB/s: quantized weight bytes / time (x and out not counted); % copy: that over the
    device-to-device copy bandwidth (bytes read + written) measured at the start of the run.
  * TFLOP/s: 2*M*N*K / time.
  * vs cuBLAS: time of CuPy matmul on the same weights pre-dequantized to fp16 (x in fp16, same
    rotation) / time of the variant: > 1 means the variant is faster.
  * err: before it is timed, each variant's output on the first inputs against that cuBLAS product
    in float32, max |out - ref| / max |ref|; ``wrong`` when it exceeds ``check_bound(variant)``
    (several times the variant's declared error bound plus the fp16 reference's own rounding):
    ``autotune`` never picks a wrong row, however fast.
Shapes are (K, N) as in the issue (K = inputs, N = outputs); the baseline row has variant
"cublas_fp16".
"""
from __future__ import annotations

import csv
import json
import math
import time

import numpy as np

SHAPES_7B = [(3584, 3584), (3584, 512), (3584, 18944), (18944, 3584), (3584, 152064)]
MS = [1, 8, 16, 64, 512, 4096]
QTYPES = ["Q4_K", "Q6_K"]
BASELINE = "cublas_fp16"

_SPIN_SRC = r'''
extern "C" __global__ void spin(long long ns) {
    long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
'''


class Timer:
    """Median device time of fn(i) over rotating inputs, host overhead hidden behind a spin.

    The spin must outlast the host's enqueue of one call, else the GPU idles between the start event
    and the first kernel and host time is counted: it is at least spin_us and at least 3x the
    slowest enqueue seen in three untimed calls (two Numba launches cost ~250 us of host time)."""

    def __init__(self, cp, spin_us=300.0, budget_s=0.25, reps=(3, 30)):
        self.cp = cp
        self.spin = cp.RawKernel(_SPIN_SRC, "spin")
        self.spin_ns = np.int64(spin_us * 1000)
        self.budget_s, self.reps = budget_s, reps

    def __call__(self, fn, n_inputs: int) -> float:
        cp = self.cp
        t0 = time.perf_counter()
        fn(0)                                          # warm-up: compiles, allocates scratch
        cp.cuda.get_current_stream().synchronize()
        first = time.perf_counter() - t0
        fn(1 % n_inputs)
        cp.cuda.get_current_stream().synchronize()
        est = time.perf_counter() - t0 - first
        enqueue = 0.0
        for i in range(3):                             # host time of a call, GPU kept busy meanwhile
            self.spin((1,), (1,), (self.spin_ns,))
            t1 = time.perf_counter()
            fn(i % n_inputs)
            enqueue = max(enqueue, time.perf_counter() - t1)
            cp.cuda.get_current_stream().synchronize()
        spin_ns = np.int64(max(int(self.spin_ns), int(3e9 * enqueue)))
        reps = int(min(self.reps[1], max(self.reps[0], self.budget_s / max(est, 1e-6))))
        events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
        for r, (a, b) in enumerate(events):
            self.spin((1,), (1,), (spin_ns,))
            a.record()
            fn((r + 2) % n_inputs)
            b.record()
        events[-1][1].synchronize()
        return float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in events])) * 1e-3


def copy_bandwidth(cp, timer, nbytes=1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    src = cp.empty(nbytes, dtype=np.uint8)
    dst = cp.empty_like(src)
    src.fill(1)
    t = timer(lambda i: dst.__setitem__(Ellipsis, src), 1)
    return 2 * nbytes / t / 1e9


def _copies(cp, a, total_bytes_wanted):
    n = max(2, min(256, math.ceil(total_bytes_wanted / max(a.nbytes, 1))))
    return [a] + [a.copy() for _ in range(n - 1)]


def _device_info(cp):
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return name, dev.attributes["L2CacheSize"]


def _row(qtype, K, N, M, variant, t, wbytes, copy_bw, t_ref, err=None, bound=None):
    gbs = wbytes / t / 1e9
    return {"qtype": qtype, "K": K, "N": N, "M": M, "variant": variant, "time_us": t * 1e6,
            "GBps": gbs, "pct_copy_bw": 100 * gbs / copy_bw, "TFLOPs": 2 * M * N * K / t / 1e12,
            "vs_cublas_fp16": (t_ref / t) if t_ref else 1.0, "err": err,
            "wrong": bool(err is not None and not err <= bound)}


REFERENCE_ERR = 2e-3    # the cuBLAS reference's own distance from the exact product (fp16 x and weights)


def check_bound(rel_err: float) -> float:
    """The largest error against the fp16 cuBLAS product a variant of declared bound ``rel_err``
    may show: 4x its bound plus the reference's own (a wrong tile, index or wait gives order 1)."""
    return 4 * rel_err + REFERENCE_ERR


def rel_error(out, ref) -> float:
    """max |out - ref| / max |ref| (NaN anywhere in out -> inf). Works on NumPy and CuPy arrays."""
    diff = abs(out.astype(np.float32) - ref.astype(np.float32)).max()
    err = float(diff) / max(float(abs(ref).max()), 1e-30)
    return err if math.isfinite(err) else math.inf


def run(shapes=None, ms=None, variants=None, qtypes=None, log=print, seed=0, also_x16=False):
    """Benchmark rows (list of dicts, see the module doc). variants: names (default: all GPU ones).

    also_x16: variants that accept float16 activations (the decode + cuBLAS paths) are timed a
    second time with x already in fp16, as the cuBLAS baseline gets it; those rows are named
    "<variant>[x16]"."""
    import cupy as cp

    from q4kdistill.formats.quants import random_blocks

    from . import dispatch, registry

    shapes, ms, qtypes = shapes or SHAPES_7B, ms or MS, qtypes or QTYPES
    timer = Timer(cp)
    gpu, l2 = _device_info(cp)
    copy_bw = copy_bandwidth(cp, timer)
    log(f"# {gpu}, L2 {l2 >> 20} MiB, copy bandwidth {copy_bw:.0f} GB/s (read + write), {time.strftime('%Y-%m-%d')}")
    rng = np.random.default_rng(seed)
    rows = []
    for q in qtypes:
        names = [n for n in (variants or registry.variants(q)) if registry.get(n).device != "cpu"]
        for K, N in shapes:
            w0 = cp.asarray(random_blocks(q, N, K, rng))
            ws = _copies(cp, w0, 3 * l2)
            w16s = _copies(cp, dispatch.dequantize_to(w0, q, N, "float16"), 3 * l2)
            for M in ms:
                x0 = cp.asarray(rng.standard_normal((M, K), dtype=np.float32))
                xs = _copies(cp, x0, l2)
                x16s = [x.astype(np.float16) for x in xs]
                out = cp.empty((M, N), dtype=np.float32)
                t_ref = timer(lambda i: cp.matmul(x16s[i % len(xs)], w16s[i % len(w16s)].T), len(xs) * len(w16s))
                rows.append(_row(q, K, N, M, BASELINE, t_ref, w0.nbytes, copy_bw, t_ref))
                ref = cp.matmul(x16s[0].astype(np.float32), w16s[0].T.astype(np.float32))     # [M, N]
                for name in names:
                    v = registry.get(name)
                    if not v.supports(q, M, True):
                        continue
                    try:
                        out.fill(np.nan)                        # a variant that writes nothing is wrong
                        v(xs[0], ws[0], q, N, out)
                        err = rel_error(out, ref)
                        t = timer(lambda i: v(xs[i % len(xs)], ws[i % len(ws)], q, N, out), len(xs) * len(ws))
                    except Exception as exc:   # one broken variant must not end a whole run
                        log(f"# {name} {q} {K}x{N} M={M}: {type(exc).__name__}: {exc}")
                        continue
                    row = _row(q, K, N, M, name, t, w0.nbytes, copy_bw, t_ref, err, check_bound(v.rel_err))
                    if row["wrong"]:
                        log(f"# {name} {q} {K}x{N} M={M}: WRONG, error {err:.3g} against cuBLAS "
                            f"(bound {check_bound(v.rel_err):.3g}); autotune will not pick it")
                    rows.append(row)
                    if also_x16 and "float16" in v.accepts:
                        t = timer(lambda i: v(x16s[i % len(xs)], ws[i % len(ws)], q, N, out), len(xs) * len(ws))
                        rows.append(_row(q, K, N, M, name + "[x16]", t, w0.nbytes, copy_bw, t_ref))
                log(format_rows([r for r in rows if (r["qtype"], r["K"], r["N"], r["M"]) == (q, K, N, M)]))
            ws = w16s = None                      # drop this shape's copies before the next one
            cp.get_default_memory_pool().free_all_blocks()
    for r in rows:
        r.update(gpu=gpu, copy_GBps=copy_bw, date=time.strftime("%Y-%m-%d"))
    return rows


HEADER = f"{'type':5} {'K':>6} {'N':>7} {'M':>5}  {'variant':22} {'us':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'vs cuBLAS':>9}"


def format_rows(rows) -> str:
    return "\n".join(f"{r['qtype']:5} {r['K']:>6} {r['N']:>7} {r['M']:>5}  {r['variant']:22} {r['time_us']:9.1f} "
                     f"{r['GBps']:7.0f} {r['pct_copy_bw']:6.1f} {r['TFLOPs']:8.2f} {r['vs_cublas_fp16']:9.2f}"
                     for r in rows)


def print_table(rows, log=print):
    log(HEADER)
    log(format_rows(rows))


def write_json(rows, path):
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
