"""Attention forward + backward speed and memory: our flash paths against the tensor cores' own rate
(cupy.matmul at 8192^3, measured in the same run) and, where it runs, torch's SDPA as the peer.

    python3 scripts/bench_attention.py                      # GPU: the 0.5B student's heads, T = 2k..32k
    python3 scripts/bench_attention.py --T 8192 --H 4 --KV 1 --D 256 --window 512   # gemma-3 local layers
    python3 scripts/bench_attention.py --T 8192 --D 128 --H 28 --KV 4 --paths mma wgmma --torch   # the 7B teacher's
    python3 scripts/bench_attention.py --tiny               # CPU: NumPy block path, small T

Paths: mma (csrc/flash_attention.cu), wgmma (csrc/flash_attention_wgmma.cu through $Q4KDISTILL_FA_FWD and
$Q4KDISTILL_FA_BWD=wgmma, sm_90 only, D = 64 / 128; its o is checked against mma's in the run), numba (the
FP32 fallback). --scheds times each path in each instruction schedule ($Q4KDISTILL_FA_SCHED) and --tiles the
wgmma forward with other tiles ($Q4KDISTILL_FA_TILES; not in schedules 15 and 19), all in one process (one CUDA
context, one matmul rate, one SDPA run):

    python3 scripts/bench_attention.py --T 8192 --D 128 --H 28 --KV 4 --paths wgmma mma --scheds 13 15 19 \
        --tiles 64,1,3 --torch

Timings: CUDA events around each call. On a GPU every row of a T (and torch SDPA with --torch) is built first, then
all are timed in interleaved rounds, one forward and one backward each a round, the order rotated a round, the
first --warmup rounds dropped; a row's figure is the median of --reps (from the seventeenth stop: rows timed one
after another read the same kernel up to 12 % apart). CPU: perf_counter, median of --reps.
FLOPs counted over visible (query, key) pairs: 4 * B * H * D * pairs for the forward (2 products),
2.5x that for the backward (5 products); causal without window: pairs = T (T + 1) / 2.
Inputs of the mma rows are already 16-bit (the casts are the caller's, timed apart in "cast ms"), and their
forward writes o in those 16 bits, as the teacher and the bf16 student ask (from the seventeenth stop; before, float32
o). The backward's time includes its row pass (dO scaled into 16 bits, drow) and the zeroing of dq, as SDPA's does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from q4kdistill import backend  # noqa: E402
from q4kdistill.student.ops.flash_attention import flash_attention_backward, flash_attention_forward  # noqa: E402


def visible_pairs(T: int, window: int | None) -> int:
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def gpu_timer(fn, warmup, reps):
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def cpu_timer(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def matmul_rate(warmup, reps, n=8192):
    """TFLOP/s of cupy.matmul fp16 [n, n] @ [n, n] (FP32 accumulation in cuBLAS; Hopper's dense
    fp16 and bf16 tensor-core rates are the same, and CuPy has no bfloat16 dtype)."""
    import cupy

    a = cupy.ones((n, n), dtype=cupy.float16)
    b = cupy.ones((n, n), dtype=cupy.float16)
    ms = gpu_timer(lambda: cupy.matmul(a, b), warmup, reps)
    return 2 * n ** 3 / ms / 1e9


def settle(ms=50.0, n=8192):
    """Keep the tensor cores busy for about `ms` (fp16 cupy.matmul) and wait: a row timed right after compiling its
    kernels read up to ~25 % slow on an H200 (docs/perf.md, sixteenth stop), the clocks not yet back up."""
    import cupy

    a = cupy.ones((n, n), dtype=cupy.float16)
    t0 = time.perf_counter()
    while 1e3 * (time.perf_counter() - t0) < ms:
        cupy.matmul(a, a)
        cupy.cuda.Device().synchronize()


def torch_sdpa_calls(B, T, H, KV, D):
    """(forward, forward + backward) callables of torch SDPA (bf16, causal, GQA by repeat), or None where torch has
    no CUDA."""
    try:
        import torch
        import torch.nn.functional as F
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)

    def fwd():
        kk, vv = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

    return fwd, lambda: torch.autograd.grad(fwd(), (q, k, v), do)


def _settings(kind, sched, tiles):
    """(enter, leave) callables that set a row's $Q4KDISTILL_FA_* settings (_kernels_env) and restore them."""
    held = []
    return (lambda: held.append(_kernels_env(kind, sched, tiles))), (lambda: held.pop().restore())


