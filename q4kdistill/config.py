"""ModelConfig: every number a forward pass needs, read from GGUF/APR metadata.

One dataclass for the three families we run (teacher and student share it):

  family   rope    ffn act     extras
  llama    norm    silu        -                       (GGUF's llama q/k are permuted for "norm" rope)
  qwen2    neox    silu        q/k/v biases
  gemma3   neox    gelu_tanh   q/k norms, post-attn/post-ffn norms, embeddings * sqrt(d_model),
                               sliding-window layers (5 of every 6) with their own rope base,
                               attention scale 1/sqrt(query_pre_attn_scalar) (= head_dim here)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import Q4KError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
MAX_WIDTH = 1 << 24        # no dimension of a real model (layers, widths, heads, vocabulary) comes near this


@dataclass
class ModelConfig:
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_style: str = "neox"              # "norm" (adjacent pairs) or "neox" (halves)
    act: str = "silu"                     # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool = False
    qk_norm: bool = False                 # RMSNorm over head_dim on q and k (gemma3)
    post_norms: bool = False              # post_attention_norm / post_ffw_norm (gemma3)
    embed_scale: float = 1.0              # token embeddings are multiplied by this (gemma3: sqrt(d_model))
    attn_scale: float | None = None       # None -> 1/sqrt(head_dim)
    sliding_window: int | None = None     # window of the sliding-window layers
    swa_layers: list = field(default_factory=list)  # indices of sliding-window layers
    rope_base_swa: float | None = None    # rope base of the sliding-window layers
    tied_output: bool = True              # no output.weight: the LM head is token_embd
    context_length: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    # -- derived -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.swa_layers else None

    def layer_rope_base(self, layer: int) -> float:
        if layer in self.swa_layers and self.rope_base_swa is not None:
            return self.rope_base_swa
        return self.rope_base

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- from GGUF metadata ------------------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: dict, tensor_names=(), source: str = "model") -> "ModelConfig":
        """``meta``: GGUF key -> python value (arrays may be given as their length).

        ``tensor_names`` tells what the header does not (tied output, biases)."""
        arch = meta.get("general.architecture")
        if arch is None:
            raise Q4KError(f"{source}: missing metadata key 'general.architecture'")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise Q4KError(f"{source}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def number(full, kind):
            value = meta[full]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise Q4KError(f"{source}: metadata key {full!r} = {str(value)[:40]} is not {'an integer' if kind is int else 'a number'}")
            if kind is float and not math.isfinite(value):
                raise Q4KError(f"{source}: metadata key {full!r} = {value} is not a finite number")
            return kind(value)

        def need(key, kind=int):
            full = f"{arch}.{key}"
            if full not in meta:
                raise Q4KError(f"{source}: missing metadata key {full!r}")
            return number(full, kind)

        def get(key, default, kind=int):
            full = f"{arch}.{key}"
            return number(full, kind) if full in meta else default

        def token_id(key):
            return number(key, int) if meta.get(key) is not None else None

        def in_range(key, value, low, high):
            if not (low <= value <= high):
                raise Q4KError(f"{source}: implausible {arch}.{key} = {value} (expected {low:g}..{high:g})")
            return value

        names = set(tensor_names)
        d_model = need("embedding_length")
        n_heads = need("attention.head_count")
        n_kv = get("attention.head_count_kv", n_heads)
        head_dim = get("attention.key_length", d_model // n_heads if n_heads > 0 else 0)
        n_layers = need("block_count")
        d_ff = need("feed_forward_length")
        vocab = get("vocab_size", None)
        if vocab is None:
            vocab = _array_length(meta.get("tokenizer.ggml.tokens"))
        if vocab is None:
            raise Q4KError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokenizer.ggml.tokens)")
        for name, value in (("block_count", n_layers), ("embedding_length", d_model), ("head_count", n_heads),
                            ("head_count_kv", n_kv), ("key_length", head_dim), ("feed_forward_length", d_ff),
                            ("vocab", vocab)):
            in_range(name, value, 1, MAX_WIDTH)
        if n_heads % n_kv:
            raise Q4KError(f"{source}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
        if head_dim % 2:
            raise Q4KError(f"{source}: key_length {head_dim} is odd (rope rotates pairs of values)")
        value_length = get("attention.value_length", head_dim)
        if value_length != head_dim:
            raise Q4KError(f"{source}: value_length {value_length} differs from key_length {head_dim} (not supported)")
        cfg = cls(
            architecture=arch, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, d_ff=d_ff, vocab_size=vocab,
            norm_eps=in_range("attention.layer_norm_rms_epsilon", get("attention.layer_norm_rms_epsilon", 1e-6, float),
                              1e-12, 1.0),
            rope_base=in_range("rope.freq_base", get("rope.freq_base", 10000.0, float), 1.0, 1e12),
            context_length=in_range("context_length", get("context_length", 2048), 1, 1 << 24),
            tied_output=("output.weight" not in names) if names else True,
            bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
            eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
            pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tid = getattr(cfg, key)
            if tid is not None and not 0 <= tid < vocab:
                raise Q4KError(f"{source}: tokenizer {key} {tid} is outside the vocabulary (0..{vocab - 1})")
        if arch == "llama":
            cfg.rope_style, cfg.act = "norm", "silu"
        elif arch == "qwen2":
            cfg.rope_style, cfg.act = "neox", "silu"
            cfg.qkv_bias = ("blk.0.attn_q.bias" in names) if names else True
        elif arch == "gemma3":
            cfg.rope_style, cfg.act = "neox", "gelu_tanh"
            cfg.qk_norm = cfg.post_norms = True
            cfg.embed_scale = math.sqrt(d_model)
            # llama.cpp: query_pre_attn_scalar is head_dim for the released gemma-3 models
            cfg.attn_scale = 1.0 / math.sqrt(head_dim)
            window = get("attention.sliding_window", None)
            if window:
                cfg.sliding_window = in_range("attention.sliding_window", window, 1, 1 << 24)
                cfg.swa_layers = _swa_layers(meta.get(f"{arch}.attention.sliding_window_pattern"), n_layers)
                cfg.rope_base_swa = in_range("rope.freq_base_swa", get("rope.freq_base_swa", 10000.0, float), 1.0, 1e12)
        return cfg

    # -- the tensors a model of this config has ------------------------------------------------
    def tensor_shapes(self) -> dict:
        """GGUF tensor name -> logical shape (rows = output features), in llama.cpp's file order.

        The one table of a model's tensors: synthetic files, the student's parameters (whose
        flat buffer puts the matrices first, see params.py) and the planner's counts use it."""
        D, Q, KV, F, Dh = self.d_model, self.q_dim, self.kv_dim, self.d_ff, self.head_dim
        shapes = {"token_embd.weight": (self.vocab_size, D)}
        for i in range(self.n_layers):
            b = {"attn_norm.weight": (D,), "attn_q.weight": (Q, D), "attn_k.weight": (KV, D), "attn_v.weight": (KV, D)}
            if self.qkv_bias:
                b.update({"attn_q.bias": (Q,), "attn_k.bias": (KV,), "attn_v.bias": (KV,)})
            if self.qk_norm:
                b.update({"attn_q_norm.weight": (Dh,), "attn_k_norm.weight": (Dh,)})
            b["attn_output.weight"] = (D, Q)
            if self.post_norms:
                b["post_attention_norm.weight"] = (D,)
            b.update({"ffn_norm.weight": (D,), "ffn_gate.weight": (F, D), "ffn_up.weight": (F, D),
                      "ffn_down.weight": (D, F)})
            if self.post_norms:
                b["post_ffw_norm.weight"] = (D,)
            shapes.update({f"blk.{i}.{n}": s for n, s in b.items()})
        shapes["output_norm.weight"] = (D,)
        if not self.tied_output:
            shapes["output.weight"] = (self.vocab_size, D)
        return shapes


def _swa_layers(pattern, n_layers) -> list:
    """Sliding-window layers from {arch}.attention.sliding_window_pattern: one bool per layer,
    or a period p (every p-th layer global). Absent: llama.cpp's gemma3 default, p = 6."""
    if isinstance(pattern, list) and len(pattern) == n_layers:
        return [i for i, slides in enumerate(pattern) if slides]
    period = pattern if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0 else 6
    return [i for i in range(n_layers) if (i + 1) % period != 0]


def _array_length(value):
    """Length of a metadata array given as a list, as its length, or as a manifest's {"array_len": n}."""
    if isinstance(value, dict):
        value = value.get("array_len")
    if isinstance(value, (list, tuple)):
        return len(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
