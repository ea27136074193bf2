"""Instruction data: JSONL conversations -> the teacher's chat template -> ids + a "trained" mask.

A JSONL file holds one record per line, either
    {"prompt": "...", "completion": "..."}            (= one user turn and one assistant turn)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Rendering: the template is Jinja2, as transformers' ``apply_chat_template`` runs it: a sandboxed
environment (``ImmutableSandboxedEnvironment``, trim_blocks, lstrip_blocks), ``raise_exception``
and ``strftime_now`` globals, ``tojson``, and the context ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``. The template comes from the GGUF's ``tokenizer.chat_template`` or a
file (``--chat-template``; ``q4kdistill/data/gemma_chat_template.jinja`` for a Gemma base model).

Which tokens are trained (the response spans), by rendering prefixes and diffing:
    for each assistant message i:
        P = render(messages[:i], add_generation_prompt=True)    # everything up to "<start_of_turn>model\n"
        F = render(messages[:i + 1])                            # ... plus the assistant turn
        the response is the text F[len(P):]: its content and the template's end-of-turn marker
    the whole text is render(messages); every P and F must be a prefix of it (true of templates
    that render a conversation turn by turn; one that rewrites earlier turns is refused).
Tokenizing: the text is cut at the response boundaries and each piece is tokenised on its own
(control tokens such as <start_of_turn> parsed), ids concatenated. That is what the model sees at
inference: the prompt up to the generation prompt is tokenised alone and the response follows it.
``trained[j] = 1`` for the ids of response pieces: the loss is on predicting those ids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Q4KError

CHAT_EXTENSIONS = (".jsonl",)
ROLES = ("system", "user", "assistant")
GEMMA_TEMPLATE = Path(__file__).resolve().parent.parent / "data" / "gemma_chat_template.jinja"


# -- records ---------------------------------------------------------------------------------------

def record_messages(record, where: str) -> list:
    """One JSON record -> [{"role", "content"}, ...]; ``where`` ("file:line") names it in errors."""
    if not isinstance(record, dict):
        raise Q4KError(f"{where}: expected a JSON object with 'messages' or 'prompt' and 'completion'")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise Q4KError(f"{where}: a record needs 'messages' or both 'prompt' and 'completion' "
                       f"(it has {', '.join(map(repr, record)) or 'no keys'})")
    if not isinstance(messages, list) or not messages:
        raise Q4KError(f"{where}: 'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise Q4KError(f"{where}: message {j} must be {{\"role\": one of {', '.join(ROLES)}, "
                           f"\"content\": text}}, got {json.dumps(m)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise Q4KError(f"{where}: no assistant message, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path) -> list:
    """A JSONL file -> [(line number, messages), ...] per non-blank line; a bad line names the file and line."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise Q4KError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise Q4KError(f"{path}:{n}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        out.append((n, record_messages(record, f"{path}:{n}")))
    if not out:
        raise Q4KError(f"{path}: no records (one JSON object per line)")
    return out


