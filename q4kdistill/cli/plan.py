"""`q4kdistill plan`: will a run fit? GPU bytes predicted from the teacher's header alone."""
from __future__ import annotations

NAME = "plan"
HELP = "predict the GPU memory of a teacher forward and a distillation step from the file header"


def add_student_arguments(p, checkpoint: bool) -> None:
    """--student / --student-params / --chunk-tokens / --checkpoint-activations (shared with
    reproduce-memory; ``checkpoint`` is the default)."""
    import argparse

    from ..train.loop import DistillConfig

    p.add_argument("--student", metavar="SPEC", default=None,
                   help="'layers=0,9,18,27' (teacher blocks, as distill's --student-layers: 'layers=5' is the one "
                        "block 5), 'n_layers=4' (that many blocks of the teacher's widths; the default), or "
                        "'d_model=896,n_layers=24,d_ff=4864,n_heads=14,n_kv_heads=2[,tied=1]'")
    p.add_argument("--student-shape", metavar="SHAPE", default=None,
                   help="a fresh student, as distill's --student-shape: a preset (qwen2-0.5b, qwen2-1.5b, qwen2-3b, "
                        "tiny) and/or widths such as layers=24,d_model=896,heads=14,kv_heads=2,head_dim=64,d_ff=4864")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the student's precision (distill's --precision); auto: bf16 on a GPU, fp32 on the CPU "
                        "(plan: bf16, what a GPU run gets)")
    p.add_argument("--student-params", type=float, metavar="N", default=None,
                   help="a qwen2-like student of about N parameters with the teacher's vocabulary (e.g. 0.5e9)")
    p.add_argument("--chunk-tokens", type=int, default=DistillConfig.chunk_tokens, metavar="C",
                   help="tokens per [C, vocab] logits chunk of the LM head and loss (default: distill's, %(default)s)")
    p.add_argument("--checkpoint-activations", dest="checkpoint", action=argparse.BooleanOptionalAction,
                   default=checkpoint, help="recompute each block's activations in the backward instead of "
                                            "keeping them (default: %(default)s)")


def student_spec(args):
    """The student spec (string or dict) from --student / --student-shape / --student-params."""
    from ..errors import Q4KError
    from ..student.spec import parse_student_shape

    given = [f for f, v in (("--student", args.student), ("--student-shape", args.student_shape),
                            ("--student-params", args.student_params)) if v]
    if len(given) > 1:
        raise Q4KError(f"give one of {', '.join(given)}")
    if args.student_shape:
        return parse_student_shape(args.student_shape)
    return f"params={args.student_params}" if args.student_params else (args.student or "n_layers=4")


def add_arguments(p) -> None:
    p.add_argument("--teacher", required=True, metavar="FILE|MANIFEST",
                   help="teacher GGUF (a truncated one is fine: only the header is read), APR, or manifest JSON")
    p.add_argument("--batch", type=int, default=None, metavar="B", help="sequences per step (default 1; with --fit: searched)")
    p.add_argument("--seq", type=int, default=512, metavar="T")
    p.add_argument("--teacher-backend", default="native", choices=("native", "dequant-f32", "dequant-bf16"))
    add_student_arguments(p, checkpoint=False)         # distill's defaults
    p.set_defaults(chunk_tokens=None, checkpoint=None)  # None = not given (--fit searches what is not given)
    p.add_argument("--fit", metavar="BUDGET", help="find the most tokens per step whose predicted peak fits this "
                   "GPU memory (24GB, 24GiB, 2.5e10); batch, chunk and checkpointing not given are searched")
    p.add_argument("--margin", type=float, default=None, metavar="M",
                   help="with --fit: safety margin over the predicted peak (default 0.10, the planner's tolerance)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="data parallelism over N GPUs (distill --gpus): --batch is the global batch; the bytes are "
                        "one GPU's (the whole teacher, a student replica, batch / N sequences' activations)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args) -> int:
    import json

    from ..errors import Q4KError
    from ..memory import planner
    from ..train.loop import DistillConfig
    from ..train.options import typed_value

    for name in ("batch", "seq", "chunk_tokens"):
        if getattr(args, name) is not None:
            typed_value(name, getattr(args, name), "plan", from_text=True)
    if args.gpus < 1:
        raise Q4KError(f"--gpus {args.gpus}: give 1 or more")
    if args.fit:
        if args.gpus != 1:
            raise Q4KError("--fit searches one GPU's settings: give --fit without --gpus, then multiply the batch")
        return _run_fit(args)
    # a plan is for a GPU: auto is bf16, the fused ops, an untied embedding's grad as rows on one GPU, cuBLAS's workspace
    precision = "fp32" if args.precision == "fp32" else "bf16"
    plan = planner.make_plan(args.teacher, args.batch or 1, args.seq, student_spec(args),
                             chunk_tokens=args.chunk_tokens or DistillConfig.chunk_tokens,
                             checkpoint=bool(args.checkpoint), teacher_backend=args.teacher_backend,
                             precision=precision, gpus=args.gpus, fused_ops=True,
                             sparse_embedding_grad=precision == "bf16" and args.gpus == 1, gpu=True)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
        return 0
    s = plan.student["config"]
    print(f"teacher {plan.teacher['source']} ({plan.teacher['architecture']}, {plan.teacher['tensor_count']} tensors, "
          f"{plan.teacher['total_tensor_bytes']:,} bytes)")
    print(f"student {plan.student['n_params']:,} params ({precision}): d_model {s['d_model']}, {s['n_layers']} layers, "
          f"d_ff {s['d_ff']}, {s['n_heads']}/{s['n_kv_heads']} heads")
    per_gpu = "" if plan.gpus == 1 else f"per GPU of {plan.gpus} (global batch {plan.batch * plan.gpus}): "
    print(f"{per_gpu}batch {plan.batch} x seq {plan.seq}, chunk {plan.chunk_tokens} tokens, "
          f"checkpointing {'on' if plan.checkpoint else 'off'}\n")
    print(plan.table())
    return 0


def _run_fit(args) -> int:
    import json

    from ..memory import fit

    given = {"batch": args.batch, "chunk_tokens": args.chunk_tokens, "checkpoint_activations": args.checkpoint}
    choice = fit.fit(args.teacher, fit.parse_bytes(args.fit), seq=args.seq, student=student_spec(args),
                     teacher_backend=args.teacher_backend, margin=fit.MARGIN if args.margin is None else args.margin,
                     fixed={k: v for k, v in given.items() if v is not None})
    if args.json:
        print(json.dumps(choice.to_json(), indent=1))
    else:
        print(choice.line())
    return 0
