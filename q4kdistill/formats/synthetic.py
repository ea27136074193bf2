"""Synthetic teachers: tiny configs and complete GGUF files of every supported architecture.

    cfg = tiny_config("qwen2", n_layers=3)           # d_model 256, 4 heads of 64, 2 kv heads, d_ff 512, vocab 384
    write_gguf("tiny.gguf", cfg, qtypes={"token_embd": "Q8_0"}, seed=0)
    ModelFile.open("tiny.gguf").config == cfg        # metadata says everything the config says

Files hold every tensor a forward needs, named as llama.cpp names them (ModelConfig.tensor_shapes),
metadata keys as llama.cpp's converter writes them for the architecture, and a small working
tokenizer (SentencePiece-style for llama/gemma3, GPT-2 byte-level BPE for qwen2) that
llama.cpp loads. Weights ~ N(0, 1/cols), norms ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), encoded
with quants.quantize. Row lengths (d_model, q_dim, d_ff) must be whole blocks of the chosen
types: multiples of 256 for K-quants.
"""
from __future__ import annotations

import dataclasses
import os

import gguf
import numpy as np

from . import quants
from ..config import SUPPORTED_ARCHITECTURES, ModelConfig
from ..errors import Q4KError

VT = gguf.GGUFValueType
T = gguf.GGMLQuantizationType

TINY = dict(n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512, vocab_size=384,
            context_length=256, norm_eps=1e-6, rope_base=10000.0)
ARCH_TINY = {
    "llama": dict(tied_output=False),
    "qwen2": dict(tied_output=False, qkv_bias=True, rope_base=1e6),
    "gemma3": dict(tied_output=True, sliding_window=8, rope_base=1e6),
}
# weight role ("attn_q", "token_embd", ...) or "*" -> type; 1-D tensors are always F32
DEFAULT_QTYPES = {"*": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}
FILE_TYPES = {T.F32: "ALL_F32", T.F16: "MOSTLY_F16", T.BF16: "MOSTLY_BF16", T.Q8_0: "MOSTLY_Q8_0",
              T.Q4_0: "MOSTLY_Q4_0", T.Q5_0: "MOSTLY_Q5_0", T.Q4_K: "MOSTLY_Q4_K_M", T.Q6_K: "MOSTLY_Q6_K"}


# -- configs ---------------------------------------------------------------------------

def tiny_config(arch: str = "llama", **overrides) -> ModelConfig:
    """A tiny ModelConfig of ``arch`` as a GGUF of it would give it; ``overrides`` change fields
    (Q4KError for a field the architecture's metadata cannot say, e.g. qkv_bias on llama)."""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise Q4KError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    fields = {**TINY, **ARCH_TINY[arch], **overrides}
    if arch == "gemma3" and fields.get("sliding_window"):
        fields.setdefault("swa_layers", [i for i in range(fields["n_layers"]) if (i + 1) % 6 != 0])
        fields.setdefault("rope_base_swa", 10000.0)
    wanted = ModelConfig(architecture=arch, **fields)
    tokenizer = default_tokenizer(arch, wanted.vocab_size)
    cfg = ModelConfig.from_metadata(metadata(wanted, tokenizer), wanted.tensor_shapes(), source="tiny_config")
    _check_same(cfg, wanted, overrides)
    return cfg


def metadata(cfg: ModelConfig, tokenizer: dict) -> dict:
    """GGUF metadata (key -> python value) for ``cfg``, keys as llama.cpp's converter writes them."""
    a = cfg.architecture
    meta = {
        "general.architecture": a, "general.type": "model", "general.name": f"tiny {a}",
        f"{a}.context_length": cfg.context_length, f"{a}.embedding_length": cfg.d_model,
        f"{a}.block_count": cfg.n_layers, f"{a}.feed_forward_length": cfg.d_ff,
        f"{a}.attention.head_count": cfg.n_heads, f"{a}.attention.head_count_kv": cfg.n_kv_heads,
        f"{a}.rope.freq_base": _f32(cfg.rope_base), f"{a}.attention.layer_norm_rms_epsilon": _f32(cfg.norm_eps),
    }
    if a == "llama":
        meta[f"{a}.rope.dimension_count"] = cfg.head_dim
    if a == "gemma3" or cfg.head_dim * cfg.n_heads != cfg.d_model:
        meta.update({f"{a}.attention.key_length": cfg.head_dim, f"{a}.attention.value_length": cfg.head_dim})
    if a == "gemma3" and cfg.sliding_window:
        meta[f"{a}.attention.sliding_window"] = cfg.sliding_window
        meta[f"{a}.attention.sliding_window_pattern"] = [i in cfg.swa_layers for i in range(cfg.n_layers)]
        meta[f"{a}.rope.freq_base_swa"] = _f32(cfg.rope_base_swa or 10000.0)
    meta.update(tokenizer)
    return meta


