"""The student transformer: forward and a hand-written backward, no autograd.

Layouts (from ModelConfig), per block, with GGUF tensor names (blk.N. omitted):

    h = rmsnorm(x, attn_norm)
    q, k, v = h @ attn_q.T (+ bias), h @ attn_k.T (+ bias), h @ attn_v.T (+ bias)   [qwen2: biases]
    q, k = rmsnorm(q, attn_q_norm), rmsnorm(k, attn_k_norm)     per head          [gemma3]
    q, k = rope(q), rope(k)                                     layer's own base  [gemma3 swa layers]
    a = attention(q, k, v, padding mask, layer's window) @ attn_output.T
    a = rmsnorm(a, post_attention_norm)                                           [gemma3]
    x = x + a
    f = glu(h2 @ ffn_gate.T, h2 @ ffn_up.T) @ ffn_down.T,  h2 = rmsnorm(x, ffn_norm)
    f = rmsnorm(f, post_ffw_norm)                                                 [gemma3]
    x = x + f

around them: x0 = token_embd[ids] * embed_scale, logits = rmsnorm(x, output_norm) @ W.T with
W = output.weight, or token_embd.weight when tied.

Parameters, grads: float32 (float64 in gradient checks) views of one flat buffer each (params.py),
named and shaped by ModelConfig.tensor_shapes.
Precision (precision.py): "fp32", "fp64", or "bf16": the matrix products take bfloat16 copies of
the weights (``self.compute``, refreshed from the fp32 master before each forward) and bfloat16
inputs, accumulate in fp32 and keep their inputs for the backward in bfloat16; everything else
(norms, rope, softmax, GLU, the loss, grad accumulation) runs in float32. The precision change
happens in two helpers only, ``_linear`` and ``_linear_backward`` (and the LM head beside them).
On a GPU a product whose consumer is float32 (q, k, v, the attention and FFN outputs, dx) comes
out of cuBLAS in float32 (matmul_f32: never rounded to bf16), and dW is accumulated by cuBLAS
straight into the float32 grad (add_outer); a product a fused op reads in bf16 (gate, up) is bf16.
Ops (``_Batch.ops``): NumPy arrays and float64 run the reference ops of ops/* (``_ReferenceOps``);
CuPy float32/bf16 runs ops/fused.py's kernels under the same names (math in float32 inside each
kernel), and the wiring differs in five places: the norms write the products' bf16 input directly,
``x + a`` is added inside the FFN norm's kernel, each norm's backward adds the residual stream's
gradient, the GLU reads the bf16 gate/up products and writes its bf16 output (so gate, up and the
GLU output are kept in bf16), rope rotates in place, and the LM head + loss is fused_linear_loss
(the loss kernel writes ds over s: no other [chunk, V] buffer of the student's).
Memory: ``checkpoint=True`` keeps only each block's input and recomputes the block in the
backward; the LM head, the loss and their backward run over ``chunk_tokens`` tokens at a time,
so [chunk, V] is the largest logits buffer.
"""
from __future__ import annotations

import math

import numpy as np
from kernels import blas

from .. import backend
from ..config import ModelConfig
from ..errors import Q4KError
from .losses import LossConfig, SparseTargets, chunk_loss, finish_parts, masked_sum, token_weights
from .ops import (embedding_backward, embedding_forward, glu_backward, glu_forward, linear_backward, linear_forward, rmsnorm_backward, rmsnorm_forward,
                  rope_backward, rope_forward, rope_tables)
from .ops import fused as fused_ops
from .ops.flash_attention import flash_attention_backward, flash_attention_forward
from .ops.fused_linear_loss import add_outer, fused_linear_loss, matmul_f32
from .params import FlatBuffer, RowGrad
from .precision import Precision

LOGITS_BUDGET = 2 ** 26   # default chunk: about this many logits (256 tokens at V = 262,144)


