"""Data pipeline: files -> token stream -> packed sequences -> deterministic, resumable batches."""
import json

import numpy as np
import pytest

from q4kdistill.train.corpus import (TokenDataset, demo_corpus, find_files, load_datasets, load_shard, save_tokens, split_files, tokenize_files)
from q4kdistill.errors import FileFormatError, Q4KError

BOS = 2


class CharTokenizer:
    """Stand-in for the teacher's tokenizer: BOS, then one id per character."""
    vocab_size, bos_id, add_bos, fingerprint = 256, BOS, True, "chars-v1"

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [BOS] + [3 + ord(c) % 250 for c in text]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh inputs every run


def test_find_files_recursive_sorted_filtered(tmp_path):
    root = tmp_path / "data"
    for name in ["b/c.txt", "a.md", "z.py", "y.rst", "UP.TXT", "skip.xyz"]:
        write(root / name, "x")
    save_tokens(root / "s.bin", [1, 2])
    got = [p.relative_to(root).as_posix() for p in find_files(root)]
    assert got == ["UP.TXT", "a.md", "b/c.txt", "s.bin", "y.rst", "z.py"]
    assert [p.name for p in find_files(root, extensions=["txt"])] == ["UP.TXT", "c.txt"]
    assert find_files(root / "skip.xyz") == [root / "skip.xyz"]  # named directly: taken whatever it is
    with pytest.raises(Q4KError, match="no such data file or folder"):
        find_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Q4KError, match="no data files"):
        find_files(tmp_path / "empty")


def test_held_out_split_is_by_file_and_deterministic():
    files = [f"doc{i:02d}.txt" for i in range(20)]
    train, held = split_files(files, 0.25, seed=7)
    assert (train, held) == split_files(files, 0.25, seed=7)
    assert len(held) == 5 and sorted(train + held) == files and not set(train) & set(held)
    assert any(split_files(files, 0.25, seed=s)[1] != held for s in range(8, 12))
    assert split_files(files, 0, seed=7) == (files, [])
    with pytest.raises(Q4KError, match="only 1 file"):
        split_files(files[:1], 0.1)
    with pytest.raises(Q4KError, match="ratio"):
        split_files(files, 1.0)


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_shards_round_trip(tmp_path, rng, suffix):
    tokens = rng.integers(0, 2**32, size=int(rng.integers(0, 500)), dtype=np.uint64).astype(np.uint32)
    save_tokens(tmp_path / f"t{suffix}", tokens)
    got = load_shard(tmp_path / f"t{suffix}")
    assert got.dtype == np.uint32 and np.array_equal(got, tokens)


def test_bad_shards_are_clear_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(bytes(5))
    np.save(tmp_path / "2d.npy", np.zeros((2, 2), np.int32))
    np.save(tmp_path / "neg.npy", np.array([1, -1], np.int64))
    np.save(tmp_path / "float.npy", np.zeros(3))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    for name, problem in [("odd.bin", "whole number"), ("2d.npy", "1-D"), ("neg.npy", "negative"),
                          ("float.npy", "1-D integers"), ("junk.npy", "readable")]:
        with pytest.raises(FileFormatError, match=problem):
            load_shard(tmp_path / name)


def test_documents_start_with_bos_and_the_stream_is_cached(tmp_path):
    docs = {"a.txt": "hello", "b.md": "", "c/d.py": "print(1)\n"}
    files = [write(tmp_path / "in" / name, text) for name, text in docs.items()]
    tok = CharTokenizer()
    stream = tokenize_files(files, tok, cache_dir=tmp_path / "cache")
    want = [t for text in docs.values() if text for t in tok.encode(text)]
    assert stream.tolist() == want and stream.dtype == np.uint32
    tok.calls = 0
    assert np.array_equal(tokenize_files(files, tok, cache_dir=tmp_path / "cache"), stream) and tok.calls == 0
    write(files[0], "hello again")  # a changed file is tokenised afresh
    assert tokenize_files(files, tok, cache_dir=tmp_path / "cache").size == stream.size + 6 and tok.calls == 2


def test_shard_ids_outside_the_vocabulary_are_refused(tmp_path):
    save_tokens(tmp_path / "s.npy", [5, 300])
    with pytest.raises(Q4KError, match="outside the teacher's vocabulary"):
        tokenize_files([tmp_path / "s.npy"], CharTokenizer())
    assert tokenize_files([tmp_path / "s.npy"]).tolist() == [5, 300]  # no tokenizer: taken as they are


def random_stream(rng, n_docs):
    """Documents of random lengths, each BOS + ids >= 3."""
    docs = [[BOS, *rng.integers(3, 256, int(rng.integers(0, 40)))] for _ in range(n_docs)]
    return np.concatenate(docs).astype(np.uint32)


def test_packing_starts_every_sequence_with_bos_and_keeps_every_token(rng):
    stream, T = random_stream(rng, 30), int(rng.integers(2, 12))
    rows = TokenDataset(stream, T, bos_id=BOS).sequences
    assert rows.dtype == np.uint32 and rows.shape[1] == T and (rows[:, 0] == BOS).all()
    pos = 0  # walk the stream: a row is the stream itself at a BOS, else BOS + the next T - 1 tokens
    for row in rows:
        own = stream[pos] == BOS
        body = row if own else row[1:]
        assert np.array_equal(body, stream[pos:pos + len(body)])
        pos += len(body)
    assert len(stream) - pos < T  # only a tail shorter than one sequence is left over


