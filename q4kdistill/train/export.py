"""Write a trained student as a GGUF that llama.cpp loads and runs, and read one back.

    write_student(path, config, params, qtype, tokenizer_fields)   -> per-tensor types written
    read_student(path) -> (ModelConfig, {name: float32 array})      (dequantized)
    tokenizer_fields(teacher_gguf, vocab_size)                      -> typed tokenizer.* keys

The student's parameters already carry GGUF names and GGUF layout (logical W is [n_out, K],
llama's q/k rows permuted for "norm" rope, gemma3 norms with the +1 folded in), so export
writes them as they are; only the number format changes.

Tensor types, as llama.cpp's own quantizer picks them:

  tensor                          f32   f16   q6_k   q4_k
  1-D (norms, biases)             F32   F32   F32    F32
  LM head (output, or tied        F32   F16   Q6_K   Q6_K
   token_embd)
  other matrices                  F32   F16   Q6_K   Q4_K

  a K-quant needs rows of a multiple of 256 values; otherwise, like llama.cpp,
  Q4_K -> Q5_0 and Q6_K -> Q8_0 (rows of a multiple of 32), else F16.
"""
from __future__ import annotations

import os

import gguf
import numpy as np

from ..config import ModelConfig
from ..errors import Q4KError

T = gguf.GGMLQuantizationType
EXPORT_TYPES = {"f32": T.F32, "f16": T.F16, "q6_k": T.Q6_K, "q4_k": T.Q4_K}
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}


def export_type(name: str):
    try:
        return EXPORT_TYPES[name.lower()]
    except KeyError:
        raise Q4KError(f"--type {name!r}: choose one of {', '.join(EXPORT_TYPES)}") from None


def tensor_type(name: str, shape, qtype, tied_output: bool):
    """The GGML type one tensor is written in (see the table in the module docstring)."""
    if len(shape) == 1 or qtype == T.F32:
        return T.F32
    if qtype == T.F16:
        return T.F16
    lm_head = name == "output.weight" or (tied_output and name == "token_embd.weight")
    want = T.Q6_K if lm_head else qtype
    cols = shape[-1]
    if cols % 256 == 0:
        return want
    if cols % 32 == 0:
        return _FALLBACK[want]
    return T.F16


def _encode(a: np.ndarray, ttype):
    """float32 [rows, cols] -> what GGUFWriter.add_tensor takes (array, raw_dtype)."""
    if ttype == T.F32:
        return np.ascontiguousarray(a, dtype=np.float32), None
    if ttype == T.F16:
        return np.ascontiguousarray(a, dtype=np.float16), None
    from ..formats.quants import quantize

    return quantize(np.ascontiguousarray(a, dtype=np.float32), ttype), ttype   # uint8 [rows, row_bytes]


# -- metadata ---------------------------------------------------------------------------