def chunk_size(vocab_size: int, n_tokens: int, chunk_tokens: int | None = None) -> int:
    """Tokens per LM-head/loss chunk: ``chunk_tokens``, else about LOGITS_BUDGET logits."""
    return chunk_tokens or max(1, min(n_tokens, LOGITS_BUDGET // vocab_size))


class _ReferenceOps:
    """The reference ops of ops/* under ops/fused.py's names (NumPy, float64 checks): the CPU path.
    Each looks this module's global up when called, so wrapping it (bench student's timers) works."""

    @staticmethod
    def rmsnorm_backward(dy, cache):
        return rmsnorm_backward(dy, cache)

    @staticmethod
    def glu_forward(gate, up, act):
        return glu_forward(gate, up, act)

    @staticmethod
    def glu_backward(dy, cache):
        return glu_backward(dy, cache)

    @staticmethod
    def rmsnorm_forward(x, w, eps, dtype=None):
        return rmsnorm_forward(x, w, eps)

    @staticmethod
    def add_rmsnorm_forward(x, res, w, eps, dtype=None):
        """-> (rmsnorm(res + x), res + x, cache)."""
        h = res + x
        y, cache = rmsnorm_forward(h, w, eps)
        return y, h, cache

    @staticmethod
    def add_rmsnorm_backward(dy, cache, dh):
        dx, dw = rmsnorm_backward(dy, cache)
        return dh + dx, dw

    @staticmethod
    def rope_forward(x, cos, sin, style, out=None):
        return rope_forward(x, cos, sin, style)

    @staticmethod
    def rope_backward(dy, cos, sin, style, out=None):
        return rope_backward(dy, cos, sin, style)


def uses_fused_ops(xp, prec: Precision) -> bool:
    """The fused kernels for CuPy float32/bf16 (or NumPy under ``fused_ops.ON_HOST``, the simulator
    tests); the reference ops on the CPU and for float64."""
    return prec.name != "fp64" and (xp is not np or fused_ops.ON_HOST)


class _Batch:
    """What every block of one batch shares: the padding mask, rope tables, the precision and the ops."""

    def __init__(self, cfg, ids, attention_mask, xp, prec: Precision):
        self.B, self.T = ids.shape
        self.prec = prec
        self.fused = uses_fused_ops(xp, prec)
        self.ops = fused_ops if self.fused else _ReferenceOps
        self.key_mask = None if attention_mask is None else xp.asarray(attention_mask).astype(bool)
        positions = xp.arange(self.T)
        self.tables = {base: rope_tables(positions, cfg.head_dim, base, xp)
                       for base in {cfg.layer_rope_base(i) for i in range(cfg.n_layers)}}


# -- one block ---------------------------------------------------------------------------------
# The cache of a block holds each norm's and linear's cache under its tensor's stem
# ("ffn_down" for blk.N.ffn_down.weight), so the backward finds both by one name. ``ops`` is the
# batch's op set (_Batch.ops): the same calls run the reference ops or the fused kernels.

def _norm(x, p, c, stem, eps, ops, dtype=None):
    """rmsnorm(x) * w; ``dtype``: the output's storage where a fused kernel can write it directly."""
    y, c[stem] = ops.rmsnorm_forward(x, p[f"{stem}.weight"], eps, dtype=dtype)
    return y


def _norm_backward(dy, c, g, stem, ops):
    """-> dx; adds the weight's grad into ``g``."""
    dx, dw = ops.rmsnorm_backward(dy, c[stem])
    g[f"{stem}.weight"] += dw
    return dx


def _add_norm_backward(dy, c, g, stem, ops, dres):
    """dy of a norm's output, dres the residual stream's own grad -> dres + the norm's dx (one
    kernel on the fused path); adds the weight's grad into ``g``."""
    dx, dw = ops.add_rmsnorm_backward(dy, c[stem], dh=dres)
    g[f"{stem}.weight"] += dw
    return dx


def _linear(x, p, c, stem, prec, high=True):
    """x [..., K] -> float32 [..., N]: the product in the low precision (its cached input too),
    the bias added in float32. ``high=False``: the product's low-precision output as it is (for a
    fused op that reads bf16; no bias)."""
    if high and prec.mixed and not prec.emulated:          # bf16 operands, FP32 output from cuBLAS directly
        xl, w = _cached_input(x, prec), p[f"{stem}.weight"]
        y = matmul_f32(xl.reshape(-1, w.shape[1]), w, trans_b=True).reshape(*x.shape[:-1], w.shape[0])
        c[stem] = (xl, w, False)                             # linear_forward's cache
    else:
        y, c[stem] = linear_forward(_cached_input(x, prec), p[f"{stem}.weight"])
        if not high:
            return prec.low(y)
        y = prec.high(y)
    bias = p.get(f"{stem}.bias")
    return y if bias is None else y + bias


def _cached_input(x, prec):
    """A product's input as _linear multiplies it and keeps it for the backward (its low-precision
    copy; C-contiguous where cuBLAS takes it directly)."""
    return _contiguous(prec.low(x)) if prec.mixed and not prec.emulated else prec.low(x)


def _linear_backward(dy, c, g, stem, prec, high=True):
    """dy float32 [..., N] -> dx float32 [..., K] (low precision with ``high=False``); adds the
    weight's (and the bias's, summed in float32) grad into ``g``."""
    if prec.mixed and not prec.emulated:
        # dW accumulated by cuBLAS straight into the float32 grad (16-bit operands, FP32 sums): no
        # [N, K] product rounded to 16 bits, cast and added in three more passes
        x, w, _ = c[stem]
        dy2 = _contiguous(prec.low(dy).reshape(-1, w.shape[0]))      # [M, N]
        dx = (matmul_f32(dy2, w, trans_b=False) if high else blas.product(dy2, w)).reshape(x.shape)
        add_outer(g[f"{stem}.weight"], dy2, _contiguous(x.reshape(-1, w.shape[1])))
    else:
        dx, dw, _ = linear_backward(prec.low(dy), c[stem])
        g[f"{stem}.weight"] += prec.high(dw)
    if f"{stem}.bias" in g:
        g[f"{stem}.bias"] += dy.reshape(-1, dy.shape[-1]).sum(axis=0)
    return prec.high(dx) if high else prec.low(dx)


def _contiguous(a):
    """a, C-contiguous (ascontiguousarray returns a itself when it already is)."""
    return backend.array_module(a).ascontiguousarray(a)


def _attention_path(q, prec):
    """A bf16 student's attention runs on the tensor cores (16-bit q, k, v); an fp32 one keeps FP32
    math: the block algorithm on cuBLAS float32 products (what NumPy arrays take too)."""
    return None if prec.mixed else "blocks"


def block_forward(cfg: ModelConfig, layer: int, p: dict, x, batch: _Batch):
    """x [B, T, D] -> (x [B, T, D], cache). ``p``: this block's params by short name."""
    B, T, D = x.shape
    eps, c, prec, ops = cfg.norm_eps, {}, batch.prec, batch.ops
    lo = prec.low_dtype if prec.mixed else None
    h = prec.low(_norm(x, p, c, "attn_norm", eps, ops, lo))   # one low copy, shared by q, k and v
    q, k, v = (_linear(h, p, c, f"attn_{n}", prec).reshape(B, T, heads, cfg.head_dim)
               for n, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)))
    del h
    _drop_normed(c, "attn_norm", QKV)
    if cfg.qk_norm:
        q, k = _norm(q, p, c, "attn_q_norm", eps, ops), _norm(k, p, c, "attn_k_norm", eps, ops)
    cos, sin = batch.tables[cfg.layer_rope_base(layer)]
    q = ops.rope_forward(q, cos, sin, cfg.rope_style, out=q)     # in place on the fused path
    k = ops.rope_forward(k, cos, sin, cfg.rope_style, out=k)     # (q, k are fresh, in no cache)
    o, c["attn"] = flash_attention_forward(q, k, v, batch.key_mask, cfg.layer_window(layer), cfg.scale,
                                           path=_attention_path(q, prec),
                                           out_dtype=None if prec.emulated else lo)   # bf16: o as o-proj reads it
    a = _linear(o.reshape(B, T, cfg.q_dim), p, c, "attn_output", prec)
    _share_attention_output(c, o.shape, prec)
    del o
    if cfg.post_norms:
        a = _norm(a, p, c, "post_attention_norm", eps, ops)
    h, x, c["ffn_norm"] = ops.add_rmsnorm_forward(a, x, p["ffn_norm.weight"], eps, dtype=lo)   # x = x + a
    h = prec.low(h)                                          # shared by gate and up
    glu_in = dict(prec=prec, high=not batch.fused)           # fused: the GLU reads and writes bf16
    m, c["glu"] = ops.glu_forward(_linear(h, p, c, "ffn_gate", **glu_in), _linear(h, p, c, "ffn_up", **glu_in),
                                  cfg.act)
    del h
    _drop_normed(c, "ffn_norm", GATE_UP)
    f = _linear(m, p, c, "ffn_down", prec)
    if batch.fused and _glu_recomputable(c, cfg):   # the GLU output is made again in the backward: [N, F] less kept
        _drop_inputs(c, ("ffn_down",))
    del m
    if cfg.post_norms:
        f = _norm(f, p, c, "post_ffw_norm", eps, ops)
    return x + f, c


