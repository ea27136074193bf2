"""APR v2 files as aprender writes them and realizar reads them: read uncompressed ones, write them.

    offset size  field (little-endian)
    0      4     magic b"APR\\0" (realizar also takes the legacy b"APR2")
    4      1     version major (2)
    5      1     version minor (0)
    6      2     flags u16 (FLAGS below)
    8      4     tensor_count u32
    12     8     metadata_offset u64     (64: right after the header)
    20     4     metadata_size u32       (JSON bytes, then zero padding to a multiple of 64)
    24     8     tensor_index_offset u64
    32     8     data_offset u64
    40     4     header CRC32 of bytes 0..40 and 44..64
    44     20    reserved, zero
    tensor index (sorted by name bytes, padded to 64), one entry per tensor:
        name_len u16 | name utf-8 | dtype u8 (DTYPES) | ndim u8 | dims u64 x ndim
        | offset u64 (from data_offset, multiple of 64) | size u64
    data: each tensor 64-byte aligned; GGML block types byte-identical to GGUF's
    footer: CRC32 u32 of every byte before it (optional when reading: neither Rust reader checks it)

dims: 2-D tensors are [rows, cols] (GGUF's shape reversed), 1-D as is, 3+-D in GGUF's order
(aprender layout_contract enforce_import_contract reverses 2-D shapes only).

Where each rule comes from (paiml/aprender, paiml/realizar, read 2026-12-03):
  container    aprender crates/apr-format/src/v2/{mod.rs,header_impl.rs,writer.rs,reader_impl.rs}
  dtype codes  aprender crates/apr-format/src/v2/tensor_index_impl.rs (TensorDType::from_u8);
               realizar src/apr/mod.rs (TensorEntry::from_binary: 8/9/128/129 -> APR q4/q8, else GGML)
  metadata     aprender crates/aprender-core/src/format/converter/{write.rs,write_model_config.rs}
               (write_apr_file_raw: typed fields + "tokenizer.*"/"model.*" custom keys);
               realizar src/apr/metadata.rs (serde aliases: never write two spellings of a field)
  names        q4kdistill/formats/apr_names.py (aprender Architecture::map_name)

Reading gives GGUF names, GGUF-style metadata (``gguf_metadata``) and GGML types: aprender's APR_Q4
and APR_Q8 tensors are decoded to F32 (exact, in memory); a code that means
one thing to aprender and another to GGML (3, 6, 7, 8, 9) is decided by the entry's byte size.
Writing (``write``) uses only the codes both Rust readers and GGML agree on (F32, F16, BF16, Q4_K,
Q6_K); other GGML types are dequantized to F32 -- exactly our float32 dequantization, so the
logits do not change -- and the growth is reported.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field, replace

import gguf
import numpy as np

from ..errors import FileFormatError, Q4KError
from . import apr_names, quants
from .manifest import tensor_info

T = gguf.GGMLQuantizationType
MAGIC = b"APR\0"
MAGIC_LEGACY = b"APR2"                       # realizar src/apr/mod.rs accepts it; same layout
VERSION = (2, 0)
ALIGN = 64
HEADER = struct.Struct("<4sBBHIQIQQI20s")   # 64 bytes, fields as in the table above
ENTRY_TAIL = struct.Struct("<QQ")            # offset, size
MAX_METADATA_BYTES = 1 << 28                 # 256 MiB of JSON

FLAGS = {   # aprender's AprV2Flags
    "LZ4_COMPRESSED": 0x0001, "ZSTD_COMPRESSED": 0x0002, "ENCRYPTED": 0x0004, "SIGNED": 0x0008,
    "SHARDED": 0x0010, "QUANTIZED": 0x0020, "HAS_VOCAB": 0x0200,
    "LAYOUT_ROW_MAJOR": 0x0400, "LAYOUT_COLUMN_MAJOR": 0x0800,
}
REFUSED = {  # flag -> why we cannot read such a file
    "LZ4_COMPRESSED": "LZ4-compressed APR files are not supported (write it uncompressed)",
    "ZSTD_COMPRESSED": "Zstd-compressed APR files are not supported (write it uncompressed)",
    "ENCRYPTED": "encrypted APR files are not supported",
    "SHARDED": "sharded APR files are not supported",
    "LAYOUT_COLUMN_MAJOR": "column-major APR files are refused (aprender marks them invalid)",
}

# aprender's TensorDType::from_u8 (tensor_index_impl.rs): code -> GGML type, or an APR-native name
APR_Q4, APR_Q8, U8 = "APR_Q4", "APR_Q8", "U8"
APRENDER_DTYPES = {0: T.F32, 1: T.F16, 30: T.BF16, 3: T.F64, 4: T.I32, 5: T.I64, 6: T.I8, 7: U8,
                   8: APR_Q4, 128: APR_Q4, 9: APR_Q8, 129: APR_Q8, 12: T.Q4_K, 14: T.Q6_K}
# codes aprender, realizar and GGML all read the same way: the only ones we write
WRITE_CODES = {T.F32: 0, T.F16: 1, T.BF16: 30, T.Q4_K: 12, T.Q6_K: 14}
APR_Q4_BLOCK = 32                            # APR_Q4: per 32 weights f16 scale + 16 nibble bytes
_GGML_CODES = {int(t) for t in T}

# aprender's metadata field <-> GGUF key suffix after "{arch}." <-> ModelConfig attribute
CONFIG_FIELDS = (
    ("hidden_size", "embedding_length", "d_model"),
    ("num_layers", "block_count", "n_layers"),
    ("num_heads", "attention.head_count", "n_heads"),
    ("num_kv_heads", "attention.head_count_kv", "n_kv_heads"),
    ("vocab_size", "vocab_size", "vocab_size"),
    ("intermediate_size", "feed_forward_length", "d_ff"),
    ("max_position_embeddings", "context_length", "context_length"),
    ("rope_theta", "rope.freq_base", "rope_base"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon", "norm_eps"),
    ("head_dim", "attention.key_length", "head_dim"),
)
F32_FIELDS = ("rope_theta", "rms_norm_eps")   # f32 in aprender's AprV2Metadata
# aprender's tokenizer keys (write.rs insert_tokenizer_metadata & co.) <-> GGUF keys
TOKENIZER_KEYS = (
    ("tokenizer.vocabulary", "tokenizer.ggml.tokens"),
    ("tokenizer.merges", "tokenizer.ggml.merges"),
    ("tokenizer.scores", "tokenizer.ggml.scores"),
    ("tokenizer.token_type", "tokenizer.ggml.token_type"),
    ("tokenizer.model", "tokenizer.ggml.model"),             # GGUF import path
    ("tokenizer.model_type", "tokenizer.ggml.model"),        # SafeTensors path; realizar reads this one
    ("tokenizer.bos_token_id", "tokenizer.ggml.bos_token_id"),
    ("tokenizer.eos_token_id", "tokenizer.ggml.eos_token_id"),
    ("tokenizer.padding_token_id", "tokenizer.ggml.padding_token_id"),
    ("tokenizer.add_bos_token", "tokenizer.ggml.add_bos_token"),
    ("tokenizer.pre_type", "tokenizer.ggml.pre"),
    ("tokenizer.chat_template", "tokenizer.chat_template"),
)
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type")
# gemma3 files from `apr import` carry no sliding window. llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3)
# fixes the pattern (5 sliding layers of 6) and the local rope base (10000) but reads the window;
# the released gemma-3 checkpoints' config.json give it by size, told apart by their layer count.
GEMMA3_WINDOWS = {18: 512, 26: 512, 34: 1024, 48: 1024, 62: 1024}   # 270m, 1b, 4b, 12b, 27b


@dataclass
class APRHeader:
    version: tuple
    flags: int
    metadata: dict          # GGUF-style metadata (see gguf_metadata)
    json: dict              # the JSON metadata as stored
    tensors: dict           # GGUF name -> TensorInfo as delivered (absolute offsets), index order
    data_offset: int
    file_size: int
    raw: dict = field(default_factory=dict)       # GGUF name -> (stored name, dtype code, abs offset, size)
    decode: dict = field(default_factory=dict)    # GGUF name -> APR_Q4 | APR_Q8 (data needs decoding)
    hf_names: bool = False                        # the file used Hugging Face names
    config_overrides: dict = field(default_factory=dict)   # ModelConfig fields the names imply
    tied_copy: str | None = None                  # "output.weight" when it came from lm_head.weight

    @property
    def data_end(self) -> tuple:
        """(end of the last tensor's bytes, the same rounded up to 64): where a footer may start."""
        ends = [off + size for _, _, off, size in self.raw.values()] or [self.data_offset]
        end = max(ends)
        return end, self.data_offset + _pad(end - self.data_offset)


# -- reading ---------------------------------------------------------------------------

def read_header(path) -> APRHeader:
    """Header, JSON metadata and tensor index; tensor data need not be there."""
    path = str(path)
    size = os.path.getsize(path)
    if size < HEADER.size:
        raise FileFormatError(path, f"not an APR file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return parse_header(buf, path)


def parse_header(buf, path) -> APRHeader:
    path, size = str(path), len(buf)
    if size < HEADER.size:
        raise FileFormatError(path, f"not an APR file (only {size} bytes)")
    (magic, major, minor, flags, n_tensors, meta_off, meta_size,
     index_off, data_off, crc, _reserved) = HEADER.unpack_from(buf, 0)
    if magic == b"APR1":
        raise FileFormatError(path, "APR v1 files are not supported (convert it to APR v2 with aprender)")
    if magic not in (MAGIC, MAGIC_LEGACY):
        raise FileFormatError(path, f"not an APR file (starts with {magic!r}, expected {MAGIC!r})")
    if major != VERSION[0]:
        raise FileFormatError(path, f"APR version {major}.{minor} is not supported (2.x is)")
    if crc != header_crc(bytes(buf[:HEADER.size])):
        raise FileFormatError(path, "APR header CRC32 mismatch (corrupted header)")
    for name, why in REFUSED.items():
        if flags & FLAGS[name]:
            raise FileFormatError(path, why)
    if not (HEADER.size <= meta_off and meta_off + meta_size <= index_off <= data_off <= size):
        raise FileFormatError(path, f"APR sections out of order or past the end of the file (metadata "
                                    f"{meta_off}+{meta_size}, index {index_off}, data {data_off}, file {size} bytes)")
    if meta_size > MAX_METADATA_BYTES:
        raise FileFormatError(path, f"absurd APR metadata size {meta_size}")
    stored = _json(bytes(buf[meta_off:meta_off + meta_size]), path)
    h = APRHeader((major, minor), flags, {}, stored, {}, data_off, size)
    meta = gguf_metadata(stored)
    _read_tensors(h, _index(buf, path, index_off, data_off, n_tensors), meta.get("general.architecture"), path)
    h.metadata = complete_metadata(meta, h.tensors, path)
    return h


def _read_tensors(h: APRHeader, entries, arch, path) -> None:
    """Fill h.tensors / h.raw / h.decode from the index entries, under GGUF names."""
    names, h.hf_names = apr_names.canonical_names(path, arch, [e[0] for e in entries])
    for stored_name, code, dims, offset, nbytes in entries:
        name = names[stored_name]
        info, kind = _tensor(path, name, code, dims, h.data_offset + offset, nbytes)
        h.tensors[name] = info
        h.raw[name] = (stored_name, code, h.data_offset + offset, nbytes)
        if kind:
            h.decode[name] = kind
    if names.get(apr_names.LM_HEAD) == "output.weight":
        h.tied_copy = "output.weight"            # ModelFile drops it if it is the embedding's copy
    if h.hf_names and arch == "llama":
        # HF llama checkpoints keep q/k rows unpermuted: rotate-half ("neox") rope is the exact model
        h.config_overrides["rope_style"] = "neox"
        _note(path, "llama tensors with Hugging Face names (unpermuted q/k): running them with neox rope")


def header_crc(header: bytes) -> int:
    return zlib.crc32(header[44:64], zlib.crc32(header[:40]))


def _json(raw: bytes, path) -> dict:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FileFormatError(path, f"APR metadata is not JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise FileFormatError(path, "APR metadata is not a JSON object")
    return value


def _index(buf, path, start, end, n_tensors) -> list:
    """[(stored name, dtype code, dims as stored, offset from data_offset, size)] in index order."""
    if n_tensors * (2 + 2 + ENTRY_TAIL.size) > end - start:
        raise FileFormatError(path, f"absurd APR tensor count {n_tensors} for an index of {end - start} bytes")
    pos, entries, seen = start, [], set()

    def take(n, what):
        nonlocal pos
        if pos + n > end:
            raise FileFormatError(path, f"APR tensor index truncated while reading {what}")
        pos += n
        return buf[pos - n:pos]

    for _ in range(n_tensors):
        (name_len,) = struct.unpack("<H", take(2, "a name length"))
        try:
            name = bytes(take(name_len, "a name")).decode("utf-8")
        except UnicodeDecodeError:
            raise FileFormatError(path, f"APR tensor name at offset {pos - name_len} is not UTF-8") from None
        code, ndim = take(2, f"dtype of {name!r}")
        if not 1 <= ndim <= 4:
            raise FileFormatError(path, f"tensor {name!r} has {ndim} dimensions (1 to 4 allowed)")
        dims = struct.unpack(f"<{ndim}Q", take(8 * ndim, f"shape of {name!r}"))
        offset, nbytes = ENTRY_TAIL.unpack(take(ENTRY_TAIL.size, f"offset of {name!r}"))
        if offset % ALIGN:
            raise FileFormatError(path, f"tensor {name!r}: offset {offset} is not {ALIGN}-byte aligned")
        if name in seen:
            raise FileFormatError(path, f"tensor {name!r} appears twice")
        seen.add(name)
        entries.append((name, code, dims, offset, nbytes))
    return entries


def shape_ggml_of(dims) -> tuple:
    """GGUF-order shape (row length first) of APR dims: 2-D reversed, others as stored."""
    return tuple(dims[::-1]) if len(dims) == 2 else tuple(dims)


def apr_dims(info) -> tuple:
    """APR dims of a TensorInfo: [rows, cols] for 2-D, GGUF order otherwise."""
    return tuple(info.shape) if len(info.shape) == 2 else tuple(info.shape_ggml)


def _tensor(path, name, code, dims, offset, nbytes):
    """(TensorInfo as delivered, APR_Q4 | APR_Q8 | None) for an index entry.

    The code's aprender meaning wins; its GGML meaning is taken when only that one fits the
    entry's byte size (files from GGML-code writers: realizar reads those codes as GGML)."""
    shape_ggml = shape_ggml_of(dims)
    n = int(np.prod(shape_ggml, dtype=np.int64)) if shape_ggml else 0
    candidates = [APRENDER_DTYPES[code]] if code in APRENDER_DTYPES else []
    if code in _GGML_CODES and T(code) not in candidates:
        candidates.append(T(code))
    if not candidates:
        raise FileFormatError(path, f"tensor {name!r} has unknown dtype code {code}")
    for kind in candidates:
        if kind == U8:
            if nbytes == n:
                raise FileFormatError(path, f"tensor {name!r} is U8 (aprender dtype 7), which a teacher cannot use")
            continue
        if kind == APR_Q8 and nbytes == 4 + n:
            return tensor_info(path, name, T.F32, shape_ggml, offset), APR_Q8
        if kind == APR_Q4 and nbytes == -(-n // APR_Q4_BLOCK) * 18:
            return tensor_info(path, name, T.F32, shape_ggml, offset), APR_Q4
        if isinstance(kind, T) and kind in gguf.GGML_QUANT_SIZES:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            if shape_ggml[0] % block == 0 and nbytes == n // block * size:
                return tensor_info(path, name, kind, shape_ggml, offset), None
    meanings = " or ".join(k if isinstance(k, str) else k.name for k in candidates)
    raise FileFormatError(path, f"tensor {name!r}: {nbytes} bytes do not fit dtype code {code} ({meanings}) "
                                f"of shape {list(dims)}")


def decode(kind: str, raw: np.ndarray, info) -> np.ndarray:
    """APR-native bytes -> float32 of the logical shape, exactly the numbers aprender decodes
    (Q4_0 holds APR_Q4's numbers too, but our kernels do not run Q4_0).

    APR_Q8 (writer.rs add_q8_tensor):  f32 scale | i8 x n;   w = q * scale
    APR_Q4 (writer.rs add_q4_tensor):  per 32 weights of the flat tensor (the last block zero-padded):
                                       f16 scale | 16 bytes, weight 2j in the low nibble of byte j and
                                       2j+1 in the high one;   w = (nibble - 8) * scale"""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    n = info.n_elements
    if kind == APR_Q8:
        scale = raw[:4].view(np.float32)[0]
        return (raw[4:4 + n].view(np.int8).astype(np.float32) * scale).reshape(info.shape)
    blocks = raw.reshape(-1, 18)                                        # [n_blocks, 18]
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)    # [n_blocks, 1]
    lo, hi = blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4                   # [n_blocks, 16]: weights 0,2,.. / 1,3,..
    nibbles = np.stack([lo, hi], axis=-1).reshape(-1, 32)               # [n_blocks, 32] in weight order
    w = (nibbles.astype(np.float32) - 8.0) * scale
    return w.reshape(-1)[:n].reshape(info.shape)


def check_footer(buf, path, header: APRHeader) -> bool:
    """Check the CRC32 footer when the file has one (reads the whole file); False when it has none.

    aprender's writer pads every tensor to 64 bytes and then appends the CRC; neither Rust reader
    checks it and files without it exist, so a file ending right after its data is accepted."""
    size = len(buf)
    end, padded_end = header.data_end
    if size in (end, padded_end):
        return False
    if size not in (end + 4, padded_end + 4):
        raise FileFormatError(path, f"{size - padded_end} unexpected bytes after the tensor data "
                                    f"(data ends at {padded_end}, file has {size})")
    body = memoryview(buf)[:size - 4]
    crc = 0
    for start in range(0, len(body), 1 << 26):
        crc = zlib.crc32(body[start:start + (1 << 26)], crc)
    if crc != int.from_bytes(buf[size - 4:], "little"):
        raise FileFormatError(path, "APR footer CRC32 mismatch (corrupted or truncated data)")
    return True


def gguf_metadata(stored: dict) -> dict:
    """GGUF-style metadata of the JSON: our "gguf_metadata" if present, completed from aprender's
    typed fields, its "model.*" custom keys and its "tokenizer.*" keys."""
    ours = isinstance(stored.get("gguf_metadata"), dict)     # written by us: config keys all there
    meta = dict(stored["gguf_metadata"]) if ours else {}
    arch = meta.get("general.architecture") or _first(stored, "architecture", "model.architecture",
                                                      "hf_model_type", "model_type")
    if not isinstance(arch, str) or not arch:
        return meta
    arch = {"qwen": "qwen2", "qwen2.5": "qwen2"}.get(arch.lower(), arch.lower())
    meta.setdefault("general.architecture", arch)
    for fld, suffix, _ in CONFIG_FIELDS:
        value = _first(stored, fld, f"model.{fld}")
        if value is not None and not ours:
            f32 = fld in F32_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool)
            meta[f"{arch}.{suffix}"] = float(np.float32(value)) if f32 else value
    for key, gguf_key in TOKENIZER_KEYS:
        if stored.get(key) is not None and gguf_key not in meta:
            meta[gguf_key] = stored[key]
    if stored.get("chat_template") is not None:
        meta.setdefault("tokenizer.chat_template", stored["chat_template"])
    return meta


def _first(d: dict, *keys):
    return next((d[k] for k in keys if d.get(k) is not None), None)


def complete_metadata(meta: dict, tensors: dict, path) -> dict:
    """Fill what aprender's metadata leaves out but exact computation needs: head_dim and kv heads
    from the tensor shapes (exact), gemma3's sliding window from the released checkpoints (said on
    stderr, refused when the layer count does not name one)."""
    arch = meta.get("general.architecture")
    if arch is None:
        return meta
    heads, d_model = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.embedding_length")
    q, k = tensors.get("blk.0.attn_q.weight"), tensors.get("blk.0.attn_k.weight")
    if (f"{arch}.attention.key_length" not in meta and isinstance(heads, int) and isinstance(d_model, int)
            and heads > 0 and q is not None and q.shape[0] != d_model):     # head_dim != d_model / heads
        head_dim = q.shape[0] // heads
        if head_dim * heads == q.shape[0]:
            meta[f"{arch}.attention.key_length"] = head_dim
            if f"{arch}.attention.head_count_kv" not in meta and k is not None and k.shape[0] % head_dim == 0:
                meta[f"{arch}.attention.head_count_kv"] = k.shape[0] // head_dim
    if arch == "gemma3" and f"{arch}.attention.sliding_window" not in meta:
        layers = meta.get(f"{arch}.block_count")
        window = GEMMA3_WINDOWS.get(layers) if isinstance(layers, int) else None
        if window is None:
            raise FileFormatError(path, f"gemma3 APR without a sliding window, and {layers} layers match no "
                                        f"released gemma-3 (window unknown: exact attention impossible)")
        meta[f"{arch}.attention.sliding_window"] = window
        _note(path, f"gemma3 APR carries no sliding window: using the released gemma-3 value for {layers} "
                    f"layers ({window}; 5 of 6 layers sliding, local rope base 10000, as llama.cpp)")
    return meta


def _note(path, text: str) -> None:
    print(f"note: {os.path.basename(str(path))}: {text}", file=sys.stderr)


# -- writing ---------------------------------------------------------------------------

@dataclass
class _Out:
    """One tensor as written: stored name, dtype code, APR dims, nbytes and how to get its bytes."""
    name: str
    code: int
    dims: tuple
    nbytes: int
    source: str             # GGUF name in the model
    to_f32: bool            # dequantize to float32 on the way


def plan(model) -> tuple[list, dict]:
    """(tensors as they will be written, sorted by stored name; {type name: (count, bytes before,
    bytes after)} of the tensors converted to F32). Q4KError names a tensor no APR reader can take."""
    arch = model.config.architecture
    gguf_names = list(model.tensors)
    if model.config.tied_output and "output.weight" not in model.tensors and "token_embd.weight" in model.tensors:
        gguf_names.append("output.weight")       # realizar's GPU loader wants an output matrix
    stored = apr_names.names_for_write(arch, gguf_names)
    if "output.weight" not in model.tensors and "output.weight" in stored:
        stored["output.weight"] = apr_names.LM_HEAD      # the tied copy, named as resolve_tied_embeddings names it
    outs, grown = [], {}
    for name in gguf_names:
        info = model.tensors.get(name) or model.tensors["token_embd.weight"]
        if info.qtype in WRITE_CODES:
            outs.append(_Out(stored[name], WRITE_CODES[info.qtype], apr_dims(info), info.nbytes, info.name, False))
            continue
        if not info.quantized:
            raise Q4KError(f"{model.path}: tensor {name!r} is {info.type_name}, which APR readers cannot take")
        quants.qtype(info.qtype)                 # Q4KError unless we can dequantize it
        f32 = replace(info, qtype=T.F32, nbytes=info.n_elements * 4)
        outs.append(_Out(stored[name], WRITE_CODES[T.F32], apr_dims(f32), f32.nbytes, info.name, True))
        count, before, after = grown.get(info.type_name, (0, 0, 0))
        grown[info.type_name] = (count + 1, before + info.nbytes, after + f32.nbytes)
    return sorted(outs, key=lambda o: o.name.encode()), grown


def metadata_json(model, source: str, outs=()) -> dict:
    """The JSON metadata of an APR written from ``model`` (a ModelFile): aprender's typed fields and
    custom keys as write_apr_file_raw writes them (no field under two spellings, see realizar's
    metadata.rs aliases), plus "gguf_metadata": every GGUF key but the tokenizer arrays, which live
    under aprender's "tokenizer.*" keys."""
    cfg, meta = model.config, model.metadata
    arch = cfg.architecture
    out = {"model_type": arch, "name": arch, "license": None, "data_source": None, "data_license": None,
           "source": source, "original_format": model.kind, "total_size": sum(o.nbytes for o in outs),
           "param_count": sum(int(np.prod(o.dims)) for o in outs), "architecture": arch,
           "hf_architecture": _hf_class(arch), "hf_model_type": arch}
    out.update({fld: getattr(cfg, attr) for fld, _, attr in CONFIG_FIELDS})
    out["rope_type"] = 0 if cfg.rope_style == "norm" else 2      # 0 = adjacent pairs, 2 = neox halves
    if meta.get("tokenizer.chat_template") is not None:
        out["chat_template"] = meta["tokenizer.chat_template"]
    out["tensor_shapes"] = {o.name: list(o.dims) for o in outs}
    for key, gguf_key in TOKENIZER_KEYS:
        if meta.get(gguf_key) is not None:
            out[key] = meta[gguf_key]
    if isinstance(meta.get("tokenizer.ggml.tokens"), list):
        out["tokenizer.vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    out.update({f"model.{fld}": out[fld] for fld in ("architecture", "hidden_size", "num_layers", "num_heads",
                                                     "num_kv_heads", "vocab_size", "intermediate_size",
                                                     "max_position_embeddings", "rope_theta", "rms_norm_eps",
                                                     "rope_type")})
    if cfg.tied_output:
        out["tied_embeddings"] = True
    out["gguf_metadata"] = {k: v for k, v in meta.items() if k not in TOKENIZER_ARRAYS}
    return out


