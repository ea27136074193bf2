"""Offline teacher cache: run the teacher once, keep its top-k per token, train later without it.

    write_cache(teacher, train, heldout, out, top_k=64)       # q4kdistill cache-teacher
    cache = TeacherCache.open(out)                            # distill --teacher-cache
    fn = cache.targets(batch, "train")                        # fn(start, stop) -> SparseTargets

Layout of a cache folder:
    meta.json                  what made it (teacher identity, tokenizer, template, seq, k, T, V),
                               the id width, per split the sequence count, fingerprint and shards
    train.tokens.npz           the packed sequences uint32 [n, T] (+ loss masks uint8 [n, T]), so
    heldout.tokens.npz         training from the cache needs neither the data nor the tokenizer
    train-00000.npz ...        one shard per SHARD_SEQUENCES sequences, np.savez_compressed (zlib):
        ids    uint8 [bytes]   the top-k ids [s, T, k], bit-packed at ceil(log2 V) bits each
                               (gemma-3, V = 262,144: 18 bits; V <= 65,536 would be 16), big-endian
                               bit order of np.packbits, most probable id first
        logp   float16 [s, T, k]  log-probabilities at temperature T (softmax over the whole vocabulary)
        rest   float16 [s, T]     log of the remaining mass, logsumexp(z outside the top k) - logsumexp(z)
    Per token: k * (bits / 8 + 2) + 2 bytes before zlib (k = 64, 18 bits: 274 bytes).
fp16 log-probabilities keep 11 significant bits: a log-prob of -1 is exact to 0.0005, one of -10
to 0.004, i.e. the probabilities are kept to about 0.05 % and 0.4 % of themselves.

Shards are written to a temporary name and renamed (atomic): an interrupted run leaves whole
shards only, and running the same command again skips them (resumable).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from ..errors import Q4KError
from ..student.losses import SparseTargets

FORMAT = "q4kdistill-teacher-cache"
VERSION = 1
SHARD_SEQUENCES = 64
SPLITS = ("train", "heldout")


# -- id packing ------------------------------------------------------------------------------------

def id_bits(vocab_size: int) -> int:
    """Bits per token id: ceil(log2 V), at least 1."""
    return max(1, math.ceil(math.log2(max(int(vocab_size), 2))))


def pack_ids(ids, bits: int) -> np.ndarray:
    """uint [...] ids -> uint8 [ceil(n * bits / 8)]: each id's ``bits`` low bits, most significant first."""
    flat = np.asarray(ids, dtype=np.uint32).reshape(-1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    return np.packbits(((flat[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))


def unpack_ids(packed, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_ids: -> uint32 [count]."""
    b = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits).reshape(count, bits)
    return (b.astype(np.uint32) << np.arange(bits - 1, -1, -1, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


# -- the teacher's top k -----------------------------------------------------------------------------

def top_k_logprobs(t, k: int, temperature: float = 1.0):
    """Teacher logits t [n, V] -> (ids [n, k] descending by probability, logp [n, k], rest [n]),
    log-probs of softmax(t / T) over the whole vocabulary; rest = log of the mass outside the top k."""
    from ..backend import array_module

    xp = array_module(t)
    z = t.astype(xp.float32) / temperature
    n, V = z.shape
    k = min(k, V)
    idx = xp.argpartition(z, V - k, axis=-1)[:, V - k:]                 # [n, k], unordered
    r = xp.arange(n)[:, None]
    order = xp.argsort(-z[r, idx], axis=-1)
    idx = idx[r, order]                                                 # most probable first
    m = z.max(axis=-1, keepdims=True)
    e = xp.exp(z - m)
    lse = m[:, 0] + xp.log(e.sum(axis=-1))                              # [n]
    logp = z[r, idx] - lse[:, None]
    e[r, idx] = 0.0
    rest_sum = e.sum(axis=-1)                                           # sum outside K, scaled by exp(-m)
    with np.errstate(divide="ignore"):
        rest = xp.where(rest_sum > 0, m[:, 0] + xp.log(xp.maximum(rest_sum, 1e-45)) - lse, -xp.inf)
    return idx, logp, rest


# -- writing ---------------------------------------------------------------------------------------

def cache_identity(meta: dict) -> str:
    """A short hash naming a cache's content (what a training run's fingerprint records)."""
    keep = {k: meta.get(k) for k in ("teacher", "tokenizer", "chat_template", "seq", "top_k", "temperature",
                                 "vocab_size", "id_bits")}
    keep["splits"] = {s: meta["splits"][s]["fingerprint"] for s in meta["splits"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.npz"


def write_cache(teacher, datasets: dict, out, top_k: int, temperature=1.0, batch=4, identity=None,
                progress=True, log=print) -> dict:
    """Run ``teacher`` over every sequence of ``datasets`` ({"train": TokenDataset, "heldout": ...})
    and write the cache folder ``out``; shards already there (same meta) are kept. -> a summary dict."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    V, seq = int(teacher.vocab_size), next(iter(datasets.values())).seq_len
    if not 1 <= top_k < V:
        raise Q4KError(f"--top-k must be in 1..{V - 1} (the teacher's vocabulary is {V}), got {top_k}")
    meta = {"format": FORMAT, "version": VERSION, **(identity or {}), "seq": seq, "top_k": int(top_k),
            "temperature": float(temperature), "vocab_size": V, "id_bits": id_bits(V),
            "shard_sequences": SHARD_SEQUENCES,
            "splits": {s: {"n_sequences": len(d), "fingerprint": d.fingerprint,
                           "shards": -(-len(d) // SHARD_SEQUENCES), "masked": d.masks is not None}
                       for s, d in datasets.items()}}
    _check_resumable(out, meta)
    _write_json(out / "meta.json", meta)
    for split, d in datasets.items():
        arrays = {"sequences": d.sequences} if d.masks is None else {"sequences": d.sequences, "masks": d.masks}
        if not (out / f"{split}.tokens.npz").exists():
            _write_npz(out / f"{split}.tokens.npz", **arrays)
    todo = [(s, i) for s, d in datasets.items() for i in range(meta["splits"][s]["shards"])
            if not (out / shard_name(s, i)).exists()]
    total = sum(len(d) for d in datasets.values()) * seq
    done_tokens = total - sum(min(SHARD_SEQUENCES, len(datasets[s]) - i * SHARD_SEQUENCES) for s, i in todo) * seq
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=done_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc="teacher top-k", dynamic_ncols=True)
    teacher.use_cuda_graphs(True)           # a GPU: the trunk replayed per batch shape (unmasked batches)
    try:
        for split, i in todo:
            d = datasets[split]
            index = np.arange(i * SHARD_SEQUENCES, min((i + 1) * SHARD_SEQUENCES, len(d)))
            _write_npz(out / shard_name(split, i), **_run_shard(teacher, d, index, top_k, temperature, batch, meta))
            bar.update(len(index) * seq)
    finally:
        teacher.use_cuda_graphs(False)
    bar.close()
    size = sum(f.stat().st_size for f in out.glob("*-*.npz"))
    tokens_bytes = sum((out / f"{s}.tokens.npz").stat().st_size for s in datasets)
    summary = {"out": str(out), "tokens": total, "top_k": int(top_k), "id_bits": meta["id_bits"],
               "shard_bytes": size, "bytes_per_token": size / total,
               "bytes_per_token_with_sequences": (size + tokens_bytes) / total,
               "seconds": time.perf_counter() - t0, "new_shards": len(todo), "identity": cache_identity(meta)}
    if log:
        log(f"teacher cache {out}: {total:,} tokens, top-{top_k}, {summary['bytes_per_token']:.1f} bytes/token "
            f"({summary['bytes_per_token_with_sequences']:.1f} with the token sequences), {len(todo)} new shards")
    return summary


def cache_teacher(teacher, data, out, top_k=64, seq=64, batch=4, heldout=0.1, seed=0, temperature=1.0,
                  chat_template=None, teacher_backend="auto", progress=True, log=print) -> dict:
    """`q4kdistill cache-teacher`: tokenise ``data`` as ``distill`` would (same split by file, same
    packing), run the teacher over the train and held-out sequences, write the cache ``out``."""
    from .loop import DistillConfig, file_identity, load_data, load_teacher

    cfg = DistillConfig(teacher=teacher, data=data, seq=seq, heldout=heldout, seed=seed, chat_template=chat_template,
                        teacher_backend=teacher_backend, temperature=temperature).validated()
    if not temperature > 0:
        raise Q4KError(f"--temperature must be > 0, got {temperature}")
    if top_k < 1:
        raise Q4KError(f"--top-k must be >= 1, got {top_k}")
    if batch < 1:
        raise Q4KError(f"--batch must be >= 1, got {batch}")
    tokenizer, train, held, _ = load_data(cfg, log)
    t = load_teacher(cfg, log)
    from .chat import load_template

    tmpl = None if tokenizer is None else load_template(teacher, tokenizer, chat_template, required=False)
    identity = {"teacher": file_identity(teacher), "tokenizer": None if tokenizer is None else tokenizer.fingerprint,
                "chat_template": None if tmpl is None or train.masks is None else tmpl.key, "data": str(data)}
    return write_cache(t, {"train": train, "heldout": held}, out, top_k, temperature, batch, identity, progress, log)


def _check_resumable(out: Path, meta: dict) -> None:
    """A folder with another cache's meta is refused (its shards would not match)."""
    path = out / "meta.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise Q4KError(f"{out} holds an unreadable meta.json: choose a new --out") from None
    if old.get("format") != FORMAT or cache_identity(old) != cache_identity(meta):
        raise Q4KError(f"{out} already holds a teacher cache made with other settings (teacher, data, --seq, "
                       "--top-k or --temperature): choose a new --out, or repeat that command to resume it")


def _run_shard(teacher, d, index, k, temperature, batch, meta) -> dict:
    """Sequences ``index`` of dataset ``d`` through the teacher -> the shard's arrays."""
    from ..backend import to_host

    T = d.seq_len
    ids = np.zeros((len(index), T, k), np.uint32)
    logp = np.zeros((len(index), T, k), np.float16)
    rest = np.zeros((len(index), T), np.float16)
    for a in range(0, len(index), batch):
        b = d.batch(index[a:a + batch])
        nb = len(b.index)
        for start, stop, t in teacher.iter_logits(b.ids):
            i, lp, r = top_k_logprobs(t, k, temperature)
            rows = slice(start, stop)
            ids[a:a + nb].reshape(-1, k)[rows] = to_host(i)
            logp[a:a + nb].reshape(-1, k)[rows] = to_host(lp)
            rest[a:a + nb].reshape(-1)[rows] = to_host(r)
    return {"ids": pack_ids(ids, meta["id_bits"]), "logp": logp, "rest": rest}


def shrink_cache(src, dst, top_k: int) -> dict:
    """A cache of the ``top_k`` most probable ids from one with more (no teacher run): the ids are
    stored most probable first, so the first ``top_k`` are the smaller cache's, and the dropped
    ones join the rest mass (logaddexp in float64, then fp16). -> write_cache's summary keys."""
    src, dst = Path(src), Path(dst)
    cache = TeacherCache.open(src)
    if not 1 <= top_k <= cache.k:
        raise Q4KError(f"{src} holds the top {cache.k}; cannot make a top-{top_k} cache from it")
    dst.mkdir(parents=True, exist_ok=True)
    meta = dict(cache.meta, top_k=int(top_k))
    for split, info in meta["splits"].items():
        (dst / f"{split}.tokens.npz").write_bytes((src / f"{split}.tokens.npz").read_bytes())
        for i in range(info["shards"]):
            sh = cache._shard(split, i)
            dropped = sh["logp"][..., top_k:].astype(np.float64)
            rest = np.logaddexp(sh["rest"].astype(np.float64), np.logaddexp.reduce(dropped, axis=-1)) \
                if dropped.shape[-1] else sh["rest"].astype(np.float64)
            _write_npz(dst / shard_name(split, i), ids=pack_ids(sh["ids"][..., :top_k], meta["id_bits"]),
                       logp=np.ascontiguousarray(sh["logp"][..., :top_k]), rest=rest.astype(np.float16))
    _write_json(dst / "meta.json", meta)
    tokens = sum(info["n_sequences"] for info in meta["splits"].values()) * meta["seq"]
    size = sum(f.stat().st_size for f in dst.glob("*-*.npz"))
    return {"out": str(dst), "tokens": tokens, "top_k": int(top_k), "id_bits": meta["id_bits"], "shard_bytes": size,
            "bytes_per_token": size / tokens, "identity": cache_identity(meta)}


# -- reading ---------------------------------------------------------------------------------------

class TeacherCache:
    """A cache folder opened for training: datasets from its stored sequences, sparse targets by sequence."""

    def __init__(self, path, meta: dict, max_shards_in_memory=16):
        self.path, self.meta = Path(path), meta
        self.k, self.bits, self.seq = meta["top_k"], meta["id_bits"], meta["seq"]
        self._shards, self._max = {}, max_shards_in_memory

    @classmethod
    def open(cls, path) -> "TeacherCache":
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except OSError:
            raise Q4KError(f"{path}: not a teacher cache (no meta.json; make one with q4kdistill cache-teacher)") from None
        except json.JSONDecodeError as exc:
            raise Q4KError(f"{path}/meta.json: not valid JSON ({exc.msg})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise Q4KError(f"{path}: not a version-{VERSION} q4kdistill teacher cache")
        cache = cls(path, meta)
        missing = [shard_name(s, i) for s, info in meta["splits"].items() for i in range(info["shards"])
                   if not (path / shard_name(s, i)).exists()]
        if missing:
            raise Q4KError(f"{path}: {len(missing)} shards missing ({missing[0]}, ...): the cache-teacher run was "
                           "interrupted; run the same command again to finish it")
        return cache

    @property
    def identity(self) -> str:
        return cache_identity(self.meta)

    def dataset(self, split: str):
        """The split's TokenDataset, rebuilt from the stored sequences (checked by fingerprint)."""
        from .corpus import TokenDataset

        if split not in self.meta["splits"]:
            return None
        try:
            with np.load(self.path / f"{split}.tokens.npz") as z:
                seqs, masks = z["sequences"], (z["masks"] if "masks" in z.files else None)
        except (OSError, KeyError, ValueError) as exc:
            raise Q4KError(f"{self.path}/{split}.tokens.npz: unreadable ({exc})") from None
        d = TokenDataset.from_sequences(seqs, masks)
        if d.fingerprint != self.meta["splits"][split]["fingerprint"]:
            raise Q4KError(f"{self.path}/{split}.tokens.npz does not match the cache's meta.json (fingerprint)")
        return d

    def _shard(self, split: str, i: int) -> dict:
        key = (split, i)
        if key not in self._shards:
            if len(self._shards) >= self._max:
                self._shards.pop(next(iter(self._shards)))
            path = self.path / shard_name(split, i)
            try:
                with np.load(path) as z:
                    logp, rest = z["logp"], z["rest"]
                    ids = unpack_ids(z["ids"], self.bits, logp.size).reshape(logp.shape)
            except (OSError, KeyError, ValueError, EOFError) as exc:
                raise Q4KError(f"{path}: unreadable cache shard ({exc}); delete it and rerun cache-teacher") from None
            self._shards[key] = {"ids": ids, "logp": logp, "rest": rest}
        return self._shards[key]

    def sparse(self, split: str, index) -> SparseTargets:
        """Sequences ``index`` [b] -> SparseTargets over their b*T tokens (row-major), logp float32."""
        S = self.meta["shard_sequences"]
        ids, logp = [], []
        for j in np.asarray(index).tolist():
            sh = self._shard(split, j // S)
            ids.append(sh["ids"][j % S])
            logp.append(np.concatenate([sh["logp"][j % S], sh["rest"][j % S][:, None]], axis=-1))
        return SparseTargets(np.concatenate(ids).astype(np.int64), np.concatenate(logp).astype(np.float32))

    def targets(self, batch, split: str):
        """fn(start, stop) -> SparseTargets of those flattened tokens of ``batch`` (a corpus.Batch)."""
        sparse = self.sparse(split, batch.index)
        return sparse.rows


class FileWeights:
    """A teacher file's config and tensors decoded on the host one at a time: what the student's
    initialisation needs, without uploading the teacher (training from a cache)."""

    def __init__(self, path):
        from ..formats.model_file import ModelFile

        self.model = ModelFile.open(path)
        self.config = self.model.config
        self.source = str(path)

    @property
    def vocab_size(self) -> int:
        name = "token_embd.weight" if self.config.tied_output else "output.weight"
        return int(self.model.tensors[name].shape[0])

    def weight_f32(self, name: str):
        from ..teacher.model import upload, weight_to_f32

        if name not in self.model.tensors:
            raise Q4KError(f"the teacher has no tensor {name!r}")
        info = self.model.tensors[name]
        return weight_to_f32(upload(self.model.tensor_data(name), info, np))