QKV, GATE_UP = ("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")


def _drop_inputs(c, stems):
    """The input these products keep for their weight grads is not kept: the backward makes it
    again (_inputs_again)."""
    for s in stems:
        c[s] = (None,) + tuple(c[s][1:])


def _inputs_again(c, stems, make, prec) -> dict:
    """If the forward dropped these products' input, put it back into their caches, made again by
    ``make()`` (the forward's kernel on the same values: the same bits) -> the caches as they were,
    for the caller to put back after the products' backward (the remade input goes with them)."""
    kept = {s: c[s] for s in stems}
    if kept[stems[0]][0] is None:
        y = _cached_input(make(), prec)
        for s in stems:
            c[s] = (y,) + tuple(kept[s][1:])
    return kept


def _drop_normed(c, norm, products):
    """On the fused path the norm's output, the input its products keep, is not kept: _normed_again
    makes it again from the norm's cache (the block's input or the residual stream, and rstd: kept
    anyway), one elementwise pass instead of [N, D] a norm."""
    if isinstance(c[norm], fused_ops.NormCache) and all(c[s][0] is not None for s in products):
        _drop_inputs(c, products)


def _normed_again(c, norm, products, prec) -> dict:
    """_inputs_again for a norm's output (fused.rmsnorm_output, at the forward's storage type)."""
    lo = prec.low_dtype if prec.mixed else None
    return _inputs_again(c, products, lambda: fused_ops.rmsnorm_output(c[norm], dtype=lo), prec)


