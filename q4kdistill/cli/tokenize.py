"""`q4kdistill tokenize --teacher FILE "text"`: the ids the teacher's own tokenizer gives (as llama.cpp)."""
from __future__ import annotations

NAME = "tokenize"
HELP = "tokenise text with the teacher GGUF's own tokenizer (the ids llama.cpp gives)"


def add_arguments(p):
    p.add_argument("text", help="the text to tokenise")
    p.add_argument("--teacher", required=True, metavar="FILE", help="teacher GGUF file (its tokenizer.ggml.* metadata)")
    p.add_argument("--json", action="store_true", help='print {"ids": [...]} only')
    p.add_argument("--no-bos", action="store_true", help="no BOS even where the file's add_bos_token asks for one")
    p.add_argument("--special", action="store_true",
                   help="parse control-token texts such as <start_of_turn> as those tokens")


def run(args) -> int:
    import json

    from ..formats.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(args.teacher)
    ids = tok.encode(args.text, add_bos=False if args.no_bos else None, parse_special=args.special)
    if args.json:
        print(json.dumps({"ids": ids}))
        return 0
    print(f"{len(ids)} tokens ({tok.model} tokenizer, vocabulary {tok.vocab_size})")
    for i in ids:
        print(f"{i:>8}  {tok.tokens[i]!r}")
    print("ids:", " ".join(map(str, ids)))
    return 0
