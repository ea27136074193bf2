"""`q4kdistill bench kernels [--json PATH] [--csv PATH]`: time every kernel variant on this GPU.

Prints the table of kernels/bench.py (time, GB/s on quantized bytes, % of the copy bandwidth
measured in the same run, TFLOP/s, speed vs cuBLAS fp16 on pre-dequantized weights).
"""
from __future__ import annotations

NAME = "bench"
HELP = "benchmark the quantized matmul kernels against the copy bandwidth and cuBLAS fp16 (GPU)"


def add_arguments(p) -> None:
    p.add_argument("what", choices=["kernels"], help="what to benchmark")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-': stdout)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--qtypes", nargs="+", metavar="TYPE", help="quant types (default: Q4_K Q6_K)")
    p.add_argument("--shapes", nargs="+", metavar="KxN", help="shapes K x N (default: the 7B teacher's five)")
    p.add_argument("--m", nargs="+", type=int, metavar="M", help="activation rows (default: 1 8 16 64 512 4096)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="variants to time (default: all GPU variants)")
    p.add_argument("--x16", action="store_true",
                   help="also time the decode + cuBLAS paths on fp16 activations, as cuBLAS gets them (rows '<name>[x16]')")


def parse_shapes(items):
    from ..errors import Q4KError

    shapes = []
    for s in items or []:
        try:
            k, n = s.lower().split("x")
            shapes.append((int(k), int(n)))
        except ValueError:
            raise Q4KError(f"--shapes: expected KxN like 3584x18944, got {s!r}") from None
    return shapes or None


def run(args) -> int:
    import json
    import sys

    from .. import backend
    from ..errors import Q4KError

    if not backend.on_gpu():
        raise Q4KError("bench kernels needs a CUDA GPU (CuPy); on the CPU run the tests instead")
    from kernels import bench

    rows = bench.run(shapes=parse_shapes(args.shapes), ms=args.m, variants=args.variants,
                     qtypes=args.qtypes, log=lambda s: print(s, file=sys.stderr), also_x16=args.x16)
    bench.print_table(rows)
    if args.json == "-":
        print(json.dumps(rows, indent=1))
    elif args.json:
        bench.write_json(rows, args.json)
    if args.csv:
        bench.write_csv(rows, args.csv)
    return 0
