"""APR v2 files (aprender/realizar, the system we replace): read uncompressed ones, write them.

    offset size  field (little-endian)
    0      4     magic b"APR\\0"
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
    tensor index (sorted by name, padded to 64), one entry per tensor:
        name_len u16 | name utf-8 | dtype u8 (GGML type code) | ndim u8 | dims u64 x ndim
        | offset u64 (from data_offset, multiple of 64) | size u64
    data: each tensor 64-byte aligned, blocks byte-identical to GGUF's
    footer: CRC32 u32 of every byte before it

dims are row-major, [rows, cols]: GGUF's shape reversed (TensorInfo.shape).

Metadata JSON we write (`metadata_json`): aprender's transformer fields (architecture,
hidden_size, num_layers, num_heads, num_kv_heads, vocab_size, intermediate_size,
max_position_embeddings, rope_theta, rope_type, rms_norm_eps, head_dim), provenance
(original_format, source), and the complete GGUF metadata under "gguf_metadata" with
tokenizer arrays as JSON lists, so an APR round-trips tokenizer and config. Reading an APR
without "gguf_metadata" rebuilds GGUF-style keys from aprender's fields (`gguf_metadata`).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass

from ..errors import FileFormatError
from .manifest import quant_type, tensor_info

MAGIC = b"APR\0"
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


@dataclass
class APRHeader:
    version: tuple
    flags: int
    metadata: dict          # GGUF-style metadata (see module doc)
    json: dict              # the JSON metadata as stored
    tensors: dict           # name -> TensorInfo (absolute offsets), in index order
    data_offset: int
    file_size: int


# -- reading ---------------------------------------------------------------------------

def read_header(path) -> APRHeader:
    """Header, JSON metadata and tensor index; tensor data need not be there."""
    path = str(path)
    size = os.path.getsize(path)
    if size < HEADER.size + 4:
        raise FileFormatError(path, f"not an APR file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return parse_header(buf, path)


def parse_header(buf, path) -> APRHeader:
    path, size = str(path), len(buf)
    if size < HEADER.size + 4:
        raise FileFormatError(path, f"not an APR file (only {size} bytes)")
    (magic, major, minor, flags, n_tensors, meta_off, meta_size,
     index_off, data_off, crc, _reserved) = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FileFormatError(path, f"not an APR file (starts with {magic!r}, expected {MAGIC!r})")
    if major != VERSION[0]:
        raise FileFormatError(path, f"APR version {major}.{minor} is not supported (2.x is)")
    if crc != header_crc(bytes(buf[:HEADER.size])):
        raise FileFormatError(path, "APR header CRC32 mismatch (corrupted header)")
    for name, why in REFUSED.items():
        if flags & FLAGS[name]:
            raise FileFormatError(path, why)
    if not (HEADER.size <= meta_off and meta_off + meta_size <= index_off <= data_off <= size - 4):
        raise FileFormatError(path, f"APR sections out of order or past the end of the file (metadata "
                                    f"{meta_off}+{meta_size}, index {index_off}, data {data_off}, file {size} bytes)")
    if meta_size > MAX_METADATA_BYTES:
        raise FileFormatError(path, f"absurd APR metadata size {meta_size}")
    stored = _json(bytes(buf[meta_off:meta_off + meta_size]), path)
    tensors = _index(buf, path, index_off, data_off, n_tensors)
    return APRHeader((major, minor), flags, gguf_metadata(stored), stored, tensors, data_off, size)


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


def _index(buf, path, start, end, n_tensors) -> dict:
    if n_tensors * (2 + 2 + ENTRY_TAIL.size) > end - start:
        raise FileFormatError(path, f"absurd APR tensor count {n_tensors} for an index of {end - start} bytes")
    pos, tensors = start, {}

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
        qtype = quant_type(code, path, name)
        if not 1 <= ndim <= 4:
            raise FileFormatError(path, f"tensor {name!r} has {ndim} dimensions (1 to 4 allowed)")
        dims = struct.unpack(f"<{ndim}Q", take(8 * ndim, f"shape of {name!r}"))
        offset, nbytes = ENTRY_TAIL.unpack(take(ENTRY_TAIL.size, f"offset of {name!r}"))
        info = tensor_info(path, name, qtype, dims[::-1], end + offset)
        if offset % ALIGN or nbytes != info.nbytes:
            raise FileFormatError(path, f"tensor {name!r}: offset {offset} / size {nbytes} do not fit "
                                        f"{qtype.name} {list(dims)} ({info.nbytes} bytes, {ALIGN}-byte aligned)")
        if name in tensors:
            raise FileFormatError(path, f"tensor {name!r} appears twice")
        tensors[name] = info
    return tensors


def check_footer(buf, path) -> None:
    """CRC32 of everything before the last 4 bytes must equal them (reads the whole file)."""
    body = memoryview(buf)[:len(buf) - 4]
    crc = 0
    for start in range(0, len(body), 1 << 26):
        crc = zlib.crc32(body[start:start + (1 << 26)], crc)
    if crc != int.from_bytes(buf[len(buf) - 4:], "little"):
        raise FileFormatError(path, "APR footer CRC32 mismatch (corrupted or truncated data)")


def gguf_metadata(stored: dict) -> dict:
    """GGUF-style metadata: the stored GGUF metadata, or one rebuilt from aprender's fields."""
    if isinstance(stored.get("gguf_metadata"), dict):
        return stored["gguf_metadata"]
    arch = stored.get("architecture") or stored.get("model_type")
    if not isinstance(arch, str) or not arch:
        return {}
    meta = {"general.architecture": arch}
    for field, suffix, _ in CONFIG_FIELDS:
        if stored.get(field) is not None:
            meta[f"{arch}.{suffix}"] = stored[field]
    return meta