class _kernels_env:
    """$Q4KDISTILL_FA_FWD and $Q4KDISTILL_FA_BWD set to `kind` ("mma" or "wgmma"), and where given
    $Q4KDISTILL_FA_SCHED to `sched` and $Q4KDISTILL_FA_TILES to `tiles`, until restore()."""

    def __init__(self, kind, sched=None, tiles=None):
        import os

        from kernels.flash_attention_mma import BWD_ENV, FWD_ENV, SCHED_ENV, TILES_ENV

        self.old = {key: os.environ.get(key) for key in (FWD_ENV, BWD_ENV, SCHED_ENV, TILES_ENV)}
        os.environ[FWD_ENV] = os.environ[BWD_ENV] = kind
        for key, value in ((SCHED_ENV, sched), (TILES_ENV, tiles)):
            if value is not None:
                os.environ[key] = str(value)

    def restore(self):
        import os

        for key, old in self.old.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _o_vs_mma(q, k, v, args, scale, o):
    """max |o - o_mma| / max |o_mma|: the wgmma forward's output against the mma forward's on the same inputs."""
    import cupy

    from kernels.flash_attention_mma import as_f32

    env = _kernels_env("mma")
    ref, _ = flash_attention_forward(q, k, v, None, args.window, scale, path="mma", mma_dtype=args.dtype)
    env.restore()
    return float(cupy.abs(as_f32(o) - ref).max() / cupy.abs(ref).max())


def interleaved_medians(cases, timer, warmup, reps):
    """{name: (median fwd ms, median bwd ms)} of `cases` timed in rounds: each round times every case's forward and
    backward once, in an order rotated by one a round (no case always first, or always right after the same other),
    and the first `warmup` rounds are dropped. A case is (name, enter, leave, fwd, bwd): enter() / leave() set and
    restore its settings around its calls; timer(fn) -> ms of one call. Timed one after another instead, two rows of
    the same kernel read up to 12 % apart in one process (docs/perf.md, seventeenth stop): the clocks drift."""
    n = len(cases)
    samples = {c[0]: ([], []) for c in cases}
    for r in range(warmup + reps):
        for i in range(n):
            name, enter, leave, fwd, bwd = cases[(i + r) % n]
            enter()
            try:
                f, b = timer(fwd), timer(bwd)
            finally:
                leave()
            if r >= warmup:
                samples[name][0].append(f)
                samples[name][1].append(b)
    return {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in samples.items()}


def _one_call_ms(fn):
    """CUDA-event ms of one call of fn (on the legacy default stream, which CuPy and torch both use here)."""
    import cupy

    a, b = cupy.cuda.Event(), cupy.cuda.Event()
    a.record()
    fn()
    b.record()
    b.synchronize()
    return cupy.cuda.get_elapsed_time(a, b)


