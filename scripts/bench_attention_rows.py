"""The attention backward's row pass (before its kernel: dO scaled into 16 bits, drow = rowsum(dO O) in [B, H, T],
and the scale itself) as the package runs it (grad_scale: one reduction; kernels/flash_attention_rows.py: one pass)
against the CuPy ops it replaced (seventeenth stop), on the same inputs: CUDA-event medians, outputs compared.

    python3 scripts/bench_attention_rows.py                       # GPU: T = 8192, 14 x 64 and 28 x 128 heads
    python3 scripts/bench_attention_rows.py --T 4096 --heads 14x64
    python3 scripts/bench_attention_rows.py --tiny                # CPU: the simulator's kernel against NumPy, tiny

dO is float32 and O bfloat16, as the bf16 student keeps them. "GB/s" counts the kernel's own bytes (dO and O read,
do16 written) over its time alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from q4kdistill import backend  # noqa: E402


def old_ops(do, o, dtype):
    """The row pass as mma_attention_backward ran it before: seven CuPy kernels for the scale, float32 copies of dO
    and O, their product and row sums, a transpose, a scaling, and the cast (kept here as the baseline)."""
    import cupy

    from kernels.flash_attention_mma import as_f32, to16

    m = cupy.ReductionKernel("float32 x", "float32 y", "fabsf(x)", "max(a, b)", "y = a", "0", "q4k_old_absmax")(
        as_f32(do))
    s = cupy.where(m > 0, cupy.exp2(-cupy.floor(cupy.log2(cupy.maximum(m, np.float32(1e-38))))),
                   np.float32(1)).astype(np.float32).reshape(1)
    drow = cupy.ascontiguousarray((as_f32(do) * as_f32(o)).sum(axis=-1).transpose(0, 2, 1))
    drow *= s
    return to16(do, dtype, s), drow


def new_ops(do, o, dtype):
    from kernels.flash_attention_mma import grad_scale
    from kernels.flash_attention_rows import backward_rows

    return backward_rows(do, o, grad_scale(do), dtype)


def gpu_us(fn):
    """CUDA-event median in microseconds (bench_attention's timer: 5 warm-up calls, 30 timed)."""
    from bench_attention import gpu_timer

    return 1e3 * gpu_timer(fn, 5, 30)


def run_gpu(args):
    import cupy

    from kernels.flash_attention_rows import backward_rows
    from q4kdistill.student.precision import Precision

    bf16 = Precision("bf16", cupy).device_bf16
    print(f"{backend.gpu_name()}: the row pass at T = {args.T} (us, CUDA-event medians)")
    print(f"{'heads':>7} {'old us':>8} {'new us':>8} {'speed-up':>8} {'kernel us':>9} {'GB/s':>7}  check")
    for spec in args.heads:
        H, D = (int(x) for x in spec.split("x"))
        rng = cupy.random.default_rng(H * D)
        do = rng.standard_normal((1, args.T, H, D), dtype=np.float32) * 1e-3
        o = rng.standard_normal((1, args.T, H, D), dtype=np.float32).astype(bf16)
        (a16, arow), (b16, brow) = old_ops(do, o, "bf16"), new_ops(do, o, "bf16")
        same = bool((a16 == b16).all())
        err = float(cupy.abs(arow - brow).max() / cupy.abs(arow).max())
        t_old, t_new = gpu_us(lambda: old_ops(do, o, "bf16")), gpu_us(lambda: new_ops(do, o, "bf16"))
        one = cupy.ones(1, np.float32)
        t_kernel = gpu_us(lambda: backward_rows(do, o, one, "bf16"))
        gb = (do.nbytes + o.nbytes + do.size * 2) / 1e9
        print(f"{spec:>7} {t_old:8.1f} {t_new:8.1f} {t_old / t_new:7.2f}x {t_kernel:9.1f} {gb / t_kernel * 1e6:7.0f}  "
              f"do16 {'bit-equal' if same else 'DIFFERS'}, drow rel diff {err:.1e}")
        if not same or err > 1e-5:
            return 1
    return 0


def run_tiny():
    """The simulator's kernel on a tiny case against NumPy (float64 sums): the command's CPU form."""
    from kernels.flash_attention_rows import backward_rows

    rng = np.random.default_rng(0)
    do = rng.standard_normal((1, 3, 2, 40)).astype(np.float32)
    o = rng.standard_normal((1, 3, 2, 40)).astype(np.float32)
    s = np.array([0.5], np.float32)
    bits, drow = backward_rows(do, o, s, "fp16")
    want = ((do * s[0]).astype(np.float64) * o).sum(axis=-1).transpose(0, 2, 1)
    ok = (bits == (do * s[0]).astype(np.float16).view(np.uint16)).all() and np.abs(drow - want).max() < 1e-5
    print(f"simulator, [1, 3, 2, 40]: do16 {'bit-equal' if ok else 'DIFFERS'}, drow max diff "
          f"{np.abs(drow - want).max():.1e}")
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--heads", nargs="+", default=["14x64", "28x128"], help="HxD per row (default: 14x64 28x128)")
    p.add_argument("--tiny", action="store_true", help="CPU: the simulator's kernel against NumPy at a tiny size")
    args = p.parse_args(argv)
    if args.tiny:
        return run_tiny()
    if not backend.on_gpu():
        print("error: bench_attention_rows.py times CUDA kernels (use --tiny here)", file=sys.stderr)
        return 2
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
