"""Time the fused kernels against the unfused CuPy ops they replace, and against the copy bandwidth.

    python scripts/bench_fused.py [--json PATH] [--only rmsnorm,rope,glu,kd,linear]     (GPU)
    python scripts/bench_fused.py --tiny                                              (CPU smoke run)

Method (GPU): every time is the median of CUDA-event times of single calls after a warm-up call
(kernels.bench.Timer: a spin kernel hides host launch cost; inputs rotate over enough copies
that the working set exceeds 2x L2, so each call reads DRAM). GB/s counts the bytes a kernel must
move (each input read once per pass over it, each output written once) and is compared with the
device-to-device copy bandwidth (read + write) measured in the same run. "unfused" is the
package's current path: the float32 CuPy ops of q4kdistill/ops and losses.py on the same shape
(float32 inputs), so "x" = unfused time / fused time. "extra MB": the peak GPU bytes in use during
one call above those in use before it (q4kdistill.memory's counter), fused vs unfused. Shapes are
the issue's: norms 4096 x 896, GLU 4096 x 4864, rope [8, 512, 14, 64], KD loss [256, 151936], the
fused linear loss over 2048 tokens of D 896 against the student's chunk loop (both float32).
--tiny: NumPy arrays, the simulator, tiny shapes, perf_counter (checks the script runs, no figures).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # this checkout's packages
import q4kdistill  # noqa: E402,F401  (backend first)
from q4kdistill import backend
from q4kdistill.memory import meter as memory
from q4kdistill.student.losses import LossConfig, chunk_loss, masked_sum, token_weights
from q4kdistill.student.ops.glu import glu_backward, glu_forward
from q4kdistill.student.ops.linear import linear_backward, linear_forward
from q4kdistill.student.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from q4kdistill.student.ops.rope import rope_forward, rope_tables
from q4kdistill.student.ops.fused_linear_loss import fused_linear_loss

import kernels

FULL = dict(norm=(4096, 896), glu=(4096, 4864), rope=(8, 512, 14, 64), kd=(256, 151936),
            linear=(2048, 896, 151936, 256))
TINY = dict(norm=(6, 40), glu=(6, 24), rope=(1, 4, 2, 8), kd=(3, 70), linear=(12, 8, 50, 4))
DTYPES = ("float32", "bfloat16", "float16")


def as_dtype(xp, a, dtype):
    """float32 array -> float32 / bfloat16 bits (uint16) / float16 storage."""
    if dtype == "bfloat16":
        u = a.astype(xp.float32).view(xp.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(xp.uint16)
    return a.astype(dtype)


class CpuTimer:
    """perf_counter of one call (the --tiny run checks that the script runs; under the simulator a
    call takes seconds, and the figure means nothing)."""

    def __call__(self, fn, n_inputs):
        t0 = time.perf_counter()
        fn(0)
        return time.perf_counter() - t0


def extra_bytes(meter, fn):
    """Peak GPU bytes in use during fn(0) above those in use before it (the package's counter)."""
    with meter.phase("call") as rec:
        fn(0)
    return rec.peak_bytes - rec.start_bytes


def copies(xp, arrays, l2_bytes):
    """Enough copies of the input tuple that one pass over them all exceeds 2x L2."""
    nbytes = sum(a.nbytes for a in arrays)
    n = 1 if l2_bytes == 0 else max(2, min(64, math.ceil(2 * l2_bytes / max(nbytes, 1))))
    return [tuple(a.copy() for a in arrays) for _ in range(n)]


def cases(xp, sizes, l2):
    """(op, shape, dtype, bytes moved, fused fn(i), unfused fn(i), n_inputs) for every benchmark row."""
    rng = np.random.default_rng(0)

    def rnd(*shape, scale=1.0):
        return xp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))

    R, D = sizes["norm"]
    x32, r32, w32, dy32 = rnd(R, D), rnd(R, D), rnd(D), rnd(R, D)
    ref_in = copies(xp, (x32, r32, dy32), l2)
    _, cache = rmsnorm_forward(x32 + r32, w32, 1e-6)
    for dt in DTYPES:
        ins = copies(xp, tuple(as_dtype(xp, a, dt) for a in (x32, r32, dy32)), l2)
        w = as_dtype(xp, w32, dt)
        _, h, rstd = kernels.rmsnorm_fwd(ins[0][0], w, 1e-6, residual=ins[0][1])
        item = ins[0][0].itemsize
        yield ("rmsnorm+add fwd", (R, D), dt, 4 * R * D * item,
               lambda i, ins=ins, w=w: kernels.rmsnorm_fwd(ins[i][0], w, 1e-6, residual=ins[i][1]),
               lambda i: rmsnorm_forward(ref_in[i % len(ref_in)][0] + ref_in[i % len(ref_in)][1], w32, 1e-6), len(ins))
        yield ("rmsnorm+add bwd", (R, D), dt, 4 * R * D * item,
               lambda i, ins=ins, w=w, h=h, rstd=rstd: kernels.rmsnorm_bwd(ins[i][2], h, w, rstd, dres=ins[i][1]),
               lambda i: rmsnorm_backward(ref_in[i % len(ref_in)][2], cache)[0] + ref_in[i % len(ref_in)][1], len(ins))

    B, T, H, Dh = sizes["rope"]
    q32 = rnd(B, T, H, Dh)
    cos, sin = rope_tables(xp.arange(T), Dh, 1e6, xp)
    ref_q = copies(xp, (q32,), l2)
    for dt in DTYPES:
        ins = copies(xp, (as_dtype(xp, q32, dt),), l2)
        yield ("rope fwd in place", (B, T, H, Dh), dt, 2 * q32.size * ins[0][0].itemsize,
               lambda i, ins=ins: kernels.rope_apply(ins[i][0], "neox", cos=cos, sin=sin),
               lambda i: rope_forward(ref_q[i % len(ref_q)][0], cos, sin, "neox"), len(ins))

    R, Fd = sizes["glu"]
    gu32, dy32 = rnd(R, 2 * Fd), rnd(R, Fd)
    ref_g = copies(xp, (gu32[:, :Fd].copy(), gu32[:, Fd:].copy(), dy32), l2)
    for dt in DTYPES:
        ins = copies(xp, (as_dtype(xp, gu32, dt), as_dtype(xp, dy32, dt)), l2)
        item = ins[0][0].itemsize
        yield ("swiglu fwd [..,2F]", (R, Fd), dt, 3 * R * Fd * item,
               lambda i, ins=ins: kernels.glu_fwd(ins[i][0], None, "silu"),
               lambda i: glu_forward(ref_g[i % len(ref_g)][0], ref_g[i % len(ref_g)][1], "silu"), len(ins))
        yield ("swiglu bwd [..,2F]", (R, Fd), dt, 5 * R * Fd * item,
               lambda i, ins=ins: kernels.glu_bwd(ins[i][1], ins[i][0], None, "silu"),
               lambda i: glu_backward(ref_g[i % len(ref_g)][2], ref_g[i % len(ref_g)][:2] + ("silu",)), len(ins))

    n, V = sizes["kd"]
    s32, t32 = rnd(n, V, scale=4.0), rnd(n, V, scale=4.0)
    targets = xp.asarray(rng.integers(0, V, n))
    kw, cw = xp.full(n, 1.0 / n), xp.full(n, 0.5 / n)
    ref_kd = copies(xp, (s32, t32), l2)
    for kind, passes in (("kl", 2), ("jsd", 3)):
        cfg = LossConfig(kind=kind, alpha=0.5)
        for dt in ("float32", "bfloat16"):
            ins = copies(xp, (as_dtype(xp, s32, dt), as_dtype(xp, t32, dt)), l2)
            yield (f"kd loss {kind}+ce, ds in place", (n, V), dt, (2 * passes + 1) * n * V * ins[0][0].itemsize,
                   lambda i, ins=ins, kind=kind: kernels.kd_loss_rows(ins[i][0], ins[i][1], targets, kw, cw, kind, 1.0,
                                                                      0.5, ds=ins[i][0]),
                   lambda i, cfg=cfg: chunk_loss(*ref_kd[i % len(ref_kd)], targets, kw, cw, cfg),
                   len(ins))

    N, D, V, step = sizes["linear"]
    h, W, tl = rnd(N, D), rnd(V, D, scale=0.05), rnd(N, V, scale=3.0)
    ids = xp.asarray(rng.integers(0, V, (1, N)))
    cfg = LossConfig(alpha=0.2)
    w = token_weights(ids, None, cfg)

    def unfused_linear(i):
        dh, gW = xp.empty_like(h), xp.zeros_like(W)
        kd_sum = ce_sum = 0.0
        for start in range(0, N, step):
            sl = slice(start, min(start + step, N))
            s, cache = linear_forward(h[sl], W)
            kd, ce, ds = chunk_loss(s, tl[sl], w["targets"][sl], w["kd_weight"][sl], w["ce_weight"][sl], cfg)
            dh[sl], dW, _ = linear_backward(ds, cache)
            gW += dW
            kd_sum += masked_sum(kd, w["kd_mask"][sl])
            ce_sum += masked_sum(ce, w["ce_mask"][sl])
        return dh, gW

    yield ("fused linear loss (kl+ce)", (N, D, V), "float32", None,
           lambda i: fused_linear_loss(h, W, tl, cfg, w, chunk_tokens=step), unfused_linear, 1)


