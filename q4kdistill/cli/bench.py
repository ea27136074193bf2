"""`q4kdistill bench kernels [--json PATH] [--csv PATH]`: time every kernel variant on this GPU.
`q4kdistill bench step [--tiny] [--shapes 1x16384] [--json PATH]`: the whole distillation step
against torch + transformers (q4kdistill.bench.step).

Prints the table of kernels/bench.py (time, GB/s on quantized bytes, % of the copy bandwidth
measured in the same run, TFLOP/s, speed vs cuBLAS fp16 on pre-dequantized weights).
"""
from __future__ import annotations

NAME = "bench"
HELP = "benchmark the quantized matmul kernels against the copy bandwidth and cuBLAS fp16 (GPU)"


def add_arguments(p) -> None:
    p.add_argument("what", choices=["kernels", "step"], help="what to benchmark (step: the whole distillation "
                   "step and the teacher forward against torch + transformers, same run)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-': stdout)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--qtypes", nargs="+", metavar="TYPE", help="quant types (default: Q4_K Q6_K)")
    p.add_argument("--shapes", nargs="+", metavar="KxN", help="kernels: shapes K x N (default: the 7B teacher's five); "
                   "step: B x T shapes added to 8x512 2x4096 1x8192 (e.g. 1x16384 1x32768)")
    p.add_argument("--m", nargs="+", type=int, metavar="M", help="activation rows (default: 1 8 16 64 512 4096)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="variants to time (default: all GPU variants)")
    add_step_arguments(p)
    p.add_argument("--x16", action="store_true",
                   help="also time the decode + cuBLAS paths on fp16 activations, as cuBLAS gets them (rows '<name>[x16]')")


def add_step_arguments(p) -> None:
    """Options of `bench step` only (q4kdistill.bench.step)."""
    import argparse

    g = p.add_argument_group("bench step")
    g.add_argument("--teacher", metavar="FILE|MANIFEST", help="teacher (default: the 7B Q4_K_M manifest, random blocks)")
    g.add_argument("--student-shape", default=None, metavar="SHAPE",
                   help="student (a), as distill's --student-shape (default qwen2-0.5b; tiny with --tiny)")
    g.add_argument("--cut-layers", type=int, default=2, metavar="N", help="student (b): N teacher blocks (default %(default)s)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="our student's (auto: bf16 on a GPU)")
    g.add_argument("--chunk-tokens", type=int, default=256, metavar="C", help="our LM head + loss chunk (default %(default)s)")
    g.add_argument("--checkpoint-activations", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
    g.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported (default %(default)s)")
    g.add_argument("--no-peer", action="store_true", help="time ours only")
    g.add_argument("--tiny", action="store_true", help="a tiny synthetic teacher on the CPU (what the tests run)")


def run_step(args) -> int:
    import json
    import sys

    from .. import backend
    from ..bench import step
    from ..errors import Q4KError

    if not args.tiny and not backend.on_gpu():
        raise Q4KError("bench step needs a CUDA GPU (CuPy); on the CPU run `bench step --tiny`")
    if min(args.warmup, args.repeats - 1, args.cut_layers - 1, args.chunk_tokens - 1) < 0:
        raise Q4KError("--repeats, --cut-layers and --chunk-tokens must be >= 1, --warmup >= 0")
    shapes = list(step.TINY_SHAPES if args.tiny else step.SHAPES)
    shapes += [s for s in step.parse_shapes(args.shapes) if s not in shapes]
    student_shape = args.student_shape or ("tiny" if args.tiny else "qwen2-0.5b")
    bench = step.StepBench(teacher=args.teacher, shapes=tuple(shapes), student_shape=student_shape,
                           cut_layers=args.cut_layers, precision=args.precision, chunk_tokens=args.chunk_tokens,
                           checkpoint=args.checkpoint_activations, warmup=args.warmup, repeats=args.repeats,
                           peer=not args.no_peer, tiny=args.tiny)
    report = step.run(bench, log=lambda line: print(line, file=sys.stderr))
    print(step.format_table(report), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(report, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


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

    if args.what == "step":
        return run_step(args)
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