def _f32(x: float) -> float:
    """The value a FLOAT32 metadata field reads back as."""
    return float(np.float32(x))


def _check_same(got: ModelConfig, wanted: ModelConfig, fields) -> None:
    bad = [f for f in fields if not _same(getattr(got, f), getattr(wanted, f))]
    if bad:
        raise Q4KError(f"{wanted.architecture} GGUF metadata cannot express " +
                       ", ".join(f"{f}={getattr(wanted, f)!r} (it gives {getattr(got, f)!r})" for f in bad))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return np.float32(a) == np.float32(b)
    return a == b


# -- tokenizers ------------------------------------------------------------------------

_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which "
          "but have an they you were her she there one all we can their has been if more when will would "
          "who so no hello world model token text data code number").split()


def default_tokenizer(arch: str, vocab_size: int) -> dict:
    """tokenizer.* metadata of a small working vocabulary of exactly ``vocab_size`` tokens."""
    return _bpe_tokenizer(vocab_size) if arch == "qwen2" else _spm_tokenizer(arch, vocab_size)


def _spm_tokenizer(arch, vocab_size) -> dict:
    """SentencePiece style (tokenizer.ggml.model = "llama"): specials, 256 byte tokens, pieces."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if arch == "gemma3" else ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    prefixes = [("\u2581" + w)[:k] for w in _WORDS for k in range(2, len(w) + 2)]   # SPM merges reach words
    pieces = list(dict.fromkeys(["\u2581", *"abcdefghijklmnopqrstuvwxyz", *prefixes]))
    n_pieces = vocab_size - len(specials) - len(byte_tokens)
    if n_pieces < 1:
        raise Q4KError(f"vocab_size {vocab_size} is too small for the synthetic tokenizer "
                       f"(at least {len(specials) + 257})")
    pieces = (pieces + [f"\u2581w{i}" for i in range(n_pieces)])[:n_pieces]
    ids = {t: i for i, t in enumerate(specials)}
    unk = ids.get("<unk>")
    types = [2 if i == unk else 3 for i in range(len(specials))] + [6] * 256 + [1] * n_pieces
    out = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": specials + byte_tokens + pieces,
        "tokenizer.ggml.scores": [0.0] * (len(specials) + 256) + [-float(i) for i in range(n_pieces)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": ids.get("<bos>", ids.get("<s>")),
        "tokenizer.ggml.eos_token_id": ids.get("<eos>", ids.get("</s>")),
        "tokenizer.ggml.unknown_token_id": unk,
    }
    if "<pad>" in ids:
        out["tokenizer.ggml.padding_token_id"] = ids["<pad>"]
    out.update({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False})
    return out


def _bpe_tokenizer(vocab_size) -> dict:
    """GPT-2 byte-level BPE (tokenizer.ggml.model = "gpt2", pre = "qwen2"): the 256 byte
    characters, merges that build common words, specials at the end."""
    from .tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    n_normal = vocab_size - len(specials)
    if n_normal < 256:
        raise Q4KError(f"vocab_size {vocab_size} is too small for the synthetic tokenizer (at least {256 + len(specials)})")
    tokens, merges = list(alphabet), []
    known = set(tokens)
    for word in ["\u0120" + w for w in _WORDS] + _WORDS:
        parts = list(word)
        while len(parts) > 1 and len(tokens) < n_normal:
            merged = parts[0] + parts[1]
            if merged not in known:
                merges.append(f"{parts[0]} {parts[1]}")
                tokens.append(merged)
                known.add(merged)
            parts = [merged] + parts[2:]
    tokens += [f"<|reserved_{i}|>" for i in range(n_normal - len(tokens))]
    types = [1 if i < 256 + len(merges) else 3 for i in range(n_normal)] + [3] * len(specials)
    eot = n_normal
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens + specials, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": eot, "tokenizer.ggml.eos_token_id": eot,
        "tokenizer.ggml.padding_token_id": eot, "tokenizer.ggml.add_bos_token": False,
    }


# -- writing ---------------------------------------------------------------------------

def write_gguf(path, config: ModelConfig, qtypes=None, seed: int = 0, tokenizer=None) -> str:
    """Write a complete GGUF of ``config`` with random weights; returns the path.

    qtypes: {tensor name | role ("attn_q", "token_embd", "output", ...) | "*": type}; what it
            does not settle comes from DEFAULT_QTYPES ({"*": "F32"} makes a dense file). tokenizer: tokenizer.* metadata (e.g. a real teacher's) with
            exactly config.vocab_size tokens; default: default_tokenizer(arch, vocab)."""
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer(config.architecture, config.vocab_size)
    tokens = tokenizer.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or len(tokens) != config.vocab_size:
        raise Q4KError(f"the tokenizer needs a list of exactly {config.vocab_size} tokenizer.ggml.tokens")
    shapes = config.tensor_shapes()
    meta = metadata(config, tokenizer)
    back = ModelConfig.from_metadata(meta, shapes, source=str(path))
    _check_same(back, config, [f.name for f in dataclasses.fields(ModelConfig)])
    types = {name: _tensor_type(name, shape, qtypes or {}) for name, shape in shapes.items()}
    meta["general.file_type"] = int(gguf.LlamaFileType[FILE_TYPES.get(_main_type(types), "GUESSED")])
    meta["general.quantization_version"] = gguf.GGML_QUANT_VERSION

    rng = np.random.default_rng(seed)
    tensors = ((name, quants.quantize(_random_weight(name, shape, rng), types[name]), types[name])   # uint8 [..., row_bytes]
               for name, shape in shapes.items())
    return write_file(path, meta, tensors)


def write_file(path, meta: dict, tensors) -> str:
    """Write a GGUF of ``meta`` (key -> python value, typed by _value_type; general.architecture
    is required) and ``tensors``: (name, array) or (name, raw blocks, qtype), in file order."""
    writer = gguf.GGUFWriter(os.fspath(path), meta["general.architecture"])
    for key, value in meta.items():
        if key != "general.architecture":           # GGUFWriter writes that one itself
            writer.add_key_value(key, value, *_value_type(value))
    for name, data, *qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype[0] if qtype else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _tensor_type(name, shape, qtypes) -> T:
    """name, then role, then "*" in ``qtypes``; then role, then "*" in DEFAULT_QTYPES."""
    if len(shape) == 1:
        return T.F32
    role = name.split(".")[-2]
    for table, key in ((qtypes, name), (qtypes, role), (qtypes, "*"), (DEFAULT_QTYPES, role), (DEFAULT_QTYPES, "*")):
        if key in table:
            q = quants.qtype(table[key])
            break
    if shape[-1] % quants.block_size(q):
        raise Q4KError(f"{name}: rows of {shape[-1]} values are not whole {q.name} blocks of {quants.block_size(q)}")
    return q


def _main_type(types: dict) -> T:
    matrices = [q for q in types.values() if q != T.F32] or [T.F32]
    return max(set(matrices), key=matrices.count)


def _random_weight(name, shape, rng) -> np.ndarray:
    if len(shape) == 2:
        return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
    noise = 0.1 * rng.standard_normal(shape, dtype=np.float32)
    return noise + 1 if "norm" in name else noise


def _value_type(value) -> tuple:
    """(GGUFValueType, item type) of a python metadata value, as llama.cpp files type them."""
    if isinstance(value, list):                      # int arrays (token_type) are INT32
        item = _value_type(value[0])[0] if value else VT.INT32
        return VT.ARRAY, VT.INT32 if item == VT.UINT32 else item
    if isinstance(value, bool):
        return VT.BOOL, None
    if isinstance(value, int):
        return (VT.INT32 if value < 0 else VT.UINT32), None
    if isinstance(value, float):
        return VT.FLOAT32, None
    return VT.STRING, None
