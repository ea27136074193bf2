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

        def need(key):
            full = f"{arch}.{key}"
            if full not in meta:
                raise Q4KError(f"{source}: missing metadata key {full!r}")
            return meta[full]

        def get(key, default):
            return meta.get(f"{arch}.{key}", default)

        names = set(tensor_names)
        d_model = int(need("embedding_length"))
        n_heads = int(need("attention.head_count"))
        n_kv = int(get("attention.head_count_kv", n_heads))
        head_dim = int(get("attention.key_length", d_model // n_heads if n_heads else 0))
        n_layers = int(need("block_count"))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = tokens if isinstance(tokens, int) else (len(tokens) if tokens is not None else None)
        if vocab is None:
            raise Q4KError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokenizer.ggml.tokens)")
        for name, value in (("block_count", n_layers), ("embedding_length", d_model), ("head_count", n_heads),
                            ("head_count_kv", n_kv), ("key_length", head_dim), ("vocab", int(vocab))):
            if not (0 < value < 10_000_000):
                raise Q4KError(f"{source}: implausible {arch}.{name} = {value}")
        if n_heads % n_kv:
            raise Q4KError(f"{source}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
        cfg = cls(
            architecture=arch, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, d_ff=int(need("feed_forward_length")), vocab_size=int(vocab),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            context_length=int(get("context_length", 2048)),
            tied_output=("output.weight" not in names) if names else True,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
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
                cfg.sliding_window = int(window)
                # llama.cpp: every 6th layer is global, the other five use the sliding window
                cfg.swa_layers = [i for i in range(n_layers) if (i + 1) % 6 != 0]
                cfg.rope_base_swa = 10000.0
        return cfg
