"""The teacher's own tokenizer, read from its GGUF metadata, giving the ids llama.cpp gives.

No sentencepiece or Hugging Face code: the vocabulary, scores, merges and flags all come from the
``tokenizer.ggml.*`` keys, and the algorithms follow llama.cpp's ``llama-vocab.cpp``:

  encode(text)
    1. partition   text -> [raw text | special-token id, ...]   (tokenizer_st_partition)
                   User-defined tokens (gemma-3: "\\n", runs of spaces/tabs, "<table>", ...) are always
                   cut out first, longest first; control tokens ("<start_of_turn>") only with
                   parse_special=True.
    2. raw text    "llama" (SentencePiece, gemma-3):  " " -> "\u2581", then merge characters by
                   token score (llm_tokenizer_spm); characters that form no token -> <0xNN> bytes.
                   "gpt2" (byte-level BPE, qwen2/DeepSeek): pre-tokenizer regexes chosen by
                   tokenizer.ggml.pre, bytes -> printable characters, merge by merge rank.
    3. BOS first when the file's tokenizer.ggml.add_bos_token says so (EOS likewise).

Both merge loops are the same priority-queue algorithm (``_merge``): repeatedly join the adjacent
pair with the best key (highest score / lowest rank; ties -> leftmost). Words are cached.
"""
from __future__ import annotations

import hashlib
import heapq

import numpy as np
import regex

from ..errors import Q4KError
from .gguf_file import read_header
from .validate import check_tokenizer

SPACE = "\u2581"  # SentencePiece's visible space
_CACHE_WORDS = 1 << 20  # words whose ids are remembered (then the cache starts over)
_SPM_PIECES = regex.compile(f"[^{SPACE}]+|{SPACE}[^{SPACE}]*")  # text before the first SPACE, then SPACE...

# llama.cpp token attributes (llama_token_attr bits); tokenizer.ggml.token_type 0..6 maps onto them.
UNDEFINED, UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 0, 1, 2, 4, 8, 16, 32
_TYPE_ATTR = [UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE]

# Texts llama.cpp makes control tokens whatever the file says (its end-of-generation and
# fill-in-the-middle guesses in llama_vocab::impl::load). So "</s>", user-defined in gemma-3, is
# not cut out of plain text, and turns special with parse_special=True even where it is normal.
_CONTROL_TEXTS = frozenset("""
    <|eot_id|> <|im_end|> <|end|> <|return|> <|call|> <|flush|> <|calls|> <end_of_turn> <|endoftext|>
    </s> <|eom_id|> <EOT> _<EOT> [EOT] [EOS] <|end_of_text|> <end_of_utterance> <eos> <turn|>
    <|tool_response> <|fim_prefix|> <fim-prefix> <fim_prefix> <PRE> <|code_prefix|> <|prefix|>
    <|fim_suffix|> <fim-suffix> <fim_suffix> <SUF> <|code_suffix|> <|suffix|> <|fim_middle|>
    <fim-middle> <fim_middle> <MID> <|code_middle|> <|middle|> <|fim_pad|> <fim-pad> <fim_pad> <PAD>
    [PAD] <|fim_repo|> <|repo_name|> <fim-repo> <REPO> <reponame> <|file_sep|>""".split())


# -- pre-tokenizers of byte-level BPE (llm_tokenizer_bpe) ----------------------------------------

# Unicode White_Space, as llama.cpp's tables have it.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

