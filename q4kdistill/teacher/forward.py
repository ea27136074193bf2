"""The teacher's forward pass, written once for NumPy and CuPy arrays.

    x = embed(token_embd, ids) * embed_scale                      [B, T, D]
    for each block:
        x += post_attn_norm( attn_output( attention( rope(qk_norm(q)), rope(qk_norm(k)), v ) ) )
        x += post_ffw_norm( ffn_down( act(ffn_gate(h)) * ffn_up(h) ) ),  h = ffn_norm(x)
    h = output_norm(x)                                            [B, T, D]
    logits = h @ head.T                                           [B*T, V]  (token chunks x vocab slabs)

Weights stay as the file stores them (``Weight``). Every linear layer goes through ``linear``,
which hands quantized weights to ``kernels.matmul`` (x [M, K] @ W.T, M = B x T tokens). At
M = 1 (and up to 8 for Q4_K on some cards) a fused GEMV decodes the blocks inside the product;
at training sizes the kernels decode one matrix at a time into a reusable fp16 scratch and call
cuBLAS (kernels/README.md, "What runs where"). The next product overwrites the scratch, so no
decoded matrix is kept, and the LM head goes HEAD_ROWS rows at a time so the scratch never holds
more than one slab (on a GPU: kernels.decode_ahead.matmul_ahead, a ring of SLOTS slabs of
HEAD_ROWS / SLOTS rows decoded on a second stream ahead of their GEMMs, each GEMM writing its columns
of the logits in their final type). On a GPU a block without q/k norms makes q, k and v with one
stacked product and one epilogue kernel (bias, rope, fp16: qkv_rope). The ops (``q4kdistill.student.ops``) are the student's, with their caches dropped. Each family's extras come from ``ModelConfig``
(q/k norms, post norms, qkv biases, sliding windows with their own rope base, embedding scale).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import kernels
from kernels import blas, decode_ahead
from gguf import GGMLQuantizationType as QT

from ..backend import array_module
from ..errors import Q4KError
from ..student.ops import embedding_forward, glu_forward, rmsnorm_forward, rope_tables
from ..student.ops import fused
from ..student.ops.flash_attention import device_path, flash_attention_forward

# On the GPU the ops between the products are the fused kernels (kernels/fused_*.py), the residual
# stream stays float32, and what feeds a product (norm outputs, attention output, GLU output) is
# written in float16, the type the decode + cuBLAS products multiply in (kernels' `accepts`).
PRODUCT_DTYPE = "float16"

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# LM head rows per product. A kernel that decodes its weight into a scratch buffer would
# otherwise need the whole [V, D] head at once (the 7B's 152064 x 3584 head: 1.1 GB in fp16).
HEAD_ROWS = 16384


@dataclass(frozen=True)
class Weight:
    """One tensor as it sits in memory.

    data   quantized: uint8 [rows, row_bytes], the file's blocks
           F32/F16:   float32/float16 of the logical shape
           BF16:      uint16 [rows, cols], the top 16 bits of float32 (neither NumPy nor CuPy has bfloat16)
    qtype  how ``data`` is stored
    shape  logical shape: (rows = output features, cols) or (n,)
    """

    data: object
    qtype: QT
    shape: tuple

    @property
    def quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def rows(self, start: int, stop: int) -> "Weight":
        """Rows start..stop-1 (a view: a quantized row is a whole row of bytes)."""
        stop = min(stop, self.shape[0])
        return Weight(self.data[start:stop], self.qtype, (stop - start,) + tuple(self.shape[1:]))


def bf16_to_f32(bits):
    """uint16 bfloat16 bits -> float32 (exact)."""
    xp = array_module(bits)
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def f32_to_bf16(x):
    """float32 -> uint16 bfloat16 bits, rounded to nearest even (finite inputs)."""
    xp = array_module(x)
    n = x.view(xp.uint32)
    return ((n + 0x7FFF + ((n >> 16) & 1)) >> 16).astype(xp.uint16)


def dense_f32(w: Weight):
    """A float (not quantized) weight as float32 (no copy for F32)."""
    xp = array_module(w.data)
    if w.qtype == QT.BF16:
        return bf16_to_f32(w.data)
    return w.data.astype(xp.float32, copy=False)


def linear(x, w: Weight, bias: Weight | None = None):
    """x [..., K] @ W.T (+ b) -> float32 [..., N]; x is flattened to [M, K] for the product.

    quantized  kernels.matmul on the stored blocks
    F16 (GPU)  cuBLAS GemmEx, fp16 operands, FP32 accumulate and output (the dense-fp16 baseline;
               the same GEMM the kernels' decode-to-scratch variant runs); on NumPy upcast to float32
    F32, BF16  float32 product (BF16 upcast one matrix at a time)
    """
    xp = array_module(x)
    n_out, k = w.shape
    x2 = x.reshape(-1, k)                                    # [M, K]
    if w.quantized:
        y = kernels.matmul(x2, w.data, w.qtype, n_out)
    elif w.qtype == QT.F16 and xp.__name__ == "cupy":
        y = kernels.gemm_f16_f32(x2.astype(xp.float16), w.data, xp.empty((x2.shape[0], n_out), dtype=xp.float32))
    else:
        y = blas.product(x2.astype(xp.float32, copy=False), dense_f32(w), trans_b=True)
    if bias is not None:
        y += bias.data
    return y.reshape(x.shape[:-1] + (n_out,))


def lm_head(h, w: Weight, dtype=None, out=None):
    """h [..., D] -> logits [..., V] (float32, or ``dtype``: each product's float32 accumulator rounded
    as it is written), the vocabulary HEAD_ROWS rows at a time (a GPU's decode + cuBLAS sizes: through
    kernels.decode_ahead.matmul_ahead); ``out``: a C-contiguous [M, V] array of that type to write them
    into (h flattened to [M, D])."""
    xp = array_module(h)
    V = w.shape[0]
    h2 = h.reshape(-1, h.shape[-1])                          # [M, D]
    if out is not None and (tuple(out.shape) != (h2.shape[0], V) or out.dtype != (dtype or xp.float32)
                            or not out.flags.c_contiguous):
        raise Q4KError(f"lm_head: out must be C-contiguous {dtype or 'float32'} {(h2.shape[0], V)}, "
                       f"got {out.dtype} {tuple(out.shape)}")
    if not w.quantized or V <= HEAD_ROWS:
        y = linear(h, w)
        if out is not None:
            out[...] = y.reshape(out.shape)
            return out.reshape(h.shape[:-1] + (V,))
        return y if dtype is None or y.dtype == dtype else y.astype(dtype)
    if out is None:
        out = xp.empty((h2.shape[0], V), dtype=dtype or xp.float32)   # [M, V]
    if _gpu(h2) and decode_ahead.applies(w.qtype, h2.shape[0], HEAD_ROWS, h2.shape[1]) \
            and out.dtype.name in ("float32", "float16"):
        # decoded HEAD_ROWS / SLOTS rows at a time ahead of the GEMMs, each writing its columns of out
        decode_ahead.matmul_ahead(h2, w.data, w.qtype, V, out, HEAD_ROWS // decode_ahead.SLOTS, decode_ahead.SLOTS)
        return out.reshape(h.shape[:-1] + (V,))
    for r0 in range(0, V, HEAD_ROWS):
        out[:, r0:r0 + HEAD_ROWS] = linear(h2, w.rows(r0, r0 + HEAD_ROWS))
    return out.reshape(h.shape[:-1] + (V,))


def embed(w: Weight, ids):
    """ids [B, T] -> float32 [B, T, D], gathered row by row (never the whole table)."""
    flat = ids.reshape(-1)                                   # [B*T]
    if w.quantized:
        rows = kernels.embedding_rows(w.data, w.qtype, flat)
    else:
        rows, _ = embedding_forward(flat, w.data)
        rows = dense_f32(Weight(rows, w.qtype, rows.shape))
    return rows.reshape(ids.shape + (w.shape[1],))


def _gpu(x) -> bool:
    return type(x).__module__.startswith("cupy") and x.flags.c_contiguous


def norm(x, w: Weight, eps, dtype=None):
    """rmsnorm(x) * w in ``dtype`` (default x's); one fused kernel on the GPU."""
    if _gpu(x):
        from kernels.fused_rmsnorm import rmsnorm_fwd

        return rmsnorm_fwd(x, w.data, eps, y=array_module(x).empty(x.shape, dtype=dtype or x.dtype))[0]
    y, _ = rmsnorm_forward(x, w.data, eps)
    return y if dtype is None else y.astype(dtype)


def add_norm(x, a, w: Weight, eps, dtype=None):
    """x += a (the residual stream, in place) -> rmsnorm(x) * w in ``dtype``; one kernel on the GPU."""
    if _gpu(x) and _gpu(a):
        from kernels.fused_rmsnorm import rmsnorm_fwd

        y = array_module(x).empty(x.shape, dtype=dtype or x.dtype)
        return rmsnorm_fwd(x, w.data, eps, residual=a, y=y, h=x)[0]
    x += a
    return norm(x, w, eps, dtype)


def _product_dtype(x):
    return PRODUCT_DTYPE if _gpu(x) else None


QKV = ("attn_q.weight", "attn_k.weight", "attn_v.weight")
# On the GPU, for blocks without q/k norms whose q, k, v are quantized: one stacked product
# (kernels.matmul_stacked) and one epilogue kernel (bias, rope, 16 bits: kernels.fused_rope.qkv_rope_split)
# instead of three products, three bias adds, two ropes and three casts. Tests switch it off to compare.
FUSED_QKV = True


def _fused_qkv(h, w: dict, cfg) -> bool:
    """Whether this block takes qkv_rope: the tensor-core attention (it reads the 16-bit q, k, v) on a GPU."""
    return (FUSED_QKV and _gpu(h) and not cfg.qk_norm and all(w[n].quantized for n in QKV)
            and device_path(cfg.head_dim) == "mma")


def qkv_rope(h, w: dict, cfg, cos_sin):
    """h [B, T, D] -> (q [B, T, H, hd], k, v [B, T, KV, hd]) in PRODUCT_DTYPE, biased and rotated:
    one stacked product, one epilogue. The product is written in float16 unless $Q4KDISTILL_QKV_PRODUCT=float32
    (the 7B at 8x512 writes and reads 38 MB a block instead of 75; the biases and rope then act on fp16 values;
    docs/perf.md, eleventh and thirteenth stops)."""
    from kernels.decode_ahead import matmul_stacked
    from kernels.fused_rope import qkv_rope_split

    B, T, _ = h.shape
    parts = [(w[n].data, w[n].qtype, w[n].shape[0]) for n in QKV]
    out = None
    if _setting16(QKV_PRODUCT_ENV):
        out = array_module(h).empty((B * T, sum(p[2] for p in parts)), dtype=PRODUCT_DTYPE)
    y = matmul_stacked(h.reshape(B * T, -1), parts, out=out)
    biases = tuple(dense_f32(w[f"attn_{n}.bias"]) for n in "qkv") if "attn_q.bias" in w else (None,) * 3
    return qkv_rope_split(y, T, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_style, *cos_sin,
                          biases=biases, dtype=PRODUCT_DTYPE)


def attention_block(h, w: dict, cfg, layer, key_mask, cos_sin):
    """h [B, T, D] (the normalised block input) -> the attention branch [B, T, D] (before the residual add)."""
    B, T, _ = h.shape
    if _fused_qkv(h, w, cfg):
        q, k, v = qkv_rope(h, w, cfg, cos_sin)
    else:
        q = linear(h, w["attn_q.weight"], w.get("attn_q.bias")).reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = linear(h, w["attn_k.weight"], w.get("attn_k.bias")).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = linear(h, w["attn_v.weight"], w.get("attn_v.bias")).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = norm(q, w["attn_q_norm.weight"], cfg.norm_eps)
            k = norm(k, w["attn_k_norm.weight"], cfg.norm_eps)
        q = fused.rope_forward(q, *cos_sin, cfg.rope_style, out=q if _gpu(q) else None)
        k = fused.rope_forward(k, *cos_sin, cfg.rope_style, out=k if _gpu(k) else None)
    o, _ = flash_attention_forward(q, k, v, key_mask, cfg.layer_window(layer), cfg.scale,   # [B, T, H, hd]
                                   out_dtype=_product_dtype(q))    # the kernels write o as the product reads it
    o = o.reshape(B, T, cfg.q_dim)
    a = linear(o.astype(_product_dtype(o) or o.dtype, copy=False), w["attn_output.weight"])
    return norm(a, w["post_attention_norm.weight"], cfg.norm_eps) if cfg.post_norms else a


GLU_INPUTS_ENV = "Q4KDISTILL_GLU_INPUTS"   # float16 (default) or float32: the gate and up products' output
QKV_PRODUCT_ENV = "Q4KDISTILL_QKV_PRODUCT"  # float16 (default) or float32: the stacked q/k/v product's output


def _setting16(env: str) -> bool:
    """Whether $env asks for float16 (float16, the default, or float32; anything else is an error). Default
    since the thirteenth stop: on the H200 the 7B teacher at 8x512 went 0.97x -> 1.01x of the peer with both,
    and the real gemma-3 file's GPU parity held (docs/perf.md)."""
    how = os.environ.get(env, "").strip() or "float16"
    if how not in ("float32", "float16"):
        raise Q4KError(f"{env}={how!r}: expected float32 or float16")
    return how == "float16"


def _glu_inputs16(h, w: dict) -> bool:
    """Whether gate and up are written in float16 by their GEMMs (the default; $Q4KDISTILL_GLU_INPUTS=float32
    keeps them float32): the GLU reads half the bytes (the 7B at 8x512: 310 MB a block instead of 620), but
    gate and up must then fit float16's range as the GLU's output already must."""
    return _setting16(GLU_INPUTS_ENV) and _gpu(h) and w["ffn_gate.weight"].quantized and w["ffn_up.weight"].quantized


def _product16(h, wt: Weight):
    """h [B, T, D] @ W.T written in float16 (kernels.decode_ahead.matmul_stacked of the one weight)."""
    from kernels.decode_ahead import matmul_stacked

    h2 = h.reshape(-1, h.shape[-1])
    out = array_module(h).empty((h2.shape[0], wt.shape[0]), dtype=PRODUCT_DTYPE)
    return matmul_stacked(h2, [(wt.data, wt.qtype, wt.shape[0])], out=out).reshape(h.shape[:-1] + (wt.shape[0],))


def ffn_block(h, w: dict, cfg):
    """h [B, T, D] (the normalised residual) -> the feed-forward branch [B, T, D] (before the residual add)."""
    if _glu_inputs16(h, w):
        gate, up = _product16(h, w["ffn_gate.weight"]), _product16(h, w["ffn_up.weight"])
    else:
        gate, up = linear(h, w["ffn_gate.weight"]), linear(h, w["ffn_up.weight"])     # [B, T, F]
    if _gpu(gate):
        from kernels.fused_glu import glu_fwd

        g = glu_fwd(gate, up, cfg.act, y=array_module(gate).empty(gate.shape, dtype=PRODUCT_DTYPE))
    else:
        g, _ = glu_forward(gate, up, cfg.act)
    del gate, up
    f = linear(g, w["ffn_down.weight"])
    return norm(f, w["post_ffw_norm.weight"], cfg.norm_eps) if cfg.post_norms else f


def hidden_states(weights: dict, layers: list, cfg, ids, key_mask):
    """ids [B, T] (positions 0..T-1), key_mask [B, T] bool or None -> float32 [B, T, D] after the final norm.

    weights: GGUF name -> Weight; layers[i]: the names of block i without "blk.i." -> Weight."""
    xp = array_module(ids)
    T = ids.shape[1]
    x = embed(weights["token_embd.weight"], ids)
    if cfg.embed_scale != 1.0:
        x *= xp.float32(cfg.embed_scale)
    bases = {cfg.layer_rope_base(i) for i in range(cfg.n_layers)}
    tables = {b: rope_tables(xp.arange(T), cfg.head_dim, b, xp) for b in bases}   # base -> (cos, sin) [T, hd/2]
    # each norm of the residual stream also adds the branch before it (add_norm): x += branch; h = norm(x)
    h = norm(x, layers[0]["attn_norm.weight"], cfg.norm_eps, _product_dtype(x)) if layers else x
    for i, w in enumerate(layers):
        a = attention_block(h, w, cfg, i, key_mask, tables[cfg.layer_rope_base(i)])
        h = add_norm(x, a, w["ffn_norm.weight"], cfg.norm_eps, _product_dtype(x))
        del a
        f = ffn_block(h, w, cfg)
        last = i + 1 == len(layers)
        nxt = weights["output_norm.weight"] if last else layers[i + 1]["attn_norm.weight"]
        h = add_norm(x, f, nxt, cfg.norm_eps, None if last else _product_dtype(x))
        del f
    return h if layers else norm(x, weights["output_norm.weight"], cfg.norm_eps)


def required_tensors(cfg) -> list:
    """The GGUF names a forward of ``cfg`` reads."""
    names = ["token_embd.weight", "output_norm.weight"] + ([] if cfg.tied_output else ["output.weight"])
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    per_layer += ["attn_q_norm", "attn_k_norm"] if cfg.qk_norm else []
    per_layer += ["post_attention_norm", "post_ffw_norm"] if cfg.post_norms else []
    names += [f"blk.{i}.{n}.weight" for i in range(cfg.n_layers) for n in per_layer]
    names += [f"blk.{i}.attn_{n}.bias" for i in range(cfg.n_layers) for n in "qkv"] if cfg.qkv_bias else []
    return names
