"""`q4kdistill logits`: the teacher's logits at every position of a list of token ids."""
from __future__ import annotations

NAME = "logits"
HELP = "run the teacher on token ids and show (or save) the logits of every position"
TOP = 5
MAX_TOKENS = 1 << 16


def add_teacher_arguments(p) -> None:
    """--teacher / --tokens / --backend (shared with `generate`)."""
    p.add_argument("--teacher", required=True, metavar="FILE", help="teacher GGUF, APR or manifest JSON")
    p.add_argument("--tokens", required=True, metavar="IDS", help="comma-separated token ids, e.g. 2,818,3823")
    p.add_argument("--backend", default="auto", help="teacher backend: auto (default), native, dense, "
                                                     "dequant-f32, dequant-bf16, dequant-f16")


def add_arguments(p) -> None:
    add_teacher_arguments(p)
    p.add_argument("--out", metavar="FILE.npy", help="write the logits as float32 [T, vocab] (NumPy .npy format, "
                                                     "to exactly this path)")
    p.add_argument("--json", action="store_true", help=f"print every position's top-{TOP} ids and logits as JSON")


def parse_tokens(text: str) -> list:
    """"2,818,3823" -> [2, 818, 3823]; Q4KError for anything else (ids must be 0 <= id < 2^31;
    the teacher then checks them against its vocabulary)."""
    from ..errors import Q4KError

    parts = [part for part in text.replace(" ", "").split(",") if part]
    shown = text if len(text) <= 40 else text[:37] + "..."
    if len(parts) > MAX_TOKENS:
        raise Q4KError(f"--tokens: {len(parts)} ids, at most {MAX_TOKENS} are taken")
    try:
        ids = [int(part) for part in parts if len(part) <= 12]
    except ValueError:
        raise Q4KError(f"--tokens {shown!r}: expected comma-separated integer token ids, e.g. 2,818,3823") from None
    if len(ids) < len(parts) or any(not 0 <= i < 2 ** 31 for i in ids):
        raise Q4KError(f"--tokens {shown!r}: token ids are integers from 0 to {2 ** 31 - 1}")
    if not ids:
        raise Q4KError("--tokens: give at least one token id")
    return ids


def load_teacher(args, log):
    from ..teacher.model import Teacher

    return Teacher.load(args.teacher, backend=args.backend, log=log)


def top_k(row, k: int):
    """float32 [V] (NumPy) -> (ids, logits), the k largest, largest first."""
    import numpy as np

    idx = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(row.shape[0])
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return idx, row[idx]


def run(args) -> int:
    import json
    import sys

    import numpy as np

    from ..backend import to_host
    from ..finite import check_finite
    from ..train.outputs import atomic_write, output_file

    ids = parse_tokens(args.tokens)
    if args.out:
        output_file(args.out, "--out")
    teacher = load_teacher(args, log=lambda line: print(line, file=sys.stderr))
    logits = to_host(teacher.logits_for_batch(np.asarray([ids], dtype=np.int64)))[0]   # [T, V]
    check_finite(logits, "the teacher's logits", 0, len(ids))
    if args.out:                       # a file object: np.save adds no ".npy" to a name without it
        atomic_write(args.out, lambda f: np.save(f, logits.astype(np.float32, copy=False)))
    k = min(TOP, logits.shape[1])
    rows = []
    for pos, (tid, row) in enumerate(zip(ids, logits)):
        top_ids, top_logits = top_k(row, k)
        rows.append({"position": pos, "token": tid, "top_ids": top_ids.tolist(),
                     "top_logits": [round(float(v), 5) for v in top_logits]})
    if args.json:
        print(json.dumps({"teacher": args.teacher, "vocab_size": teacher.vocab_size, "positions": rows}))
        return 0
    print(f"{'pos':>4} {'token':>8}  top-{k} next-token ids (logit)")
    for r in rows:
        best = "  ".join(f"{i} ({v:.3f})" for i, v in zip(r["top_ids"], r["top_logits"]))
        print(f"{r['position']:>4} {r['token']:>8}  {best}")
    if args.out:
        print(f"wrote {args.out}: float32 {list(logits.shape)}")
    return 0
