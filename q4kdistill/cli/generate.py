"""`q4kdistill generate`: greedy continuation of token ids by the teacher (a quick look)."""
from __future__ import annotations

from .logits import add_teacher_arguments, load_teacher, parse_tokens

NAME = "generate"
HELP = "greedy-decode N tokens after the given token ids with the teacher"
MAX_NEW = 1 << 16


def add_arguments(p) -> None:
    add_teacher_arguments(p)
    p.add_argument("-n", type=int, default=20, metavar="N", help="tokens to generate (default 20)")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "new_ids": [...], "text": ...} as JSON')


def greedy(teacher, ids: list, n: int, eos=None) -> list:
    """The n (or fewer, stopping after ``eos``) ids the teacher picks, each by argmax."""
    import numpy as np

    from ..backend import to_host
    from ..finite import check_finite

    out = list(ids)
    for _ in range(n):
        fn = teacher.logits_fn(np.asarray([out], dtype=np.int64), spans=False)
        last = check_finite(to_host(fn(len(out) - 1, len(out))), "the teacher's logits", len(out) - 1, len(out))
        nxt = int(last[0].argmax())                                   # last position only
        out.append(nxt)
        if nxt == eos:
            break
    return out[len(ids):]


def _detokenizer(path):
    """Token ids -> text with the file's own tokenizer, or None (APR, manifests, no tokenizer)."""
    from ..errors import Q4KError
    from ..formats.tokenizer import Tokenizer

    try:
        return Tokenizer.from_gguf(path).decode
    except (Q4KError, OSError, ValueError):
        return None


def run(args) -> int:
    import json
    import sys

    from ..errors import Q4KError

    if not 0 <= args.n <= MAX_NEW:
        raise Q4KError(f"-n must be >= 0 and <= {MAX_NEW}, got {args.n}")
    ids = parse_tokens(args.tokens)
    teacher = load_teacher(args, log=lambda line: print(line, file=sys.stderr))
    new = greedy(teacher, ids, args.n, eos=teacher.config.eos_token_id)
    decode = _detokenizer(args.teacher) if str(args.teacher).endswith(".gguf") else None
    text = decode(new) if decode else None
    if args.json:
        print(json.dumps({"ids": ids + new, "new_ids": new, "text": text}))
        return 0
    print("new ids:", ",".join(map(str, new)))
    if text is not None:
        print("text:", text)
    return 0
