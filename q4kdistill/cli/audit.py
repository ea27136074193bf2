"""`q4kdistill audit`: KL(reference || teacher) per token, top-1 agreement and both perplexities on your
data (teacher/audit.py): is a quantized teacher good enough to distil from?"""
from __future__ import annotations

NAME = "audit"
HELP = "compare a (quantized) teacher with a reference model on your data: KL, top-1 agreement, perplexities"


def add_arguments(p):
    p.add_argument("--teacher", required=True, metavar="A.gguf", help="the teacher to audit (e.g. Q4_K_M)")
    p.add_argument("--reference", required=True, metavar="B.gguf", help="the reference (e.g. F16 or Q8_0 of the same model)")
    p.add_argument("--data", required=True, metavar="PATH", help="as distill's --data: text, .jsonl chat data, shards, or 'demo'")
    p.add_argument("--seq", type=int, default=128, metavar="T", help="tokens per sequence (default 128)")
    p.add_argument("--batch", type=int, default=4, metavar="B", help="sequences per pass (default 4)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="audit at most N tokens (whole sequences)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja2 chat template for .jsonl data (default: the GGUF's own)")
    p.add_argument("--teacher-backend", default="auto", help="auto | native | dense | dequant-f32 | dequant-bf16 | dequant-f16")
    p.add_argument("--json", action="store_true",
                   help="print JSON: tokens, kl_mean, kl_median, kl_p99, kl_max, top1_agreement, ppl_teacher, ppl_reference")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import json
    import sys

    from ..teacher.audit import audit, report_text

    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    report = audit(args.teacher, args.reference, args.data, seq=args.seq, batch=args.batch, max_tokens=args.max_tokens,
                   chat_template=args.chat_template, teacher_backend=args.teacher_backend,
                   progress=not args.no_progress, log=log)
    print(json.dumps(report) if args.json else report_text(report))
    return 0
