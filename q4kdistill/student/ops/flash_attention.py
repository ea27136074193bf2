"""Linear-memory attention: FlashAttention-2's block algorithm, forward and backward, and the
dispatcher that picks NumPy, the Numba fp32 kernels or the tensor-core kernels.

Same semantics as the float64 reference ``ops/attention.py`` (causal; key j visible to query i
iff j <= i, i - j < window and key_mask[b, j]; query head h reads kv head h // (H // KV); a query
that sees no key gets o = 0 and no gradient), but no [T, T] array per head ever exists:

  forward, per query block Qb (rows i0..i1) and each visible key block Kb, Vb:
      S = Qb Kb^T * scale,  masked to -inf where hidden              [.., bq, bk]
      m' = max(m, rowmax S);  P = exp(S - m');  a = exp(m - m')
      l = a l + rowsum P;  acc = a acc + P Vb;  m = m'
  then O = acc / l and the row log-sum-exp L = m + log l (L = +inf for a row that sees no key,
  so exp(S - L) = 0 there).
  backward, with Drow = rowsum(dO * O), per block pair:
      P = exp(S - L);  dV += P^T dOb;  dP = dOb Vb^T;  dS = P * (dP - Drow)
      dQ += dS Kb * scale;  dK += dS^T Qb * scale

The cache keeps q, k, v, o and L (O(T) bytes), never P.

    flash_attention_forward(q, k, v, key_mask, window, scale, path=None) -> (o, cache)
    flash_attention_backward(do, cache) -> (dq, dk, dv)

Paths (``choose_path``):
  "blocks"  the block loop below in array operations, input dtype kept: NumPy arrays (the CPU)
            and CuPy float64 (gradient checks on a GPU)
  "mma"     CuPy: bf16 or fp16 tensor cores, FP32 accumulation (kernels/flash_attention_mma.py);
            float32 output and grads; the default on a GPU where NVRTC compiles it
  "numba"   the FP32 Numba kernels (kernels/flash_attention.py): the simulator's path in CI
            (NumPy arrays with path="numba") and the GPU fallback
Q4KDISTILL_ATTENTION=numba|mma|blocks forces the path for CuPy arrays.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ...backend import array_module
from ...errors import Q4KError

BLOCK = 256            # block path: queries and keys per block (scores block [B, KV, G*256, 256])
PATHS = ("blocks", "numba", "mma")
INF = float("inf")


@dataclass
class FlashCache:
    """What the backward needs: the inputs, the output and the row log-sum-exp (never P)."""
    q: object          # [B, T, H, D]   (None on the mma path: its 16-bit copies are in extra)
    k: object          # [B, T, KV, D]
    v: object          # [B, T, KV, D]
    o: object          # [B, T, H, D]
    lse: object        # [B, H, T] float32 (float64 on the NumPy path for float64 inputs)
    key_mask: object   # [B, T] bool or None
    window: int | None
    scale: float
    path: str
    extra: object = None   # blocks: the block size; mma: (q16, k16, v16, dtype), the 16-bit copies it read


def check_shapes(q, k, v, key_mask):
    """Raise Q4KError unless q [B,T,H,D], k/v [B,T,KV,D] with KV | H, key_mask [B,T] or None."""
    if q.ndim != 4 or k.ndim != 4 or tuple(k.shape) != tuple(v.shape):
        raise Q4KError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                       "need q [B,T,H,D] and k, v [B,T,KV,D]")
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D or H % k.shape[2]:
        raise Q4KError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} do not match "
                       "(same B, T, D; kv heads dividing the query heads)")
    if key_mask is not None and tuple(key_mask.shape) != (B, T):
        raise Q4KError(f"attention: key_mask {tuple(key_mask.shape)} != (B, T) = {(B, T)}")


def key_range(i0, i1, window):
    """Keys [j0, j1) that any query of rows [i0, i1) may see (causal, window)."""
    return (0 if window is None else max(0, i0 - window + 1)), i1


def query_range(j0, j1, T, window):
    """Queries [i0, i1) that may see any key of [j0, j1)."""
    return j0, (T if window is None else min(T, j1 - 1 + window))


# -- NumPy path: the block algorithm ----------------------------------------------------------
def _rows(x, i0, i1, kv):
    """x[:, i0:i1] [B, n, H, D] -> [B, KV, G*n, D] (row g*n + r = query i0 + r of head kv*G + g)."""
    B, _, H, D = x.shape
    n = i1 - i0
    return x[:, i0:i1].reshape(B, n, kv, H // kv, D).transpose(0, 2, 3, 1, 4).reshape(B, kv, (H // kv) * n, D)


def _unrows(x, n):
    """[B, KV, G*n, D] -> [B, n, H, D]."""
    B, kv, Gn, D = x.shape
    return x.reshape(B, kv, Gn // n, n, D).transpose(0, 3, 1, 2, 4).reshape(B, n, -1, D)


def _keys(x, j0, j1):
    """x[:, j0:j1] [B, n, KV, D] -> [B, KV, n, D]."""
    return x[:, j0:j1].transpose(0, 2, 1, 3)


def _visible(xp, i0, i1, j0, j1, G, key_mask, window):
    """bool [B or 1, 1, G*(i1-i0), j1-j0]: may query row (g, i) read key j."""
    i = xp.arange(i0, i1)[:, None]
    j = xp.arange(j0, j1)[None, :]
    ok = j <= i
    if window is not None:
        ok &= i - j < window
    ok = xp.tile(ok, (G, 1))[None, None]
    if key_mask is not None:
        ok = ok & key_mask[:, j0:j1].astype(bool)[:, None, None, :]
    return ok


def _forward_blocks(q, k, v, key_mask, window, scale, block):
    xp = array_module(q)
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    o = xp.empty_like(q)
    lse = xp.empty((B, H, T), dtype=q.dtype)
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        n = i1 - i0
        qb = _rows(q, i0, i1, KV)                                  # [B, KV, G*n, D]
        m = xp.full((B, KV, G * n, 1), -INF, dtype=q.dtype)    # running row max
        l = xp.zeros((B, KV, G * n, 1), dtype=q.dtype)            # running row sum
        acc = xp.zeros_like(qb)                                    # running P V
        k_lo, k_hi = key_range(i0, i1, window)
        for j0 in range(k_lo, k_hi, block):
            j1 = min(k_hi, j0 + block)
            s = (qb @ _keys(k, j0, j1).transpose(0, 1, 3, 2)) * q.dtype.type(scale)   # [B, KV, G*n, bk]
            s = xp.where(_visible(xp, i0, i1, j0, j1, G, key_mask, window), s, -INF)
            m_new = xp.maximum(m, s.max(axis=-1, keepdims=True))
            m_safe = xp.where(xp.isfinite(m_new), m_new, 0).astype(q.dtype)
            p = xp.exp(s - m_safe)                                 # hidden keys: exp(-inf) = 0
            alpha = xp.exp(m - m_safe)                             # first visible block: exp(-inf) = 0
            l = l * alpha + p.sum(axis=-1, keepdims=True)
            acc = acc * alpha + p @ _keys(v, j0, j1)
            m = m_new
        seen = l > 0
        o[:, i0:i1] = _unrows(acc / xp.where(seen, l, 1), n)
        L = xp.where(seen, m + xp.log(xp.where(seen, l, 1)), INF)   # [B, KV, G*n, 1]
        lse[:, :, i0:i1] = L.reshape(B, H, n)
    return o, lse


def _backward_blocks(do, c: FlashCache, block):
    xp = array_module(do)
    q, k, v, o, lse = c.q, c.k, c.v, c.o, c.lse
    B, T, H, D = q.shape
    KV = k.shape[2]
    G = H // KV
    sc = q.dtype.type(c.scale)
    drow = (do * o).sum(axis=-1)                                   # [B, T, H]
    dq = xp.zeros_like(q)
    dk = xp.zeros((B, KV, T, D), dtype=q.dtype)
    dv = xp.zeros((B, KV, T, D), dtype=q.dtype)
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        n = i1 - i0
        qb, dob = _rows(q, i0, i1, KV), _rows(do, i0, i1, KV)     # [B, KV, G*n, D]
        L = lse[:, :, i0:i1].reshape(B, KV, G * n, 1)
        Dr = drow[:, i0:i1].transpose(0, 2, 1).reshape(B, KV, G * n, 1)
        dqb = xp.zeros_like(qb)
        k_lo, k_hi = key_range(i0, i1, window=c.window)
        for j0 in range(k_lo, k_hi, block):
            j1 = min(k_hi, j0 + block)
            kb, vb = _keys(k, j0, j1), _keys(v, j0, j1)            # [B, KV, bk, D]
            s = (qb @ kb.transpose(0, 1, 3, 2)) * sc               # [B, KV, G*n, bk]
            p = xp.exp(xp.where(_visible(xp, i0, i1, j0, j1, G, c.key_mask, c.window), s - L, -INF))
            dv[:, :, j0:j1] += p.transpose(0, 1, 3, 2) @ dob
            ds = p * (dob @ vb.transpose(0, 1, 3, 2) - Dr) * sc
            dqb += ds @ kb
            dk[:, :, j0:j1] += ds.transpose(0, 1, 3, 2) @ qb
        dq[:, i0:i1] = _unrows(dqb, n)
    return dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


# -- dispatch ---------------------------------------------------------------------------------
def choose_path(q, path=None) -> str:
    """The path for these inputs: ``path`` if given, else "blocks" for NumPy arrays and CuPy float64
    (no FP64 kernel), else $Q4KDISTILL_ATTENTION, else "mma" where it compiles for this head size,
    else "numba"."""
    if path not in (None,) + PATHS:
        raise Q4KError(f"attention path {path!r}: expected one of {', '.join(PATHS)}")
    on_cupy = array_module(q) is not np
    if path is None and (not on_cupy or q.dtype == np.float64):
        return "blocks"
    return device_path(q.shape[-1], on_cupy, path)


def device_path(head_dim: int, on_cupy: bool = True, path=None) -> str:
    """choose_path for float32 / 16-bit inputs of this head size: ``path``, else $Q4KDISTILL_ATTENTION,
    else "mma" where the tensor-core kernels compile for it, else "numba"."""
    path = path or os.environ.get("Q4KDISTILL_ATTENTION", "").strip().lower() or None
    if path not in (None, "numba", "mma", "blocks"):
        raise Q4KError(f"Q4KDISTILL_ATTENTION={path!r}: expected numba, mma or blocks")
    if path == "mma" and not on_cupy:
        raise Q4KError("attention path 'mma' needs CuPy arrays on a GPU")
    if path is None:
        from kernels import flash_attention_mma
        path = "mma" if flash_attention_mma.supports(head_dim) and flash_attention_mma.available() else "numba"
    return path


def flash_attention_forward(q, k, v, key_mask, window, scale, path=None, block=BLOCK, mma_dtype="fp16",
                            out_dtype=None):
    """q [B,T,H,D], k/v [B,T,KV,D], key_mask [B,T] bool or None, window int or None, scale
    -> (o [B,T,H,D], FlashCache). The block path keeps the input dtype; the kernels return float32,
    or on the tensor-core path ``out_dtype`` (float16 / bfloat16) when given: o written in the 16 bits
    the next product reads (the float32 values rounded to nearest even, as a cast gives them).
    mma_dtype: what the tensor cores read for float32 inputs. "fp16" (default): 8x finer than bf16
    (2^-11 against 2^-8), so teacher logits and student gradients stay close to FP32; its range
    (|x| < 65504) holds for q, k, v, and the backward scales dO by a power of two so that small
    gradients keep their precision. "bf16": float32's range, coarser."""
    check_shapes(q, k, v, key_mask)
    window = None if window is None else int(window)
    scale = float(scale)
    path = choose_path(q, path)
    if path == "blocks" and q.dtype.kind != "f":
        raise Q4KError(f"attention on {q.dtype} arrays: the block path takes float arrays "
                       "(bf16 bits as uint16 go to the GPU kernels)")
    if path == "blocks":
        o, lse = _forward_blocks(q, k, v, key_mask, window, scale, block)
        return o, FlashCache(q, k, v, o, lse, key_mask, window, scale, path, block)
    if path == "mma":
        from kernels.flash_attention_mma import mma_attention_forward
        o, lse, extra = mma_attention_forward(q, k, v, key_mask, window, scale, mma_dtype, out_dtype)
        return o, FlashCache(None, None, None, o, lse, key_mask, window, scale, path, extra)
    from kernels.flash_attention import numba_attention_forward
    o, lse = numba_attention_forward(q, k, v, key_mask, window, scale)
    return o, FlashCache(q, k, v, o, lse, key_mask, window, scale, path)


def flash_attention_backward(do, cache: FlashCache):
    """do [B,T,H,D] -> (dq [B,T,H,D], dk [B,T,KV,D], dv [B,T,KV,D]), by the forward's path."""
    if tuple(do.shape) != tuple(cache.o.shape):
        raise Q4KError(f"attention backward: do {tuple(do.shape)} != o {tuple(cache.o.shape)}")
    if cache.path == "blocks":
        return _backward_blocks(do, cache, cache.extra)
    if cache.path == "mma":
        from kernels.flash_attention_mma import mma_attention_backward
        return mma_attention_backward(do, cache)
    from kernels.flash_attention import numba_attention_backward
    return numba_attention_backward(do, cache)
