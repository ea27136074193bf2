"""`q4kdistill bench WHAT`: the benchmarks behind the speed claims (docs/claims.md).

    bench kernels [--json PATH] [--csv PATH] [--x16]   every kernel variant vs copy bandwidth and cuBLAS (GPU)
    bench student [--preset qwen2-0.5b] [--batch 8 --seq 512] [--json] [--tiny]
    bench teacher [--manifest M.json] [--batch 8 --seq 512] [--json] [--tiny]
    bench step [--shapes 1x16384 1x32768] [--student-shape qwen2-0.5b] [--json PATH] [--tiny]
                                                        the whole distillation step against torch + transformers

Argument parsing only: the work is in ``kernels.bench`` and ``q4kdistill.bench``. Each target is a
row of TARGETS (name -> help, add_arguments, run); a new benchmark adds a row. ``--tiny`` runs the
student and teacher benchmarks' code at a tiny size on the CPU (what the CPU suite runs).
"""
from __future__ import annotations

NAME = "bench"
HELP = "benchmark the kernels, a student training step, the teacher forward or the whole step against torch"


def _step_arguments(p) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-': stdout)")
    p.add_argument("--shapes", nargs="+", metavar="BxT",
                   help="B x T shapes added to 8x512 2x4096 1x8192 (e.g. 1x16384 1x32768)")
    p.add_argument("--only", action="store_true", help="time only the --shapes given, not the default three")
    add_step_arguments(p)


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
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay our step as a CUDA graph, as distill does, and our teacher forward's trunk (default: on)")
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
    shapes = [] if args.only and args.shapes else list(step.TINY_SHAPES if args.tiny else step.SHAPES)
    shapes += [s for s in step.parse_shapes(args.shapes) if s not in shapes]
    student_shape = args.student_shape or ("tiny" if args.tiny else "qwen2-0.5b")
    bench = step.StepBench(teacher=args.teacher, shapes=tuple(shapes), student_shape=student_shape,
                           cut_layers=args.cut_layers, precision=args.precision, chunk_tokens=args.chunk_tokens,
                           checkpoint=args.checkpoint_activations, cuda_graph=args.cuda_graph, warmup=args.warmup, repeats=args.repeats,
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


def _print_report(args, report: dict, table: str) -> None:
    """The table on stdout; with --json one JSON object on stdout and the table on stderr."""
    import json
    import sys

    print(table, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report))


def _need_gpu_or_tiny(args, what: str) -> None:
    from .. import backend
    from ..errors import Q4KError

    if not args.tiny and not backend.on_gpu():
        raise Q4KError(f"bench {what} at full size needs a CUDA GPU (CuPy); --tiny runs it small on the CPU")


# -- bench kernels -----------------------------------------------------------------------------
def _kernels_arguments(p) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-': stdout)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--qtypes", nargs="+", metavar="TYPE", help="quant types (default: Q4_K Q6_K)")
    p.add_argument("--shapes", nargs="+", metavar="KxN", help="shapes K x N (default: the 7B teacher's five)")
    p.add_argument("--m", nargs="+", type=int, metavar="M", help="activation rows (default: 1 8 16 64 512 4096)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="variants to time (default: all GPU variants)")
    p.add_argument("--x16", action="store_true",
                   help="also time the decode + cuBLAS paths on fp16 activations, as cuBLAS gets them (rows '<name>[x16]')")


def _kernels_run(args) -> int:
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


# -- bench student -----------------------------------------------------------------------------
def _student_arguments(p) -> None:
    p.add_argument("--preset", choices=["qwen2-0.5b", "gemma3-0.5b"], default="qwen2-0.5b",
                   help="student layout and size (default qwen2-0.5b)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; 2 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; 16 with --tiny)")
    p.add_argument("--checkpoint", action="store_true", help="recompute block activations in the backward")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per LM-head/loss chunk (default: auto)")
    p.add_argument("--loss", choices=["kl", "rkl", "jsd"], default="kl")
    p.add_argument("--top-k", type=int, default=None, help="keep only the teacher's k largest logits")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 5; 2 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="the preset's layout at a tiny size (runs on the CPU)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, the table on stderr")


def _student_run(args) -> int:
    from ..bench import student

    _need_gpu_or_tiny(args, "student")
    size = dict(batch=8, seq=512, warmup=2, steps=5) if not args.tiny else student.TINY_SIZE
    pick = lambda key: size[key] if getattr(args, key) is None else getattr(args, key)  # noqa: E731
    report = student.run(args.preset, tiny=args.tiny, batch=pick("batch"), seq=pick("seq"),
                         checkpoint=args.checkpoint, chunk_tokens=args.chunk_tokens, loss=args.loss,
                         top_k=args.top_k, warmup=pick("warmup"), steps=pick("steps"))
    _print_report(args, report, student.table(report))
    return 0


# -- bench teacher -----------------------------------------------------------------------------
def _teacher_arguments(p) -> None:
    p.add_argument("--manifest", metavar="PATH", help="teacher manifest JSON, GGUF or APR file "
                   "(default: the 7B Q4_K_M manifest, random valid blocks)")
    p.add_argument("--batch", type=int, default=None, help="prefill batch (default 8; 2 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="prefill tokens per sequence (default 512; 32 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards, best reported (default 3; 1 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny synthetic teacher (runs on the CPU)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, the table on stderr")


def _teacher_run(args) -> int:
    import sys
    import tempfile

    from ..bench import teacher
    from ..errors import Q4KError

    _need_gpu_or_tiny(args, "teacher")
    if args.tiny and args.manifest:
        raise Q4KError("bench teacher: --tiny writes its own teacher; leave out --manifest")
    size = dict(batch=8, seq=512, repeats=3) if not args.tiny else teacher.TINY_SIZE
    pick = lambda key: size[key] if getattr(args, key) is None else getattr(args, key)  # noqa: E731
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            source = teacher.tiny_teacher_file(tmp)
        else:
            from ..data import MANIFEST_7B

            source = args.manifest or MANIFEST_7B
        report = teacher.run(source, batch=pick("batch"), seq=pick("seq"), repeats=pick("repeats"),
                             peak_seq=pick("seq") if args.tiny else teacher.PEAK_SEQ, log=log)
    _print_report(args, report, teacher.table(report))
    return 0


# name -> (help, add_arguments, run)
TARGETS = {
    "kernels": ("time every kernel variant against the copy bandwidth and cuBLAS fp16 on dequantized "
                "weights (GPU)", _kernels_arguments, _kernels_run),
    "student": ("time one student training step: tokens/s, share of the matmul ceiling, time per op",
                _student_arguments, _student_run),
    "teacher": ("Q4_K-native teacher vs dense fp16 weights: prefill time, resident bytes, forward peak",
                _teacher_arguments, _teacher_run),
    "step": ("the whole distillation step (teacher -> KD loss -> student backward -> AdamW) and the teacher "
             "forward against the same step in torch + transformers, same run", _step_arguments, run_step),
}


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    sub.required = True
    for name, (help_, add, run_) in TARGETS.items():
        q = sub.add_parser(name, help=help_, description=help_)
        add(q)
        q.set_defaults(_bench_run=run_)


def run(args) -> int:
    return args._bench_run(args)