def _share_attention_output(c, shape, prec):
    """bf16: the flash cache's O, read once in the backward for rowsum(dO * O), becomes the 16-bit
    copy of the attention output that attn_output's product keeps anyway (FlashAttention-2 keeps O
    in 16 bits too), so the float32 O ([N, q_dim] a block) is not kept. fp32 keeps its O as it is;
    so does the Numba fallback, whose kernels read float32 only."""
    kept = c["attn_output"][0]
    if prec.mixed and kept is not None and c["attn"].path in ("mma", "blocks"):
        c["attn"].o = kept.reshape(shape)


def _glu_recomputable(c, cfg) -> bool:
    """The GLU's cache is (gate, up, act) (not the halves of one product): its output can be made again
    from it, bit for bit. Used on the fused path (the planner's block_cache_bytes counts it so); the
    reference ops keep the output (their planner rows count it)."""
    glu = c["glu"]
    return isinstance(glu, tuple) and len(glu) == 3 and glu[2] == cfg.act and c["ffn_down"][0] is not None


def _ffn_backward(cfg, dx, c, g, batch):
    """The FFN half: residual grad dx [B, T, D] -> dx + its share through ffn_norm. On the fused path
    the GLU output (ffn_down's input) is made again from the kept gate and up (one elementwise pass,
    the same kernel and inputs as the forward's: the same values) and dropped after ffn_down's backward."""
    prec, ops, high = batch.prec, batch.ops, not batch.fused
    df = _norm_backward(dx, c, g, "post_ffw_norm", ops) if cfg.post_norms else dx
    kept = _inputs_again(c, ("ffn_down",), lambda: ops.glu_forward(*c["glu"])[0], prec)
    dglu = _linear_backward(df, c, g, "ffn_down", prec, high)
    c.update(kept)                                           # (the recomputed output goes)
    dgate, dup = ops.glu_backward(dglu, c["glu"])
    del dglu
    kept = _normed_again(c, "ffn_norm", GATE_UP, prec)
    dh = _linear_backward(dgate, c, g, "ffn_gate", prec) + _linear_backward(dup, c, g, "ffn_up", prec)
    c.update(kept)
    return _add_norm_backward(dh, c, g, "ffn_norm", ops, dx)


