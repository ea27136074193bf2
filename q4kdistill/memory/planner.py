"""Memory planner: GPU bytes of a distillation run, predicted from the teacher's header alone.

    plan = make_plan("teacher.gguf" | "x.manifest.json", batch=8, seq=512, student="params=0.5e9")
    plan.teacher_resident_bytes      {"native": ..., "dequant-f32": ..., "dequant-bf16": ...}
    plan.teacher_forward_peak_bytes  resident + the forward's largest stage at B x T
    plan.distill_step_peak_bytes     teacher + student state + the step's largest stage
    plan.rows                        every number with what it counts (docs/memory.md has the table)

A *stage* is a point of the code where the most buffers are alive at once: the buffers are
listed below with their shapes, as teacher.py / teacher_forward.py / kernels / student.py /
losses.py / optim.py allocate them on CuPy (which, unlike NumPy, never elides a temporary and
copies a non-contiguous operand of a batched matmul). A working set is its largest stage.
Pool rounding (512-byte blocks) is below 0.1 % and left out.

Shapes: N = B*T tokens, D d_model, Q = heads*head_dim, KV = kv_heads*head_dim, F d_ff, V vocab,
U = one float32 [C, V] logits chunk. Attention is the flash path (ops/flash_attention.py on the
tensor cores): 16-bit copies of q, k, v and a float32 [B, heads, T] log-sum-exp, linear in T.
Student precision (student/precision.py): "fp32", or "bf16" with ``lo`` = 2 bytes for what the
matrix products keep (their inputs, the weight copy); lo = 4 in fp32.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..config import ModelConfig
from ..errors import Q4KError
from ..student.spec import count_params, parse_student_spec, student_config  # noqa: F401 (part of the planner's API)

if TYPE_CHECKING:
    from ..formats.model_file import ModelFile

F32 = 4
BACKENDS = ("native", "dequant-f32", "dequant-bf16")


# -- the teacher file --------------------------------------------------------------------------

def open_teacher(source) -> ModelFile:
    """Header only: a GGUF (a truncated one too), an APR file, a manifest JSON or dict; a
    ModelFile is taken as it is."""
    from ..formats.model_file import ModelFile

    return source if isinstance(source, ModelFile) else ModelFile.open(source, header_only=True)


# -- the teacher's weights: resident and while loading (teacher.upload, teacher.decode_weight) -----

def kept_bytes(t, backend: str) -> int:
    """Bytes Teacher.load keeps for tensor ``t``: vectors (norms, biases) always as float32;
    matrices as stored (native), or decoded to float32 / bfloat16 bits."""
    if len(t.shape) == 1:
        return F32 * t.n_elements
    return {"native": t.nbytes, "dequant-f32": F32 * t.n_elements, "dequant-bf16": 2 * t.n_elements}[backend]


def teacher_resident(tensors) -> dict:
    """{backend: bytes Teacher.load keeps} for each of BACKENDS (inspect reports these too)."""
    tensors = list(tensors)
    return {b: sum(kept_bytes(t, b) for t in tensors) for b in BACKENDS}


def row_padding(rows: int, row_bytes: int) -> int:
    """kernels.weights.device_views copies rows whose length is not a multiple of 4 bytes into a
    padded buffer for the call that reads them (odd numbers of Q6_K / Q8_0 / Q5_0 blocks): here,
    kernels.dequantize_to at load; a matmul variant declares its own copy in its workspace."""
    from kernels.weights import padded_rows_bytes

    return padded_rows_bytes(rows, row_bytes)


def load_bytes(t, backend: str) -> int:
    """Bytes alive for tensor ``t`` at the fullest moment of its Teacher.load step, its kept
    result included:
      native, vectors   what is kept (uploaded as stored; vectors converted on the host)
      quantized matrix  the uploaded blocks (and their padded copy) + kernels.dequantize_to's
                        result, decoded straight to float32 / bfloat16 bits
      float matrix      the uploaded tensor + dense_f32's float32 copy (none for F32; BF16's
                        upcast holds 8 bytes/element at its fullest) + astype's float32 result,
                        or f32_to_bf16's three uint32 temporaries alive at once (12 bytes/element)"""
    if backend == "native" or len(t.shape) == 1:
        return kept_bytes(t, backend)
    n = t.n_elements
    if t.quantized:
        return t.nbytes + row_padding(t.shape[0], t.nbytes // t.shape[0]) + kept_bytes(t, backend)
    return t.nbytes + (0 if t.type_name == "F32" else F32 * n) + (F32 * n if backend == "dequant-f32" else 3 * F32 * n)


def teacher_load_peak(tensors, backend: str) -> int:
    """Peak while Teacher.load uploads and decodes tensor after tensor in file order."""
    peak = kept = 0
    for t in tensors:
        peak = max(peak, kept + load_bytes(t, backend))
        kept += kept_bytes(t, backend)
    return max(peak, kept)


# -- one product (teacher_forward.linear / lm_head -> kernels.matmul) -----------------------------

def _variant(type_name: str, M: int, N: int, K: int):
    """The kernels.matmul variant a GPU would run (this card's tuning table, else the default)."""
    import kernels

    return kernels.get(kernels.choose(type_name, M, N, K, on_gpu=True))


class Matrix:
    """A weight as the teacher holds it: rows x K, in ``kind`` (a quant type name, F32, F16, BF16)."""

    def __init__(self, t, backend: str, rows: int | None = None):
        self.rows, self.K = (rows or t.shape[0]), t.shape[1]
        self.kind = t.type_name if backend == "native" else {"dequant-f32": "F32", "dequant-bf16": "BF16"}[backend]
        self.quantized = backend == "native" and t.quantized
        self.row_bytes = t.nbytes // t.shape[0]

    @property
    def n(self) -> int:
        return self.rows * self.K

    def scratch(self, M: int) -> tuple:
        """(dtype, bytes) of the decode scratch a product at M rows needs, or (None, 0): what the
        variant declares (kernels.Variant.workspace)."""
        if not self.quantized:
            return None, 0
        return _variant(self.kind, M, self.rows, self.K).decode_scratch(self.kind, M, self.rows, self.K)

    def transient(self, M: int, x_dtype: str = "float32") -> int:
        """Bytes a product at M rows allocates and frees again (x in fp16, q8 copies of x, padded
        rows, ...): all the variant's declared workspace but the decode scratch."""
        if not self.quantized:
            return 0
        v = _variant(self.kind, M, self.rows, self.K)
        if x_dtype in v.accepts:
            return v.transient_bytes(self.kind, M, self.rows, self.K, x_dtype)
        # kernels.matmul widens x to float32 for a variant that does not take its dtype
        return F32 * M * self.K + v.transient_bytes(self.kind, M, self.rows, self.K, "float32")

    def linear(self, M: int, out_bytes: int, replaced_scratch: int = 0, x_dtype: str = "float32") -> int:
        """Bytes of one teacher_forward.linear at its fullest, its output included (not x, not the
        decode scratch), at M activation rows:
          quantized  the output + the larger of: the scratch buffer being replaced when this
                     product grows it (kernels.scratch.scratch keeps the old one bound while it
                     allocates the new one) and the variant's transient workspace (all alive at
                     once: x in fp16 [M, K] for the decode-to-fp16-scratch variants, the padded
                     copy kernels.weights.device_views makes of rows not a multiple of 4 bytes,
                     q8 copies of x for the int8 GEMVs; kernels.Variant.workspace)
          F32        the output (+ x widened to float32 when it comes in float16)
          F16        the output + x in fp16 (cuBLAS GemmEx)
          BF16       bf16_to_f32: astype(uint32) and << 16 alive at once (8 bytes/element), then
                     the float32 matrix (4) and the output (+ x widened to float32)"""
        widened = F32 * M * self.K if x_dtype != "float32" and self.kind in ("F32", "BF16") else 0
        if self.kind == "BF16":
            return widened + max(2 * F32 * self.n, F32 * self.n + out_bytes)
        if not self.quantized:
            return widened + out_bytes + (2 * M * self.K if self.kind == "F16" else 0)
        return out_bytes + max(replaced_scratch, self.transient(M, x_dtype))


def decode_scratch(uses) -> int:
    """kernels.scratch keeps one buffer per dtype, grown to the largest matrix a decode-to-scratch
    variant decoded and held until kernels.release_scratch(). uses: [(Matrix, M)]."""
    sizes = {}
    for m, M in uses:
        dtype, nbytes = m.scratch(M)
        if dtype:
            sizes[dtype] = max(sizes.get(dtype, 0), nbytes)
    return sum(sizes.values())


# -- the teacher's forward (teacher_forward.hidden_states, lm_head; Teacher.iter_logits / logits_fn) --

# Temporaries of ops.glu's activation, in [N, F] float32 units, counted from glu.py's expressions:
#   forward   besides gate and up       silu: 0.5*x and tanh(..), then s and x*s: 2
#                                       gelu_tanh: t, 0.5*x, 1+t and their product: 4
#   backward  besides the cache and dm  silu: s, a, then (1-s), x*(1-s), 1+.., s*(..) two at a time: 4
#                                       gelu_tanh: t, y, 0.5*(1+t) and the long product's two operands + result: 6
ACT_TEMPS = {"silu": (2, 4), "gelu_tanh": (4, 6)}


def _sizes(cfg: ModelConfig, B: int, T: int) -> dict:
    N = B * T
    # attention (ops/flash_attention.py, the tensor-core path): 16-bit copies of q, k, v (QKV16) and
    # the row log-sum-exp (L); nothing of size T x T
    return dict(N=N, ND=N * cfg.d_model * F32, NQ=N * cfg.q_dim * F32, NKV=N * cfg.kv_dim * F32,
                NF=N * cfg.d_ff * F32, QKV16=N * (cfg.q_dim + 2 * cfg.kv_dim) * 2, L=B * cfg.n_heads * T * F32,
                rope=8 * T * cfg.head_dim * len({cfg.layer_rope_base(i) for i in range(cfg.n_layers)}))


def _head(info: ModelFile):
    return info.tensors["token_embd.weight" if info.config.tied_output else "output.weight"]


def head_matrix(info: ModelFile, backend: str) -> Matrix:
    """The weight one lm_head product multiplies: a HEAD_ROWS-row slab of a quantized head, else all of it."""
    from ..teacher.forward import HEAD_ROWS

    t = _head(info)
    whole = Matrix(t, backend)
    return Matrix(t, backend, rows=HEAD_ROWS) if whole.quantized and whole.rows > HEAD_ROWS else whole


def lm_head_bytes(info: ModelFile, backend: str, n: int, replaced_scratch: int = 0, itemsize: int = F32) -> dict:
    """teacher_forward.lm_head for n tokens at its fullest, besides h and the decode scratch: a
    quantized head above HEAD_ROWS rows fills an [n, V] output (float32, or ``itemsize`` bytes a logit)
    slab by slab (one slab's float32 product and its x_fp16 at a time); any other head is one linear()
    (and its cast to a 16-bit output). replaced_scratch: the trunk's scratch buffer, when the head's
    product grows it (the first forward)."""
    V, w = _head(info).shape[0], head_matrix(info, backend)
    if w.rows == V:
        cast = n * V * itemsize if itemsize != F32 else 0
        return dict(logits=w.linear(n, n * V * F32, replaced_scratch), cast_logits=cast)
    return dict(logits=n * V * itemsize, slab_product=w.linear(n, n * w.rows * F32, replaced_scratch))


def teacher_scratch(info: ModelFile, backend: str, N: int, C: int, workspace: int = 0) -> tuple:
    """(after the blocks, after the head too): the decode scratch a forward at N tokens with
    head chunks of C tokens leaves behind (native only), + ``workspace``: kernels.blas's cuBLAS
    workspace (a GPU's; allocated at the first product and kept, like the scratch)."""
    if backend != "native":
        return workspace, workspace
    trunk = [(Matrix(t, backend), N) for n, t in info.tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    return (decode_scratch(trunk) + workspace,
            decode_scratch(trunk + [(head_matrix(info, backend), min(C, N))]) + workspace)


def _chunks(N: int, C: int) -> list:
    """(tokens of a chunk, tokens of the chunk before it) for the first chunk and, when there are
    more, for the fullest later one (a middle chunk, or the last)."""
    first = [(min(C, N), 0)]
    if N <= C:
        return first
    return first + [(C if N > 2 * C else N - C, C)]


def teacher_trunk_stages(info: ModelFile, B: int, T: int, backend: str, scratch: int) -> dict:
    """hidden_states (teacher/forward.py, the GPU path) at its fullest moments in a block; each holds
    the float32 residual stream x, the normalised input h in float16 (what the products take), the
    decode scratch and the rope tables:
      attention    the flash attention kernel: roped q, k, v (float32), their 16-bit copies, o (written
                   in float16, what the product reads) and the row log-sum-exp
      attn_output  its product: q, k, v, o, and the 16-bit copies and log-sum-exp that the dropped
                   attention cache (bound to `_`) still holds
      ffn          the fused GLU: gate, up (float32) and its float16 output (no temporaries)
      ffn_down     its product: the GLU output (gate and up are deleted first)"""
    cfg, s = info.config, _sizes(info.config, B, T)
    N = s["N"]
    w = {n: Matrix(info.tensors[f"blk.0.{n}.weight"], backend) for n in ("attn_output", "ffn_down")}
    common = dict(decode_scratch=scratch, rope_tables=s["rope"], x_and_normed16=s["ND"] + s["ND"] // 2)
    return {
        "attention": dict(common, q_and_o16=s["NQ"] + s["NQ"] // 2, k_and_v=2 * s["NKV"], qkv_16bit=s["QKV16"],
                          lse=s["L"]),
        "attn_output": dict(common, q_and_o16=s["NQ"] + s["NQ"] // 2, k_and_v=2 * s["NKV"],
                            qkv_16bit=s["QKV16"], lse=s["L"],
                            product=w["attn_output"].linear(N, s["ND"], x_dtype="float16")),
        "ffn": dict(common, gate_and_up=2 * s["NF"], glu16=s["NF"] // 2),
        "ffn_down": dict(common, glu16=s["NF"] // 2, product=w["ffn_down"].linear(N, s["ND"], x_dtype="float16")),
    }


def teacher_head_stages(info: ModelFile, B: int, T: int, backend: str, C: int, scratch: tuple) -> dict:
    """Teacher.iter_logits: the decode scratch, the final hidden [N, D], the chunk the caller's
    loop variable still holds (from the second chunk on) and lm_head for the current chunk.
    scratch: (after the blocks, after the head) of a first forward; the first chunk's product
    grows the buffer when the head's matrix is the largest."""
    ND, V = B * T * info.config.d_model * F32, _head(info).shape[0]
    trunk, full = scratch
    return {f"head ({n} tokens{f' after {p}' if p else ''})":
            dict(decode_scratch=full, final_hidden=ND, previous_chunk=p * V * F32,
                 **lm_head_bytes(info, backend, n, trunk if full > trunk and not p else 0))
            for n, p in _chunks(B * T, C)}


def teacher_stages(info: ModelFile, B: int, T: int, head_chunk: int, backend: str, workspace: int = 0) -> dict:
    """Every stage of a first teacher forward (Teacher.iter_logits at B x T, head chunks of ``head_chunk``)."""
    scratch = teacher_scratch(info, backend, B * T, head_chunk, workspace)
    return {**teacher_trunk_stages(info, B, T, backend, scratch[0]),
            **teacher_head_stages(info, B, T, backend, head_chunk, scratch)}


# -- the student (student.py, losses.py, optim.py) -------------------------------------------------

def block_cache_bytes(cfg: ModelConfig, B: int, T: int, lo: int = F32) -> dict:
    """What block_forward's cache keeps for the backward (the block's input x included): x and the
    residual stream after attention (mid), the attention output and the GLU's gate and up at ``lo``
    bytes an element (the attention output once: in bf16 the flash cache reads its product's bf16
    copy, model._share_attention_output), not the two norms' outputs (model._drop_normed) nor the GLU
    output (the fused GLU reads and writes the products' precision): the backward makes those again."""
    s, r = _sizes(cfg, B, T), lo / F32
    return dict(input_and_mid=2 * s["ND"],
                attn_out=int(r * s["NQ"]), qkv_16bit=s["QKV16"], lse=s["L"],
                gate_up=int(2 * r * s["NF"]),
                prenorm_q_k=s["NQ"] + s["NKV"] if cfg.qk_norm else 0,             # the q/k norms' inputs
                prenorm_attn_out_ffn_out=2 * s["ND"] if cfg.post_norms else 0)   # the post norms' inputs


def block_forward_stages(cfg: ModelConfig, B: int, T: int, lo: int = F32) -> dict:
    """block_forward on the fused ops (GPU) at its fullest moments, the block's input x included:
      attention  the flash attention kernel: x, q, k (roped in place), v, their 16-bit copies, o (the
                 kernel writes it at lo) and the row log-sum-exp (+ the q/k norms' inputs; the normed h,
                 written at lo, is gone once q, k and v are made)
      ffn        the fused GLU: the attention half's cache, q, k, v and the attention block's output a
                 (locals still bound; the float32 O is dropped once its product is made), mid, h2,
                 gate, up and the GLU output (all at lo; no temporaries)
      ffn_down   ffn_down's product made: the whole cache, the GLU output (dropped right after: the
                 backward makes it again), q, k, v, a and f
      end        x + f: the whole cache, q, k, v, a, f and the new x"""
    s, cache, r = _sizes(cfg, B, T), block_cache_bytes(cfg, B, T, lo), lo / F32
    ND, NQ, NKV, NF, QKV16, L = (s[k] for k in ("ND", "NQ", "NKV", "NF", "QKV16", "L"))
    attn_cache = ND + cache["attn_out"] + QKV16 + L + cache["prenorm_q_k"] + cache["prenorm_attn_out_ffn_out"] // 2
    return {
        "attention": dict(input=ND, q_k_and_v=NQ + 2 * NKV, qkv_16bit=QKV16,
                          o_and_lse=int(r * NQ) + L, prenorm_q_k=cache["prenorm_q_k"]),
        "ffn": dict(attention_cache=attn_cache, q_k_v_and_attn_out=NQ + 2 * NKV + ND,
                    mid_and_normed2=int((1 + r) * ND), gate_up_and_glu=int(3 * r * NF)),
        "ffn_down": dict(cache=sum(cache.values()), glu_out=int(r * NF), q_k_v_attn_out_and_ffn_out=NQ + 2 * NKV + 2 * ND),
        "end": dict(cache=sum(cache.values()), q_k_v_attn_out_ffn_out_and_new_x=NQ + 2 * NKV + 3 * ND),
    }


def block_backward_stages(cfg: ModelConfig, B: int, T: int, lo: int = F32) -> dict:
    """block_backward on the fused ops at its fullest moments, besides the block's cache and the incoming grad dx:
      ffn_down   ffn_down's backward: (the post-FFN norm's grad,) the GLU output made again, d(GLU output)
                 and the weight grad (as ffn_up's)
      ffn        the fused GLU backward: (the post-FFN norm's grad,) d(GLU output), d gate and d up (at lo)
      ffn_up     ffn_up's linear_backward: d gate, d up, h2 made again (at lo), the gate's dx and the
                 up's dx [N, D] and its weight grad [F, D] (float32; in bf16 made in bf16, then its
                 float32 copy)
      ffn_sum    the two dx added: d gate, d up, h2, both dx and their sum
      attention  the flash attention backward kernel: dx after the FFN half (+ the post-attention
                 norm's grad), do, its 16-bit copy, rowsum(do * o) per head, dq, dk and dv
                 (rope's backward rotates dq, dk in place afterwards)"""
    s, r = _sizes(cfg, B, T), lo / F32
    post = s["ND"] if cfg.post_norms else 0
    return {
        "ffn_down": dict(post_norm_grad=post, glu_out_and_its_grad=int(2 * r * s["NF"]),
                         weight_grad=cfg.d_ff * cfg.d_model * (F32 + (lo if lo != F32 else 0))),
        "ffn": dict(post_norm_grad=post, glu_out_grad_dgate_dup=int(3 * r * s["NF"])),
        "ffn_up": dict(post_norm_grad=post, dgate_dup=int(2 * r * s["NF"]), normed2=int(r * s["ND"]),
                       dx_gate_and_up=2 * s["ND"], weight_grad=cfg.d_ff * cfg.d_model * (F32 + (lo if lo != F32 else 0))),
        "ffn_sum": dict(post_norm_grad=post, dgate_dup=int(2 * r * s["NF"]), normed2=int(r * s["ND"]),
                        dx_gate_up_and_sum=3 * s["ND"]),
        "attention": dict(mid_grad=s["ND"], post_norm_grad=post, do_and_dq=2 * s["NQ"], do_16bit=s["NQ"] // 2,
                          drow=s["L"], dk_dv=2 * s["NKV"]),
    }


def loss_stages(cfg: ModelConfig, N: int, C: int, teacher_head, lo: int = F32, span=None) -> dict:
    """Student._fused_head_backward (ops/fused_linear_loss.py), chunk by chunk (teacher_head(n, itemsize):
    the teacher's lm_head buffers for n tokens). Per chunk of n tokens, S = the student's logits s [n, V]
    at lo (the loss kernel writes ds over s, so s/ds is one buffer); the teacher's logits are asked
    for before s is made, and each chunk's buffers are dropped before the next chunk's:
      teacher    the teacher's lm_head for the chunk (span: for a span of R = max(n, tokens) rows)
      loss       s/ds and the teacher's logits (float32 [n, V]; span: the span's R rows at its itemsize)
      backward   s/ds and ds @ W [n, D] (gW += ds^T h accumulates in place: cuBLAS, no [V, D] temporary),
                 and the span's buffer while chunks are left (one buffer serves every span: SpanLogits)
    span: (tokens, bytes per logit) of Teacher.logits_fn's spans (teacher.model.head_span), or None."""
    V, D = cfg.vocab_size, cfg.d_model
    stages = {}
    for n, p in _chunks(N, C):
        S, later = n * V * lo, (f" after {p}" if p else "")
        R, isz = (n, F32) if span is None else (min(max(n, span[0]), N), span[1])
        more = N > n if not p else N > 2 * C          # chunks after this one (a first chunk; a middle one)
        kept = R * V * isz if span is not None and more else 0
        stages[f"teacher head ({n} tokens{later})"] = {f"teacher_{k}": v for k, v in teacher_head(R, isz).items()}
        stages[f"loss ({n} tokens{later})"] = dict(logits_ds=S, teacher_logits=R * V * isz)
        stages[f"head backward ({n} tokens{later})"] = dict(logits_ds=S, dh_chunk=n * D * lo, teacher_span=kept)
    return stages


# -- the student on the reference ops (NumPy: the CPU, where the fused kernels do not run) --------
# make_plan(..., fused_ops=False) models these: CuPy temporaries of every elementwise op.

def _reference_block_cache_bytes(cfg: ModelConfig, B: int, T: int, lo: int = F32) -> dict:
    """What block_forward's cache keeps for the backward (the block's input x included); the
    products' inputs (normed, normed2, attention output, GLU output) at ``lo`` bytes an element
    (the attention output once: in bf16 the flash cache reads its product's bf16 copy)."""
    s, r = _sizes(cfg, B, T), lo / F32
    return dict(input_normed_mid_normed2=int((2 + 2 * r) * s["ND"]),
                attn_out=int(r * s["NQ"]), qkv_16bit=s["QKV16"], lse=s["L"],
                gate_up_glu=int((2 + r) * s["NF"]),
                prenorm_q_k=s["NQ"] + s["NKV"] if cfg.qk_norm else 0,             # the q/k norms' inputs
                prenorm_attn_out_ffn_out=2 * s["ND"] if cfg.post_norms else 0)   # the post norms' inputs


def _reference_block_forward_stages(cfg: ModelConfig, B: int, T: int) -> dict:
    """The reference ops' (NumPy, the CPU) block_forward at its fullest moments, the block's input x included:
      attention  the flash attention kernel: x, h, roped q, k, v, their 16-bit copies, o and the
                 row log-sum-exp (+ the q/k norms' inputs)
      ffn        the GLU's activation: the attention half's cache, the roped q, k, v and attention
                 output (locals still bound), x2, h2, gate, up and the activation's temporaries
      end        x + f: the whole cache, the roped q, k, v, a, f and the new x"""
    s, cache = _sizes(cfg, B, T), _reference_block_cache_bytes(cfg, B, T)
    ND, NQ, NKV, NF, QKV16, L = (s[k] for k in ("ND", "NQ", "NKV", "NF", "QKV16", "L"))
    attn_cache = 2 * ND + NQ + QKV16 + L + cache["prenorm_q_k"] + cache["prenorm_attn_out_ffn_out"] // 2
    return {
        "attention": dict(input_and_normed=2 * ND, roped_q_k_and_v=NQ + 2 * NKV, qkv_16bit=QKV16, o_and_lse=NQ + L,
                          prenorm_q_k=cache["prenorm_q_k"]),
        "ffn": dict(attention_cache=attn_cache, roped_q_k_v_and_attn_out=NQ + 2 * NKV + ND, mid_and_normed2=2 * ND,
                    gate_and_up=2 * NF, act_temps=ACT_TEMPS[cfg.act][0] * NF),
        "end": dict(cache=sum(cache.values()), roped_q_k_v_attn_out_ffn_out_and_new_x=NQ + 2 * NKV + 3 * ND),
    }


def _reference_block_backward_stages(cfg: ModelConfig, B: int, T: int) -> dict:
    """block_backward at its fullest moments, besides the block's cache and the incoming grad dx:
      ffn        glu_backward: (the post-FFN norm's grad,) d(GLU output) and the activation-grad temporaries
      attention  the flash attention backward kernel: dx after the FFN half (+ the post-attention
                 norm's grad), do, its 16-bit copy, rowsum(do * o) per head, dq, dk and dv"""
    s = _sizes(cfg, B, T)
    post = s["ND"] if cfg.post_norms else 0
    return {
        "ffn": dict(post_norm_grad=post, glu_out_grad=s["NF"], act_grad_temps=ACT_TEMPS[cfg.act][1] * s["NF"]),
        "attention": dict(mid_grad=s["ND"], post_norm_grad=post, do_and_dq=2 * s["NQ"], do_16bit=s["NQ"] // 2,
                          drow=s["L"], dk_dv=2 * s["NKV"]),
    }


def _reference_loss_stages(cfg: ModelConfig, N: int, C: int, teacher_head, lo: int = F32) -> dict:
    """The reference ops' Student._head_backward (the CPU), chunk by chunk (U(n) = n x V float32; teacher_head(n): the
    teacher's lm_head buffers for n tokens):
      loss       losses.chunk_loss (kind kl, alpha 0): s, t, ds, both log-softmaxes, q, p and
                 _plogp_diff's mask (bool), difference and where-result: 9.25 U
      teacher    s and the teacher's lm_head for the chunk
      new s      linear_forward makes s while the previous chunk's s is still bound
      backward   linear_backward: s, ds, dx [n, D] and the head's dW [V, D]
    From the second chunk on, the previous chunk's ds (until chunk_loss returns) and dW (until
    linear_backward returns) are still bound.
    bf16 (lo = 2): the product's bf16 logits beside their float32 copy, a bf16 ds for the
    backward products, and dW made in bf16 then upcast (its bf16 and float32 copies at once)."""
    V, D = cfg.vocab_size, cfg.d_model
    mixed = lo != F32
    W = V * D * (F32 + lo if mixed else F32)
    stages = {}
    for n, p in _chunks(N, C):
        U, later = n * V * F32, (f" after {p}" if p else "")
        low_logits = n * V * lo if mixed else 0
        held = dict(previous_ds=p * V * F32, previous_dW=W if p else 0)
        stages[f"loss ({n} tokens{later})"] = dict(held, logits_and_teacher=2 * U, ds=U, log_softmaxes=2 * U,
                                                   q_and_p=2 * U, mask_difference_where=int(2.25 * U),
                                                   low_logits=low_logits)
        stages[f"teacher head ({n} tokens{later})"] = dict(held, logits=U, **{f"teacher_{k}": v for k, v in teacher_head(n).items()})
        if p:
            stages[f"new logits ({n} tokens{later})"] = dict(held, previous_logits=p * V * F32, logits=U)
        stages[f"head backward ({n} tokens{later})"] = dict(previous_dW=held["previous_dW"], logits_and_ds=2 * U,
                                                            low_logits_and_ds=2 * low_logits,
                                                            dx=n * D * (F32 + lo if mixed else F32), dW=W)
    return stages


def _largest(stages: dict) -> tuple:
    """(name, buffers) of the stage holding the most bytes."""
    name = max(stages, key=lambda k: sum(stages[k].values()))
    return name, stages[name]


def _stage_text(name, bufs) -> str:
    return f"stage '{name}': " + ", ".join(k for k, v in bufs.items() if v)


# -- the plan ---------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    predicted_bytes: int
    counts: str                 # what the row counts
    measured: bool = False      # reproduce-memory measures this row

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    teacher: dict
    student: dict
    batch: int
    seq: int
    chunk_tokens: int           # student LM head + loss (and the teacher's chunks inside a step)
    teacher_chunk_tokens: int   # Teacher.iter_logits in a plain teacher forward
    checkpoint: bool
    teacher_backend: str
    rows: list = field(default_factory=list)
    gpus: int = 1               # data-parallel ranks: the rows are one GPU's, ``batch`` its share
    blas_workspace: int = 0     # kernels.blas's cuBLAS workspace (a GPU's), kept from the first product on
    head_span: tuple = None     # (tokens, bytes per logit) of the teacher's logits_fn spans in a step (a GPU's)

    def add(self, name, predicted_bytes, counts, measured=False) -> int:
        self.rows.append(Row(name, int(predicted_bytes), counts, measured))
        return int(predicted_bytes)

    def row(self, name) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def teacher_resident_bytes(self) -> dict:
        return {b: self.row(f"teacher resident ({b})").predicted_bytes for b in BACKENDS}

    @property
    def teacher_forward_peak_bytes(self) -> int:
        return self.row(f"teacher forward peak ({self.teacher_backend})").predicted_bytes

    @property
    def distill_step_peak_bytes(self) -> int:
        return self.row("distill step peak").predicted_bytes

    def to_json(self) -> dict:
        return {"teacher": self.teacher, "student": self.student, "batch": self.batch, "seq": self.seq,
                "chunk_tokens": self.chunk_tokens, "teacher_chunk_tokens": self.teacher_chunk_tokens,
                "checkpoint": self.checkpoint, "teacher_backend": self.teacher_backend,
                "gpus": self.gpus, "global_batch": self.batch * self.gpus, "blas_workspace": self.blas_workspace,
                "head_span": self.head_span,
                "teacher_resident_bytes": self.teacher_resident_bytes,
                "teacher_forward_peak_bytes": self.teacher_forward_peak_bytes,
                "distill_step_peak_bytes": self.distill_step_peak_bytes,
                "rows": [r.to_dict() for r in self.rows]}

    def table(self) -> str:
        width = max(len(r.name) for r in self.rows)
        lines = [f"{'row':<{width}}  {'predicted':>12}  counts"]
        lines += [f"{r.name:<{width}}  {r.predicted_bytes / 1e9:>9.3f} GB  {r.counts}" for r in self.rows]
        return "\n".join(lines)


def make_plan(teacher, batch: int, seq: int, student=None, *,
              chunk_tokens: int | None = None, teacher_chunk_tokens: int | None = None,
              checkpoint: bool = True, teacher_backend: str = "native", precision: str = "fp32",
              gpus: int = 1, fused_ops: bool | None = None, sparse_embedding_grad: bool | None = None,
              gpu: bool | None = None, head_span_tokens: int | None = None) -> Plan:
    """The plan for a teacher (path, manifest dict or ModelFile) and a student: a spec string or
    dict (see parse_student_spec), or a list of teacher block numbers such as distill's
    student_layers ([5]: one block, teacher block 5). Default: four blocks of the teacher's widths
    ('n_layers=4', as distill's default student). chunk_tokens None: the student's own choice.
    precision: the student's, "fp32" or "bf16" (student/precision.py). fused_ops: whether the
    student runs the fused kernels (student.model.uses_fused_ops: a GPU) or the reference ops;
    None: as the student would here. sparse_embedding_grad: whether an untied embedding's grad is
    the gathered rows (Student's option); None: as the student picks it here. gpu: whether the plan is
    a GPU's (its products go through kernels.blas, whose cuBLAS workspace stays allocated); None: here.
    head_span_tokens: the teacher's logits span in a step (Teacher.span_tokens; None: the default).
    gpus > 1 (data parallelism): ``batch`` is the global batch and the plan is one GPU's: the whole
    teacher, a student replica with its grads and AdamW moments, and batch / gpus sequences'
    activations (NCCL sums the grads in place; its own channel buffers are not counted)."""
    from ..student.model import chunk_size
    from ..teacher.model import DEFAULT_CHUNK_TOKENS

    if min(batch, seq, chunk_tokens or 1, teacher_chunk_tokens or 1) < 1:
        raise Q4KError(f"batch, seq and chunk tokens must be >= 1 (got {batch}, {seq}, {chunk_tokens})")
    if gpus < 1 or batch % gpus:
        raise Q4KError(f"--batch {batch} does not split evenly over {gpus} GPUs: give a multiple of {gpus}")
    batch //= gpus
    if teacher_backend not in BACKENDS:
        raise Q4KError(f"teacher backend {teacher_backend!r}: expected one of {', '.join(BACKENDS)}")
    if precision not in ("fp32", "bf16"):
        raise Q4KError(f"student precision {precision!r}: expected fp32 or bf16")
    info = open_teacher(teacher)
    spec = parse_student_spec("n_layers=4" if student is None else student)
    scfg = student_config(info.config, spec)
    n_params = count_params(scfg)
    plan = Plan(teacher={"source": info.path, "architecture": info.config.architecture,
                         "tensor_count": len(info.tensors), "total_tensor_bytes": info.total_tensor_bytes,
                         "n_elements": info.n_elements},
                student={"config": scfg.to_dict(), "n_params": n_params, "spec": spec, "precision": precision,
                         "fused_ops": _student_fused(fused_ops),
                         "sparse_embedding_grad": _student_rows(scfg, precision, gpus, sparse_embedding_grad)},
                batch=batch, seq=seq, chunk_tokens=chunk_size(scfg.vocab_size, batch * seq, chunk_tokens),
                teacher_chunk_tokens=teacher_chunk_tokens or DEFAULT_CHUNK_TOKENS, checkpoint=checkpoint,
                teacher_backend=teacher_backend, gpus=gpus, **_gpu_terms(gpu, head_span_tokens))
    _add_teacher_rows(plan, info)
    _add_step_rows(plan, info, scfg, n_params)
    return plan


def _student_rows(cfg: ModelConfig, precision: str, gpus: int, given) -> bool:
    """Whether the student keeps its embedding's grad as gathered rows (Student's sparse_embedding_grad):
    as given, else as it picks it here: an untied embedding, bf16, on a GPU, one rank."""
    if given is not None:
        return bool(given) and not cfg.tied_output
    from .. import backend

    return not cfg.tied_output and precision == "bf16" and gpus == 1 and backend.on_gpu()


def _gpu_terms(gpu, span_tokens=None) -> dict:
    """What a GPU plan (gpu, or None: here) adds: kernels.blas's cuBLAS workspace (kept from the first
    product on; the CPU's products use none) and teacher.model.head_span's (tokens, bytes per logit)."""
    import numpy as np

    from .. import backend
    from ..teacher import model as teacher_model

    gpu = backend.on_gpu() if gpu is None else bool(gpu)
    workspace, span = 0, teacher_model.head_span(gpu, span_tokens)
    if gpu:
        from kernels.blas import WORKSPACE as workspace
    return dict(blas_workspace=workspace, head_span=None if span is None else (int(span[0]), np.dtype(span[1]).itemsize))


def _student_fused(fused_ops) -> bool:
    """The student's op set as student.model.uses_fused_ops picks it here (None), or as given."""
    if fused_ops is not None:
        return bool(fused_ops)
    from .. import backend
    from ..student.ops import fused

    return backend.on_gpu() or fused.ON_HOST


def _add_teacher_rows(plan: Plan, info: ModelFile) -> None:
    B, T, C = plan.batch, plan.seq, plan.teacher_chunk_tokens
    resident = teacher_resident(info.tensors.values())
    counts = {"native": "every matrix as stored (quantized blocks) + vectors as float32",
              "dequant-f32": "4 bytes x every element", "dequant-bf16": "2 bytes x matrix elements + 4 x vector elements"}
    for b in BACKENDS:
        plan.add(f"teacher resident ({b})", resident[b], counts[b], measured=True)
    for b in BACKENDS:
        plan.add(f"teacher load peak ({b})", teacher_load_peak(info.tensors.values(), b),
                 "resident so far + the tensor being loaded" + ("" if b == "native" else
                 ": its uploaded blocks and its decoded result (kernels.dequantize_to)"), measured=True)
    slab = head_matrix(info, "native").rows
    ws = plan.blas_workspace
    plan.add("teacher decode scratch (native)", teacher_scratch(info, "native", B * T, C, ws)[1],
             "kernels' reusable decode buffers, kept after the forward: the largest matrix a decode-to-scratch "
             f"product decoded (the LM head {f'in slabs of {slab} rows' if slab < _head(info).shape[0] else 'whole'})"
             + (f" + the cuBLAS workspace of kernels.blas ({ws >> 20} MiB)" if ws else ""),
             measured=True)
    for b in BACKENDS:
        name, bufs = _largest(teacher_stages(info, B, T, C, b, ws))
        work = plan.add(f"teacher forward working set ({b})", sum(bufs.values()), _stage_text(name, bufs))
        plan.add(f"teacher forward peak ({b})", resident[b] + work,
                 f"resident + working set: iter_logits at {B}x{T}, chunks of {C} tokens", measured=True)


def bf16_copy_elements(cfg: ModelConfig) -> int:
    """Elements of a bf16 student's low-precision weight copy (Student._compute_views): every matrix
    but an untied token embedding."""
    return sum(math.prod(shape) for name, shape in cfg.tensor_shapes().items()
               if len(shape) >= 2 and (cfg.tied_output or name != "token_embd.weight"))


def _add_step_rows(plan: Plan, info: ModelFile, cfg: ModelConfig, n_params: int) -> None:
    """Teacher trunk (logits_fn), then loss_and_grads, then AdamW.step, as reproduce-memory runs
    them (distill.train_step also keeps the teacher's hidden [N, D] through AdamW.step)."""
    B, T, b, L = plan.batch, plan.seq, plan.teacher_backend, cfg.n_layers
    s, N = _sizes(cfg, B, T), B * T
    ND = s["ND"]
    lo = 2 if plan.student.get("precision") == "bf16" else F32
    params = plan.add("student params", F32 * n_params, f"{n_params:,} float32 parameters (one flat buffer)")
    rows = plan.student.get("sparse_embedding_grad", False)
    embd = cfg.vocab_size * cfg.d_model if rows else 0
    grads = plan.add("student grads", F32 * (n_params - embd), "the flat float32 grad buffer" + (
        " without the untied embedding's [V, D]: its grad is the rows the step gathered (RowGrad), [N, D]"
        if rows else ""))
    adam = plan.add("AdamW m and v", 2 * F32 * n_params, "two float32 moments per parameter")
    n_matrix = bf16_copy_elements(cfg)
    low_copy = plan.add("student bf16 weight copy", 2 * n_matrix if lo != F32 else 0,
                        f"bf16: {n_matrix:,} matrix elements x 2 bytes, what the products multiply (an untied "
                        "embedding is gathered from the master, not copied; refreshed from the master before "
                        "each forward); fp32: none")
    base = plan.row(f"teacher resident ({b})").predicted_bytes + params + grads + adam + low_copy
    plan.add("student state", params + grads + adam + low_copy, "params + grads + AdamW m and v (+ the bf16 copy)")

    scratch = teacher_scratch(info, b, N, plan.chunk_tokens, plan.blas_workspace)[1]   # the head's slabs run inside the loss
    name, bufs = _largest(teacher_trunk_stages(info, B, T, b, scratch))
    plan.add("distill: teacher trunk peak", base + sum(bufs.values()),
             f"teacher + student state + teacher {_stage_text(name, bufs)}", measured=True)

    fused = plan.student.get("fused_ops", True)
    cache_bytes, fwd_stages, bwd_stages, stages_of_loss = (
        (block_cache_bytes, block_forward_stages, block_backward_stages, loss_stages) if fused else
        (_reference_block_cache_bytes, lambda c, b, t, lo: _reference_block_forward_stages(c, b, t),
         lambda c, b, t, lo: _reference_block_backward_stages(c, b, t), _reference_loss_stages))
    cache = sum(cache_bytes(cfg, B, T, lo).values())
    plan.add("student activations (checkpointing on)", (L + 1) * ND + cache,
             "each block's input [N, D] + the final norm's input + one block's cache, recomputed in the backward")
    plan.add("student activations (checkpointing off)", L * cache + ND,
             "every block's cache (" + ", ".join(k for k, v in cache_bytes(cfg, B, T, lo).items() if v)
             + ") + the final norm's input")
    head_bytes = lambda n, itemsize=F32: lm_head_bytes(info, b, n, itemsize=itemsize)      # noqa: E731
    loss_name, loss = _largest(stages_of_loss(cfg, N, plan.chunk_tokens, head_bytes, lo, **(
        dict(span=plan.head_span) if fused else {})))
    if not fused and lo != F32:
        loss = dict(loss, low_hidden=N * cfg.d_model * lo)     # the final hidden's bf16 copy, held through the head
    head = "Student._fused_head_backward" if fused else "Student._head_backward"
    loss = plan.add("loss chunk working set", sum(loss.values()),
                    f"{head} over chunks of {plan.chunk_tokens} tokens: {_stage_text(loss_name, loss)}")
    (fwd_name, fwd), (bwd_name, bwd) = (_largest(f(cfg, B, T, lo)) for f in (fwd_stages, bwd_stages))
    fwd, bwd = sum(fwd.values()), sum(bwd.values())
    # fused: the final norm writes h at lo and the head's dh is at lo (float32 after it); reference: float32
    h = N * cfg.d_model * (lo if fused else F32)
    if plan.checkpoint:     # saved: each block's input; then the final norm's input, h and dh; dx in the backward
        moments = {f"block forward ({fwd_name}; earlier inputs, the previous block's cache)":
                   (L - 1) * ND + (cache - ND if L > 1 else 0) + fwd,
                   "LM head + loss (inputs, final norm's input, h, dh)": (L + 1) * ND + 2 * h + loss,
                   f"block recompute ({fwd_name}; inputs, h, dh, dx)": (L + 2) * ND + h + fwd,
                   f"block backward ({bwd_name}; inputs, h, dh, dx, the recomputed cache)": (L + 2) * ND + h + cache + bwd}
    else:
        moments = {f"block forward ({fwd_name}; earlier caches)": (L - 1) * cache + fwd,
                   "LM head + loss (caches, final norm's input, h, dh)": L * cache + ND + 2 * h + loss,
                   f"block backward ({bwd_name}; caches, h, dh, dx)": L * cache + 3 * ND + h + bwd}
    where = max(moments, key=moments.get)
    held = scratch + N * info.config.d_model * F32 + s["rope"]        # + logits_fn's hidden [N, D_teacher]
    fb = plan.add("distill: student forward/backward peak", base + held + moments[where],
                  f"teacher + student state + decode scratch + teacher hidden [N, D] + rope tables + {where}",
                  measured=True)
    # a sparse embedding grad: the gathered rows [N, D] (kept from the backward), and in AdamW their
    # per-id sum and the gathered rows' p, m, v before the update ([U, D] each, U <= N), np.unique's
    # sorted ids and inverse (int64 [N] each)
    row_bytes = 5 * N * cfg.d_model * F32 + 2 * N * 8 if rows else 0
    opt = plan.add("distill: optimizer step peak", base + scratch + row_bytes, "teacher + student state + decode scratch "
                   "(the fused AdamW kernel updates in place" + ("; + the embedding's gathered rows, their per-id "
                   "sums and the rows' p, m, v before the update" if rows else "") + ")", measured=True)
    plan.add("distill step peak", max(plan.row("distill: teacher trunk peak").predicted_bytes, fb, opt),
             "the largest of the three phases above", measured=True)


SPAN_CHOICES = (2048, 1024)    # wider teacher-logit spans step_head_span tries, widest first


def step_head_span(teacher, batch: int, seq: int, student=None, **plan_kw) -> int:
    """Teacher-logit span (tokens) for a GPU distillation step of this student: the widest of
    SPAN_CHOICES whose planned step peak is the default span's (teacher.model.HEAD_SPAN_TOKENS), i.e.
    whose span buffer fits under a peak set elsewhere in the step, else the default.

    A wider span means fewer LM-head passes of the quantized teacher and, with the loss writing its
    gradient over the span's rows (ops/fused_linear_loss.py), fewer read-modify-writes of the student
    head's float32 [V, D] grad: for blocks cut from the 7B (peak in their block backward) the span is
    free up to 2048 tokens; for the 0.5B-layout student the loss is the peak and the default stays
    (docs/perf.md, tenth stop). $Q4KDISTILL_HEAD_SPAN, when set, wins in Teacher.logits_fn anyway."""
    from ..teacher.model import HEAD_SPAN_TOKENS

    plan_kw = dict(plan_kw, gpu=True)
    base = make_plan(teacher, batch, seq, student, head_span_tokens=HEAD_SPAN_TOKENS, **plan_kw)
    peak = base.row("distill step peak").predicted_bytes
    for tokens in SPAN_CHOICES:
        if tokens <= HEAD_SPAN_TOKENS or tokens > batch * seq:
            continue
        plan = make_plan(teacher, batch, seq, student, head_span_tokens=tokens, **plan_kw)
        if plan.row("distill step peak").predicted_bytes <= peak:
            return tokens
    return HEAD_SPAN_TOKENS
