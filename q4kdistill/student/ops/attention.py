"""Causal grouped-query attention with a key padding mask and an optional sliding window.

Query head h reads kv head h // G (G = H // KV), as llama.cpp repeats kv heads. Queries are
grouped by their kv head so that every product is one batched matmul without copying k or v:

    q [B, T, H, D] -> qg [B, KV, G*T, D]      (row g*T + i = query i of head kv*G + g)
    scores  s = qg @ k^T * scale               [B, KV, G*T, T]
    probs   p = softmax over visible keys      (key j visible to query i iff j <= i,
                                                i - j < window, and key_mask[b, j])
    out     o = p @ v                          [B, KV, G*T, D] -> [B, T, H, D]

A query that sees no key at all (a left-padding position) gets p = 0 and o = 0, never NaN.
"""
from __future__ import annotations

from ...backend import array_module


def _group(x, kv):
    """[B, T, H, D] -> [B, KV, G*T, D]."""
    B, T, H, D = x.shape
    return x.reshape(B, T, kv, H // kv, D).transpose(0, 2, 3, 1, 4).reshape(B, kv, (H // kv) * T, D)


def _ungroup(x, T):
    """[B, KV, G*T, D] -> [B, T, H, D]."""
    B, kv, GT, D = x.shape
    G = GT // T
    return x.reshape(B, kv, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, kv * G, D)


def _visible(T, key_mask, window, xp):
    """bool [B or 1, 1, 1, T, T]: may query i (row) read key j (column)."""
    i = xp.arange(T)[:, None]
    j = xp.arange(T)[None, :]
    ok = j <= i
    if window is not None:
        ok = ok & (i - j < window)
    ok = ok[None, None, None]
    if key_mask is not None:
        ok = ok & key_mask.astype(bool)[:, None, None, None, :]
    return ok


def _softmax_visible(s, visible, xp):
    """Row softmax of s [..., T, T] over visible entries; all-hidden rows give zeros."""
    s = xp.where(visible, s, -xp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    p = xp.exp(s - m)                                 # exp(-inf) = 0 for hidden keys
    z = p.sum(axis=-1, keepdims=True)
    p /= xp.where(z > 0, z, 1.0)
    return p


def attention_forward(q, k, v, key_mask, window, scale):
    """q [B,T,H,D], k/v [B,T,KV,D], key_mask [B,T] bool (True = real token) or None,
    window int or None, scale float -> (o [B,T,H,D], cache)."""
    xp = array_module(q)
    B, T, H, D = q.shape
    KV = k.shape[2]
    qg = _group(q, KV)                                # [B, KV, G*T, D]
    kt = k.transpose(0, 2, 1, 3)                      # [B, KV, T, D]
    vt = v.transpose(0, 2, 1, 3)                      # [B, KV, T, D]
    scale = float(scale)                              # a NumPy float64 scalar would upcast float32
    s = (qg @ kt.transpose(0, 1, 3, 2)) * scale       # [B, KV, G*T, T]
    s = s.reshape(B, KV, H // KV, T, T)
    p = _softmax_visible(s, _visible(T, key_mask, window, xp), xp).reshape(B, KV, -1, T)
    o = _ungroup(p @ vt, T)                           # [B, T, H, D]
    return o, (qg, kt, vt, p, scale)


def attention_backward(do, cache):
    """do [B,T,H,D] -> (dq [B,T,H,D], dk [B,T,KV,D], dv [B,T,KV,D])."""
    qg, kt, vt, p, scale = cache
    T = kt.shape[2]
    dog = _group(do, kt.shape[1])                     # [B, KV, G*T, D]
    dv = p.transpose(0, 1, 3, 2) @ dog                # [B, KV, T, D]
    dp = dog @ vt.transpose(0, 1, 3, 2)               # [B, KV, G*T, T]
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    ds *= scale
    dq = _ungroup(ds @ kt, T)                         # [B, T, H, D]
    dk = (ds.transpose(0, 1, 3, 2) @ qg).transpose(0, 2, 1, 3)
    return dq, dk, dv.transpose(0, 2, 1, 3)
