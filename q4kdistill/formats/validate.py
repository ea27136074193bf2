"""The one gate between a model file and the code that uses it: metadata -> ModelConfig + tensor table.

GGUF, APR and manifests all come through here (``ModelFile.config`` calls ``model_config``), so a
file that passes is one the forward pass, the planner and export can take as it is:

    config      every value typed and in range (ModelConfig.from_metadata), special token ids
                inside the vocabulary
    tokenizer   tokenizer.ggml.tokens / scores / token_type of one length (a list, or a
                summarised {"array_len": n}), items of the right type, merges strings
    tensors     exactly the tensors ModelConfig.tensor_shapes() names, each of that shape; no
                extras beyond IGNORED_TENSORS; 1-D tensors (norms, biases) in a float type
    values      (full files) norms and biases finite: they are tiny, and one NaN there makes
                every logit NaN
    memory      ``check_fits``: the teacher's load peak (the planner's figure) against the memory
                of the device it goes to, before anything is allocated

Every refusal is a ``FileFormatError`` / ``Q4KError``: one line naming the file and the value.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import FileFormatError, Q4KError

# Tensors a real file may carry that no forward here reads (llama 3.1's rope scaling table).
IGNORED_TENSORS = ("rope_freqs.weight",)
TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
SPECIAL_IDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
               "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.seperator_token_id",
               "tokenizer.ggml.cls_token_id", "tokenizer.ggml.mask_token_id")


def model_config(metadata: dict, tensors: dict, source: str):
    """Metadata + {name: TensorInfo} -> the validated ModelConfig (FileFormatError otherwise)."""
    from ..config import ModelConfig

    config = ModelConfig.from_metadata(metadata, tensors.keys(), source=source)
    check_tokenizer(metadata, config.vocab_size, source)
    check_tensors(config, tensors, source)
    return config


# -- tokenizer metadata ---------------------------------------------------------------------

def array_length(value):
    """Length of a metadata array given as a list/ndarray or as a manifest's {"array_len": n}; else None."""
    if isinstance(value, dict) and set(value) == {"array_len"}:
        value = value["array_len"]
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value)
    return None


def check_tokenizer(metadata: dict, vocab_size: int | None, source: str) -> None:
    """The tokenizer.ggml.* keys agree with each other and with the vocabulary."""
    lengths = {}
    for key in TOKEN_ARRAYS:
        if key in metadata:
            n = array_length(metadata[key])
            if n is None:
                raise FileFormatError(source, f"metadata key {key!r} is not an array")
            lengths[key] = n
    n_tokens = lengths.get("tokenizer.ggml.tokens")
    for key, n in lengths.items():
        if n_tokens is None:
            raise FileFormatError(source, f"metadata has {key!r} but no 'tokenizer.ggml.tokens'")
        if n != n_tokens:
            raise FileFormatError(source, f"metadata {key!r} has {n} items, 'tokenizer.ggml.tokens' has {n_tokens}")
    _check_items(metadata, "tokenizer.ggml.tokens", str, "strings", source)
    _check_items(metadata, "tokenizer.ggml.scores", (int, float), "numbers", source, finite=True)
    _check_items(metadata, "tokenizer.ggml.token_type", int, "integers", source)
    _check_items(metadata, "tokenizer.ggml.merges", str, "strings", source)
    if "tokenizer.ggml.model" in metadata and not isinstance(metadata["tokenizer.ggml.model"], str):
        raise FileFormatError(source, "metadata key 'tokenizer.ggml.model' is not a string")
    if n_tokens is not None and vocab_size is not None and n_tokens > vocab_size:
        raise FileFormatError(source, f"the tokenizer has {n_tokens} tokens, more than the model's vocabulary "
                                      f"of {vocab_size}")
    limit = min(x for x in (n_tokens, vocab_size) if x is not None) if (n_tokens or vocab_size) else None
    for key in SPECIAL_IDS:
        value = metadata.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise FileFormatError(source, f"metadata key {key!r} = {str(value)[:40]} is not an integer")
        if limit is not None and not 0 <= value < limit:
            raise FileFormatError(source, f"metadata key {key!r} = {value} is outside the vocabulary (0..{limit - 1})")