def _attn_backward(cfg, layer, dx, c, g, batch):
    """The attention half: residual grad dx [B, T, D] -> dx + its share through attn_norm."""
    B, T, D = dx.shape
    ops = batch.ops
    da = _norm_backward(dx, c, g, "post_attention_norm", ops) if cfg.post_norms else dx
    do = _linear_backward(da, c, g, "attn_output", batch.prec)
    dq, dk, dv = flash_attention_backward(do.reshape(B, T, cfg.n_heads, cfg.head_dim), c["attn"])
    cos, sin = batch.tables[cfg.layer_rope_base(layer)]
    dq = ops.rope_backward(dq, cos, sin, cfg.rope_style, out=dq)
    dk = ops.rope_backward(dk, cos, sin, cfg.rope_style, out=dk)
    if cfg.qk_norm:
        dq, dk = _norm_backward(dq, c, g, "attn_q_norm", ops), _norm_backward(dk, c, g, "attn_k_norm", ops)
    kept = _normed_again(c, "attn_norm", QKV, batch.prec)
    dh = 0
    for n, d in (("q", dq), ("k", dk), ("v", dv)):
        dh = dh + _linear_backward(d.reshape(B, T, -1), c, g, f"attn_{n}", batch.prec)
    c.update(kept)
    return _add_norm_backward(dh, c, g, "attn_norm", ops, dx)


def block_backward(cfg: ModelConfig, layer: int, dx, cache, g: dict, batch: _Batch):
    """dx [B, T, D] (grad of the block output) -> grad of the block input; adds into ``g``."""
    dx = _ffn_backward(cfg, dx, cache, g, batch)
    return _attn_backward(cfg, layer, dx, cache, g, batch)


class QueuedLoss:
    """The loss of a queued forward + backward: its masked row sums (floats, or 0-d device arrays
    not yet read) and the token weights they are normalised by."""

    def __init__(self, kd_sum, ce_sum, w, loss_cfg):
        self.kd_sum, self.ce_sum, self.w, self.loss_cfg = kd_sum, ce_sum, w, loss_cfg

    def read(self):
        """-> (loss, parts); waits for the device to have summed them."""
        return finish_parts(float(self.kd_sum), float(self.ce_sum), self.w, self.loss_cfg)


