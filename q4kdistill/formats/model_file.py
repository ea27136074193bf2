"""ModelFile: the one object a teacher loads from, whatever it was stored as.

    mf = ModelFile.open("model.gguf")            # or "model.apr", "x.manifest.json", a manifest dict
    mf.config                                    # ModelConfig
    mf.tensors["blk.0.attn_q.weight"]            # TensorInfo(name, qtype, shape, shape_ggml, nbytes, offset)
    mf.tensor_data("blk.0.attn_q.weight")        # uint8 [rows, row_bytes], a view of the mapped file

Kinds
  gguf      header parsed by gguf_file, data memory-mapped (numpy.memmap, views, no copies)
  apr       header parsed by apr (aprender's names, dtype codes and metadata keys mapped to GGUF's;
            docs/apr.md), data memory-mapped the same way; APR_Q4/APR_Q8 tensors decoded to F32
  manifest  no data: tensor_data() makes random valid blocks, the same for a name and seed

``header_only=True`` reads only the header (works on a truncated file; metadata summarised as
in a manifest); asking such a ModelFile for data whose bytes are missing is an error then.
``header_only=False`` refuses a file whose tensor data is not all there (and checks an APR's
footer CRC when it has one).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from . import apr

from . import gguf_file

from . import manifest
from . import validate
from ..config import ModelConfig  # noqa: F401  (the type of .config)
from ..errors import FileFormatError, Q4KError


class ModelFile:
    def __init__(self, path, kind, metadata, tensors, header_only, version=3, seed=0, source=None):
        self.path = str(path)
        self.kind = kind                  # "gguf" | "apr" | "manifest"
        self.metadata = metadata          # key -> python value
        self.tensors = tensors            # name -> TensorInfo, in file order
        self.header_only = header_only
        self.version = version            # GGUF version (3 for APR and manifests)
        self.seed = seed                  # manifest only: seed of the random tensors
        self.source = source or f"{kind} file {os.path.basename(self.path)}"
        self._data = None                 # numpy.memmap of the whole file, made on first use
        self._apr = None                  # apr only: the APRHeader (stored extents, decoding)

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, source, header_only: bool = False, seed: int = 0) -> "ModelFile":
        """A GGUF or APR file, a manifest JSON file, or a manifest dict."""
        if isinstance(source, dict):
            return cls._from_manifest(source, "<manifest>", seed)
        path = os.fspath(source)
        head = _head(path)
        if head.startswith(gguf_file.MAGIC):
            return cls._from_gguf(path, header_only)
        if head.startswith(b"APR"):
            return cls._from_apr(path, header_only)
        if head.lstrip()[:1] == b"{":
            return cls._from_manifest(path, path, seed)
        raise FileFormatError(path, f"not a GGUF, APR or manifest file (starts with {head[:4]!r})")

    @classmethod
    def _from_gguf(cls, path, header_only):
        h = gguf_file.read_header(path, summarize=header_only)
        mf = cls(path, "gguf", h.metadata, h.tensors, header_only, h.version)
        if not header_only:
            mf.check_complete()
            validate.check_vector_values(mf)
        return mf

    @classmethod
    def _from_apr(cls, path, header_only):
        h = apr.read_header(path)
        metadata = manifest.summarize_metadata(h.metadata) if header_only else h.metadata
        mf = cls(path, "apr", metadata, dict(h.tensors), header_only)
        mf._apr = h
        if h.tied_copy and (mf._same_data(h.tied_copy, "token_embd.weight") if not header_only
                            else h.json.get("tied_embeddings") is True):
            del mf.tensors[h.tied_copy]          # aprender's lm_head.weight copy of a tied embedding
        if not header_only:
            mf.check_complete()
            apr.check_footer(mf._mapped(), path, h)
            validate.check_vector_values(mf)
        return mf

    def _same_data(self, a: str, b: str) -> bool:
        ta, tb = self.tensors.get(a), self.tensors.get(b)
        return (ta is not None and tb is not None and (ta.qtype, ta.shape) == (tb.qtype, tb.shape)
                and np.array_equal(self.tensor_data(a), self.tensor_data(b)))

    @classmethod
    def _from_manifest(cls, source, path, seed):
        data, tensors = manifest.load(source)
        return cls(path, "manifest", data["metadata"], tensors, True, data.get("gguf_version", 3), seed,
                   data.get("source"))

    # -- what the file says ---------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise FileFormatError(self.path, "missing metadata key 'general.architecture'")
        return arch

    @functools.cached_property
    def config(self) -> ModelConfig:
        """The validated config: FileFormatError unless the tensors are those it implies (validate.py)."""
        cfg = validate.model_config(self.metadata, self.tensors, self.path)
        if self._apr is not None and self._apr.config_overrides:
            cfg = cfg.replace(**self._apr.config_overrides)     # what an APR's tensor names imply
        return cfg

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    def dtype_histogram(self) -> dict:
        """{type name: {"count": tensors, "bytes": their bytes}}, most bytes first."""
        hist = {}
        for t in self.tensors.values():
            entry = hist.setdefault(t.type_name, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += t.nbytes
        return dict(sorted(hist.items(), key=lambda kv: -kv[1]["bytes"]))

    def to_manifest(self) -> dict:
        return manifest.to_dict(self.metadata, self.tensors.values(), self.source, self.version)

    # -- tensor data ----------------------------------------------------------------------
    def tensor_data(self, name: str) -> np.ndarray:
        """uint8 [..., row_bytes] for quantized types; float32/float16/uint16(BF16)/ints of the
        logical shape otherwise. A view of the mapped file (read-only), or random for a manifest."""
        info = self.tensors.get(name)
        if info is None:
            raise Q4KError(f"{self.path}: no tensor {name!r}")
        if self.kind == "manifest":
            return manifest.random_tensor(info, self.seed)
        self._check_extent(info)
        if self._apr is not None and name in self._apr.decode:       # APR_Q4 / APR_Q8: decoded copy
            _, _, offset, nbytes = self._apr.raw[name]
            return apr.decode(self._apr.decode[name], self._mapped()[offset:offset + nbytes], info)
        raw = self._mapped()[info.offset:info.offset + info.nbytes]
        return raw.view(info.dtype).reshape(info.data_shape)

    def check_complete(self) -> None:
        """FileFormatError unless every tensor's bytes are in the file."""
        for info in self.tensors.values():
            self._check_extent(info)

    def _check_extent(self, info) -> None:
        size = os.path.getsize(self.path)
        end = info.offset + info.nbytes
        if self._apr is not None:                # stored bytes, which decoded tensors do not match
            _, _, offset, nbytes = self._apr.raw[info.name]
            end = offset + nbytes
        if end > size:
            raise FileFormatError(self.path, f"truncated: tensor {info.name} needs bytes up to {end}, file has {size}")

    def _mapped(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._data

    def __repr__(self):
        return f"ModelFile({self.path!r}, kind={self.kind!r}, tensors={len(self.tensors)})"


def _head(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except FileNotFoundError:
        raise Q4KError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Q4KError(f"{path}: is a directory, not a model file") from None
    except OSError as exc:
        raise Q4KError(f"{path}: cannot read ({exc.strerror})") from None