def _hf_class(arch: str) -> str:
    """write_model_config.rs synthesize_hf_architecture_from_family."""
    root = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama", "gemma": "Gemma", "gemma2": "Gemma2"}
    return f"{root.get(arch, arch[:1].upper() + arch[1:])}ForCausalLM"


def write(model, out_path, log=None) -> int:
    """Write ``model`` (a ModelFile) as an uncompressed APR v2 file aprender and realizar read;
    returns its size in bytes. ``log``: callable told about tensors converted to F32."""
    outs, grown = plan(model)
    meta = json.dumps(metadata_json(model, os.path.basename(str(model.path)), outs)).encode()
    if len(meta) >= 1 << 32:
        raise Q4KError(f"{model.path}: {len(meta)} bytes of metadata do not fit an APR header")
    offsets, data_size = [], 0
    for o in outs:
        offsets.append(data_size)
        data_size += _pad(o.nbytes)
    index = b"".join(_entry(o, off) for o, off in zip(outs, offsets))
    index_off = HEADER.size + _pad(len(meta))
    data_off = index_off + _pad(len(index))
    flags = FLAGS["LAYOUT_ROW_MAJOR"]
    flags |= FLAGS["QUANTIZED"] if any(o.code in (12, 14) for o in outs) else 0
    flags |= FLAGS["HAS_VOCAB"] if "tokenizer.ggml.tokens" in model.metadata else 0
    header = _header(flags, len(outs), len(meta), index_off, data_off)
    with open(out_path, "wb") as f:
        crc = _write(f, header, 0)
        crc = _write(f, meta + bytes(index_off - HEADER.size - len(meta)), crc)
        crc = _write(f, index + bytes(data_off - index_off - len(index)), crc)
        for o in outs:
            crc = _write(f, _bytes(model, o), crc)
            crc = _write(f, bytes(_pad(o.nbytes) - o.nbytes), crc)
        f.write(struct.pack("<I", crc))
    if log:
        for type_name, (count, before, after) in grown.items():
            log(f"{count} {type_name} tensor(s) written as F32 (no APR reader takes {type_name}; exact): "
                f"{before:,} -> {after:,} bytes")
    return data_off + data_size + 4


def _bytes(model, o: _Out):
    data = model.tensor_data(o.source)
    if o.to_f32:
        data = quants.dequantize(data, model.tensors[o.source].qtype)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _header(flags, n_tensors, meta_size, index_off, data_off) -> bytes:
    fields = [MAGIC, *VERSION, flags, n_tensors, HEADER.size, meta_size, index_off, data_off, 0, bytes(20)]
    fields[-2] = header_crc(HEADER.pack(*fields))
    return HEADER.pack(*fields)


def _entry(o: _Out, offset) -> bytes:
    name = o.name.encode()
    return (struct.pack("<H", len(name)) + name + struct.pack("<BB", o.code, len(o.dims))
            + struct.pack(f"<{len(o.dims)}Q", *o.dims) + ENTRY_TAIL.pack(offset, o.nbytes))


def _write(f, data, crc) -> int:
    f.write(data)
    return zlib.crc32(data, crc)


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