# -- writing ---------------------------------------------------------------------------

def metadata_json(model, source: str) -> dict:
    """The JSON metadata of an APR written from ``model`` (a ModelFile)."""
    cfg = model.config
    out = {"model_type": cfg.architecture, "architecture": cfg.architecture}
    out.update({field: getattr(cfg, attr) for field, _, attr in CONFIG_FIELDS})
    out["rope_type"] = 0 if cfg.rope_style == "norm" else 2
    out.update(original_format=model.kind, source=source, gguf_metadata=model.metadata)
    return out


def write(model, out_path) -> int:
    """Write ``model`` (a ModelFile) as an uncompressed APR v2 file; returns its size in bytes."""
    tensors = sorted(model.tensors.values(), key=lambda t: t.name.encode())
    meta = json.dumps(metadata_json(model, os.path.basename(str(model.path)))).encode()
    offsets, data_size = [], 0
    for t in tensors:
        offsets.append(data_size)
        data_size += _pad(t.nbytes)
    index = b"".join(_entry(t, off) for t, off in zip(tensors, offsets))
    index_off = HEADER.size + _pad(len(meta))
    data_off = index_off + _pad(len(index))
    flags = FLAGS["LAYOUT_ROW_MAJOR"]
    flags |= FLAGS["QUANTIZED"] if any(t.quantized for t in tensors) else 0
    flags |= FLAGS["HAS_VOCAB"] if "tokenizer.ggml.tokens" in model.metadata else 0
    header = _header(flags, len(tensors), len(meta), index_off, data_off)
    with open(out_path, "wb") as f:
        crc = _write(f, header, 0)
        crc = _write(f, meta + bytes(index_off - HEADER.size - len(meta)), crc)
        crc = _write(f, index + bytes(data_off - index_off - len(index)), crc)
        for t in tensors:
            crc = _write(f, model.tensor_data(t.name), crc)
            crc = _write(f, bytes(_pad(t.nbytes) - t.nbytes), crc)
        f.write(struct.pack("<I", crc))
    return data_off + data_size + 4


def _header(flags, n_tensors, meta_size, index_off, data_off) -> bytes:
    fields = [MAGIC, *VERSION, flags, n_tensors, HEADER.size, meta_size, index_off, data_off, 0, bytes(20)]
    fields[-2] = header_crc(HEADER.pack(*fields))
    return HEADER.pack(*fields)


def _entry(t, offset) -> bytes:
    name = t.name.encode()
    return (struct.pack("<H", len(name)) + name + struct.pack("<BB", int(t.qtype), len(t.shape))
            + struct.pack(f"<{len(t.shape)}Q", *t.shape) + ENTRY_TAIL.pack(offset, t.nbytes))


def _write(f, data, crc) -> int:
    f.write(data)
    return zlib.crc32(data, crc)


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
