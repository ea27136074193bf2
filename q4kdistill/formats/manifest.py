"""The tensor table shared by every teacher file, and the manifest JSON that describes one.

A manifest is a teacher without its weights: the GGUF header written as JSON.

    {
      "source": "where the header came from",
      "gguf_version": 3,
      "metadata": {"general.architecture": "qwen2", ...,
                   "tokenizer.ggml.tokens": {"array_len": 152064},   # arrays over ARRAY_LIMIT items
                   "tokenizer.chat_template": {"chars": 2081}},      # strings over STRING_LIMIT chars
      "tensors": [{"name": "output.weight", "shape_ggml": [3584, 152064], "type": "Q6_K",
                   "nbytes": 447068160}, ...],                       # in file order
      "total_tensor_bytes": 4677120000
    }

It plans GPU memory and builds full-size synthetic teachers: ``random_tensor`` fills a tensor
with valid random blocks (norms are ones), deterministic per tensor name.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import FileFormatError

ARRAY_LIMIT = 64        # metadata arrays longer than this are summarised as {"array_len": n}
STRING_LIMIT = 256      # metadata strings longer than this are summarised as {"chars": n}
MAX_DIMS = 4            # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 40  # one tensor of more elements than this is a lying header

# GGML types stored one element at a time (not in blocks) -> the numpy dtype their data is
# viewed as (BF16 as raw uint16 bits).
ELEMENT_DTYPES = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.BF16: np.uint16,
    gguf.GGMLQuantizationType.F64: np.float64,
    gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16,
    gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple            # logical numpy shape: (rows, cols) = shape_ggml reversed, or (n,)
    shape_ggml: tuple       # GGUF order: (cols, rows)
    nbytes: int
    offset: int | None = None   # absolute byte offset of the data in its file (None: no file)

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def quantized(self) -> bool:
        return self.qtype not in ELEMENT_DTYPES

    @property
    def data_shape(self) -> tuple:
        """Shape of the stored array: logical shape, or [..., row_bytes] uint8 for quantized types."""
        if not self.quantized:
            return self.shape
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.shape[:-1] + (self.shape[-1] // block * size,)

    @property
    def dtype(self):
        return ELEMENT_DTYPES.get(self.qtype, np.uint8)

    def manifest_entry(self) -> dict:
        return {"name": self.name, "shape_ggml": list(self.shape_ggml), "type": self.type_name, "nbytes": self.nbytes}


def quant_type(code_or_name, path, tensor="?") -> gguf.GGMLQuantizationType:
    """GGML type from its code or name; FileFormatError for types gguf does not know."""
    try:
        if isinstance(code_or_name, str):
            qtype = gguf.GGMLQuantizationType[code_or_name]
        else:
            qtype = gguf.GGMLQuantizationType(code_or_name)
    except (KeyError, ValueError):
        raise FileFormatError(path, f"tensor {tensor!r} has unknown quant type {code_or_name!r}") from None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise FileFormatError(path, f"tensor {tensor!r} has quant type {qtype.name} of unknown block size")
    return qtype


def tensor_info(path, name, qtype, shape_ggml, offset=None) -> TensorInfo:
    """Validated TensorInfo; FileFormatError for shapes no real file has."""
    shape_ggml = tuple(int(d) for d in shape_ggml)
    if not 1 <= len(shape_ggml) <= MAX_DIMS:
        raise FileFormatError(path, f"tensor {name!r} has {len(shape_ggml)} dimensions (1 to {MAX_DIMS} allowed)")
    n = 1
    for d in shape_ggml:
        if d <= 0:
            raise FileFormatError(path, f"tensor {name!r} has dimension {d} in shape {list(shape_ggml)}")
        n *= d
    if n > MAX_ELEMENTS:
        raise FileFormatError(path, f"tensor {name!r} claims an absurd shape {list(shape_ggml)} ({n} elements)")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape_ggml[0] % block:
        raise FileFormatError(path, f"tensor {name!r}: row length {shape_ggml[0]} is not a multiple of "
                                    f"{qtype.name}'s block of {block}")
    return TensorInfo(name, qtype, shape_ggml[::-1], shape_ggml, n // block * size, offset)


# -- metadata values as a manifest records them ------------------------------------------

def summarize_value(value):
    """Metadata value -> what a manifest records: long arrays/strings by their length."""
    if isinstance(value, dict):                     # already a summary
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > ARRAY_LIMIT:
            return {"array_len": len(value)}
        return [summarize_value(v) for v in value]
    if isinstance(value, str) and len(value) > STRING_LIMIT:
        return {"chars": len(value)}
    return value


def summarize_metadata(metadata: dict) -> dict:
    return {k: summarize_value(v) for k, v in metadata.items()}


# -- manifest JSON ---------------------------------------------------------------------

def to_dict(metadata: dict, tensors, source: str, gguf_version: int = 3) -> dict:
    tensors = list(tensors)
    return {
        "source": source,
        "gguf_version": gguf_version,
        "metadata": summarize_metadata(metadata),
        "tensors": [t.manifest_entry() for t in tensors],
        "total_tensor_bytes": sum(t.nbytes for t in tensors),
    }


def save(manifest: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def load(path_or_dict):
    """Manifest JSON file or dict -> (manifest dict, {name: TensorInfo} in file order)."""
    path = "<manifest>" if isinstance(path_or_dict, dict) else str(path_or_dict)
    manifest = path_or_dict if isinstance(path_or_dict, dict) else _read_json(path)
    if not isinstance(manifest.get("metadata"), dict) or not isinstance(manifest.get("tensors"), list):
        raise FileFormatError(path, "not a manifest: needs a 'metadata' object and a 'tensors' list")
    tensors = {}
    for i, entry in enumerate(manifest["tensors"]):
        info = _manifest_tensor(path, i, entry)
        if info.name in tensors:
            raise FileFormatError(path, f"tensor {info.name!r} is listed twice")
        tensors[info.name] = info
    total = manifest.get("total_tensor_bytes")
    if total is not None and total != sum(t.nbytes for t in tensors.values()):
        raise FileFormatError(path, f"total_tensor_bytes {total} is not the sum of the tensors' nbytes")
    return manifest, tensors


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(path, f"cannot read manifest JSON ({exc})") from None


def _manifest_tensor(path, i, entry) -> TensorInfo:
    try:
        name, type_name, shape_ggml = entry["name"], entry["type"], entry["shape_ggml"]
        if not (isinstance(name, str) and isinstance(type_name, str) and isinstance(shape_ggml, list)
                and all(isinstance(d, int) and not isinstance(d, bool) for d in shape_ggml)):
            raise TypeError
    except (KeyError, TypeError):
        raise FileFormatError(path, f"tensor entry {i} needs 'name' and 'type' strings and a list of integers "
                                    "'shape_ggml'") from None
    info = tensor_info(path, name, quant_type(type_name, path, name), shape_ggml)
    if "nbytes" in entry and entry["nbytes"] != info.nbytes:
        raise FileFormatError(path, f"tensor {name!r}: nbytes {entry['nbytes']} but {type_name} "
                                    f"{shape_ggml} needs {info.nbytes}")
    return info


# -- a teacher from a manifest: random valid tensors ---------------------------------------

def tensor_seed(name: str, seed: int = 0) -> int:
    """A seed per tensor that does not depend on the order tensors are built in."""
    return zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def random_tensor(info: TensorInfo, seed: int = 0) -> np.ndarray:
    """Random but valid data of ``info``'s type and shape, the same on every call.

    Norm weights are ones; other float tensors ~ N(0, 0.02); quantized tensors are random
    valid blocks (finite scales) from ``quants.random_blocks``."""
    rng = np.random.default_rng(tensor_seed(info.name, seed))
    if not info.quantized:
        if "norm" in info.name:
            values = np.ones(info.shape, np.float32)
        else:
            values = (0.02 * rng.standard_normal(info.shape)).astype(np.float32)
        return _float_as(values, info.qtype)
    from . import quants

    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    return quants.random_blocks(info.qtype, rows, info.shape[-1], rng).reshape(info.data_shape)


def _float_as(values: np.ndarray, qtype) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.BF16:   # truncate float32 to its top 16 bits
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(ELEMENT_DTYPES[qtype])