def run_gpu(args):
    import cupy

    from kernels.flash_attention_mma import forward_kind, to16
    from q4kdistill.student.precision import Precision

    peak = matmul_rate(args.warmup, args.reps)
    print(f"cupy.matmul fp16 8192^3: {peak:.1f} TFLOP/s (the tensor-core rate of this run)")
    print(f"(every row of a T timed in interleaved rounds: {args.warmup} dropped, median of {args.reps})")
    print(f"{'path':>6} {'T':>6} {'fwd ms':>9} {'bwd ms':>9} {'cast ms':>8} {'fwd TF/s':>9} {'bwd TF/s':>9} "
          f"{'f+b TF/s':>9} {'of peak':>8} {'peak GiB':>9}")
    rows = []
    pool = cupy.get_default_memory_pool()
    for T in args.T:
        B, H, KV, D = args.B, args.H, args.KV, args.D
        flops_f = 4 * B * H * D * visible_pairs(T, args.window)
        rng = cupy.random.default_rng(T)
        q32 = rng.standard_normal((B, T, H, D), dtype=np.float32)
        k32 = rng.standard_normal((B, T, KV, D), dtype=np.float32)
        v32 = rng.standard_normal((B, T, KV, D), dtype=np.float32)
        do32 = rng.standard_normal((B, T, H, D), dtype=np.float32)
        cases, info = [], {}
        for path, sched, tiles in _combos(args):     # each row built, checked and its memory read: untimed
            kind = "wgmma" if path == "wgmma" else "mma"
            env = _kernels_env(kind, sched, tiles)
            path, label = ("mma", "wgmma") if path == "wgmma" else (path, path)
            label += (f"/s{sched}" if sched is not None else "") + (f"/t{tiles}" if tiles else "")
            if label.startswith("wgmma") and forward_kind(D) != "wgmma":
                env.restore()
                print(f"{label:>6} {T:>6}   (not here: needs an sm_90 GPU and D = 64 or 128)")
                continue
            out16 = None                                 # the tensor-core paths write o in 16 bits, as the models ask
            if path == "mma":
                out16 = np.float16 if args.dtype == "fp16" else Precision("bf16", cupy).device_bf16
                q, k, v, do = (to16(x, args.dtype) for x in (q32, k32, v32, do32))
                if args.dtype == "fp16":
                    q, k, v, do = (x.view(np.float16) for x in (q, k, v, do))
                cast = gpu_timer(lambda: [to16(x, args.dtype) for x in (q32, k32, v32, do32)], 1, 3)
            else:
                q, k, v, do, cast = q32, k32, v32, do32, 0.0
            scale = D ** -0.5
            pool.free_all_blocks()
            base = pool.total_bytes()
            state = {}

            def fwd(q=q, k=k, v=v, path=path, out16=out16, state=state, scale=scale):
                state["o"], state["c"] = flash_attention_forward(q, k, v, None, args.window, scale, path=path,
                                                                 mma_dtype=args.dtype, out_dtype=out16)

            def bwd(do=do, state=state):
                flash_attention_backward(do, state["c"])

            fwd()                                        # built (compiled) before any clock runs
            bwd()
            cupy.cuda.Device().synchronize()
            grew = (pool.total_bytes() - base) / 2 ** 30
            extra = {"o_vs_mma": _o_vs_mma(q, k, v, args, scale, state["o"])} if label.startswith("wgmma") else {}
            env.restore()
            info[label] = dict(sched=sched, tiles=tiles, cast=cast, grew=grew, **extra)
            cases.append((label, *_settings(kind, sched, tiles), fwd, bwd))
        sdpa = torch_sdpa_calls(B, T, H, KV, D) if args.torch else None
        if args.torch and sdpa is None:
            print("torch SDPA: no CUDA torch here")
        if sdpa is not None:                             # its "bwd" is forward + backward: the forward subtracted
            cases.append(("torch", lambda: None, lambda: None, *sdpa))
        settle()
        times = interleaved_medians(cases, _one_call_ms, args.warmup, args.reps)
        for label, (f_ms, b_ms) in times.items():
            if label == "torch":
                b_ms = b_ms - f_ms
                tf = 3.5 * flops_f / (f_ms + b_ms) / 1e9
                rows.append(dict(path="torch_sdpa", T=T, fwd_ms=f_ms, bwd_ms=b_ms, tflops=tf, of_peak=tf / peak))
                print(f"{'torch':>6} {T:>6} {f_ms:9.3f} {b_ms:9.3f} {'':>8} {flops_f / f_ms / 1e9:9.1f} "
                      f"{2.5 * flops_f / b_ms / 1e9:9.1f} {tf:9.1f} {tf / peak:8.1%}")
                continue
            i = info[label]
            tf_f, tf_b = flops_f / f_ms / 1e9, 2.5 * flops_f / b_ms / 1e9
            tf = 3.5 * flops_f / (f_ms + b_ms) / 1e9
            row = dict(path=label, sched=i["sched"], tiles=i["tiles"], B=B, T=T, H=H, KV=KV, D=D, window=args.window,
                       dtype=args.dtype, fwd_ms=f_ms, bwd_ms=b_ms, cast_ms=i["cast"], fwd_tflops=tf_f, bwd_tflops=tf_b,
                       tflops=tf, of_peak=tf / peak, peak_tflops=peak, pool_gib=i["grew"], gpu=backend.gpu_name(),
                       timing="interleaved")
            if "o_vs_mma" in i:
                row["o_vs_mma"] = i["o_vs_mma"]
            rows.append(row)
            print(f"{label:>6} {T:>6} {f_ms:9.3f} {b_ms:9.3f} {i['cast']:8.3f} {tf_f:9.1f} {tf_b:9.1f} {tf:9.1f} "
                  f"{tf / peak:8.1%} {i['grew']:9.2f}" + (f"   o vs mma {row['o_vs_mma']:.2e}" if "o_vs_mma" in row else ""))
        cases.clear()
        info.clear()
    return rows