def _add_architecture(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    w.add_context_length(int(cfg.context_length))
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_rope_freq_base(float(cfg.rope_base))
    w.add_vocab_size(cfg.vocab_size)
    if cfg.architecture == "gemma3" and cfg.sliding_window and cfg.swa_layers:
        w.add_sliding_window(int(cfg.sliding_window))
        # llama.cpp's default is "every 6th layer global"; say which layers slide (a student
        # built from teacher blocks 0,3,6,... need not follow that pattern).
        w.add_sliding_window_pattern([i in cfg.swa_layers for i in range(cfg.n_layers)])
        if cfg.rope_base_swa is not None:
            w.add_rope_freq_base_swa(float(cfg.rope_base_swa))


def tokenizer_source(path, given: bool) -> str:
    """The teacher file to read the tokenizer from, opened only if it is a regular file (a FIFO or
    device named by a checkpoint would block or stream forever)."""
    where = "--teacher" if given else "the teacher the checkpoint names"
    if not isinstance(path, str) or not path:
        raise Q4KError(f"{where}: no file name; name the teacher with --teacher FILE")
    if not os.path.exists(path):
        raise Q4KError(f"{path}: the teacher file (for the tokenizer) is gone; name it with --teacher FILE")
    if not os.path.isfile(path):
        raise Q4KError(f"{path} ({where}) is not a regular file; name the teacher with --teacher FILE")
    return path


def tokenizer_fields(teacher_gguf, vocab_size: int) -> list:
    """The teacher's ``tokenizer.*`` keys as (key, value, type, sub_type), token arrays cut to
    ``vocab_size`` when the student was trained on a truncated vocabulary. The header goes
    through our own parser and validate.check_tokenizer first (hostile files get one line)."""
    from ..formats.gguf_file import MAGIC, read_header
    from ..formats.validate import check_tokenizer

    teacher_gguf = os.fspath(teacher_gguf)
    with open(teacher_gguf, "rb") as f:
        if f.read(4) != MAGIC:
            raise Q4KError(f"{teacher_gguf}: not a GGUF file; the tokenizer is read from the teacher's GGUF")
    header = read_header(teacher_gguf)
    check_tokenizer(header.metadata, None, teacher_gguf)
    fields = []
    for key, value in header.metadata.items():           # our parser: gguf.GGUFReader takes ~10 s on gemma-3
        if not key.startswith("tokenizer."):
            continue
        vtype, sub = header.types[key]
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            if len(value) < vocab_size:
                raise Q4KError(f"{teacher_gguf}: its tokenizer has {len(value)} tokens, the student {vocab_size}")
            value = value[:vocab_size]
        fields.append((key, value, vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in fields):
        raise Q4KError(f"{teacher_gguf}: no tokenizer.ggml.tokens in the teacher file; llama.cpp needs one")
    return fields


# -- write / read -----------------------------------------------------------------------

def write_student(path, config: ModelConfig, params: dict, qtype, tokenizer: list, name: str = "q4kdistill student") -> dict:
    """Write ``params`` (GGUF names -> float32 arrays, NumPy or CuPy) as a GGUF at ``path``.
    Returns {tensor name: GGML type name} as written.

    Every tensor is checked finite before its bytes are made (NonFiniteError names it); the file
    is written as PATH.part and renamed, so a failure (disk full) leaves no half file."""
    from .. import backend
    from ..finite import check_finite
    from ..interrupts import partial
    from .outputs import writing

    if isinstance(qtype, str):
        qtype = export_type(qtype)
    path = os.fspath(path)
    tmp = path + ".part"
    try:
        with writing(path), partial(tmp):
            written = _write(tmp, config, params, qtype, tokenizer, name, backend, check_finite)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return written


def _write(path, config, params, qtype, tokenizer, name, backend, check_finite) -> dict:
    w = gguf.GGUFWriter(path, config.architecture)
    w.add_name(name)
    w.add_file_type(int(FILE_TYPES[qtype]))
    if qtype not in (T.F32, T.F16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_architecture(w, config)
    for key, value, vtype, sub in tokenizer:
        w.add_key_value(key, value, vtype, sub_type=sub)
    written = {}
    for tname in sorted(params, key=_tensor_order):
        a = check_finite(backend.to_host(params[tname]).astype(np.float32, copy=False), f"tensor {tname}")
        ttype = tensor_type(tname, a.shape, qtype, config.tied_output)
        data, raw = _encode(a, ttype)
        w.add_tensor(tname, data, raw_dtype=raw)
        written[tname] = ttype.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _tensor_order(name: str):
    """token_embd, blk.0.*, blk.1.*, ..., output_norm, output (the order llama.cpp writes)."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def read_student(path):
    """A GGUF written by ``write_student`` (or any llama/qwen2/gemma3 GGUF) ->
    (ModelConfig, {name: float32 [n_out, K] or [n]}), every tensor decoded."""
    from ..formats.model_file import ModelFile
    from ..formats.quants import dequantize

    mf = ModelFile.open(path)
    params = {}
    for name, info in mf.tensors.items():
        data = mf.tensor_data(name)             # float of the logical shape, or uint8 [n_out, row_bytes]
        params[name] = (np.array(data, dtype=np.float32) if info.qtype in (T.F32, T.F16)
                        else dequantize(data, info.qtype))
    return mf.config, params
