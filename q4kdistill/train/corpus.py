"""Training data: text files, chat JSONL (or pre-tokenised shards) -> one token stream -> sequences of T tokens.

    files/folders --find_files--> [doc, ...] --teacher tokenizer--> stream uint32 [N]
        each document tokenised on its own, so it starts with BOS where the teacher adds one;
        a .jsonl file holds conversations, rendered with the teacher's chat template (chat.py),
        each one a document; with any JSONL file the stream has a loss mask uint8 [N] beside it:
        1 where the id is a training target (assistant turns; every id of text and shards)
    stream --TokenDataset(seq_len=T)--> sequences uint32 [n, T] (+ masks uint8 [n, T])
        packed back to back; where the teacher adds BOS every sequence starts with BOS (a BOS is
        put in front when the sequence starts inside a document; it is never a target)
    TokenDataset.batches(B, seed) -> Batches: endless [B, T] int32 batches (next_batch(): with their
        loss mask and sequence numbers); epoch e visits every
        sequence once in the order permutation(seed, e); state_dict()/load_state_dict() resume it
        bit-identically.

The held-out split is by file: whole documents go to one side or the other (``split_files``).
Shards are little-endian uint32 ``.bin`` files or 1-D integer ``.npy`` files.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import FileFormatError, Q4KError
from .chat import CHAT_EXTENSIONS, tokenize_chat_file

TEXT_EXTENSIONS = (".txt", ".md", ".py", ".rst")
SHARD_EXTENSIONS = (".bin", ".npy")


# -- files ---------------------------------------------------------------------------------------

def find_files(paths, extensions=TEXT_EXTENSIONS + SHARD_EXTENSIONS + CHAT_EXTENSIONS) -> list:
    """Files named directly, and files with one of ``extensions`` under folders (recursive, sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    files = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
            if not found:
                raise Q4KError(f"no data files ({' '.join(extensions)}) under {p}")
            files += found
        else:
            raise Q4KError(f"no such data file or folder: {p}")
    if not files:
        raise Q4KError("no data given")
    return files


def split_files(files, held_out=0.1, seed=0) -> tuple:
    """(train, held_out) lists of files; a seeded shuffle picks round(ratio * n) (>= 1) held-out files."""
    files = list(files)
    if not 0 <= held_out < 1:
        raise Q4KError(f"the held-out ratio must be in [0, 1), not {held_out}")
    if held_out == 0:
        return files, []
    if len(files) < 2:
        raise Q4KError(f"the held-out split is by file and there is only {len(files)} file; "
                       "give more files, separate held-out data, or a held-out ratio of 0")
    n_held = min(len(files) - 1, max(1, round(held_out * len(files))))
    pick = set(np.random.default_rng(seed).permutation(len(files))[:n_held].tolist())
    return ([f for i, f in enumerate(files) if i not in pick], [f for i, f in enumerate(files) if i in pick])


def demo_corpus(train_chars=1_500_000, held_out_chars=200_000) -> tuple:
    """Python's own standard library as a corpus any machine has: (train_files, held_out_files).

    Candidates: the top-level ``*.py`` modules in sorted order plus the documentation topics
    (``pydoc_data/topics.py``); every 8th module is held out. Each side takes files in order
    until its character budget is reached (so the choice is fixed for a given Python version).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(stdlib.glob("*.py"))
    held = modules[7::8]
    train = [f for i, f in enumerate(modules) if i % 8 != 7]
    docs = stdlib / "pydoc_data" / "topics.py"
    if docs.exists():
        train.insert(0, docs)
    picked = _take_chars(train, train_chars), _take_chars(held, held_out_chars)
    if not picked[0] or not picked[1]:
        raise Q4KError(f"the standard library at {stdlib} has too few Python files for the demo corpus")
    return picked


def _take_chars(files, budget):
    out, total = [], 0
    for f in files:
        if total >= budget:
            break
        out.append(f)
        total += f.stat().st_size
    return out


# -- tokens --------------------------------------------------------------------------------------

def read_text(path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def load_shard(path) -> np.ndarray:
    """A pre-tokenised shard -> uint32 [N]: raw little-endian uint32 (.bin) or a 1-D integer .npy."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise FileFormatError(path, f"not a readable .npy file ({exc})") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise FileFormatError(path, f"a token shard must be 1-D integers, not {arr.dtype} {arr.shape}")
        check_ids(arr, path)                   # by value, before a cast to uint32 could wrap them
        return np.asarray(arr, dtype=np.uint32)
    size = path.stat().st_size
    if size % 4:
        raise FileFormatError(path, f"{size} bytes is not a whole number of uint32 tokens")
    return np.fromfile(path, dtype="<u4").astype(np.uint32)


def check_ids(ids: np.ndarray, path, vocab_size: int | None = None) -> None:
    """Every id of an integer array is a token id: 0 <= id < vocab_size (or < 2^32 when the
    vocabulary is not known yet), whatever the array's dtype. FileFormatError naming the first."""
    if ids.size == 0:
        return
    high = 2 ** 32 if vocab_size is None else int(vocab_size)
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < high:
        return
    bad = lo if lo < 0 else hi
    at = int(np.flatnonzero(ids == bad)[0])
    if bad < 0:
        raise FileFormatError(path, f"negative token id {bad} at index {at}")
    where = "uint32" if vocab_size is None else f"the vocabulary of {vocab_size}"
    raise FileFormatError(path, f"token id {bad} at index {at} is outside {where} (0..{high - 1})")


def save_tokens(path, tokens) -> None:
    """uint32 tokens -> ``.npy`` or ``.bin`` (little-endian), written then renamed (atomic; the
    temporary name is this process's and thread's, so two runs filling the same token cache do not
    interleave, nor two thread ranks of one process: distributed.LocalGroup)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    arr = np.asarray(tokens, dtype="<u4")
    with open(tmp, "wb") as f:
        if path.suffix.lower() == ".npy":
            np.save(f, arr)
        else:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def tokenize_files(files, tokenizer=None, cache_dir=None, progress=False, chat=None) -> np.ndarray:
    """Files -> one uint32 token stream (see tokenize_files_masked)."""
    return tokenize_files_masked(files, tokenizer, cache_dir, progress, chat)[0]


def tokenize_files_masked(files, tokenizer=None, cache_dir=None, progress=False, chat=None) -> tuple:
    """Files -> (stream uint32 [N], loss mask uint8 [N] or None): texts through ``tokenizer`` (one
    document each), shards as stored, JSONL conversations through the ``chat`` template (ChatTemplate).
    The mask is None when no file is chat data (every id a target). With ``cache_dir`` both are
    kept there as .npy files keyed by files, tokenizer and template."""
    files = [Path(f) for f in files]
    has_chat = any(f.suffix.lower() in CHAT_EXTENSIONS for f in files)
    key = _cache_key(files, tokenizer, chat if has_chat else None)
    cache = Path(cache_dir) / f"tokens-{key}.npy" if cache_dir else None
    mask_cache = Path(cache_dir) / f"tokens-{key}.mask.npy" if cache_dir and has_chat else None
    if cache is not None and cache.exists() and (mask_cache is None or mask_cache.exists()):
        return load_shard(cache), None if mask_cache is None else np.load(mask_cache).astype(np.uint8)
    parts, masks = [], []
    for f in _progress(files, progress, "tokenising"):
        ids, mask = _tokenize_file(f, tokenizer, chat)
        parts.append(ids)
        masks.append(np.ones(len(ids), np.uint8) if mask is None else mask)
    stream = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    mask = (np.concatenate(masks) if masks else np.zeros(0, np.uint8)) if has_chat else None
    if tokenizer is not None and stream.size and int(stream.max()) >= tokenizer.vocab_size:
        raise Q4KError(f"token id {int(stream.max())} in the data is outside the teacher's vocabulary "
                       f"({tokenizer.vocab_size}): the shards were made with another tokenizer")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        if mask_cache is not None:
            save_tokens(mask_cache, mask)          # uint32 on disk; the mask is written first
        save_tokens(cache, stream)
    return stream, mask


def _tokenize_file(f, tokenizer, chat):
    """One file -> (ids uint32, loss mask uint8 or None)."""
    suffix = f.suffix.lower()
    if suffix in SHARD_EXTENSIONS:
        return load_shard(f), None
    if tokenizer is None:
        raise Q4KError(f"{f} is text and no tokenizer was given")
    if suffix in CHAT_EXTENSIONS:
        return tokenize_chat_file(f, tokenizer, chat)
    text = read_text(f)
    return (np.asarray(tokenizer.encode(text), dtype=np.uint32) if text else np.zeros(0, np.uint32)), None


def _cache_key(files, tokenizer, chat=None) -> str:
    h = hashlib.sha256(tokenizer.fingerprint.encode() if tokenizer is not None else b"no tokenizer")
    if chat is not None:
        h.update(f"\0chat template {chat.key}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _progress(items, on, desc):
    if not on:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file")


# -- sequences and batches -----------------------------------------------------------------------

class Batch(NamedTuple):
    """One batch: ids int32 [B, T], loss_mask bool [B, T] (None: every id a target), index [B]
    (the sequence numbers in the dataset, which a teacher cache is keyed by)."""
    ids: np.ndarray
    loss_mask: np.ndarray | None
    index: np.ndarray


class TokenDataset:
    """Sequences of ``seq_len`` tokens packed from one token stream; uint32 [n, T] in ``sequences``
    and, for chat data, uint8 [n, T] in ``masks`` (1: the id is a training target; else None)."""

    def __init__(self, tokens, seq_len: int, bos_id=None, loss_mask=None):
        if seq_len < 2:
            raise Q4KError(f"the sequence length must be at least 2, not {seq_len}")
        self.seq_len = int(seq_len)
        self.bos_id = bos_id
        if loss_mask is not None and len(loss_mask) != len(tokens):
            raise Q4KError(f"the loss mask has {len(loss_mask)} entries for {len(tokens)} tokens")
        self.sequences, self.masks = _pack(np.asarray(tokens, dtype=np.uint32), self.seq_len, bos_id,
                                           None if loss_mask is None else np.asarray(loss_mask, np.uint8))
        if len(self.sequences) == 0:
            raise Q4KError(f"the data has {len(tokens)} tokens: not even one sequence of {seq_len} "
                           "(add data or lower the sequence length)")
        h = hashlib.sha256(self.sequences.tobytes())
        if self.masks is not None:
            h.update(self.masks.tobytes())
        self.fingerprint = h.hexdigest()[:16]

    @classmethod
    def from_sequences(cls, sequences, masks=None) -> "TokenDataset":
        """Already packed sequences uint32 [n, T] (+ masks uint8 [n, T]), e.g. from a teacher cache."""
        sequences = np.asarray(sequences, np.uint32)
        if sequences.ndim != 2:
            raise Q4KError(f"packed sequences must be [n, T], got shape {sequences.shape}")
        return cls(sequences.reshape(-1), sequences.shape[1], None,
                   None if masks is None else np.asarray(masks, np.uint8).reshape(-1))

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def n_tokens(self) -> int:
        return self.sequences.size

    @property
    def n_trained(self) -> int:
        """Ids that are training targets (all of them without a loss mask)."""
        return self.n_tokens if self.masks is None else int(self.masks.sum())

    def batches(self, batch_size: int, seed: int = 0) -> "Batches":
        return Batches(self, batch_size, seed)

    def batch(self, index) -> Batch:
        """The sequences ``index`` (int [b]) as a Batch."""
        index = np.asarray(index, dtype=np.int64)
        mask = None if self.masks is None else self.masks[index].astype(bool)
        return Batch(self.sequences[index].astype(np.int32), mask, index)

    def in_order(self, batch_size: int, limit=None):
        """Every sequence once, in stored order (for evaluation): int32 [b, T], the last b may be smaller."""
        for b in self.in_order_batches(batch_size, limit):
            yield b.ids

    def in_order_batches(self, batch_size: int, limit=None):
        """As in_order, as Batch tuples (ids, loss mask, sequence numbers)."""
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, n)))


def _pack(stream, T, bos, mask=None):
    """uint32 [N] (+ mask uint8 [N]) -> (uint32 [n, T], uint8 [n, T] or None); with a ``bos``
    every row starts with it (stream BOS reused; an inserted one has mask 0)."""
    if bos is None:
        n = len(stream) // T
        rows = stream[:n * T].reshape(n, T).copy()
        return rows, None if mask is None else mask[:n * T].reshape(n, T).copy()
    rows, mrows, pos, lead = [], [], 0, np.array([bos], np.uint32)
    while pos < len(stream):
        at_bos = stream[pos] == bos
        take = T if at_bos else T - 1
        if pos + take > len(stream):
            break
        rows.append(stream[pos:pos + take] if at_bos else np.concatenate([lead, stream[pos:pos + take]]))
        if mask is not None:
            m = mask[pos:pos + take]
            mrows.append(m if at_bos else np.concatenate([np.zeros(1, np.uint8), m]))
        pos += take
    if not rows:
        return np.zeros((0, T), np.uint32), None if mask is None else np.zeros((0, T), np.uint8)
    return np.stack(rows), np.stack(mrows) if mask is not None else None


class Batches:
    """Endless deterministic batches of ``batch_size`` sequences (int32 [B, T]).

    ``position`` counts the sequences handed out over all epochs; epoch e = position // n walks
    the sequences in the order permutation(seed, e), and a batch may run on into the next epoch.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise Q4KError(f"the batch size must be at least 1, not {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.position = 0
        self._orders = {}

    @property
    def epoch(self) -> int:
        return self.position // len(self.dataset)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))}
        return self._orders[epoch]

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch().ids

    def next_batch(self) -> Batch:
        """The next batch with its loss mask and sequence numbers."""
        n = len(self.dataset)
        picks = [self.order(p // n)[p % n] for p in range(self.position, self.position + self.batch_size)]
        self.position += self.batch_size
        return self.dataset.batch(picks)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position, "batch_size": self.batch_size,
                "n_sequences": len(self.dataset), "seq_len": self.dataset.seq_len,
                "fingerprint": self.dataset.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_sequences", "seq_len", "fingerprint"):
            ours = self.state_dict()[key]
            if state.get(key) != ours:
                raise Q4KError(f"the data differs from the checkpoint's ({key}: {state.get(key)} there, "
                               f"{ours} here): resume with the same data, tokenizer and --seq")
        self.seed, self.position = int(state["seed"]), int(state["position"])


# -- all of it -----------------------------------------------------------------------------------

def load_datasets(paths, seq_len, tokenizer=None, held_out=0.1, held_out_paths=None, seed=0,
                  extensions=TEXT_EXTENSIONS + SHARD_EXTENSIONS + CHAT_EXTENSIONS, cache_dir=None,
                  progress=False, chat=None) -> tuple:
    """(train, held_out) TokenDatasets from files/folders. Held-out data is ``held_out_paths`` when
    given, else a ``held_out`` ratio of the files (by file); held_out=0 -> (train, None).
    ``chat``: the ChatTemplate that renders JSONL conversations (chat.py)."""
    files = find_files(paths, extensions)
    if held_out_paths:
        train_files, held_files = files, find_files(held_out_paths, extensions)
    else:
        train_files, held_files = split_files(files, held_out, seed)
    bos = tokenizer.bos_id if tokenizer is not None and tokenizer.add_bos else None

    def dataset(files):
        stream, mask = tokenize_files_masked(files, tokenizer, cache_dir, progress, chat)
        return TokenDataset(stream, seq_len, bos, loss_mask=mask)

    train = dataset(train_files)
    return (train, None) if not held_files else (train, dataset(held_files))