# -- the model ---------------------------------------------------------------------------------
class Student:
    def __init__(self, config: ModelConfig, dtype=np.float32, xp=None, checkpoint=False, chunk_tokens=None,
                 precision: str = "fp32", sparse_embedding_grad=None):
        """precision: "fp32" or "bf16" (see precision.py); dtype float64 means "fp64" (gradient checks).
        sparse_embedding_grad: an untied embedding's grad as the rows the step gathered (a RowGrad,
        grads["token_embd.weight"]) instead of a [V, D] array in the flat grad buffer; None: so for a
        bf16 student on a GPU (one rank: the data-parallel all-reduce sums the flat buffer)."""
        if config.n_heads % config.n_kv_heads:
            raise Q4KError(f"n_heads {config.n_heads} is not a multiple of n_kv_heads {config.n_kv_heads}")
        self.config = config
        self.xp = xp or backend.xp()
        self.checkpoint = checkpoint
        self.chunk_tokens = chunk_tokens
        self.prec = Precision("fp64" if np.dtype(dtype) == np.float64 else precision, self.xp)
        self.param_buffer = FlatBuffer(config.tensor_shapes(), self.xp, self.prec.master)
        embd = "token_embd.weight"
        rows_fit = not config.tied_output and self.param_buffer.offsets.get(embd) == 0
        if sparse_embedding_grad is None:
            sparse_embedding_grad = rows_fit and self.prec.mixed and self.xp is not np
        elif sparse_embedding_grad and not rows_fit:
            raise Q4KError("a sparse embedding grad needs an untied embedding (a tied one is the LM head too, "
                           "whose grad has every row)")
        self.embedding_rows = RowGrad(self.param_buffer.shapes[embd], self.xp, self.prec.master) \
            if sparse_embedding_grad else None
        self.grad_buffer = self.param_buffer.zeros_like(without=embd if sparse_embedding_grad else None)
        self.params = self.param_buffer.views      # name -> view of the flat params (the master copy)
        self.grads = dict(self.grad_buffer.views)  # name -> view of the flat grads (or the embedding's RowGrad)
        if self.embedding_rows is not None:
            self.grads[embd] = self.embedding_rows
        self.compute, self._low_flat = self._compute_views()    # what the forward multiplies with

    def _compute_views(self):
        """-> (name -> the view the forward uses, the low-precision flat copy or None). fp32/fp64:
        the master views themselves. bf16: the matrices the products multiply (the prefix
        flat[low_start:decay_stop], params.py) from one low-precision copy, the rest from the master:
        the vectors (norms, biases), and an untied embedding (a gather reads the master; only a tied
        one is also the LM head's product weight)."""
        self._low_start = 0
        if not self.prec.mixed:
            return self.params, None
        buf = self.param_buffer
        embd = "token_embd.weight"
        if not self.config.tied_output and buf.offsets.get(embd) == 0:
            self._low_start = int(np.prod(buf.shapes[embd]))
        low = self.xp.empty(buf.decay_stop - self._low_start, dtype=self.prec.low_dtype)
        views = dict(self.params)
        for name, shape in buf.shapes.items():
            start = buf.offsets[name] - self._low_start
            if len(shape) >= 2 and start >= 0:
                views[name] = low[start:start + int(np.prod(shape))].reshape(shape)
        return views, low

    def refresh_compute(self):
        """Copy the fp32 master matrices into the low-precision copy (bf16; a no-op otherwise).
        Run before every forward: the optimizer and checkpoint loads write the master only."""
        if self._low_flat is not None:
            self.prec.assign_low(self._low_flat, self.param_buffer.flat[self._low_start:self.param_buffer.decay_stop])

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, seed=0, **kw) -> "Student":
        """Random init: N(0, 0.02) matrices, N(0, 0.02/sqrt(2 L)) output projections, ones for
        norms, zeros for biases. Drawn on the host, so CPU and GPU students start equal."""
        student = cls(config, **kw)
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / math.sqrt(2 * max(config.n_layers, 1))
        for name, view in student.params.items():
            if name.endswith("norm.weight"):
                view[...] = 1
            elif name.endswith(".weight"):
                std = residual_std if name.endswith(("attn_output.weight", "ffn_down.weight")) else 0.02
                view[...] = student.xp.asarray(rng.standard_normal(view.shape, dtype=np.float32) * std)
        return student

    @classmethod
    def from_teacher(cls, teacher, layers, **kw) -> "Student":
        """Teacher's embedding, output, final norm and blocks ``layers`` (student block i = teacher
        block layers[i]), decoded to float via ``teacher.weight_f32(name)``."""
        tc = teacher.config
        layers = [int(i) for i in layers]
        if not layers or any(not 0 <= i < tc.n_layers for i in layers):
            raise Q4KError(f"student layers {layers}: need teacher block indices in 0..{tc.n_layers - 1}")
        config = tc.replace(n_layers=len(layers), swa_layers=[i for i, t in enumerate(layers) if t in tc.swa_layers])
        student = cls(config, **kw)
        for name, view in student.params.items():
            src = name
            if name.startswith("blk."):
                _, i, rest = name.split(".", 2)
                src = f"blk.{layers[int(i)]}.{rest}"
            view[...] = student._to_device(teacher.weight_f32(src))
        return student

    def _to_device(self, a):
        return backend.to_host(a) if self.xp is np else self.xp.asarray(a)

    @property
    def n_params(self) -> int:
        return self.param_buffer.size

    def block_params(self, layer: int, grads=False) -> dict:
        """Short name (no 'blk.N.') -> view, for block ``layer``: the weights the forward uses
        (``self.compute``), or the grads."""
        src = self.grads if grads else self.compute
        prefix = f"blk.{layer}."
        return {n[len(prefix):]: v for n, v in src.items() if n.startswith(prefix)}

    def _head_weight(self, grads=False):
        src = self.grads if grads else self.compute
        return src["token_embd.weight" if self.config.tied_output else "output.weight"]

    def _chunk(self, n_tokens: int) -> int:
        return chunk_size(self.config.vocab_size, n_tokens, self.chunk_tokens)

    # -- forward -------------------------------------------------------------------------------
    def _trunk(self, ids, attention_mask, keep):
        """ids [B, T] -> (final-normed hidden [B*T, D], saved per block, embedding and norm caches).

        keep: "none" (inference), "inputs" (checkpointing) or "caches"."""
        cfg, xp = self.config, self.xp
        self.refresh_compute()
        batch = _Batch(cfg, ids, attention_mask, xp, self.prec)
        x, emb_cache = embedding_forward(ids, self.params["token_embd.weight"])
        if cfg.embed_scale != 1.0:
            x = x * cfg.embed_scale
        saved = []
        for layer in range(cfg.n_layers):
            x_in = x
            x, cache = block_forward(cfg, layer, self.block_params(layer), x, batch)
            saved.append({"none": None, "inputs": x_in, "caches": cache}[keep])
        lo = self.prec.low_dtype if self.prec.mixed else None               # the head multiplies h in bf16
        h, norm_cache = batch.ops.rmsnorm_forward(x, self.params["output_norm.weight"], cfg.norm_eps, dtype=lo)
        return h.reshape(-1, cfg.d_model), (batch, saved, emb_cache, norm_cache)

    def _ids(self, input_ids, attention_mask):
        ids = self.xp.asarray(input_ids)
        if ids.ndim != 2:
            raise Q4KError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
            raise Q4KError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(ids.shape)}")
        return ids

    def iter_logits(self, input_ids, attention_mask=None, chunk_tokens=None):
        """Yields (start, stop, logits [stop - start, V]) over the row-major flattened B*T tokens."""
        ids = self._ids(input_ids, attention_mask)
        h, _ = self._trunk(ids, attention_mask, keep="none")
        step = chunk_tokens or self._chunk(h.shape[0])
        W, prec = self._head_weight(), self.prec
        h = prec.low(h)
        for start in range(0, h.shape[0], step):
            stop = min(start + step, h.shape[0])
            yield start, stop, prec.high(blas.product(h[start:stop], W, trans_b=True))

    def forward(self, input_ids, attention_mask=None):
        """input_ids [B, T] -> logits [B, T, V] (the whole tensor: use iter_logits for big V)."""
        B, T = self._ids(input_ids, attention_mask).shape
        parts = [logits for _, _, logits in self.iter_logits(input_ids, attention_mask)]
        return self.xp.concatenate(parts, axis=0).reshape(B, T, -1)

    # -- loss and backward ---------------------------------------------------------------------
    def loss_and_grads(self, input_ids, teacher_logits_or_fn, loss_cfg: LossConfig = None, attention_mask=None,
                       accumulate=False, loss_mask=None, token_counts=None):
        """-> (loss, grads, parts). ``teacher_logits_or_fn``: [B, T, V] array, a callable
        fn(start, stop) -> [stop - start, V] (or SparseTargets, a teacher cache's) over the
        flattened tokens, or None (CE only, alpha 1). ``loss_mask`` [B, T]: 1 where the id is a
        training target (instruction data; see losses.token_weights). ``token_counts`` (n_kd, n_ce):
        the counts the loss is normalised by, when these rows are one rank's share of a larger batch.
        grads: name -> view of the flat grad buffer (zeroed first unless ``accumulate``)."""
        queued = self.queue_loss_and_grads(input_ids, teacher_logits_or_fn, loss_cfg, attention_mask, accumulate,
                                           loss_mask, token_counts)
        loss, parts = queued.read()
        return loss, self.grads, parts

    def queue_loss_and_grads(self, input_ids, teacher_logits_or_fn, loss_cfg: LossConfig = None, attention_mask=None,
                             accumulate=False, loss_mask=None, token_counts=None) -> "QueuedLoss":
        """loss_and_grads without its one read of the device: the whole forward and backward is queued
        (the grads are written when the device gets there) and ``.read()`` of the result waits for the
        loss sums -> (loss, parts). What a CUDA graph captures (train/cuda_graph.py)."""
        cfg, xp = self.config, self.xp
        loss_cfg = loss_cfg or LossConfig()
        ids = self._ids(input_ids, attention_mask)
        if not accumulate:
            self.grad_buffer.flat.fill(0)
            if self.embedding_rows is not None:
                self.embedding_rows.reset()
        h, (batch, saved, emb_cache, norm_cache) = self._trunk(
            ids, attention_mask, keep="inputs" if self.checkpoint else "caches")
        mask = None if attention_mask is None else xp.asarray(attention_mask)
        w = token_weights(ids, mask, loss_cfg, None if loss_mask is None else xp.asarray(loss_mask), token_counts)
        head = self._fused_head_backward if batch.fused else self._head_backward
        dh, kd_sum, ce_sum = head(h, teacher_logits_or_fn, loss_cfg, w)
        dx, dw = batch.ops.rmsnorm_backward(dh.reshape(batch.B, batch.T, -1), norm_cache)
        self.grads["output_norm.weight"] += dw
        for layer in reversed(range(cfg.n_layers)):
            cache = saved[layer]
            if self.checkpoint:
                cache = block_forward(cfg, layer, self.block_params(layer), cache, batch)[1]
            dx = block_backward(cfg, layer, dx, cache, self.block_params(layer, grads=True), batch)
            saved[layer] = None
        if cfg.embed_scale != 1.0:
            dx = dx * cfg.embed_scale
        if self.embedding_rows is not None:
            self.embedding_rows.add(emb_cache[0], dx)              # kept as they are: no [V, D] grad
        else:
            embedding_backward(dx, emb_cache, out=self.grads["token_embd.weight"])
        # the loss sums are read only by .read(), with the whole backward queued: the host reads nothing
        # from the device between the teacher's trunk and here, so it issues ahead of the GPU
        return QueuedLoss(kd_sum, ce_sum, w, loss_cfg)

    def _teacher_chunk(self, teacher, start, stop):
        if teacher is None:
            return None
        if callable(teacher):
            t = teacher(start, stop)
        else:
            t = teacher.reshape(-1, teacher.shape[-1])[start:stop]
        if isinstance(t, SparseTargets):                                # a teacher cache's top-k
            return t.to(self.xp)
        if tuple(t.shape) != (stop - start, self.config.vocab_size):
            raise Q4KError(f"teacher logits for tokens {start}:{stop} have shape {tuple(t.shape)}, "
                           f"expected {(stop - start, self.config.vocab_size)} (same vocabulary as the student?)")
        t = self.xp.asarray(t)
        return t if t.dtype == np.float32 or t.dtype == np.float64 else t.astype(np.float32)   # the reference loss: float32

    def _head_backward(self, h, teacher, loss_cfg, w):
        """LM head + loss + their backward, chunk by chunk. h [N, D] -> (dh [N, D], kd sum, ce sum).
        The products run in the low precision, the loss and its gradient in float32."""
        W, gW, prec = self._head_weight(), self._head_weight(grads=True), self.prec
        dh = self.xp.empty_like(h)
        h = prec.low(h)
        kd_sum = ce_sum = 0.0
        step = self._chunk(h.shape[0])
        for start in range(0, h.shape[0], step):
            stop = min(start + step, h.shape[0])
            sl = slice(start, stop)
            s, cache = linear_forward(h[sl], W)                             # [n, V]
            kd, ce, ds = chunk_loss(prec.high(s), self._teacher_chunk(teacher, start, stop), w["targets"][sl],
                                    w["kd_weight"][sl], w["ce_weight"][sl], loss_cfg)
            dh_chunk, dW, _ = linear_backward(prec.low(ds), cache)
            dh[sl] = prec.high(dh_chunk)
            gW += prec.high(dW)
            kd_sum += masked_sum(kd, w["kd_mask"][sl])
            ce_sum += masked_sum(ce, w["ce_mask"][sl])
        return dh, kd_sum, ce_sum

    def _fused_head_backward(self, h, teacher, loss_cfg, w):
        """_head_backward on the fused kernels (ops/fused_linear_loss.py): per chunk s = h W^T in the
        low precision, the loss kernel writes ds over s, dh = ds W, and gW += ds^T h accumulates in
        float32 straight into the grad buffer. Teacher-cache chunks (SparseTargets) take the
        reference chunk loss inside the same loop. The teacher goes as it came: the kernel reads its
        16-bit spans (Teacher.logits_fn) as they are, and writes ds over a span's rows once it has read
        them (fused_linear_loss), so no float32 copy of a teacher chunk is made."""
        dh, _, kd_sum, ce_sum = fused_linear_loss(self.prec.low(h), self._head_weight(), teacher,
                                                  loss_cfg, w, self._chunk(h.shape[0]), gW=self._head_weight(grads=True),
                                                  host_sums=False)   # (read after the backward is queued)
        return self.prec.high(dh), kd_sum, ce_sum
