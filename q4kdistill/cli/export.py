"""`q4kdistill export`: a distillation checkpoint -> a GGUF that llama.cpp runs."""
from __future__ import annotations

NAME = "export"
HELP = "write a trained student (a distill checkpoint) as a GGUF file that llama.cpp loads"


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the run directory of `q4kdistill distill` (or its checkpoint.npz)")
    p.add_argument("--out", required=True, metavar="FILE", help="the GGUF to write")
    p.add_argument("--type", default="f16", metavar="TYPE", help="f32 | f16 | q4_k | q6_k (default f16)")
    p.add_argument("--teacher", default=None, metavar="FILE",
                   help="where to read the tokenizer (default: the teacher the run used)")


def run(args) -> int:
    import collections
    import os

    from ..train import checkpoint, export
    from ..train.outputs import output_file

    qtype = export.export_type(args.type)
    output_file(args.out, "--out")
    ck = checkpoint.load_student(args.checkpoint)
    config = ck.student_config
    teacher = export.tokenizer_source(args.teacher or ck.config["distill"]["teacher"], given=bool(args.teacher))
    tokenizer = export.tokenizer_fields(teacher, config.vocab_size)
    types = export.write_student(args.out, config, ck.state["params"], qtype, tokenizer,
                                 name=f"q4kdistill student of {os.path.basename(teacher)} (step {ck.step})")
    counts = collections.Counter(types.values())
    print(f"wrote {args.out}: {config.architecture}, {config.n_layers} blocks, step {ck.step}, "
          f"{os.path.getsize(args.out) / 1e6:.1f} MB ({', '.join(f'{n} {t}' for t, n in counts.most_common())})")
    return 0