def _check_items(metadata, key, kind, what, source, finite=False) -> None:
    value = metadata.get(key)
    if value is None or isinstance(value, dict):          # absent, or summarised (length checked above)
        return
    if not isinstance(value, (list, tuple)):
        raise FileFormatError(source, f"metadata key {key!r} is not an array of {what}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, kind) or (finite and not math.isfinite(item)):
            raise FileFormatError(source, f"metadata {key!r}[{i}] = {str(item)[:40]} is not one of the {what} "
                                          "this array must hold")


# -- tensors ------------------------------------------------------------------------------

def check_tensors(config, tensors: dict, source: str) -> None:
    """Every tensor ``config`` implies is there with that shape; nothing else but IGNORED_TENSORS."""
    from .manifest import ELEMENT_DTYPES

    floats = {q for q, dt in ELEMENT_DTYPES.items() if np.dtype(dt).kind == "f" or dt is np.uint16}
    if config.n_layers * 9 > len(tensors):            # every block has >= 9 tensors; never list a million
        raise FileFormatError(source, f"the metadata says {config.n_layers} blocks, the file has only "
                                      f"{len(tensors)} tensors")
    wanted = config.tensor_shapes()
    missing = [name for name in wanted if name not in tensors]
    if missing:
        more = ", ..." if len(missing) > 3 else ""
        raise FileFormatError(source, f"not a complete {config.architecture} model of {config.n_layers} blocks, "
                                      f"missing {len(missing)} tensors ({', '.join(missing[:3])}{more})")
    for name, shape in wanted.items():
        info = tensors[name]
        if tuple(info.shape) != tuple(shape):
            raise FileFormatError(source, f"tensor {name} has shape {list(info.shape)}, the metadata implies "
                                          f"{list(shape)} ({_why(config)})")
        if len(shape) == 1 and info.qtype not in floats:
            raise FileFormatError(source, f"tensor {name} is {info.type_name}; a 1-D tensor must be a float type")
    extra = [name for name in tensors if name not in wanted and name not in IGNORED_TENSORS]
    if extra:
        raise FileFormatError(source, f"tensor(s) {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} are not "
                                      f"part of a {config.architecture} model of {config.n_layers} blocks")


def _why(c) -> str:
    return (f"d_model {c.d_model}, {c.n_heads} heads / {c.n_kv_heads} kv heads of {c.head_dim}, "
            f"d_ff {c.d_ff}, vocab {c.vocab_size}")


def check_vector_values(mf) -> None:
    """Norms and biases of a complete file are finite (a few KB per layer: always cheap)."""
    for name, info in mf.tensors.items():
        if len(info.shape) != 1:
            continue
        data = np.asarray(mf.tensor_data(name))
        if data.dtype == np.uint16:                        # BF16 bits: exponent all ones = inf/NaN
            bad = np.flatnonzero((data & 0x7F80) == 0x7F80)
        else:
            bad = np.flatnonzero(~np.isfinite(data))
        if bad.size:
            raise FileFormatError(mf.path, f"tensor {name} holds a non-finite value at index {int(bad[0])}")


# -- memory -------------------------------------------------------------------------------

def host_memory_available() -> int | None:
    """Bytes the kernel says a new allocation can get (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_available(xp) -> int | None:
    """Free bytes where ``xp``'s arrays live: host RAM for NumPy, the GPU's free memory for CuPy."""
    if xp is np:
        return host_memory_available()
    try:
        free, _ = xp.cuda.runtime.memGetInfo()
        return int(free) + int(xp.get_default_memory_pool().free_bytes())
    except Exception:                                       # a figure we cannot get never blocks a run
        return None


PLANNER_BACKEND = {"auto": "native", "native": "native", "dense": "native", "dequant-f32": "dequant-f32",
                   "dequant-bf16": "dequant-bf16", "dequant-f16": "dequant-bf16"}   # f16: 2 bytes, as bf16


def load_need(mf, backend_name: str, on_host: bool) -> int:
    """Bytes Teacher.load allocates for ``mf``: the planner's load peak; on the host a file's
    matrices kept as stored are views of the mapped file (no allocation), a manifest's are made
    in memory (plus random_tensor's float64 draw and float32 copy of the largest tensor)."""
    from ..memory.planner import kept_bytes, teacher_load_peak

    backend = PLANNER_BACKEND.get(backend_name, "native")
    tensors = list(mf.tensors.values())
    if on_host and mf.kind != "manifest" and backend == "native":
        return sum(kept_bytes(t, backend) for t in tensors if len(t.shape) == 1)
    need = teacher_load_peak(tensors, backend)
    if mf.kind == "manifest":
        need += max((t.nbytes + 12 * t.n_elements * (not t.quantized) for t in tensors), default=0)
    return need


def check_fits(mf, backend_name: str, xp, available=None) -> None:
    """Refuse to load a teacher whose load needs more than the free memory of its device, before
    anything is allocated; ``available`` overrides the measured free bytes (tests)."""
    need = load_need(mf, backend_name, on_host=xp is np)
    free = device_memory_available(xp) if available is None else available
    if free is not None and need > free:
        where = "host memory" if xp is np else "GPU memory"
        raise Q4KError(f"{mf.path}: loading this teacher needs {need / 1e9:.2f} GB ({backend_name}, the planner's "
                       f"figure) and {free / 1e9:.2f} GB of {where} is free; use a smaller model or backend")