# The expressions llama.cpp splits with (llm_tokenizer_bpe), over real Unicode classes. (Where it
# falls back to std::regex it matches a copy of the text with each non-ASCII character collapsed to
# its class; for \p{N}, \p{P} and \s that is the same thing, and the three below that use \p{L}
# are all ones it matches exactly, checked against llama.cpp in tests/test_tokenizer_llamacpp.py.)
# Known gap: llama.cpp's class tables are Unicode 15.1, the regex module's newer, so letters and
# digits first assigned after 15.1 (new scripts, not emoji) may split differently.
_GPT2 = rf"'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}+| ?\p{{N}}+| ?[^{_WS}\p{{L}}\p{{N}}]+|[{_WS}]+(?![^{_WS}])"
_LLAMA3 = (rf"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+"
           rf"|\p{{N}}{{1,3}}| ?[^{_WS}\p{{L}}\p{{N}}]+[\r\n]*|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre -> expressions applied one after another (each splits the pieces of the one
# before; text between two matches stays a piece of its own).
_PRE_TOKENIZERS = {
    "default": [r"[\p{P}$+<=>^~|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
}
_PRE_ALIASES = {"gpt-2": "gpt2", "phi-2": "gpt2", "llama-bpe": "llama3", "llama-v3": "llama3",
                "falcon3": "llama3", "pixtral": "llama3", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2"}


def bytes_to_unicode() -> list:
    """GPT-2's byte -> printable character table (the 188 printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = bytes_to_unicode()
_BYTE_ENCODE = {b: ord(c) for b, c in enumerate(_BYTE_CHARS)}   # for bytes.decode("latin-1").translate
_BYTE_DECODE = {c: b for b, c in enumerate(_BYTE_CHARS)}


# -- the shared merge loop ----------------------------------------------------------------------

def _merge(word: str, table: dict, sep: str) -> list:
    """Merge adjacent symbols of ``word`` (one per character at first), best pair first.

    A pair (a, b) may merge when ``table`` has ``a + sep + b``; its value is the priority (lower
    first: minus the token score for SentencePiece, the merge rank for BPE); ties go to the
    leftmost pair, as in llama.cpp's priority queues. Returns the final symbols' texts.
    Symbol i starts at character i and spans size[i] characters (0 once merged into its left).
    """
    n = len(word)
    size = [1] * n
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap = []  # (priority, left, right, joined size)
    for i in range(1, n):
        k = table.get(word[i - 1] + sep + word[i])
        if k is not None:
            heap.append((k, i - 1, i, 2))
    heapq.heapify(heap)
    while heap:
        _, left, right, joined = heapq.heappop(heap)
        if size[left] == 0 or size[right] == 0 or size[left] + size[right] != joined:
            continue  # stale: one side changed since the pair was queued
        size[left], size[right] = joined, 0
        nxt[left] = after = nxt[right]
        if after >= 0:
            prv[after] = left
        # the merged symbol forms new pairs with both neighbours
        for a, b in ((prv[left], left), (left, after)):
            if a >= 0 and b >= 0:
                k = table.get(word[a:b] + sep + word[b:b + size[b]])
                if k is not None:
                    heapq.heappush(heap, (k, a, b, size[a] + size[b]))
    out, i = [], 0 if n else -1
    while i != -1:
        out.append(word[i:i + size[i]])
        i = nxt[i]
    return out


# -- the tokenizer ------------------------------------------------------------------------------

class Tokenizer:
    """A GGUF file's tokenizer: ``encode(text) -> ids`` and ``decode(ids) -> text`` as llama.cpp."""

    def __init__(self, model, tokens, token_types, scores=None, merges=None, pre="default",
                 bos_id=None, eos_id=None, pad_id=None, unk_id=None,
                 add_bos=None, add_eos=False, add_space_prefix=None):
        if model not in ("llama", "gpt2"):
            raise Q4KError(f"tokenizer model {model!r} is not supported (only 'llama' SentencePiece and 'gpt2' BPE)")
        self.model, self.pre = model, pre
        # llama.cpp renames empty tokens, and the last of equal texts wins in its text -> id map
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._id = {t: i for i, t in enumerate(self.tokens)}
        self.attrs = [_TYPE_ATTR[int(t)] if 0 <= int(t) < len(_TYPE_ATTR) else UNDEFINED for t in token_types]
        for text in _CONTROL_TEXTS & self._id.keys():
            self.attrs[self._id[text]] |= CONTROL
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = (model == "llama") if add_bos is None else bool(add_bos)
        self.add_eos = bool(add_eos)
        self.add_space_prefix = (model == "llama") if add_space_prefix is None else bool(add_space_prefix)
        by_length = sorted((i for i, a in enumerate(self.attrs) if a & (CONTROL | USER_DEFINED | UNKNOWN)),
                           key=lambda i: -len(self.tokens[i].encode("utf-8", "surrogateescape")))
        self._special_all = [(self.tokens[i], i) for i in by_length]
        self._special_user = [(self.tokens[i], i) for i in by_length if not self.attrs[i] & (CONTROL | UNKNOWN)]
        self._cache = {}
        self._fingerprint = None
        if model == "llama":
            self._init_spm(scores)
        else:
            self._init_bpe(merges, pre)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path_or_metadata) -> "Tokenizer":
        """From a GGUF path (header only is read) or an already-read metadata dict."""
        md = path_or_metadata if isinstance(path_or_metadata, dict) else _read_metadata(path_or_metadata)
        check_tokenizer(md, None, _where(path_or_metadata))      # lengths, item types, special ids in range
        if not isinstance(md.get("tokenizer.ggml.tokens"), (list, np.ndarray)) or "tokenizer.ggml.model" not in md:
            raise Q4KError(f"{_where(path_or_metadata)} carries no tokenizer (the tokenizer.ggml.* arrays); "
                           "give the teacher's GGUF file")

        def opt_int(key):
            return int(md[key]) if key in md else None

        return cls(
            model=str(md["tokenizer.ggml.model"]),
            tokens=list(md["tokenizer.ggml.tokens"]),
            token_types=md.get("tokenizer.ggml.token_type", [1] * len(md["tokenizer.ggml.tokens"])),
            scores=md.get("tokenizer.ggml.scores"),
            merges=md.get("tokenizer.ggml.merges"),
            pre=str(md.get("tokenizer.ggml.pre", "default")),
            bos_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_id=opt_int("tokenizer.ggml.eos_token_id"),
            pad_id=opt_int("tokenizer.ggml.padding_token_id"),
            unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
            add_bos=md.get("tokenizer.ggml.add_bos_token"),
            add_eos=md.get("tokenizer.ggml.add_eos_token", False),
            add_space_prefix=md.get("tokenizer.ggml.add_space_prefix"),
        )

    def _init_spm(self, scores):
        if scores is None:
            raise Q4KError("a SentencePiece ('llama') tokenizer needs tokenizer.ggml.scores")
        neg_score = (-np.asarray(scores, dtype=np.float32)).tolist()
        self._merge_table = {t: neg_score[i] for i, t in enumerate(self.tokens)}  # text -> priority
        hexes = [f"<0x{b:02X}>" for b in range(256)]
        self._byte_id = [self._id.get(h, self._id.get(chr(b), self.unk_id)) for b, h in enumerate(hexes)]
        # Characters c with c + SPACE inside some token: only there may a merge cross a word start.
        self._glued = {t[i - 1] for t in self.tokens if SPACE in t[1:]
                       for i in range(1, len(t)) if t[i] == SPACE}

    def _init_bpe(self, merges, pre):
        if merges is None:
            raise Q4KError("a BPE ('gpt2') tokenizer needs tokenizer.ggml.merges")
        self._merge_table = {}  # "left right" -> rank (the first one where a merge repeats)
        for rank, m in enumerate(merges):
            self._merge_table.setdefault(m, rank)
        name = _PRE_ALIASES.get(pre, pre)
        if name not in _PRE_TOKENIZERS:
            raise Q4KError(f"BPE pre-tokenizer {pre!r} is not supported (known: "
                           f"{', '.join(sorted([*_PRE_TOKENIZERS, *_PRE_ALIASES]))})")
        self.pre = name
        self._pre = [regex.compile(rx) for rx in _PRE_TOKENIZERS[name]]
        self._ignore_merges = name == "llama3"

    # -- public API -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def fingerprint(self) -> str:
        """A short hash of everything that decides the ids (for caches of tokenised data)."""
        if self._fingerprint is None:
            h = hashlib.sha256(repr((self.model, self.pre, self.bos_id, self.eos_id,
                                     self.add_bos, self.add_eos, self.add_space_prefix)).encode())
            h.update("\0".join(self.tokens).encode("utf-8", "surrogateescape"))
            h.update(np.asarray(self.attrs, np.uint32).tobytes())
            h.update("\0".join(self._merge_table).encode("utf-8", "surrogateescape"))  # scored texts / merges
            h.update(np.asarray(list(self._merge_table.values()), np.float64).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def encode(self, text: str, add_bos=None, parse_special=False, add_eos=None) -> list:
        """Text -> token ids. add_bos/add_eos None -> the file's add_bos_token/add_eos_token."""
        if not isinstance(text, str):
            raise Q4KError(f"encode() takes text (str), not {type(text).__name__}")
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
            elif self.model == "llama":
                ids += self._encode_spm(" " + frag if self.add_space_prefix and prev_special else frag)
                prev_special = False
            else:
                ids += self._encode_bpe(frag)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, special=False) -> str:
        """Token ids -> text. Control tokens (BOS, EOS, ...) are dropped unless special=True."""
        return b"".join(self.piece_bytes(int(i), special) for i in ids).decode("utf-8", errors="replace")

    def piece_bytes(self, tid: int, special=False) -> bytes:
        """The bytes one token stands for (llama.cpp's token_to_piece)."""
        if not 0 <= tid < len(self.tokens):
            raise Q4KError(f"token id {tid} is outside the vocabulary (size {len(self.tokens)})")
        text, attr = self.tokens[tid], self.attrs[tid]
        if attr & CONTROL and not special:
            return b""
        if attr & (USER_DEFINED | ((CONTROL | UNKNOWN) if special else 0)):
            return text.encode("utf-8", "surrogateescape")
        if attr & NORMAL and self.model == "llama":
            return text.replace(SPACE, " ").encode("utf-8", "surrogateescape")
        if attr & NORMAL:
            return bytes(_BYTE_DECODE.get(c, ord("?")) for c in text)
        if attr & BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused, and unknown unless special

    # -- 1. special tokens ----------------------------------------------------------------------
    def _partition(self, text, parse_special):
        """Cut special tokens out of the text, longest first -> [str | int, ...] (no empty strings)."""
        frags = [text] if text else []
        for tok, tid in (self._special_all if parse_special else self._special_user):
            if tok not in text:
                continue
            out = []
            for frag in frags:
                if frag.__class__ is int or tok not in frag:
                    out.append(frag)
                    continue
                for j, part in enumerate(frag.split(tok)):
                    if j:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    # -- 2a. SentencePiece ----------------------------------------------------------------------
    def _encode_spm(self, text):
        """One raw fragment -> ids. The escaped text is cut before each SPACE that no token glues to
        the character before it; no merge can cross such a cut, so pieces tokenise independently."""
        text = text.replace(" ", SPACE)
        ids, word = [], ""
        for piece in _SPM_PIECES.findall(text):
            if word and word[-1] not in self._glued:
                ids += self._cached(word, self._spm_word)
                word = ""
            word += piece
        if word:
            ids += self._cached(word, self._spm_word)
        return ids

    def _cached(self, word, encode_word):
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= _CACHE_WORDS:
                self._cache.clear()
            ids = self._cache[word] = encode_word(word)
        return ids

    def _spm_word(self, word):
        ids = []
        for sym in _merge(word, self._merge_table, ""):
            tid = self._id.get(sym)
            if tid is not None:
                ids.append(tid)
            else:  # a character that is no token: its UTF-8 bytes
                ids += [self._byte_id[b] for b in sym.encode("utf-8", "surrogateescape")]
        return ids

    # -- 2b. byte-level BPE ---------------------------------------------------------------------
    def _encode_bpe(self, text):
        ids = []
        for word in self._pre_split(text):
            ids += self._cached(word, self._bpe_word)
        return ids

    def _pre_split(self, text):
        spans = [(0, len(text))]
        for rx in self._pre:
            pieces = []
            for start, end in spans:
                pos = start
                for m in rx.finditer(text, start, end):
                    if m.start() > pos:
                        pieces.append((pos, m.start()))
                    pieces.append(m.span())
                    pos = m.end()
                if pos < end:
                    pieces.append((pos, end))
            spans = pieces
        return [text[a:b] for a, b in spans]

    def _bpe_word(self, word):
        chars = word.encode("utf-8", "surrogateescape").decode("latin-1").translate(_BYTE_ENCODE)
        if self._ignore_merges and chars in self._id:
            return [self._id[chars]]
        ids = []
        for sym in _merge(chars, self._merge_table, " "):
            tid = self._id.get(sym)
            if tid is not None:
                ids.append(tid)
            else:  # as llama.cpp: single-byte tokens for what it can find, the rest is dropped
                ids += [self._id[c] for c in sym if c < "\x80" and c in self._id]
        return ids


def _read_metadata(path) -> dict:
    """The header's metadata of a GGUF (header only: the truncated 7B chunk works too) or an APR
    file (aprender's tokenizer.* keys come back as tokenizer.ggml.*)."""
    try:
        with open(path, "rb") as f:
            if f.read(3) == b"APR":
                from . import apr
                return apr.read_header(path).metadata
        return read_header(path).metadata
    except OSError as exc:
        raise Q4KError(f"cannot read the teacher file {path}: {exc.strerror or exc}") from None


def _where(path_or_metadata):
    return "the metadata" if isinstance(path_or_metadata, dict) else str(path_or_metadata)