def test_packing_without_bos_is_a_reshape(rng):
    stream = rng.integers(0, 1000, 103).astype(np.uint32)
    assert np.array_equal(TokenDataset(stream, 10).sequences, stream[:100].reshape(10, 10))
    with pytest.raises(Q4KError, match="not even one sequence"):
        TokenDataset(stream[:9], 10)
    with pytest.raises(Q4KError, match="at least 2"):
        TokenDataset(stream, 1)


def test_batches_visit_every_sequence_once_per_epoch_and_reshuffle(rng):
    n, B = 50, int(rng.integers(1, 9))
    ds = TokenDataset(np.arange(n * 4, dtype=np.uint32), 4)  # row i starts with 4 * i
    batches = ds.batches(B, seed=int(rng.integers(1 << 30)))
    picks = np.concatenate([next(batches)[:, 0] // 4 for _ in range(-(-3 * n // B))])
    for e in range(3):
        assert sorted(picks[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(picks[:n], picks[n:2 * n])
    assert batches.epoch == len(picks) // n and next(batches).dtype == np.int32


def test_batches_resume_bit_identically(rng):
    ds = TokenDataset(random_stream(rng, 40), 8, bos_id=BOS)
    seed, B = int(rng.integers(1 << 30)), int(rng.integers(1, 6))
    first = ds.batches(B, seed)
    for _ in range(int(rng.integers(0, 3 * len(ds)))):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    again = ds.batches(B, seed=seed + 1)  # the state carries the seed
    again.load_state_dict(state)
    for _ in range(2 * len(ds) // B + 2):
        assert np.array_equal(next(first), next(again))


def test_resume_on_other_data_is_refused(rng):
    a = TokenDataset(random_stream(rng, 20), 8, bos_id=BOS)
    b = TokenDataset(np.concatenate([a.sequences.ravel(), [BOS] * 8]).astype(np.uint32), 8, bos_id=BOS)
    with pytest.raises(Q4KError, match="data differs from the checkpoint"):
        b.batches(2).load_state_dict(a.batches(2).state_dict())


def test_in_order_covers_everything_once(rng):
    ds = TokenDataset(rng.integers(0, 100, 7 * 5).astype(np.uint32), 5)
    parts = list(ds.in_order(3))
    assert [len(p) for p in parts] == [3, 3, 1] and np.array_equal(np.concatenate(parts), ds.sequences)
    assert sum(len(p) for p in ds.in_order(3, limit=4)) == 4


def test_load_datasets_keeps_held_out_files_apart(tmp_path):
    for i in range(10):
        write(tmp_path / "corpus" / f"doc{i}.txt", chr(ord("a") + i) * 50)
    tok = CharTokenizer()
    train, held = load_datasets(tmp_path / "corpus", 16, tok, held_out=0.2, seed=3)
    letters = [set(np.unique(d.sequences)) - {BOS} for d in (train, held)]
    assert not letters[0] & letters[1] and len(letters[1]) == 2  # two whole files held out
    assert (train.sequences[:, 0] == BOS).all() and (held.sequences[:, 0] == BOS).all()
    extra = write(tmp_path / "other" / "x.txt", "z" * 40)
    train2, held2 = load_datasets(tmp_path / "corpus", 16, tok, held_out_paths=[extra])
    assert len(train2) > len(train) and set(np.unique(held2.sequences)) == {BOS, 3 + ord("z")}
    assert load_datasets(tmp_path / "corpus", 16, tok, held_out=0)[1] is None
    write(tmp_path / "blank" / "a.txt", "")
    write(tmp_path / "blank" / "b.txt", "")
    with pytest.raises(Q4KError, match="has 0 tokens"):
        load_datasets(tmp_path / "blank", 16, tok, held_out=0)


def test_demo_corpus_is_fixed_and_keeps_held_out_modules_apart():
    train, held = demo_corpus(train_chars=300_000, held_out_chars=50_000)
    assert (train, held) == demo_corpus(train_chars=300_000, held_out_chars=50_000)
    assert train and held and not set(train) & set(held) and all(f.exists() for f in train + held)
    assert sum(f.stat().st_size for f in train[:-1]) < 300_000 <= sum(f.stat().st_size for f in train)


def test_demo_corpus_through_the_real_teacher_tokenizer(gemma_path):
    from q4kdistill.formats.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gemma_path)
    files = demo_corpus(train_chars=60_000, held_out_chars=20_000)
    train, held = load_datasets(files[0], 64, tok, held_out_paths=files[1])
    assert (train.sequences[:, 0] == tok.bos_id).all() and train.sequences.max() < tok.vocab_size
    first_held = files[1][0].read_text(encoding="utf-8")
    assert tok.decode(held.sequences[0]) == first_held[:len(tok.decode(held.sequences[0]))]
