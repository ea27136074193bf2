"""Our tokenizer against llama.cpp itself (llama-cpp-python, vocab_only) on the real vocabularies:
gemma-3-270m's SentencePiece file, and the DeepSeek-R1-Distill-Qwen-7B BPE vocabulary (its header,
copied into a small GGUF that llama.cpp will open) under each pre-tokenizer we implement."""
import json
import random
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q4kdistill import cli
from q4kdistill.formats.gguf_file import read_header
from q4kdistill.formats.tokenizer import CONTROL, NORMAL, USER_DEFINED, Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "", " ", "Hello world", " leading space", "trailing space ", "   ", "\n", "\n\n\n", " \n \n",
    "two  spaces,\tthen a tab,\t\ttwo tabs\n\n\tand an indented line", " " * 45 + "z", "a" + "\n" * 40 + "b",
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b: pass\r\n}", "x = {'k': [1, 2.5e-3, -7]}",
    "Ünïcödé àccénts: naïve façade Straße; cafe\u0301 (combining)", "3.14159 1,000,000 42nd 0x1F 2024-01-01 12345678",
    "emoji 😀👍🏽 👩‍👩‍👧 🇫🇷 ❤️ 🚀🚀🚀", "中文字符和标点。，！日本語のテキスト 한국어", "Привет, мир! مرحبا بالعالم ½ Ⅻ ﬁ",
    "<table><tr><td>x</td></tr></table> <b>bold</b>", "<start_of_turn>user\nhi<end_of_turn>", "<bos><eos></s><unk>",
    "<think>hmm</think> <|endoftext|> <|fim_prefix|>x<|fim_suffix|>",
    "I'm you're they'll we've He'd SHE'S",
    "\u2581\u2581 literal sentencepiece spaces", "nbsp\u00a0ideographic\u3000em\u2003space", "\x00\x01\x7f ctrl", "x" * 300,
]


def _write_gguf(metadata, path):
    """A GGUF with all of ``metadata`` and no tensors: enough for llama.cpp's vocab_only loading."""
    w = gguf.GGUFWriter(str(path), metadata["general.architecture"])
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(value, list):
            sub = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32,
                   int: gguf.GGUFValueType.INT32}[type(value[0])]
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=sub)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def gemma(gemma_path):
    return Tokenizer.from_gguf(gemma_path), llama_cpp.Llama(gemma_path, vocab_only=True, verbose=False)


@pytest.fixture(scope="session")
def qwen_metadata(deepseek_chunk_path):
    return read_header(deepseek_chunk_path).metadata


# "gemma": the real file; the others: the 7B's vocabulary and merges under a tokenizer.ggml.pre
VOCABS = {"gemma": None, "qwen2": "deepseek-r1-qwen", "llama3": "llama-bpe", "gpt2": "gpt-2", "default": "default"}


@pytest.fixture(scope="session", params=list(VOCABS))
def pair(request, tmp_path_factory):
    """(our Tokenizer, llama.cpp's Llama with vocab_only) for one vocabulary."""
    if request.param == "gemma":
        return request.getfixturevalue("gemma")
    metadata = {**request.getfixturevalue("qwen_metadata"), "tokenizer.ggml.pre": VOCABS[request.param]}
    path = tmp_path_factory.mktemp("vocab") / f"{request.param}.gguf"
    _write_gguf(metadata, path)
    return Tokenizer.from_gguf(metadata), llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _assert_same(pair, text, special):
    ours, ref = pair
    want = ref.tokenize(text.encode("utf-8"), add_bos=True, special=special)
    assert ours.encode(text, parse_special=special) == want, (text, special)


@pytest.mark.parametrize("special", [False, True])
def test_varied_texts_give_llama_cpp_ids(pair, special):
    for text in TEXTS:
        _assert_same(pair, text, special)