def _combos(args):
    """(path, schedule, tiles) of every row a T gets: each path in each of --scheds (None: the setting as it
    is), then the wgmma forward in each --tiles, in every schedule but the warp-specialised one."""
    scheds = args.scheds or [None]
    rows = [(path, sched, None) for path in args.paths for sched in scheds]
    if "wgmma" in args.paths:
        from kernels.flash_attention_mma import WS_SCHED, kernel_sched
        rows += [("wgmma", sched, t) for t in args.tiles for sched in scheds
                 if kernel_sched("wgmma fwd", 64, sched) != WS_SCHED]
    return rows


def run_cpu(args):
    print(f"{'path':>6} {'T':>6} {'fwd ms':>9} {'bwd ms':>9} {'GFLOP/s':>9}")
    rows = []
    rng = np.random.default_rng(0)
    for T in args.T:
        B, H, KV, D = args.B, args.H, args.KV, args.D
        q = rng.standard_normal((B, T, H, D), dtype=np.float32)
        k = rng.standard_normal((B, T, KV, D), dtype=np.float32)
        v = rng.standard_normal((B, T, KV, D), dtype=np.float32)
        do = rng.standard_normal((B, T, H, D), dtype=np.float32)
        state = {}

        def fwd():
            state["o"], state["c"] = flash_attention_forward(q, k, v, None, args.window, D ** -0.5)

        f_ms = cpu_timer(fwd, 1, args.reps)
        b_ms = cpu_timer(lambda: flash_attention_backward(do, state["c"]), 1, args.reps)
        gf = 3.5 * 4 * B * H * D * visible_pairs(T, args.window) / (f_ms + b_ms) / 1e6
        rows.append(dict(path="blocks", T=T, fwd_ms=f_ms, bwd_ms=b_ms, gflops=gf))
        print(f"{'blocks':>6} {T:>6} {f_ms:9.2f} {b_ms:9.2f} {gf:9.2f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=None)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=14)
    p.add_argument("--KV", type=int, default=2)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="fp16")
    p.add_argument("--paths", nargs="+", default=["mma"], choices=["mma", "wgmma", "numba", "blocks"],
                   help="wgmma: the sm_90 kernels; numba: the FP32 fallback (slow beyond T = 8192)")
    p.add_argument("--torch", action="store_true", help="time torch SDPA too (needs a CUDA torch)")
    p.add_argument("--scheds", type=int, nargs="+", default=None,
                   help="instruction schedules to time each path in ($Q4KDISTILL_FA_SCHED; default: as set)")
    p.add_argument("--tiles", nargs="+", default=[],
                   help="wgmma forward tiles to time too, keys,warpgroups,slots ($Q4KDISTILL_FA_TILES)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="CPU: the NumPy block path at small T")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny or not backend.on_gpu():
        args.T = args.T or [256, 512]
        args.reps = min(args.reps, 3)
        args.H, args.KV, args.D = (args.H, args.KV, args.D) if not args.tiny else (4, 2, 16)
        rows = run_cpu(args)
    else:
        args.T = args.T or [2048, 4096, 8192, 16384, 32768]
        rows = run_gpu(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
