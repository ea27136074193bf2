"""GGUF headers, parsed by hand so that truncated and hostile files get a clear answer.

    magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv_count     x { key: str | value_type u32 | value }
    tensor_count x { name: str | n_dims u32 | dims u64 x n_dims | ggml_type u32 | offset u64 }
    zero padding up to general.alignment (default 32)               <- data_offset
    tensor data: tensor i at data_offset + offset_i
    str = len u64 | utf-8 bytes;  array = item_type u32 | count u64 | count x item;  little-endian

dims are in ggml order (dims[0] = row length); TensorInfo.shape is the numpy order, reversed.

Why not ``gguf.GGUFReader`` for the header: it needs the whole file (it refuses the truncated
7B chunk), builds a numpy view per array element (7.6 s for gemma-3's 262,144-token vocabulary,
~0.3 s here) and a lying header makes it raise whatever numpy raises. We keep gguf's enums and
block sizes, check every count and length against the bytes that are there before reading
it, and leave the data section to ``ModelFile``, which maps it with numpy.memmap as GGUFReader
does (tests compare the two on real and synthetic files).
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct

import numpy as np
from gguf import GGUFValueType as VT

from ..errors import FileFormatError
from .manifest import ARRAY_LIMIT, STRING_LIMIT, quant_type, tensor_info

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_LEN = 1 << 24      # 16.7M items: real vocabularies are ~262k, merges ~500k
MAX_STRING_BYTES = 1 << 24   # chat templates are ~10 KB
MAX_NESTING = 2              # arrays of arrays of scalars at most

# scalar value type -> struct format (one value) and numpy dtype (arrays, read without a loop)
_FORMATS = {
    VT.UINT8: ("B", "<u1"), VT.INT8: ("b", "<i1"), VT.UINT16: ("H", "<u2"), VT.INT16: ("h", "<i2"),
    VT.UINT32: ("I", "<u4"), VT.INT32: ("i", "<i4"), VT.FLOAT32: ("f", "<f4"), VT.BOOL: ("?", "?"),
    VT.UINT64: ("Q", "<u8"), VT.INT64: ("q", "<i8"), VT.FLOAT64: ("d", "<f8"),
}
_STRUCT = {vt: struct.Struct("<" + fmt) for vt, (fmt, _) in _FORMATS.items()}
_SCALAR = {vt: np.dtype(dt) for vt, (_, dt) in _FORMATS.items()}
_U64 = struct.Struct("<Q")
_MIN_ITEM = {VT.STRING: 8, VT.ARRAY: 12, **{vt: dt.itemsize for vt, dt in _SCALAR.items()}}


@dataclasses.dataclass
class GGUFHeader:
    version: int
    metadata: dict          # key -> python value (summarised as in a manifest if asked)
    tensors: dict           # name -> TensorInfo (absolute offsets), in file order
    alignment: int
    data_offset: int        # where tensor data starts
    file_size: int
    types: dict = dataclasses.field(default_factory=dict)   # key -> (value type, item type of an array or None)


def read_header(path, summarize: bool = False) -> GGUFHeader:
    """Parse the header of the GGUF at ``path``; tensor data need not be there (truncated files).

    ``summarize``: record long arrays as {"array_len": n} and long strings as {"chars": n}
    (as a manifest does) without decoding them."""
    path = str(path)
    size = os.path.getsize(path)
    if size < 24:
        raise FileFormatError(path, f"not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return parse_header(buf, path, summarize)


def parse_header(buf, path, summarize: bool = False) -> GGUFHeader:
    """The same from bytes (anything with the buffer protocol)."""
    cur = _Cursor(buf, str(path))
    if bytes(buf[:4]) != MAGIC:
        raise FileFormatError(path, f"not a GGUF file (starts with {bytes(buf[:4])!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.scalar(VT.UINT32, "version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (2, 3):
            raise FileFormatError(path, "big-endian GGUF files are not supported")
        raise FileFormatError(path, f"unsupported GGUF version {version} (2 and 3 are)")
    n_tensors = cur.count("tensor count", min_item=24, limit=1 << 20)
    n_kv = cur.count("metadata count", min_item=13, limit=1 << 20)
    metadata, types = {}, {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        if key in metadata:
            raise FileFormatError(path, f"metadata key {key!r} appears twice")
        vtype = cur.scalar(VT.UINT32, f"type of {key!r}")
        item = cur.peek_u32() if vtype == VT.ARRAY else None
        metadata[key] = cur.value(vtype, key, summarize, 0)      # checks both types
        types[key] = (VT(vtype), None if item is None else VT(item))
    alignment = _alignment(metadata, path)
    tensors = {}
    for _ in range(n_tensors):
        info = cur.tensor_info(alignment)
        if info.name in tensors:
            raise FileFormatError(path, f"tensor {info.name!r} appears twice")
        tensors[info.name] = info
    data_offset = -(-cur.pos // alignment) * alignment
    if data_offset > len(buf):
        raise FileFormatError(path, f"data section starts at byte {data_offset}, past the end of the file ({len(buf)} bytes)")
    tensors = {name: dataclasses.replace(info, offset=info.offset + data_offset) for name, info in tensors.items()}
    return GGUFHeader(version, metadata, tensors, alignment, data_offset, len(buf), types)


def _alignment(metadata, path) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FileFormatError(path, f"general.alignment {alignment!r} is not a power of two")
    return alignment


class _Cursor:
    """Reads values at ``pos``; every read checks that its bytes are there first."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, n, what):
        if n > len(self.buf) - self.pos:
            raise FileFormatError(self.path, f"truncated header: {what} needs {n} bytes at offset {self.pos}, "
                                             f"the file has {len(self.buf)}")

    def scalar(self, vtype, what):
        st = _STRUCT[vtype]
        self.need(st.size, what)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def peek_u32(self):
        """The next u32 without moving (None past the end: reading it for real then says what is missing)."""
        if self.pos + 4 > len(self.buf):
            return None
        return _STRUCT[VT.UINT32].unpack_from(self.buf, self.pos)[0]

    def count(self, what, min_item, limit):
        """A u64 count of items of at least ``min_item`` bytes each: they must fit in the file."""
        n = self.scalar(VT.UINT64, what)
        if n > limit or n * min_item > len(self.buf) - self.pos:
            raise FileFormatError(self.path, f"absurd {what} {n} at offset {self.pos - 8} "
                                             f"(the file has {len(self.buf)} bytes)")
        return n

    def raw_string(self, what) -> bytes:
        n = self.scalar(VT.UINT64, f"length of {what}")
        if n > MAX_STRING_BYTES:
            raise FileFormatError(self.path, f"absurd length {n} of {what} at offset {self.pos - 8}")
        self.need(n, what)
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def string(self, what) -> str:
        raw = self.raw_string(what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise FileFormatError(self.path, f"{what} at offset {self.pos - len(raw)} is not UTF-8") from None

    def value(self, vtype, key, summarize, depth):
        if vtype in _STRUCT:
            return self.scalar(vtype, f"value of {key!r}")
        if vtype == VT.STRING:
            text = bytes(self.raw_string(f"value of {key!r}")).decode("utf-8", errors="surrogateescape")
            return {"chars": len(text)} if summarize and len(text) > STRING_LIMIT else text
        if vtype == VT.ARRAY and depth < MAX_NESTING:
            return self.array(key, summarize, depth + 1)
        raise FileFormatError(self.path, f"metadata key {key!r} has unknown value type {vtype}")

    def array(self, key, summarize, depth):
        item = self.scalar(VT.UINT32, f"item type of {key!r}")
        if item not in _MIN_ITEM:
            raise FileFormatError(self.path, f"metadata key {key!r} is an array of unknown type {item}")
        item = VT(item)
        n = self.count(f"length of array {key!r}", _MIN_ITEM[item], MAX_ARRAY_LEN)
        brief = summarize and n > ARRAY_LIMIT
        if item in _SCALAR:
            dtype = _SCALAR[item]
            values = None if brief else np.frombuffer(self.buf, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
        elif item == VT.STRING:
            values = self.skip_strings(n, key) if brief else [
                bytes(self.raw_string(f"item of {key!r}")).decode("utf-8", errors="surrogateescape") for _ in range(n)]
        else:
            values = [self.value(item, key, summarize, depth) for _ in range(n)]
        return {"array_len": n} if brief else values

    def skip_strings(self, n, key):
        """Step over ``n`` strings without decoding them (a 152k-token vocabulary in ~50 ms)."""
        buf, end, pos = self.buf, len(self.buf), self.pos
        for _ in range(n):
            if pos + 8 > end:
                break
            pos += 8 + _U64.unpack_from(buf, pos)[0]
        else:
            if pos <= end:
                self.pos = pos
                return
        raise FileFormatError(self.path, f"truncated header: the strings of {key!r} run past the end of the file")

    def tensor_info(self, alignment):
        name = self.string("tensor name")
        n_dims = self.scalar(VT.UINT32, f"dimension count of {name!r}")
        if not 1 <= n_dims <= 4:
            raise FileFormatError(self.path, f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        dims = [self.scalar(VT.UINT64, f"shape of {name!r}") for _ in range(n_dims)]
        qtype = quant_type(self.scalar(VT.UINT32, f"type of {name!r}"), self.path, name)
        offset = self.scalar(VT.UINT64, f"offset of {name!r}")
        if offset % alignment:
            raise FileFormatError(self.path, f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        return tensor_info(self.path, name, qtype, dims, offset)
