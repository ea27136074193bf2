"""`q4kdistill cache-teacher`: run the teacher once over the data and keep its top-k log-probs per token,
so that `distill --teacher-cache` trains later without the teacher (train/teacher_cache.py)."""
from __future__ import annotations

NAME = "cache-teacher"
HELP = "run the teacher once and store its top-k log-probs per token (for distill --teacher-cache)"


def add_arguments(p):
    p.add_argument("--teacher", required=True, metavar="FILE", help="teacher GGUF (or APR file, or manifest JSON)")
    p.add_argument("--data", required=True, metavar="PATH", help="as distill's --data: text, .jsonl chat data, shards, or 'demo'")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache folder (an interrupted run resumes into it)")
    p.add_argument("--top-k", type=int, default=64, metavar="K", help="teacher ids kept per token (default 64)")
    p.add_argument("--seq", type=int, default=64, metavar="T", help="tokens per sequence, as distill's --seq (default 64)")
    p.add_argument("--batch", type=int, default=4, metavar="B", help="sequences per teacher pass (default 4)")
    p.add_argument("--heldout", type=float, default=0.1, help="share of the data files held out, as distill's (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="the held-out split's seed, as distill's (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the stored log-probs (default 1)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja2 chat template for .jsonl data (default: the GGUF's own)")
    p.add_argument("--teacher-backend", default="auto", help="auto | native | dense | dequant-f32 | dequant-bf16 | dequant-f16")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import json
    import sys

    from ..train.teacher_cache import cache_teacher

    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    summary = cache_teacher(args.teacher, args.data, args.out, top_k=args.top_k, seq=args.seq, batch=args.batch,
                            heldout=args.heldout, seed=args.seed, temperature=args.temperature,
                            chat_template=args.chat_template, teacher_backend=args.teacher_backend,
                            progress=not args.no_progress, log=log)
    if args.json:
        print(json.dumps(summary))
    return 0
