"""A float64 NumPy forward pass of a GGUF model, written plainly, for parity tests only.

It shares nothing with the package's forward: tensors are decoded with ``gguf.quants`` (the
codecs of llama.cpp's own Python package), and every op is spelled out here, attention as a
loop over heads. One unpadded sequence at a time; slow, but exact to float64.

    w = load_weights(path)                       # GGUF name -> float64 array, logical shape
    logits = reference_logits(w, config, ids)    # ids [T] -> float64 [T, V]

``config`` is a ``q4kdistill.config.ModelConfig`` (the numbers only; no code of the teacher).
"""
from __future__ import annotations

import math

import gguf
import numpy as np


def load_weights(path) -> dict:
    """GGUF tensor name -> float64 array of the logical shape (rows = output features)."""
    reader = gguf.GGUFReader(str(path))
    weights = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        logical = tuple(int(n) for n in reversed(t.shape))     # ggml shape is [cols, rows]
        weights[t.name] = np.asarray(values, dtype=np.float64).reshape(logical)
    return weights


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, base, style):
    """x [T, H, D] at positions 0..T-1. "norm" turns pairs (2i, 2i+1); "neox" turns (i, i + D/2)."""
    T, H, D = x.shape
    out = x.copy()
    positions = np.arange(T, dtype=np.float64)
    for i in range(D // 2):
        theta = positions * base ** (-2.0 * i / D)               # [T]
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]    # [T, 1]
        a, b = (2 * i, 2 * i + 1) if style == "norm" else (i, i + D // 2)
        out[:, :, a] = x[:, :, a] * c - x[:, :, b] * s
        out[:, :, b] = x[:, :, a] * s + x[:, :, b] * c
    return out


def attention(q, k, v, scale, window):
    """q [T, H, D], k/v [T, KV, D] -> [T, H, D]; causal, optional sliding window."""
    T, H, D = q.shape
    group = H // k.shape[1]
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    out = np.zeros_like(q)
    for h in range(H):
        scores = q[:, h] @ k[:, h // group].T * scale             # [T, T]
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[:, h] = p @ v[:, h // group]
    return out


def activation(x, act):
    if act == "silu":
        return x / (1.0 + np.exp(-x))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def block(x, w, cfg, layer):
    """One transformer block on x [T, D]."""
    p = f"blk.{layer}."
    T = x.shape[0]
    h = rmsnorm(x, w[p + "attn_norm.weight"], cfg.norm_eps)
    q, k, v = (h @ w[p + f"attn_{n}.weight"].T + w.get(p + f"attn_{n}.bias", 0.0) for n in "qkv")
    q = q.reshape(T, cfg.n_heads, cfg.head_dim)
    k = k.reshape(T, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(T, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rmsnorm(q, w[p + "attn_q_norm.weight"], cfg.norm_eps)
        k = rmsnorm(k, w[p + "attn_k_norm.weight"], cfg.norm_eps)
    base = cfg.layer_rope_base(layer)
    q, k = rope(q, base, cfg.rope_style), rope(k, base, cfg.rope_style)
    o = attention(q, k, v, cfg.scale, cfg.layer_window(layer)).reshape(T, -1)
    a = o @ w[p + "attn_output.weight"].T
    if cfg.post_norms:
        a = rmsnorm(a, w[p + "post_attention_norm.weight"], cfg.norm_eps)
    x = x + a
    h = rmsnorm(x, w[p + "ffn_norm.weight"], cfg.norm_eps)
    f = activation(h @ w[p + "ffn_gate.weight"].T, cfg.act) * (h @ w[p + "ffn_up.weight"].T)
    f = f @ w[p + "ffn_down.weight"].T
    if cfg.post_norms:
        f = rmsnorm(f, w[p + "post_ffw_norm.weight"], cfg.norm_eps)
    return x + f


def reference_hidden(w, cfg, ids):
    """ids [T] -> float64 [T, D] after the final norm."""
    x = w["token_embd.weight"][np.asarray(ids)] * cfg.embed_scale
    for layer in range(cfg.n_layers):
        x = block(x, w, cfg, layer)
    return rmsnorm(x, w["output_norm.weight"], cfg.norm_eps)


def reference_logits(w, cfg, ids):
    """ids [T] -> float64 logits [T, V]."""
    head = w.get("output.weight", w["token_embd.weight"])
    return reference_hidden(w, cfg, ids) @ head.T
