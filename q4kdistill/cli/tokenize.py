"""`q4kdistill tokenize --teacher FILE "text"`: the ids the teacher's own tokenizer gives (as llama.cpp);
`--chat FILE.json`: one conversation rendered with the chat template, and which ids are trained."""
from __future__ import annotations

NAME = "tokenize"
HELP = "tokenise text (or a chat record, --chat) with the teacher GGUF's own tokenizer (the ids llama.cpp gives)"


def add_arguments(p):
    p.add_argument("text", nargs="?", help="the text to tokenise")
    p.add_argument("--teacher", required=True, metavar="FILE", help="teacher GGUF file (its tokenizer.ggml.* metadata)")
    p.add_argument("--json", action="store_true", help='print {"ids": [...]} only ({"ids", "trained", "text"} with --chat)')
    p.add_argument("--no-bos", action="store_true", help="no BOS even where the file's add_bos_token asks for one")
    p.add_argument("--special", action="store_true",
                   help="parse control-token texts such as <start_of_turn> as those tokens")
    p.add_argument("--chat", metavar="FILE.json",
                   help='one record {"prompt", "completion"} or {"messages": [...]}: render it with the chat template')
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja2 chat template for a GGUF that has none (default: its tokenizer.chat_template)")


def run(args) -> int:
    import json

    from ..errors import Q4KError
    from ..formats.tokenizer import Tokenizer

    if (args.text is None) == (args.chat is None):
        raise Q4KError("give either the text to tokenise or --chat FILE.json")
    tok = Tokenizer.from_gguf(args.teacher)
    if args.chat:
        return _run_chat(args, tok)
    ids = tok.encode(args.text, add_bos=False if args.no_bos else None, parse_special=args.special)
    if args.json:
        print(json.dumps({"ids": ids}))
        return 0
    print(f"{len(ids)} tokens ({tok.model} tokenizer, vocabulary {tok.vocab_size})")
    for i in ids:
        print(f"{i:>8}  {tok.tokens[i]!r}")
    print("ids:", " ".join(map(str, ids)))
    return 0


def _run_chat(args, tok) -> int:
    import json

    from ..train.chat import encode_conversation, load_template, read_conversation

    messages = read_conversation(args.chat)
    template = load_template(args.teacher, tok, args.chat_template)
    ids, trained, text = encode_conversation(tok, template, messages, where=args.chat)
    if args.json:
        print(json.dumps({"ids": ids.tolist(), "trained": trained.tolist(), "text": text}))
        return 0
    print(f"{len(ids)} tokens, {int(trained.sum())} trained (assistant turns), {template.name}")
    for i, t in zip(ids.tolist(), trained.tolist()):
        print(f"{i:>8} {'T' if t else ' '} {tok.tokens[i]!r}")
    return 0