# Characters assigned in Python's Unicode tables (14.0): llama.cpp's tables are Unicode 15.1, the
# regex module's newer, so letters first assigned after 15.1 may split differently (see report).
_CHARS = st.characters(exclude_categories=("Cs", "Cn"))
_PIECES = st.sampled_from(["the", " the", "'s", "'LL", "<td>", "</s>", "<think>", "<|fim_prefix|>", "<unused3>",
                           "<start_of_turn>", "<bos>", "\n\n", "   ", "\t\t", "123456", " \u2581", "ing", "😀"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(_CHARS, max_size=6), _PIECES), max_size=12).map("".join), st.booleans())
def test_random_text_gives_llama_cpp_ids(pair, text, special):
    _assert_same(pair, text, special)


def test_standard_library_files_give_llama_cpp_ids(pair):
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    for path in random.Random().sample(stdlib, 3):  # fresh files each run
        text = path.read_text(encoding="utf-8", errors="replace")[:60_000]
        _assert_same(pair, text, False)


def test_token_attributes_and_pieces_match_llama_cpp(pair):
    """Token attributes (incl. llama.cpp's control-by-text overrides such as "</s>") and the bytes
    each token decodes to, for every special token and a random sample of the rest."""
    ours, ref = pair
    vocab = llama_cpp.llama_model_get_vocab(ref.model)
    attrs = np.array([llama_cpp.llama_vocab_get_attr(vocab, i) for i in range(ours.vocab_size)])
    np.testing.assert_array_equal(np.array(ours.attrs) & ~2, attrs & ~2)  # bit 2 (unused) is not ours to track
    ids = [i for i, a in enumerate(ours.attrs) if not a & NORMAL] + random.Random().sample(range(ours.vocab_size), 2000)
    buf = (llama_cpp.ctypes.c_char * 1024)()
    for special in (False, True):
        for i in ids:
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
            assert ours.piece_bytes(i, special) == bytes(buf[:n]), (i, ours.tokens[i], special)


def test_decode_inverts_encode(pair):
    ours, _ = pair
    for text in TEXTS:
        if ours.model == "llama" and "\u2581" in text:
            continue  # SentencePiece reads a literal U+2581 as a space
        assert ours.decode(ours.encode(text)) == text


def test_real_flags_and_special_tokens(pair):
    ours, _ = pair
    if ours.model == "llama":
        assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos, ours.add_space_prefix) == (2, 1, 0, True, False)
        assert ours.attrs[106] & CONTROL and ours.tokens[106] == "<end_of_turn>"
        assert ours.attrs[212] == USER_DEFINED | CONTROL  # "</s>": user-defined in the file, control in llama.cpp
    else:
        assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.vocab_size) == (151646, 151643, True, 152064)


def test_truncated_7b_file_tokenizes(deepseek_chunk_path):
    """The 100 MB chunk (llama.cpp refuses it) still gives its tokenizer; ids checked by llama.cpp
    on the copied header above and by hand here."""
    tok = Tokenizer.from_gguf(deepseek_chunk_path)
    assert tok.encode("Hello world") == [151646, 9707, 1879]
    assert tok.encode("<think>12</think>", add_bos=False) == [151648, 16, 17, 151649]


def test_tokenize_command(gemma, gemma_path, capsys):
    ref = gemma[1]
    text = "Hello  world!\n\tcafé 😀"
    assert cli.main(["tokenize", "--teacher", gemma_path, text, "--json", "--no-bos"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == ref.tokenize(text.encode(), add_bos=False, special=False)
    assert cli.main(["tokenize", "--teacher", gemma_path, "<start_of_turn>hi", "--special"]) == 0
    out = capsys.readouterr().out
    assert "'<start_of_turn>'" in out and out.splitlines()[-1] == "ids: 2 105 2202"  # BOS by add_bos_token


def test_speed_is_reasonable(gemma_path):
    """Tokenising stays well above 100k characters per CPU second (cold word cache)."""
    import time

    tok = Tokenizer.from_gguf(gemma_path)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    start = time.process_time()
    tok.encode(text)
    assert len(text) / (time.process_time() - start) > 100_000
