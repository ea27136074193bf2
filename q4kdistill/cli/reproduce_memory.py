"""`q4kdistill reproduce-memory`: measure the memory claims on this GPU, next to the planner
(the experiment itself: ``q4kdistill.memory.reproduce``).

"""
from __future__ import annotations

NAME = "reproduce-memory"
HELP = "measure GPU memory of native vs dequantized teachers and a distillation step, against the planner"



def add_arguments(p) -> None:
    from .plan import add_student_arguments

    src = p.add_mutually_exclusive_group()
    src.add_argument("--manifest", metavar="PATH", help="teacher manifest JSON (default: the real 7B Q4_K_M manifest)")
    src.add_argument("--teacher", metavar="FILE", help="teacher GGUF or APR file")
    src.add_argument("--tiny", action="store_true", help="a tiny synthetic teacher and student (runs on the CPU)")
    p.add_argument("--batch", type=int, metavar="B", help="teacher forward batch (default 1)")
    p.add_argument("--seq", type=int, metavar="T", help="tokens per sequence (default 512)")
    p.add_argument("--step-batch", type=int, metavar="B", help="distillation step batch (default 8)")
    p.add_argument("--long-step", metavar="BxT", help="also a distillation step at this shape, e.g. 1x8192 "
                   "(the long-context step's rows, named with it)")
    add_student_arguments(p, checkpoint=True)
    p.set_defaults(precision="fp32")     # the claims' configuration; --precision bf16 measures the mixed-precision step
    p.add_argument("--backends", default="native,dequant-f32,dequant-bf16",
                   help="teacher backends to measure, comma-separated (the step runs with native)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (progress goes to stderr)")
    p.add_argument("--plot", metavar="OUT.png", help="bar chart of predicted vs measured (needs matplotlib)")


def run(args) -> int:
    import json
    import sys

    from ..errors import Q4KError
    from ..memory.reproduce import DEFAULTS, TINY, format_report, plot, reproduce
    from .plan import student_spec

    from ..train.options import typed_value

    for flag, rule in (("batch", "batch"), ("seq", "seq"), ("step_batch", "batch"), ("chunk_tokens", "chunk_tokens")):
        if getattr(args, flag, None) is not None:
            typed_value(rule, getattr(args, flag), "reproduce-memory --" + flag.replace("_", "-"))
    preset = TINY if args.tiny else DEFAULTS
    if args.student or args.student_params or args.student_shape:
        preset = dict(preset, student=student_spec(args))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {"native", "dequant-f32", "dequant-bf16"})
    if unknown or not backends:
        raise Q4KError(f"--backends {args.backends!r}: choose from native, dequant-f32, dequant-bf16")
    long_step = None
    if args.long_step:
        from ..bench.step import parse_shapes

        long_step = parse_shapes([args.long_step], "--long-step")[0]
        typed_value("batch", long_step[0], "reproduce-memory --long-step")
        typed_value("seq", long_step[1], "reproduce-memory --long-step")
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    report = reproduce(_source(args), batch=args.batch or preset["batch"], seq=args.seq or preset["seq"],
                       step_batch=args.step_batch or preset["step_batch"], student=preset["student"],
                       chunk_tokens=args.chunk_tokens, checkpoint=args.checkpoint, backends=backends, log=log,
                       precision=args.precision, long_step=long_step)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    if args.plot:
        plot(report, args.plot, log)
    return 1 if any(r["status"] == "error" for r in report["rows"]) else 0


def _source(args):
    if args.tiny:
        from ..memory.reproduce import tiny_manifest

        return tiny_manifest()
    if args.teacher:
        return args.teacher
    from ..data import MANIFEST_7B

    return args.manifest or MANIFEST_7B