def run(tiny: bool, only=None, log=print):
    xp = backend.xp()
    on_gpu = backend.on_gpu() and not tiny
    if on_gpu:
        import cupy as cp

        from kernels.bench import Timer, _device_info, copy_bandwidth

        memory.install()
        meter = memory.MemoryMeter()
        timer = Timer(cp)
        name, l2 = _device_info(cp)
        copy_bw = copy_bandwidth(cp, timer)
    else:
        timer, name, l2, copy_bw, meter = CpuTimer(), "cpu (simulator)", 0, None, None
    log(f"# {name}; copy bandwidth {copy_bw and round(copy_bw, 1)} GB/s (read + write)")
    rows = []
    for op, shape, dt, nbytes, fused, unfused, n_in in cases(xp, TINY if tiny or not on_gpu else FULL, l2):
        if only and not any(op.startswith(o) or o in op for o in only):
            continue
        t_f = timer(fused, n_in)
        t_u = timer(unfused, n_in)
        gbs = nbytes / t_f / 1e9 if (nbytes and on_gpu) else None
        mem_f, mem_u = (extra_bytes(meter, fn) for fn in (fused, unfused)) if meter else (None, None)
        row = dict(op=op, shape=list(shape), dtype=dt, fused_us=t_f * 1e6, unfused_f32_us=t_u * 1e6,
                   speedup=t_u / t_f, GBps=gbs, pct_copy_bw=(100 * gbs / copy_bw) if gbs else None,
                   fused_extra_MB=mem_f and mem_f / 1e6, unfused_extra_MB=mem_u and mem_u / 1e6)
        rows.append(row)
        log(f"{op:28s} {str(tuple(shape)):24s} {dt:9s} fused {t_f * 1e6:10.1f} us  unfused f32 {t_u * 1e6:10.1f} us"
            f"  x{t_u / t_f:6.2f}" + (f"  {gbs:7.1f} GB/s ({100 * gbs / copy_bw:5.1f}% copy)" if gbs else "")
            + (f"  extra MB {mem_f / 1e6:8.1f} vs {mem_u / 1e6:8.1f}" if meter else ""))
    return dict(device=name, copy_GBps=copy_bw, rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (simulator): a smoke run")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--only", help="comma-separated op name prefixes: rmsnorm, rope, swiglu, kd, fused linear")
    a = p.parse_args(argv)
    result = run(a.tiny, only=a.only.split(",") if a.only else None,
                 log=lambda s: print(s, file=sys.stderr if a.json == "-" else sys.stdout))
    if a.json:
        text = json.dumps(result, indent=1)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
