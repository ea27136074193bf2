"""The tokenizer's parts on tiny hand-made vocabularies (llama.cpp checks are in test_tokenizer_llamacpp.py)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from q4kdistill.errors import FileFormatError, Q4KError
from q4kdistill.formats.tokenizer import SPACE, Tokenizer, _merge

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def spm(pieces, user_defined=(), control=(), **kw):
    """A SentencePiece tokenizer: <pad> <eos> <bos>, the 256 byte tokens, then ``pieces`` {text: score}."""
    tokens = ["<pad>", "<eos>", "<bos>", *BYTES, *pieces, *user_defined, *control]
    types = [3, 3, 3, *[6] * 256, *[1] * len(pieces), *[4] * len(user_defined), *[3] * len(control)]
    scores = [0.0] * 259 + list(pieces.values()) + [0.0] * (len(user_defined) + len(control))
    kw = {"bos_id": 2, "eos_id": 1, "pad_id": 0, "add_bos": True, "add_space_prefix": False, **kw}
    return Tokenizer("llama", tokens, types, scores=scores, **kw)


def naive_merge(word, priority):
    """The definition: join the adjacent pair with the lowest priority(left, right), leftmost first."""
    syms = list(word)
    while True:
        cands = [(priority(syms[i], syms[i + 1]), i) for i in range(len(syms) - 1)]
        cands = [c for c in cands if c[0] is not None]
        if not cands:
            return syms
        _, i = min(cands)
        syms[i:i + 2] = [syms[i] + syms[i + 1]]


_ALPHABET = "ab" + SPACE
_VOCAB = st.dictionaries(st.text(_ALPHABET, min_size=2, max_size=4), st.integers(-3, 3), max_size=12)


@settings(max_examples=300, deadline=None)
@given(_VOCAB, st.text(_ALPHABET, max_size=14))
def test_merge_follows_the_definition(vocab, word):
    spm_table = {t: float(-s) for t, s in vocab.items()}               # higher score first
    assert _merge(word, spm_table, "") == naive_merge(word, lambda a, b: spm_table.get(a + b))
    bpe_table = {f"{t[:1]} {t[1:]}": s for t, s in vocab.items()}       # a merge "left right" -> rank
    assert _merge(word, bpe_table, " ") == naive_merge(word, lambda a, b: bpe_table.get(f"{a} {b}"))


@settings(max_examples=300, deadline=None)
@given(_VOCAB, st.text("ab ", max_size=20))
def test_cutting_sentencepiece_text_at_spaces_changes_nothing(vocab, text):
    """Tokens that glue a character to a following SPACE (like gemma's ">\u2581</") must stop the cut."""
    tok = spm({t: float(s) for t, s in vocab.items()})
    whole = tok._spm_word(text.replace(" ", SPACE)) if text else []
    assert tok.encode(text, add_bos=False) == whole


@pytest.mark.parametrize("ab, bb, want", [(1.0, 2.0, ["a", "bb"]), (2.0, 1.0, ["ab", "b"]), (1.0, 1.0, ["ab", "b"])])
def test_scores_decide_and_ties_go_left(ab, bb, want):
    tok = spm({"a": 0.0, "b": 0.0, "ab": ab, "bb": bb})
    assert tok.encode("abb", add_bos=False) == [tok._id[t] for t in want]


def test_byte_fallback_and_decode():
    tok = spm({"a": -1.0, "b": -1.0, SPACE: -1.0, SPACE + "a": 0.0})
    ids = tok.encode("a é", add_bos=True)
    assert ids == [2, tok._id["a"], tok._id[SPACE], 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(ids) == "a é" and tok.decode(ids, special=True) == "<bos>a é"


def test_user_defined_tokens_always_cut_control_only_when_asked():
    tok = spm({"x": 0.0}, user_defined=["\n", "\n\n", "<u>"], control=["<c>"])
    nl, nl2, u, c = (tok._id[t] for t in ("\n", "\n\n", "<u>", "<c>"))
    assert tok.encode("x\n\n\nx<u><c>", add_bos=False) == [tok._id["x"], nl2, nl, tok._id["x"], u,
                                                           *[3 + b for b in b"<c>"]]
    assert tok.encode("<c>x", add_bos=False, parse_special=True) == [c, tok._id["x"]]


def test_space_prefix_after_start_and_special_tokens():
    tok = spm({SPACE + "x": 1.0, "x": 0.0, SPACE: 0.0}, control=["<c>"], add_space_prefix=True)
    sx = tok._id[SPACE + "x"]
    assert tok.encode("x<c>x", parse_special=True) == [2, sx, tok._id["<c>"], sx]


def test_bos_and_eos_follow_the_file_unless_overridden():
    tok = spm({"x": 0.0}, add_bos=False, add_eos=True)
    x = tok._id["x"]
    assert tok.encode("x") == [x, 1]
    assert tok.encode("x", add_bos=True, add_eos=False) == [2, x]
    assert tok.encode("") == [1] and tok.encode("", add_eos=False) == []


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(Q4KError, match="not supported"):
        Tokenizer("bert", ["a"], [1])
    with pytest.raises(Q4KError, match="pre-tokenizer 'tekken' is not supported"):
        Tokenizer("gpt2", ["a", "b"], [1, 1], merges=["a b"], pre="tekken")
    with pytest.raises(Q4KError, match="carries no tokenizer"):
        Tokenizer.from_gguf({"general.architecture": "qwen2"})
    with pytest.raises(Q4KError, match="carries no tokenizer"):  # a manifest's summary of the arrays
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": {"array_len": 5}})
    with pytest.raises(Q4KError, match="No such file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(FileFormatError, match="not a GGUF"):
        Tokenizer.from_gguf(tmp_path / "x.gguf")
    tok = spm({"x": 0.0})
    with pytest.raises(Q4KError, match="takes text"):
        tok.encode(b"bytes")
    with pytest.raises(Q4KError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_fingerprint_follows_what_decides_the_ids():
    assert spm({"ab": 1.0}).fingerprint == spm({"ab": 1.0}).fingerprint
    assert spm({"ab": 1.0}).fingerprint != spm({"ab": 2.0}).fingerprint
    assert spm({"ab": 1.0}).fingerprint != spm({"ab": 1.0}, add_bos=False).fingerprint