def read_conversation(path) -> list:
    """A .json file holding one record (for ``q4kdistill tokenize --chat``) -> its messages."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise Q4KError(f"{path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise Q4KError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return record_messages(record, str(path))


# -- the template ----------------------------------------------------------------------------------

@dataclass
class ChatTemplate:
    """A compiled chat template and the special-token texts it is rendered with."""
    source: str
    bos_token: str = ""
    eos_token: str = ""
    name: str = "chat template"

    def __post_init__(self):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def strftime_now(fmt):
            import datetime

            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self._template = env.from_string(self.source)
        except jinja2.exceptions.TemplateError as exc:
            raise Q4KError(f"{self.name}: not a valid Jinja2 template ({exc})") from None

    @property
    def key(self) -> str:
        """What decides the rendering (for caches of tokenised data)."""
        import hashlib

        return hashlib.sha256(f"{self.source}\0{self.bos_token}\0{self.eos_token}".encode()).hexdigest()[:16]

    def render(self, messages, add_generation_prompt=False, where="") -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise Q4KError(f"{where + ': ' if where else ''}the {self.name} failed to render: "
                           f"{type(exc).__name__}: {exc}") from None

    @classmethod
    def for_teacher(cls, tokenizer, metadata: dict, template_file=None, teacher_name="the teacher"):
        """The template of ``template_file`` if given, else the GGUF's tokenizer.chat_template;
        None where neither exists (plain-text data needs none)."""
        bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
        eos = tokenizer.tokens[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
        if template_file:
            try:
                source = Path(template_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise Q4KError(f"{template_file}: cannot read the chat template ({exc.strerror})") from None
            return cls(source, bos, eos, name=f"chat template {template_file}")
        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            return None
        return cls(source, bos, eos, name=f"chat template of {teacher_name}")


def missing_template_error(teacher_name) -> Q4KError:
    return Q4KError(f"{teacher_name} carries no tokenizer.chat_template (a base model?): give one with "
                    f"--chat-template FILE (a Gemma-style one: {GEMMA_TEMPLATE})")


def load_template(teacher_path, tokenizer, template_file=None, required=True):
    """ChatTemplate for a teacher GGUF (``template_file`` wins); raises when ``required`` and none."""
    from ..formats.tokenizer import _read_metadata

    metadata = {} if template_file else _read_metadata(teacher_path)
    tmpl = ChatTemplate.for_teacher(tokenizer, metadata, template_file, teacher_name=str(teacher_path))
    if tmpl is None and required:
        raise missing_template_error(teacher_path)
    return tmpl


# -- spans and ids ---------------------------------------------------------------------------------

def response_spans(template: ChatTemplate, messages, where="") -> tuple:
    """-> (text, [(start, stop), ...]): the rendered conversation and the character spans of its
    assistant turns (see the module docstring for how they are found)."""
    text = template.render(messages, where=where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = template.render(messages[:i], add_generation_prompt=True, where=where)
        upto = template.render(messages[:i + 1], where=where)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise Q4KError(f"{where + ': ' if where else ''}the {template.name} does not render the conversation "
                           f"turn by turn (message {i}'s prefix is not a prefix of the whole), so its response "
                           "tokens cannot be found; use a template that does (--chat-template)")
        if len(upto) > len(prefix):
            spans.append((len(prefix), len(upto)))
    return text, spans


def encode_conversation(tokenizer, template: ChatTemplate, messages, where="") -> tuple:
    """-> (ids [n] uint32, trained [n] uint8, text): 1 where an id belongs to an assistant turn."""
    text, spans = response_spans(template, messages, where)
    cuts = sorted({0, len(text), *[c for span in spans for c in span]})
    ids, trained = [], []
    for a, b in zip(cuts, cuts[1:]):
        inside = any(s <= a and b <= e for s, e in spans)
        piece = _encode_piece(tokenizer, text[a:b], after_special=not ids or _is_special(tokenizer, ids[-1]))
        ids += piece
        trained += [int(inside)] * len(piece)
    return np.asarray(ids, np.uint32), np.asarray(trained, np.uint8), text


def _is_special(tokenizer, tid) -> bool:
    from ..formats.tokenizer import CONTROL

    return bool(tokenizer.attrs[tid] & CONTROL)


def _encode_piece(tokenizer, text, after_special):
    """One piece of a rendered conversation; SentencePiece's space prefix only where the whole
    text's tokenisation would put it (at the start, or after a control token)."""
    if not tokenizer.add_space_prefix or after_special:
        return tokenizer.encode(text, add_bos=False, add_eos=False, parse_special=True)
    tokenizer.add_space_prefix = False
    try:
        return tokenizer.encode(text, add_bos=False, add_eos=False, parse_special=True)
    finally:
        tokenizer.add_space_prefix = True


def tokenize_chat_file(path, tokenizer, template: ChatTemplate | None) -> tuple:
    """A JSONL file -> (ids uint32 [N], trained uint8 [N]): its conversations back to back."""
    if template is None:
        raise Q4KError(f"{path} is chat data (JSONL) and there is no chat template: the teacher carries no "
                       f"tokenizer.chat_template; give one with --chat-template FILE (a Gemma-style one: {GEMMA_TEMPLATE})")
    ids, trained = [], []
    for n, messages in read_jsonl(path):
        i, t, _ = encode_conversation(tokenizer, template, messages, where=f"{path}:{n}")
        ids.append(i)
        trained.append(t)
    return np.concatenate(ids), np.concatenate(trained)
